/**
 * What V8 made of our code in one VMM process, from its `--log-ic` logs (one per isolate):
 * the property accesses that went polymorphic (P) or megamorphic (N), with the function and
 * source position of each, and the tiers each of our functions reached (~ interpreter,
 * ^ Sparkplug, + Maglev, * TurboFan). For the lab:
 *
 *   TYPERVISOR_BENCH_NO_SECCOMP=1 \
 *   TYPERVISOR_BENCH_NODE_FLAGS="--log-ic --logfile=/dev/shm/ic/ic-%p.log" \
 *     node dist/bench/lab-net.js --only vsock --runs 1 --vmm typervisor
 *   node dist/bench/ic-sites.js [--match vsock] /dev/shm/ic/isolate-*.log
 *
 * (The logs are per isolate: the main thread's, the device worker's, each vCPU worker's. It ran
 * without seccomp, as the filters might refuse a worker's open of its log; not tried with them.)
 * Only code under dist/src is listed; `--match` keeps the lines whose file or function contains the string.
 */
import { readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';

interface Region {
  start: number;
  end: number;
  name: string;
}

const { values, positionals } = parseArgs({
  options: { match: { type: 'string' } },
  allowPositionals: true,
});
if (positionals.length === 0) {
  process.stderr.write('usage: node dist/bench/ic-sites.js [--match TEXT] LOG...\n');
  process.exit(2);
}
const OURS = /file:\/\/\S*\/dist\/src\//;

for (const path of positionals) {
  const regions: Region[] = [];
  const tiers = new Map<string, Set<string>>();
  const ics: Array<{ kind: string; pc: number; pos: string; to: string; key: string }> = [];
  for (const line of readFileSync(path, 'utf8').split('\n')) {
    const f = line.split(',');
    if (f[0] === 'code-creation' && f.length >= 7) {
      const start = parseInt(f[4]!, 16);
      const size = Number(f[5]);
      const name = f[6]!.trim();
      if (!Number.isFinite(start) || !Number.isFinite(size)) continue;
      regions.push({ start, end: start + size, name });
      if (f[1] === 'JS' && OURS.test(name)) {
        const tier = f[f.length - 1]!.trim() || '~';
        let s = tiers.get(name);
        if (!s) tiers.set(name, (s = new Set()));
        s.add(tier);
      }
    } else if (/IC$/.test(f[0] ?? '') && f.length >= 9) {
      ics.push({
        kind: f[0]!,
        pc: parseInt(f[1]!, 16),
        pos: `${f[3]}:${f[4]}`,
        to: f[6]!,
        key: f[8]!,
      });
    }
  }
  regions.sort((a, b) => a.start - b.start);
  const owner = (pc: number): string => {
    let lo = 0;
    let hi = regions.length - 1;
    let at = -1;
    while (lo <= hi) {
      const mid = (lo + hi) >> 1;
      if (regions[mid]!.start <= pc) {
        at = mid;
        lo = mid + 1;
      } else hi = mid - 1;
    }
    // The region that starts last at or before pc may be a small one inside a larger one.
    for (let i = at; i >= 0 && i > at - 50; i--) if (pc < regions[i]!.end) return regions[i]!.name;
    return '?';
  };
  const short = (s: string) => s.replace(/file:\/\/\S*\/dist\/src\//, '');
  const keep = (s: string) => OURS.test(s) && (!values.match || s.includes(values.match));
  const sites = new Map<string, number>();
  for (const ic of ics) {
    if (ic.to !== 'P' && ic.to !== 'N') continue;
    const fn = owner(ic.pc);
    if (!keep(fn)) continue;
    const k = `${ic.to} ${ic.kind} .${ic.key} in ${short(fn)} at ${ic.pos}`;
    sites.set(k, (sites.get(k) ?? 0) + 1);
  }
  console.log(`== ${path}: ${ics.length} IC transitions`);
  const lines = [...sites].sort(([a], [b]) => a.localeCompare(b));
  console.log(`megamorphic (N) and polymorphic (P) sites in our code: ${lines.length}`);
  for (const [k, n] of lines) console.log(`  ${k}${n > 1 ? ` (${n} transitions)` : ''}`);
  console.log('tiers each of our functions reached:');
  for (const [name, t] of [...tiers].sort(([a], [b]) => short(a).localeCompare(short(b))))
    if (keep(name)) console.log(`  ${[...t].sort().join('')}\t${short(name)}`);
}

/**
 * `npm run fuzz`: runs every target (or --target a,b) for its full case count (or --cases N),
 * seeded (--seed, default: from the clock, printed), within --time seconds per target.
 * Prints per target: cases, seconds, failures, each with the command that replays it.
 * Exit status 1 when any property failed.
 *
 *   npm run fuzz -- --target virtio-blk --seed 1234 --cases 20000
 *   npm run fuzz -- --target virtio-blk --seed 1234 --from 4500 --cases 37   (a replay)
 */
import { hasGc, runTarget, type TargetResult } from './core.js';
import { TARGETS } from './targets/index.js';
import { knownFinding } from './known.js';
import { stopRacer } from './racer.js';

interface Args {
  targets: string[];
  cases?: number;
  seed: number;
  from?: number;
  time?: number;
  list: boolean;
}

function parseArgs(argv: string[]): Args {
  const a: Args = { targets: [], seed: Date.now() % 0x1_0000_0000, list: false };
  for (let i = 0; i < argv.length; i++) {
    const k = argv[i]!;
    const v = () => {
      const x = argv[++i];
      if (x === undefined) throw new Error(`${k} needs a value`);
      return x;
    };
    const num = (x: string) => {
      const n = Number(x);
      if (!Number.isSafeInteger(n) || n < 0) throw new Error(`${k}: not a whole number: ${x}`);
      return n;
    };
    if (k === '--target') a.targets.push(...v().split(','));
    else if (k === '--cases') a.cases = num(v());
    else if (k === '--seed') a.seed = num(v()) >>> 0;
    else if (k === '--from') a.from = num(v());
    else if (k === '--time') a.time = Number(v());
    else if (k === '--list') a.list = true;
    else
      throw new Error(`unknown argument ${k} (--target, --cases, --seed, --from, --time, --list)`);
  }
  return a;
}

async function main(): Promise<number> {
  let args: Args;
  try {
    args = parseArgs(process.argv.slice(2));
  } catch (e) {
    process.stderr.write(`fuzz: ${(e as Error).message}\n`);
    return 2;
  }
  if (args.list) {
    for (const t of TARGETS)
      process.stdout.write(`${t.name.padEnd(16)} ${t.cases} cases  ${t.what}\n`);
    return 0;
  }
  const chosen =
    args.targets.length === 0 ? TARGETS : TARGETS.filter((t) => args.targets.includes(t.name));
  const unknown = args.targets.filter((n) => !TARGETS.some((t) => t.name === n));
  if (unknown.length > 0) {
    process.stderr.write(`fuzz: unknown target ${unknown.join(', ')} (see --list)\n`);
    return 2;
  }
  if (!hasGc()) process.stderr.write('fuzz: no garbage collector to call: heap checks are rough\n');
  process.stdout.write(`fuzz: seed ${args.seed}\n`);
  const results: TargetResult[] = [];
  const t0 = performance.now();
  for (const t of chosen) {
    const r = await runTarget(t, {
      seed: args.seed,
      cases: args.cases ?? t.cases,
      from: args.from,
      timeSec: args.time,
    });
    results.push(r);
    const line =
      `${r.name.padEnd(16)} ${String(r.cases).padStart(8)} cases ${r.seconds.toFixed(1).padStart(7)} s  ` +
      `heap ${r.heapStartMiB.toFixed(0)}->${r.heapMaxMiB.toFixed(0)} MiB  ` +
      `${r.failureCount === 0 ? 'ok' : `${r.failureCount} FAILED`}\n`;
    process.stdout.write(line);
    const st = Object.entries(r.stats);
    if (st.length > 0)
      process.stdout.write(`  exercised: ${st.map(([k, v]) => `${k} ${v}`).join(', ')}\n`);
    for (const f of r.failures) {
      const known = knownFinding(f.message);
      process.stdout.write(
        `  case ${f.case} (${f.count}x this shape)${known ? ` [known ${known.id}]` : ''}: ${f.message}\n`,
      );
      process.stdout.write(
        `    replay: npm run fuzz -- --target ${r.name} --seed ${args.seed} --from ${f.sessionStart} --cases ${f.case - f.sessionStart + 1}\n`,
      );
    }
  }
  await stopRacer();
  const total = results.reduce((a, r) => a + r.cases, 0);
  const failed = results.reduce((a, r) => a + r.failureCount, 0);
  process.stdout.write(
    `fuzz: ${total} cases in ${((performance.now() - t0) / 1000).toFixed(1)} s, ${failed} failures (seed ${args.seed})\n`,
  );
  return failed === 0 ? 0 : 1;
}

main().then(
  (code) => process.exit(code),
  (e) => {
    process.stderr.write(`fuzz: ${(e as Error).stack ?? String(e)}\n`);
    process.exit(2);
  },
);

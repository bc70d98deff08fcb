/**
 * `npm run bench [-- --suite micro|lab|all] [--runs N] [--lab-runs N] [--lab-suites LIST]`:
 * Typervisor vs QEMU microvm (and the C KVM floor on the host). Prints a Markdown table and
 * writes bench/results/latest.md and bench/results/latest.json. See docs/bench.md.
 */
import { spawnSync } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { release } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { detectKvm } from '../src/kvm/detect.js';
import { REPO, type LabHost, type Row, type Stat } from './common.js';
import {
  LAB_SUB_SUITES,
  LAB_SUB_SUITE_NAMES,
  labSuite,
  type LabSubSuiteName,
  type SubSuiteResult,
} from './lab.js';
import { DEFAULT_DENSITY, MAX_DENSITY, densitySuite } from './density.js';
import { daemonSuite } from './daemon.js';
import { microSuite } from './micro.js';
import { netMicroRows, netMicroSkipReason } from './net-micro.js';
import { snapshotHostSuite } from './snapshot-host.js';
import { apiStartRows } from './api-start.js';
import { startupSuite } from './startup.js';
import { vcpusSuite } from './vcpus.js';
import { warmSuite } from './warm.js';

const DEFAULT_LAB_RUNS = LAB_SUB_SUITES.map((d) => `${d.name} ${d.defaultRuns}`).join(', ');
const USAGE = `usage: npm run bench -- [--suite micro|startup|vcpus|density|daemon|warm|snapshot-host|lab|snapshot|all] [--runs N] [--density N] [--lab-runs N] [--lab-suites NAME[:N],...]
  --suite        which suites (default all; micro includes startup); startup: bench/startup.ts
                 alone; snapshot: the lab's snapshot sub-suite alone;
                 vcpus: 1-64 vCPUs, per-vCPU workers vs native runner threads vs QEMU (bench/vcpus.ts)
                 density: N idle micro VMs at once beside N QEMU microvm (bench/density.ts)
  --density N    VMs at once in the density suite (default ${DEFAULT_DENSITY}, at most ${MAX_DENSITY})
                 warm: the library's in-process warm starts vs cold QEMU and the floor (bench/warm.ts)
                 snapshot-host: snapshot create (Full, Diff) and load on the host, tiny guests (bench/snapshot-host.ts)
  --runs N       runs of the micro suite (default 10); if given, also caps each lab sub-suite's default
  --lab-runs N   runs of every lab sub-suite (defaults: ${DEFAULT_LAB_RUNS})
  --lab-suites   lab sub-suites to run, in order, each with an optional run count
                 (${LAB_SUB_SUITE_NAMES.join(', ')}; default all), e.g. --lab-suites boot:5,fio`;

function fmt(x: number): string {
  if (x >= 1000) return x.toFixed(0);
  if (x >= 100) return x.toFixed(1);
  return x.toFixed(2);
}

/** A note as one Markdown list item (error notes quote VMM output). */
const oneLine = (s: string) => s.replace(/\s*\n\s*/g, ' ').trim();

function cell(s: Stat | undefined): string {
  return s ? `${fmt(s.median)} (${fmt(s.min)}–${fmt(s.max)})` : '–';
}

function ratio(a: Stat | undefined, b: Stat | undefined): string {
  return a && b && b.median !== 0 ? `${(a.median / b.median).toFixed(2)}x` : '–';
}

/** A Markdown table with padded columns (as prettier writes it, so results pass its check). */
function table(rows: Row[], withFloor: boolean): string {
  const head = ['metric', 'unit', 'Typervisor', 'QEMU microvm'];
  if (withFloor) head.push('C floor', 'Typervisor/QEMU', 'Typervisor/floor', 'note');
  else head.push('Typervisor/QEMU', 'note');
  const body = rows.map((r) => {
    const cells = [r.metric, `${r.unit}${r.higherIsBetter ? ' ↑' : ''}`];
    cells.push(cell(r.typervisor), cell(r.qemu));
    if (withFloor)
      cells.push(cell(r.floor), ratio(r.typervisor, r.qemu), ratio(r.typervisor, r.floor));
    else cells.push(ratio(r.typervisor, r.qemu));
    return [...cells, r.note ?? ''];
  });
  const width = head.map((h, i) => Math.max(3, h.length, ...body.map((b) => b[i]!.length)));
  const line = (cells: string[]) => `| ${cells.map((c, i) => c.padEnd(width[i]!)).join(' | ')} |`;
  return [line(head), line(width.map((w) => '-'.repeat(w))), ...body.map(line)].join('\n');
}

function hostInfo() {
  const cpuinfo = readFileSync('/proc/cpuinfo', 'utf8');
  const kvm = detectKvm();
  const qemu =
    spawnSync('qemu-system-x86_64', ['--version'], { encoding: 'utf8' }).stdout?.split('\n')[0] ??
    'not found';
  const commit = spawnSync('git', ['rev-parse', '--short', 'HEAD'], {
    cwd: REPO,
    encoding: 'utf8',
  }).stdout?.trim();
  const dirty = spawnSync('git', ['status', '--porcelain', '--', 'src', 'native'], {
    cwd: REPO,
    encoding: 'utf8',
  }).stdout?.trim();
  return {
    cpu: /model name\s*:\s*(.*)/.exec(cpuinfo)?.[1] ?? '?',
    cpus: (cpuinfo.match(/^processor\s*:/gm) ?? []).length,
    kernel: release(),
    kvm: kvm.reason,
    kvmKind: kvm.kind,
    node: process.version,
    qemu,
    commit: commit
      ? `${commit}${dirty ? ' (+ uncommitted changes in src/native)' : ''}`
      : undefined,
  };
}

interface Options {
  suite:
    'micro' | 'startup' | 'vcpus' | 'density' | 'daemon' | 'warm' | 'snapshot-host' | 'lab' | 'all';
  runs: number;
  density: number;
  lab: Array<{ name: LabSubSuiteName; runs: number }>;
}

/** The options, or a message for the usage error. */
function parseOptions(argv: string[]): Options | string {
  let v;
  try {
    v = parseArgs({
      args: argv,
      options: {
        suite: { type: 'string' },
        runs: { type: 'string' },
        'lab-runs': { type: 'string' },
        'lab-suites': { type: 'string' },
        density: { type: 'string' },
      },
    }).values;
  } catch (e) {
    return (e as Error).message;
  }
  const count = (s: string | undefined, what: string): number | string | undefined => {
    if (s === undefined) return undefined;
    const n = Number(s);
    return Number.isInteger(n) && n >= 1 ? n : `${what}: not a positive integer: ${s}`;
  };
  let suite = v.suite ?? 'all';
  if (suite === 'snapshot') {
    // The lab's snapshot sub-suite alone (its run count from --lab-runs or --runs).
    if (v['lab-suites'] !== undefined)
      return '--suite snapshot and --lab-suites cannot be combined';
    suite = 'lab';
    v['lab-suites'] = 'snapshot';
  }
  if (
    suite !== 'micro' &&
    suite !== 'startup' &&
    suite !== 'vcpus' &&
    suite !== 'density' &&
    suite !== 'daemon' &&
    suite !== 'warm' &&
    suite !== 'snapshot-host' &&
    suite !== 'lab' &&
    suite !== 'all'
  )
    return `unknown suite: ${suite}`;
  const runs = count(v.runs, '--runs');
  const labRuns = count(v['lab-runs'], '--lab-runs');
  if (typeof runs === 'string') return runs;
  if (typeof labRuns === 'string') return labRuns;
  const density = count(v.density, '--density') ?? DEFAULT_DENSITY;
  if (typeof density === 'string') return density;
  if (density > MAX_DENSITY) return `--density: at most ${MAX_DENSITY}`;
  const lab: Options['lab'] = [];
  for (const item of (v['lab-suites'] ?? LAB_SUB_SUITE_NAMES.join(',')).split(',')) {
    const [name, n] = item.trim().split(':');
    const def = LAB_SUB_SUITES.find((d) => d.name === name);
    if (!def) return `unknown lab sub-suite: ${name} (have ${LAB_SUB_SUITE_NAMES.join(', ')})`;
    if (lab.some((s) => s.name === def.name)) return `lab sub-suite given twice: ${name}`;
    const own = count(n, `--lab-suites ${name}`);
    if (typeof own === 'string') return own;
    lab.push({
      name: def.name,
      runs: own ?? labRuns ?? Math.min(def.defaultRuns, runs ?? def.defaultRuns),
    });
  }
  return { suite, runs: runs ?? 10, density, lab };
}

function labSection(results: SubSuiteResult[], labHost: LabHost | undefined): string[] {
  const out = ['## Linux in the lab', ''];
  if (labHost)
    out.push(
      `Lab: ${labHost.cpu ?? '?'}, Linux ${labHost.kernel}; KVM: ${labHost.kvmKind} (${labHost.kvm}); ${labHost.qemu}. The lab is TCG-emulated: every figure is slow and noisy; compare the columns, not the absolute values with the host.`,
      '',
    );
  for (const r of results) {
    out.push(`### ${r.name}: ${r.title}`, '');
    if (r.status !== 'skipped') {
      const boots = r.labBootMs.map((ms) => (ms >= 0 ? `${(ms / 1000).toFixed(1)} s` : 'no boot'));
      out.push(
        `${r.runs} run(s), ${r.seconds.toFixed(0)} s, ${r.attempts} lab(s) booted (${boots.join(', ')}); ${r.status}.`,
        '',
      );
    }
    if (r.rows.length) out.push(table(r.rows, false), '');
    if (r.notes.length) out.push(...r.notes.map((n) => `- ${oneLine(n)}`), '');
  }
  return out;
}

async function main() {
  if (process.argv.includes('--help') || process.argv.includes('-h')) {
    process.stdout.write(`${USAGE}\n`);
    return;
  }
  const o = parseOptions(process.argv.slice(2));
  if (typeof o === 'string') {
    process.stderr.write(`bench: ${o}\n${USAGE}\n`);
    process.exit(2);
  }
  const log = (s: string) => process.stderr.write(`bench: ${s}\n`);
  const host = hostInfo();
  const started = Date.now();
  const micro: Row[] = [];
  const startup: Row[] = [];
  const density: Row[] = [];
  const notes: string[] = [];
  const times: string[] = [];
  let lab: SubSuiteResult[] = [];
  let vcpus: string | undefined;
  if (o.suite === 'vcpus' || o.suite === 'all') {
    const runs = Math.min(o.runs, 3);
    log(`vcpus suite, ${runs} runs`);
    const t = Date.now();
    try {
      vcpus = await vcpusSuite({ runs, counts: [1, 8, 32, 64], kvmKind: host.kvmKind, log });
    } catch (e) {
      notes.push(`vcpus suite failed: ${(e as Error).message.split('\n').slice(0, 5).join(' ')}`);
    }
    times.push(`vcpus ${((Date.now() - t) / 1000).toFixed(0)} s`);
  }
  if (o.suite === 'micro' || o.suite === 'all') {
    log(`micro suite, ${o.runs} runs`);
    const t = Date.now();
    try {
      const m = await microSuite({ runs: o.runs, kvmKind: host.kvmKind, log });
      micro.push(...m.rows);
      notes.push(...m.notes);
    } catch (e) {
      notes.push(`micro suite failed: ${(e as Error).message.split('\n').slice(0, 5).join(' ')}`);
      log((e as Error).stack ?? String(e));
    }
    // bench/net-micro.ts: a ping's device path on this host's KVM, beside QEMU's.
    const netSkip = netMicroSkipReason();
    if (netSkip) notes.push(`virtio-net echo rows skipped: ${netSkip}`);
    else
      try {
        micro.push(...(await netMicroRows(o.runs, log)));
      } catch (e) {
        notes.push(`net-micro failed: ${(e as Error).message.split('\n').slice(0, 5).join(' ')}`);
      }
    times.push(`micro ${((Date.now() - t) / 1000).toFixed(0)} s`);
  }
  if (o.suite === 'micro' || o.suite === 'startup' || o.suite === 'all') {
    log(`startup suite, ${o.runs} runs`);
    const t = Date.now();
    try {
      const m = await startupSuite({ runs: o.runs, kvmKind: host.kvmKind, log });
      startup.push(...m.rows);
      notes.push(...m.notes);
    } catch (e) {
      notes.push(`startup suite failed: ${(e as Error).message.split('\n').slice(0, 5).join(' ')}`);
      log((e as Error).stack ?? String(e));
    }
    try {
      // bench/api-start.ts: exec -> the first GET / answered, beside a bare Node floor.
      startup.push(...(await apiStartRows(o.runs, log)));
    } catch (e) {
      notes.push(`api-start failed: ${(e as Error).message.split('\n').slice(0, 5).join(' ')}`);
    }
    times.push(`startup ${((Date.now() - t) / 1000).toFixed(0)} s`);
  }
  if (o.suite === 'density' || o.suite === 'all') {
    // A batch of N VMs takes tens of seconds per VMM: 3 rounds at most.
    const runs = Math.min(o.runs, 3);
    log(`density suite, ${o.density} VMs, ${runs} runs`);
    const t = Date.now();
    try {
      const m = await densitySuite({ runs, n: o.density, kvmKind: host.kvmKind, log });
      density.push(...m.rows);
      notes.push(...m.notes);
    } catch (e) {
      notes.push(`density suite failed: ${(e as Error).message.split('\n').slice(0, 5).join(' ')}`);
      log((e as Error).stack ?? String(e));
    }
    times.push(`density ${((Date.now() - t) / 1000).toFixed(0)} s`);
  }
  if (o.suite === 'daemon' || o.suite === 'all') {
    // bench/daemon.ts: typervisor serve's warm pool (both modes) beside QEMU's cold start.
    const t = Date.now();
    try {
      const m = await daemonSuite({ runs: o.runs, kvmKind: host.kvmKind, log });
      startup.push(...m.rows);
      notes.push(...m.notes);
    } catch (e) {
      notes.push(`daemon suite failed: ${(e as Error).message.split('\n').slice(0, 5).join(' ')}`);
    }
    times.push(`daemon ${((Date.now() - t) / 1000).toFixed(0)} s`);
  }
  const warm: Row[] = [];
  if (o.suite === 'warm' || o.suite === 'all') {
    const runs = Math.min(o.runs, 5);
    log(`warm suite, ${runs} runs`);
    const t = Date.now();
    try {
      const m = await warmSuite({ runs, kvmKind: host.kvmKind, log });
      warm.push(...m.rows);
      notes.push(...m.notes);
    } catch (e) {
      notes.push(`warm suite failed: ${(e as Error).message.split('\n').slice(0, 5).join(' ')}`);
    }
    times.push(`warm ${((Date.now() - t) / 1000).toFixed(0)} s`);
  }
  const snapHost: Row[] = [];
  let snapHostTable: string | undefined;
  if (o.suite === 'snapshot-host' || o.suite === 'all') {
    const runs = Math.min(o.runs, 5);
    log(`snapshot-host suite, ${runs} runs`);
    const t = Date.now();
    try {
      const m = await snapshotHostSuite({ runs, log });
      snapHost.push(...m.rows);
      snapHostTable = m.table;
      notes.push(...m.notes);
    } catch (e) {
      notes.push(
        `snapshot-host suite failed: ${(e as Error).message.split('\n').slice(0, 5).join(' ')}`,
      );
    }
    times.push(`snapshot-host ${((Date.now() - t) / 1000).toFixed(0)} s`);
  }
  if (o.suite === 'lab' || o.suite === 'all') {
    lab = await labSuite({ suites: o.lab, log });
    const chosen = o.lab.map((s) => `${s.name} ${s.runs}`).join(', ');
    notes.push(
      `Lab runs per sub-suite: ${chosen} (defaults: ${DEFAULT_LAB_RUNS}; --lab-runs N or --lab-suites NAME:N change them). Each sub-suite boots a lab of its own and is run once more if that lab dies, times out or prints no result.`,
    );
    for (const r of lab)
      times.push(
        `lab ${r.name} ${r.status === 'skipped' ? 'skipped' : `${r.seconds.toFixed(0)} s`}`,
      );
  }
  const totalS = (Date.now() - started) / 1000;
  times.push(`total ${totalS.toFixed(0)} s`);
  notes.push(`Time: ${times.join(', ')}.`);
  const labHost = lab.find((r) => r.labHost)?.labHost;
  const md = [
    '# Typervisor benchmark',
    '',
    `${new Date().toISOString()}, ${totalS.toFixed(0)} s. Cells: median (min–max) over the runs; ↑: higher is better, otherwise lower is. See docs/bench.md.`,
    '',
    `- host: ${host.cpu}, ${host.cpus} CPUs, Linux ${host.kernel}; KVM: ${host.kvmKind} (${host.kvm})`,
    `- ${host.qemu}; Node.js ${host.node}${host.commit ? `; Typervisor ${host.commit}` : ''}`,
    '',
    ...(micro.length
      ? [
          "## Micro: VMM overhead on the host's KVM",
          '',
          `${o.runs} runs.`,
          '',
          table(micro, true),
          '',
        ]
      : []),
    ...(startup.length
      ? [
          '## Start-up and memory: a cold VMM process (issue 18)',
          '',
          `${o.runs} runs.`,
          '',
          table(startup, false),
          '',
        ]
      : []),
    ...(density.length
      ? [
          `## Density: ${o.density} idle micro VMs at once (issue 18)`,
          '',
          `${Math.min(o.runs, 3)} runs.`,
          '',
          table(density, false),
          '',
        ]
      : []),
    ...(warm.length
      ? [
          '## Warm: the library, VMs started in a running process (issue 19)',
          '',
          table(warm, true),
          '',
        ]
      : []),
    ...(snapHostTable
      ? [
          "## Snapshots on the host's KVM: tiny guests, Typervisor alone (issue 13)",
          '',
          `${Math.min(o.runs, 5)} runs, medians (min–max).`,
          '',
          snapHostTable,
          '',
        ]
      : []),
    ...(vcpus
      ? ['## vCPU threads: per-vCPU workers vs native runner threads vs QEMU', '', vcpus]
      : []),
    ...(lab.length ? labSection(lab, labHost) : []),
    '## Notes',
    '',
    ...notes.map((n) => `- ${oneLine(n)}`),
    '',
  ].join('\n');
  const dir = join(REPO, 'bench', 'results');
  mkdirSync(dir, { recursive: true });
  writeFileSync(join(dir, 'latest.md'), md);
  writeFileSync(
    join(dir, 'latest.json'),
    JSON.stringify(
      {
        date: new Date().toISOString(),
        seconds: totalS,
        runs: o.runs,
        labRuns:
          o.suite === 'micro' ||
          o.suite === 'startup' ||
          o.suite === 'vcpus' ||
          o.suite === 'density' ||
          o.suite === 'warm' ||
          o.suite === 'snapshot-host'
            ? undefined
            : Object.fromEntries(o.lab.map((s) => [s.name, s.runs])),
        suite: o.suite,
        host,
        lab: labHost,
        labSuites: lab,
        rows: [
          ...micro,
          ...startup,
          ...density,
          ...warm,
          ...snapHost,
          ...lab.flatMap((r) => r.rows),
        ],
        notes,
      },
      null,
      2,
    ).replace(
      /\[\n\s+([-\d.e+]+(?:,\n\s+[-\d.e+]+)*)\n\s+\]/g,
      (_, xs: string) =>
        // Short arrays of numbers on one line, as prettier writes them.
        `[${xs.split(/,\s+/).join(', ')}]`,
    ) + '\n',
  );
  process.stdout.write(md);
  log(`done in ${totalS.toFixed(0)} s (${times.join(', ')})`);
}

main().catch((e) => {
  process.stderr.write(`bench: ${(e as Error).stack ?? e}\n`);
  process.exit(1);
});

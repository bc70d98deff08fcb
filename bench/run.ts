/**
 * `npm run bench [-- --suite micro|lab|all] [--runs N] [--lab-runs N]`: Typervisor vs QEMU
 * microvm (and the C KVM floor on the host). Prints a Markdown table and writes
 * bench/results/latest.md and bench/results/latest.json. See docs/bench.md.
 */
import { spawnSync } from 'node:child_process';
import { mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { release } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { detectKvm } from '../src/kvm/detect.js';
import { REPO, type Row, type Stat } from './common.js';
import { labSuite, type LabSuiteResult } from './lab.js';
import { microSuite } from './micro.js';

const USAGE =
  'usage: npm run bench -- [--suite micro|lab|all] [--runs N (default 10)] [--lab-runs N (default 3)]';

function fmt(x: number): string {
  if (x >= 1000) return x.toFixed(0);
  if (x >= 100) return x.toFixed(1);
  if (x >= 10) return x.toFixed(2);
  return x.toFixed(2);
}

function cell(s: Stat | undefined): string {
  return s ? `${fmt(s.median)} (${fmt(s.min)}–${fmt(s.max)})` : '–';
}

function ratio(a: Stat | undefined, b: Stat | undefined): string {
  return a && b && b.median !== 0 ? `${(a.median / b.median).toFixed(2)}x` : '–';
}

function table(rows: Row[], withFloor: boolean): string {
  const head = withFloor
    ? '| metric | unit | Typervisor | QEMU microvm | C floor | Typervisor/QEMU | Typervisor/floor | note |\n|---|---|---|---|---|---|---|---|'
    : '| metric | unit | Typervisor | QEMU microvm | Typervisor/QEMU | note |\n|---|---|---|---|---|---|';
  const lines = rows.map((r) =>
    withFloor
      ? `| ${r.metric} | ${r.unit} | ${cell(r.typervisor)} | ${cell(r.qemu)} | ${cell(r.floor)} | ${ratio(r.typervisor, r.qemu)} | ${ratio(r.typervisor, r.floor)} | ${r.note ?? ''} |`
      : `| ${r.metric} | ${r.unit} | ${cell(r.typervisor)} | ${cell(r.qemu)} | ${ratio(r.typervisor, r.qemu)} | ${r.note ?? ''} |`,
  );
  return [head, ...lines].join('\n');
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

async function main() {
  let v;
  try {
    v = parseArgs({
      options: {
        suite: { type: 'string' },
        runs: { type: 'string' },
        'lab-runs': { type: 'string' },
        help: { type: 'boolean' },
      },
    }).values;
  } catch (e) {
    process.stderr.write(`${(e as Error).message}\n${USAGE}\n`);
    process.exit(2);
  }
  if (v.help) {
    process.stdout.write(`${USAGE}\n`);
    return;
  }
  const suite = v.suite ?? 'all';
  const runs = Number(v.runs ?? 10);
  const labRuns = Number(v['lab-runs'] ?? (v.runs !== undefined ? Math.min(runs, 3) : 3));
  if (!['micro', 'lab', 'all'].includes(suite) || !(runs >= 1) || !(labRuns >= 1)) {
    process.stderr.write(`${USAGE}\n`);
    process.exit(2);
  }
  const log = (s: string) => process.stderr.write(`bench: ${s}\n`);
  const host = hostInfo();
  const started = Date.now();
  const rows: Row[] = [];
  const notes: string[] = [];
  let lab: LabSuiteResult | undefined;
  if (suite === 'micro' || suite === 'all') {
    log(`micro suite, ${runs} runs`);
    const m = await microSuite({ runs, kvmKind: host.kvmKind, log });
    rows.push(...m.rows);
    notes.push(...m.notes);
  }
  if (suite === 'lab' || suite === 'all') {
    log(`lab suite, ${labRuns} runs (boots the lab once)`);
    try {
      lab = await labSuite({ runs: labRuns, log });
      rows.push(...lab.rows);
      notes.push(...lab.notes);
      for (const e of lab.errors) notes.push(`lab run failed: ${e}`);
    } catch (e) {
      notes.push(`lab suite failed: ${(e as Error).message.split('\n').slice(0, 5).join(' ')}`);
      log((e as Error).message);
    }
  }
  const totalS = (Date.now() - started) / 1000;
  const micro = rows.filter((r) => r.suite === 'micro');
  const labRows = rows.filter((r) => r.suite === 'lab');
  const md = [
    '# Typervisor benchmark',
    '',
    `${new Date().toISOString()}, ${totalS.toFixed(0)} s. Cells: median (min–max) over the runs. See docs/bench.md.`,
    '',
    `- host: ${host.cpu}, ${host.cpus} CPUs, Linux ${host.kernel}; KVM: ${host.kvmKind} (${host.kvm})`,
    `- ${host.qemu}; Node.js ${host.node}${host.commit ? `; Typervisor ${host.commit}` : ''}`,
    ...(lab?.labHost
      ? [
          `- lab: ${lab.labHost.cpu}, Linux ${lab.labHost.kernel}; KVM: ${lab.labHost.kvmKind} (${lab.labHost.kvm}); ${lab.labHost.qemu}; lab boot ${lab.labBootMs} ms`,
        ]
      : []),
    '',
    ...(micro.length
      ? [
          "## Micro: VMM overhead on the host's KVM",
          '',
          `${runs} runs.`,
          '',
          table(micro, true),
          '',
        ]
      : []),
    ...(labRows.length ? ['## Linux in the lab', '', table(labRows, false), ''] : []),
    '## Notes',
    '',
    ...notes.map((n) => `- ${n}`),
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
        runs,
        labRuns,
        suite,
        host,
        lab: lab?.labHost,
        rows,
        notes,
      },
      null,
      2,
    ) + '\n',
  );
  process.stdout.write(md);
}

main().catch((e) => {
  process.stderr.write(`bench: ${(e as Error).stack ?? e}\n`);
  process.exit(1);
});

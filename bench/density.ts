/**
 * The density suite (issue 18): N idle micro VMs at once, Typervisor (bin/typervisor exec'd, as
 * a user runs it) beside N QEMU microvm processes running the same guest (the IDLE mode of
 * bench/guests/micro.S: "M\n" on COM1, then HLT forever with interrupts off, so that no VM uses
 * a CPU while it is measured). Per round, for each VMM in turn (the order rotating every round):
 *  - the host's MemAvailable (/proc/meminfo) before the first VM starts;
 *  - start N VMs (at most START_CONCURRENCY starting at a time: the host has 2 cores), each
 *    until its marker;
 *  - SETTLE_MS later: every VM's RSS, PSS and USS from /proc/PID/smaps_rollup (USS =
 *    Private_Clean + Private_Dirty: what that VM alone costs), and MemAvailable again;
 *  - every VM is killed (SIGKILL) and reaped before the next batch: also when a start fails, and
 *    when this process is interrupted (an 'exit' hook kills what is left).
 * `node dist/bench/density.js [--density N] [--runs R]` prints Markdown and writes
 * bench/results/density.md; `npm run bench -- --suite density [--density N]` puts the rows in
 * the benchmark's table.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { detectKvm } from '../src/kvm/detect.js';
import {
  REPO,
  TYPERVISOR,
  isMainModule,
  qemuCpu,
  stat,
  trainBundleCaches,
  type Row,
  type Stat,
} from './common.js';

const MEM_MIB = 64;
export const DEFAULT_DENSITY = 50;
/** More would not fit comfortably in the 24 GiB host's memory with QEMU's and ours. */
export const MAX_DENSITY = 200;
/** VMs starting at once (the host has 2 cores; more only makes every start slower). */
const START_CONCURRENCY = 4;
/** After the last marker, before sampling: the VMMs' start-up garbage settles. */
const SETTLE_MS = 1000;
const START_TIMEOUT_MS = 60_000;

export type Name = 'typervisor' | 'qemu';
const NAMES: Name[] = ['typervisor', 'qemu'];

export function command(name: Name, elf: string, kvmKind: string): [string, string[]] {
  if (name === 'typervisor')
    return [TYPERVISOR, ['run', '--kernel', elf, '--memory', String(MEM_MIB)]];
  return [
    'qemu-system-x86_64',
    [
      ...['-M', 'microvm', '-enable-kvm', '-cpu', qemuCpu(kvmKind), '-m', String(MEM_MIB)],
      ...['-nodefaults', '-no-user-config', '-display', 'none', '-serial', 'stdio'],
      ...['-device', 'i8042', '-no-reboot', '-kernel', elf],
    ],
  ];
}

/** The host's MemAvailable, KiB. */
export function memAvailableKiB(): number {
  const m = /^MemAvailable:\s+(\d+) kB/m.exec(readFileSync('/proc/meminfo', 'utf8'));
  if (!m) throw new Error('no MemAvailable in /proc/meminfo');
  return Number(m[1]);
}

/** smaps_rollup of a process, KiB (USS = Private_Clean + Private_Dirty). */
export function rollupKiB(pid: number): { rss: number; pss: number; uss: number } {
  const t = readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8');
  const f = (k: string) => {
    const m = new RegExp(`^${k}:\\s+(\\d+) kB`, 'm').exec(t);
    if (!m) throw new Error(`no ${k} in /proc/${pid}/smaps_rollup`);
    return Number(m[1]);
  };
  return { rss: f('Rss'), pss: f('Pss'), uss: f('Private_Clean') + f('Private_Dirty') };
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Every VMM process this module started and has not reaped yet. */
const live = new Set<ChildProcess>();
let exitHook = false;
function track(c: ChildProcess): void {
  if (!exitHook) {
    exitHook = true;
    // An interrupted or crashing benchmark leaves no VM behind.
    process.on('exit', () => {
      for (const p of live) p.kill('SIGKILL');
    });
  }
  live.add(c);
  c.once('exit', () => live.delete(c));
}

/** Starts one VM and resolves once its marker is on stdout. */
function startOne(name: Name, cmd: string, args: string[]): Promise<ChildProcess> {
  const c = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  track(c);
  let stderr = '';
  c.stderr!.on('data', (b: Buffer) => (stderr = (stderr + b.toString()).slice(-2000)));
  return new Promise((resolve, reject) => {
    const t = setTimeout(
      () => reject(new Error(`${name}: no marker within ${START_TIMEOUT_MS} ms\n${stderr}`)),
      START_TIMEOUT_MS,
    );
    c.stdout!.once('data', () => {
      clearTimeout(t);
      c.stdout!.resume(); // keep reading: a full pipe would block the guest's console
      resolve(c);
    });
    c.once('exit', (code, sig) => {
      clearTimeout(t);
      reject(new Error(`${name}: exited (${code ?? sig}) before its marker\n${stderr}`));
    });
    c.once('error', (e) => {
      clearTimeout(t);
      reject(e);
    });
  });
}

/** VMM processes started here and not reaped yet (0 after every batch, failed or not). */
export function liveVmms(): number {
  return live.size;
}

/** SIGKILLs every live VMM and waits until each is reaped. */
async function killAll(): Promise<void> {
  const waits = [...live].map(
    (c) =>
      new Promise<void>((r) => {
        if (c.exitCode !== null || c.signalCode !== null) return r();
        c.once('exit', () => r());
        c.kill('SIGKILL');
      }),
  );
  await Promise.all(waits);
}

export interface BatchSample {
  /** Per VM, KiB: medians over the batch. */
  rss: number;
  pss: number;
  uss: number;
  /** Sums over the batch, KiB. */
  pssSum: number;
  ussSum: number;
  /** MemAvailable before - after, KiB (what the batch took from the host). */
  hostKiB: number;
  /** First spawn -> last marker, ms. */
  startAllMs: number;
}

/** One batch of `n` VMs of one VMM: started, measured, killed (whatever happens). */
export async function batch(
  name: Name,
  n: number,
  elf: string,
  kvmKind: string,
): Promise<BatchSample> {
  const [cmd, args] = command(name, elf, kvmKind);
  await sleep(200); // what the previous batch freed is back
  const before = memAvailableKiB();
  try {
    const t0 = performance.now();
    const children: ChildProcess[] = [];
    let next = 0;
    let failed: unknown;
    // On the first failure no further VM starts; the ones starting finish (or fail) first, so
    // that the cleanup below sees every process.
    await Promise.all(
      Array.from({ length: Math.min(START_CONCURRENCY, n) }, async () => {
        while (next < n && failed === undefined) {
          next++;
          try {
            children.push(await startOne(name, cmd, args));
          } catch (e) {
            failed ??= e;
          }
        }
      }),
    );
    if (failed !== undefined) throw failed;
    const startAllMs = performance.now() - t0;
    await sleep(SETTLE_MS);
    const mems = children.map((c) => rollupKiB(c.pid!));
    const after = memAvailableKiB();
    const med = (k: 'rss' | 'pss' | 'uss') => stat(mems.map((m) => m[k]))!.median;
    const sum = (k: 'pss' | 'uss') => mems.reduce((s, m) => s + m[k], 0);
    return {
      rss: med('rss'),
      pss: med('pss'),
      uss: med('uss'),
      pssSum: sum('pss'),
      ussSum: sum('uss'),
      hostKiB: before - after,
      startAllMs,
    };
  } finally {
    await killAll();
  }
}

export interface DensityOptions {
  runs: number;
  /** VMs at once per VMM. */
  n: number;
  kvmKind: string;
  log: (s: string) => void;
}

export async function densitySuite(o: DensityOptions): Promise<{ rows: Row[]; notes: string[] }> {
  if (!Number.isInteger(o.n) || o.n < 1 || o.n > MAX_DENSITY)
    throw new Error(`density: N must be a whole number from 1 to ${MAX_DENSITY} (got ${o.n})`);
  const caches = trainBundleCaches();
  const dir = mkdtempSync(join(tmpdir(), 'typervisor-bench-density-'));
  try {
    const b = spawnSync('sh', [join(REPO, 'bench', 'guests', 'build.sh'), dir, '1000'], {
      encoding: 'utf8',
    });
    if (b.status !== 0) throw new Error(`bench/guests/build.sh failed: ${b.stderr}`);
    const elf = join(dir, 'idle.elf');
    const samples: Record<string, Record<Name, number[]>> = {};
    const add = (k: string, name: Name, v: number) =>
      ((samples[k] ??= { typervisor: [], qemu: [] })[name] ??= []).push(v);
    for (let r = 0; r < o.runs; r++) {
      const order = NAMES.map((_, i) => NAMES[(i + r) % NAMES.length]!);
      for (const name of order) {
        const s = await batch(name, o.n, elf, o.kvmKind);
        add('rss', name, s.rss / 1024);
        add('pss', name, s.pss / 1024);
        add('uss', name, s.uss / 1024);
        add('pssSum', name, s.pssSum / 1024);
        add('ussSum', name, s.ussSum / 1024);
        add('host', name, s.hostKiB / 1024);
        add('hostPer', name, s.hostKiB / 1024 / o.n);
        add('start', name, s.startAllMs);
        o.log(
          `density: round ${r + 1}/${o.runs}, ${o.n} x ${name}: USS ${(s.uss / 1024).toFixed(1)} MiB/VM, host ${(s.hostKiB / 1024).toFixed(0)} MiB`,
        );
      }
    }
    const row = (metric: string, key: string, unit: string, note?: string): Row => ({
      suite: 'micro',
      metric,
      unit,
      note,
      typervisor: stat(samples[key]?.typervisor ?? []),
      qemu: stat(samples[key]?.qemu ?? []),
    });
    return {
      rows: [
        row(`${o.n} idle VMs: RSS per VM (median)`, 'rss', 'MiB', 'shared pages counted in full'),
        row(`${o.n} idle VMs: PSS per VM (median)`, 'pss', 'MiB', 'shared pages split'),
        row(`${o.n} idle VMs: USS per VM (median)`, 'uss', 'MiB', 'Private_Clean + Private_Dirty'),
        row(`${o.n} idle VMs: PSS, all VMs`, 'pssSum', 'MiB'),
        row(`${o.n} idle VMs: USS, all VMs`, 'ussSum', 'MiB'),
        row(`${o.n} idle VMs: host MemAvailable drop`, 'host', 'MiB', 'kernel memory included'),
        row(`${o.n} idle VMs: host MemAvailable drop per VM`, 'hostPer', 'MiB'),
        row(
          `${o.n} idle VMs: first spawn → last marker`,
          'start',
          'ms',
          `${START_CONCURRENCY} starting at a time`,
        ),
      ],
      notes: [
        `density rows: bench/density.ts, ${o.n} idle micro VMs at once (bench/guests/micro.S MODE_IDLE: HLT with interrupts off, ${MEM_MIB} MiB, 1 vCPU) per VMM, ${o.runs} interleaved round(s); smaps_rollup of each VMM process ${SETTLE_MS} ms after the last marker; MemAvailable from /proc/meminfo before the first start and then. Other work on the host moves MemAvailable: the per-process figures are the firmer ones.`,
        caches,
      ],
    };
  } finally {
    await killAll();
    rmSync(dir, { recursive: true, force: true });
  }
}

function cell(s: Stat | undefined): string {
  return s ? `${s.median.toFixed(1)} (${s.min.toFixed(1)}–${s.max.toFixed(1)})` : '–';
}

async function main() {
  const { values } = parseArgs({
    options: { runs: { type: 'string' }, density: { type: 'string' } },
  });
  const runs = Number(values.runs ?? 1);
  const n = Number(values.density ?? DEFAULT_DENSITY);
  if (!Number.isInteger(runs) || runs < 1)
    throw new Error('usage: density.js [--density N] [--runs R]');
  const { rows, notes } = await densitySuite({
    runs,
    n,
    kvmKind: detectKvm().kind,
    log: (s) => process.stderr.write(`${s}\n`),
  });
  const ratio = (r: Row) =>
    r.typervisor && r.qemu && r.qemu.median !== 0
      ? `${(r.typervisor.median / r.qemu.median).toFixed(2)}x`
      : '–';
  const md = [
    `# Density: ${n} idle micro VMs, Typervisor vs QEMU microvm`,
    '',
    `${new Date().toISOString()}, ${runs} round(s). Cells: median (min–max) over the rounds.`,
    '',
    '| metric | unit | Typervisor | QEMU microvm | Typervisor/QEMU | note |',
    '|---|---|---|---|---|---|',
    ...rows.map(
      (r) =>
        `| ${r.metric} | ${r.unit} | ${cell(r.typervisor)} | ${cell(r.qemu)} | ${ratio(r)} | ${r.note ?? ''} |`,
    ),
    '',
    ...notes.map((x) => `- ${x}`),
    '',
  ].join('\n');
  process.stdout.write(md);
  mkdirSync(join(REPO, 'bench', 'results'), { recursive: true });
  writeFileSync(join(REPO, 'bench', 'results', 'density.md'), md);
}

if (isMainModule(import.meta.url))
  await main().catch(async (e) => {
    await killAll();
    process.stderr.write(`density: ${(e as Error).stack ?? e}\n`);
    process.exit(1);
  });

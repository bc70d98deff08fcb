/**
 * Snapshots on this host's KVM with the tiny guests of test/guests (32 MiB, 1 vCPU), Typervisor
 * alone (the lab's snapshot sub-suite, bench/snapshot.ts, is the comparison with QEMU on a Debian
 * guest). In `npm run bench` as `--suite snapshot-host` (and in `all`); also a tool to measure a
 * change to the snapshot paths, interleaved against another checkout:
 *
 *   node dist/bench/snapshot-host.js [--runs N] [--settle MS] [--run-ms MS] [--compare /other/checkout]
 *
 * (after `node scripts/bundle.mjs` in each checkout, as `npm run bench` does: without a fresh
 * bundle the launcher runs dist/ itself, whose start-up is slower, so spawn -> output would
 * compare the two start-ups, not the snapshot paths).
 *
 * Per round and build (the order alternating each round), fresh processes started with the
 * launcher (bin/typervisor) as a user would:
 * The counting guests are built with a short COUNT_SPIN (a line every ~1-2 ms here, instead of
 * every ~85 ms), so that a restored guest's next line comes at once.
 *   - create: API mode, `machine-config` with track_dirty_pages, countmem.elf (it counts in guest
 *     RAM) booted and printing; paused: PUT /snapshot/create Full; resumed for `--run-ms` ms,
 *     paused again: PUT /snapshot/create Diff. For each create:
 *       call            the request's round trip, seen by this client
 *       created in      createSnapshot()'s own figure, from its log line
 *       memory file     bytes allocated on disk (st_blocks; the file is sparse: untouched RAM,
 *                       and for a Diff every page not written since the Full, are holes)
 *       dirty pages     from its log line (pages written since the last snapshot or the boot)
 *   - load: a Full snapshot of count.elf (made once, at the start); API mode: spawn
 *     `--api-sock S --level Debug`, wait for the socket, then `--settle` ms (the prewarmed
 *     vCPU and device workers' time; 0 = at once), then PUT /snapshot/load with resume_vm:
 *       load call       the request's round trip, seen by this client
 *       loaded in       loadSnapshot()'s own figure, from its log line (what Firecracker's
 *                       `load_snapshot` latency metric measures)
 *       load → output   the request sent to the first byte the restored guest prints (the
 *                       guest often prints before the client has the answer)
 *       start → output  spawn to that byte
 *     and `run --restore`: spawn to the restored guest's first byte.
 * The first round's load timeline (loadSnapshot's debug line) is kept per build. Medians.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, statSync } from 'node:fs';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { apiCall } from '../src/cli/snapshot.js';
import { REPO, isMainModule, stat, type Row } from './common.js';

const MEM_MIB = 32;
const OUTPUT_TIMEOUT_MS = 20_000;
/** `pause` iterations between the counting guests' lines (test/guests/tiny.S). */
const COUNT_SPIN = 0x400;

async function call(sock: string, method: string, path: string, body: unknown): Promise<void> {
  const r = await apiCall(sock, method, path, body, 20_000);
  if (r.status >= 300) throw new Error(`${method} ${path}: ${r.status} ${r.fault ?? ''}`);
}

function canConnect(sock: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect(sock);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

async function waitForSocket(sock: string, p: Proc): Promise<void> {
  const deadline = performance.now() + OUTPUT_TIMEOUT_MS;
  while (!(existsSync(sock) && (await canConnect(sock)))) {
    if (p.child.exitCode !== null || performance.now() > deadline)
      throw new Error(`no API socket: ${p.err().slice(-400)}`);
    await sleep(1);
  }
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

interface Proc {
  child: ChildProcess;
  /** The process's stderr (its log) so far. */
  err: () => string;
  stdoutBytes: () => number;
  /** Resolves at the first stdout byte (the guest's console) after `from` bytes. */
  outputAfter(from: number): Promise<number>;
  kill(): Promise<void>;
}

function start(cli: string, args: string[]): Proc {
  const child = spawn(cli, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let bytes = 0;
  let err = '';
  const waiters: Array<{ from: number; resolve: (t: number) => void }> = [];
  child.stdout!.on('data', (b: Buffer) => {
    bytes += b.length;
    const now = performance.now();
    for (const w of waiters.splice(0)) {
      if (bytes > w.from) w.resolve(now);
      else waiters.push(w);
    }
  });
  child.stderr!.setEncoding('utf8').on('data', (s: string) => (err += s));
  const exited = new Promise<void>((r) => child.on('exit', () => r()));
  return {
    child,
    err: () => err,
    stdoutBytes: () => bytes,
    outputAfter: (from) =>
      new Promise((resolve, reject) => {
        if (bytes > from) return resolve(performance.now());
        waiters.push({ from, resolve });
        setTimeout(
          () => reject(new Error(`no guest output in 20 s: ${err.slice(-400)}`)),
          OUTPUT_TIMEOUT_MS,
        ).unref();
      }),
    async kill() {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
      await exited;
    },
  };
}

/** Boots `guest` in API mode and waits until it has printed 200 bytes. */
async function bootApi(cli: string, sock: string, guest: string, trackDirty: boolean) {
  // Info: createSnapshot's log lines (its time, the dirty pages).
  const p = start(cli, ['--api-sock', sock, '--level', 'Info']);
  try {
    await waitForSocket(sock, p);
    await call(sock, 'PUT', '/machine-config', {
      vcpu_count: 1,
      mem_size_mib: MEM_MIB,
      ...(trackDirty ? { track_dirty_pages: true } : {}),
    });
    await call(sock, 'PUT', '/boot-source', { kernel_image_path: guest });
    await call(sock, 'PUT', '/actions', { action_type: 'InstanceStart' });
    await p.outputAfter(200);
    return p;
  } catch (e) {
    await p.kill();
    throw e;
  }
}

const pause = (sock: string) => call(sock, 'PATCH', '/vm', { state: 'Paused' });
const resume = (sock: string) => call(sock, 'PATCH', '/vm', { state: 'Resumed' });

/** A Full snapshot of count.elf, for the load samples. */
async function makeLoadSnapshot(
  cli: string,
  guest: string,
  dir: string,
): Promise<[string, string]> {
  const sock = join(dir, 'a.sock');
  const p = await bootApi(cli, sock, guest, false);
  try {
    await sleep(100);
    await pause(sock);
    const state = join(dir, 'vm.snap');
    const mem = join(dir, 'vm.mem');
    await call(sock, 'PUT', '/snapshot/create', { snapshot_path: state, mem_file_path: mem });
    return [state, mem];
  } finally {
    await p.kill();
  }
}

interface CreateFigures {
  call: number;
  createdIn: number;
  memAllocatedKiB: number;
  memApparentMiB: number;
  stateBytes: number;
  dirtyPages: number;
}

interface Sample {
  full: CreateFigures;
  diff: CreateFigures;
  loadCall: number;
  loadedIn: number;
  loadToOutput: number;
  startToOutput: number;
  restoreToOutput: number;
  timeline: string;
}

/** One create through the API, with what its log line and its files say. */
async function timedCreate(
  p: Proc,
  sock: string,
  type: 'Full' | 'Diff',
  state: string,
  mem: string,
): Promise<CreateFigures> {
  const logFrom = p.err().length;
  const t0 = performance.now();
  await call(sock, 'PUT', '/snapshot/create', {
    snapshot_type: type,
    snapshot_path: state,
    mem_file_path: mem,
  });
  const t1 = performance.now();
  // Its log lines are written before the answer; give the pipe a moment.
  await sleep(20);
  const text = p.err().slice(logFrom);
  const st = statSync(mem);
  return {
    call: t1 - t0,
    createdIn: Number(/created in ([\d.]+) ms/.exec(text)?.[1] ?? NaN),
    memAllocatedKiB: (st.blocks * 512) / 1024,
    memApparentMiB: st.size / (1024 * 1024),
    stateBytes: statSync(state).size,
    dirtyPages: Number(/(\d+) pages dirty since the last one/.exec(text)?.[1] ?? NaN),
  };
}

async function sampleCreate(
  cli: string,
  dir: string,
  guest: string,
  runMs: number,
): Promise<{ full: CreateFigures; diff: CreateFigures }> {
  const tag = process.hrtime.bigint();
  const sock = join(dir, `c-${tag}.sock`);
  const files = (t: string) => [join(dir, `${t}-${tag}.snap`), join(dir, `${t}-${tag}.mem`)];
  const p = await bootApi(cli, sock, guest, true);
  try {
    await sleep(100);
    await pause(sock);
    const [fs, fm] = files('full');
    const full = await timedCreate(p, sock, 'Full', fs!, fm!);
    await resume(sock);
    await sleep(runMs);
    await pause(sock);
    const [ds, dm] = files('diff');
    const diff = await timedCreate(p, sock, 'Diff', ds!, dm!);
    for (const f of [fs, fm, ds, dm]) rmSync(f!, { force: true });
    return { full, diff };
  } finally {
    await p.kill();
  }
}

async function sampleLoad(
  cli: string,
  dir: string,
  state: string,
  mem: string,
  settleMs: number,
): Promise<Omit<Sample, 'full' | 'diff'>> {
  const sock = join(dir, `b-${process.hrtime.bigint()}.sock`);
  const t0 = performance.now();
  const p = start(cli, ['--api-sock', sock, '--level', 'Debug']);
  let s: Omit<Sample, 'full' | 'diff' | 'restoreToOutput'>;
  try {
    await waitForSocket(sock, p);
    if (settleMs > 0) await sleep(settleMs);
    const first = p.outputAfter(p.stdoutBytes());
    const t1 = performance.now();
    await call(sock, 'PUT', '/snapshot/load', {
      snapshot_path: state,
      mem_backend: { backend_type: 'File', backend_path: mem },
      resume_vm: true,
    });
    const t2 = performance.now();
    const t3 = await first;
    await sleep(50);
    const text = p.err();
    s = {
      loadCall: t2 - t1,
      loadedIn: Number(/loaded in ([\d.]+) ms/.exec(text)?.[1] ?? NaN),
      loadToOutput: t3 - t1,
      startToOutput: t3 - t0,
      timeline: /load timeline \(ms\): (.*)/.exec(text)?.[1] ?? '',
    };
  } finally {
    await p.kill();
  }
  const t4 = performance.now();
  const r = start(cli, ['run', '--restore', state, '--mem-file', mem]);
  try {
    const t5 = await r.outputAfter(0);
    return { ...s, restoreToOutput: t5 - t4 };
  } finally {
    await r.kill();
  }
}

type Metric = [label: string, unit: string, get: (s: Sample) => number];
const METRICS: Metric[] = [
  ['create Full: the call (client round trip)', 'ms', (s) => s.full.call],
  ['create Full: createSnapshot() (its log line)', 'ms', (s) => s.full.createdIn],
  ['create Full: memory file allocated', 'KiB', (s) => s.full.memAllocatedKiB],
  ['create Full: pages dirty since the boot', 'pages', (s) => s.full.dirtyPages],
  ['create Diff: the call (client round trip)', 'ms', (s) => s.diff.call],
  ['create Diff: createSnapshot() (its log line)', 'ms', (s) => s.diff.createdIn],
  ['create Diff: memory file allocated', 'KiB', (s) => s.diff.memAllocatedKiB],
  ['create Diff: pages dirty since the Full (written)', 'pages', (s) => s.diff.dirtyPages],
  ['state file', 'bytes', (s) => s.full.stateBytes],
  ['load: the call (client round trip)', 'ms', (s) => s.loadCall],
  ['load: loadSnapshot() (its log line)', 'ms', (s) => s.loadedIn],
  ['load requested → guest output', 'ms', (s) => s.loadToOutput],
  ['API mode: spawn → socket → load → guest output', 'ms', (s) => s.startToOutput],
  ['`run --restore`: spawn → guest output', 'ms', (s) => s.restoreToOutput],
];

export interface SnapshotHostOptions {
  runs: number;
  /** ms between the API socket coming up and the load call (default 200). */
  settleMs?: number;
  /** ms the VM runs between the Full and the Diff (default 200). */
  runMs?: number;
  /** Other builds to interleave with this one: [name, path to its bin/typervisor]. */
  compare?: Array<[string, string]>;
  log: (s: string) => void;
}

export interface SnapshotHostResult {
  /** This build's figures as bench rows (Typervisor's column). */
  rows: Row[];
  notes: string[];
  /** A Markdown table with a column per build. */
  table: string;
  /** The first round's load timeline per build. */
  timelines: Array<[string, string]>;
}

export async function snapshotHostSuite(o: SnapshotHostOptions): Promise<SnapshotHostResult> {
  const settle = o.settleMs ?? 200;
  const runMs = o.runMs ?? 200;
  const self = o.compare?.length ? 'this' : 'Typervisor';
  const builds: Array<[string, string]> = [
    [self, join(REPO, 'bin', 'typervisor')],
    ...(o.compare ?? []),
  ];
  const dir = mkdtempSync(join(tmpdir(), 'typervisor-snaphost-'));
  try {
    // COUNT_SPIN: a line every ~1-2 ms instead of every ~85 ms (the default spin on this PVM
    // host), so that "load -> output" is the VMM's time, not the guest's wait for its next line.
    const g = spawnSync('sh', [join(REPO, 'test', 'guests', 'build.sh'), dir], {
      encoding: 'utf8',
      env: { ...process.env, EXTRA_CFLAGS: `-DCOUNT_SPIN=${COUNT_SPIN}` },
    });
    if (g.status !== 0) throw new Error(`cannot build the tiny guests: ${g.stderr}`);
    const [state, mem] = await makeLoadSnapshot(builds[0]![1], join(dir, 'count.elf'), dir);
    const samples = new Map<string, Sample[]>(builds.map(([n]) => [n, []]));
    for (let i = 0; i < o.runs; i++) {
      const order = i % 2 === 0 ? builds : [...builds].reverse();
      for (const [name, cli] of order) {
        const c = await sampleCreate(cli, dir, join(dir, 'countmem.elf'), runMs);
        const l = await sampleLoad(cli, dir, state, mem, settle);
        const s: Sample = { ...c, ...l };
        samples.get(name)!.push(s);
        o.log(
          `${name} ${i}: Full ${s.full.call.toFixed(1)} ms ${s.full.memAllocatedKiB} KiB, Diff ${s.diff.call.toFixed(1)} ms ${s.diff.memAllocatedKiB} KiB (${s.diff.dirtyPages} pages); load call ${s.loadCall.toFixed(1)}, loaded in ${s.loadedIn}, load->out ${s.loadToOutput.toFixed(1)}, start->out ${s.startToOutput.toFixed(1)}, run --restore ${s.restoreToOutput.toFixed(1)} ms`,
        );
      }
    }
    const fmt = (v: number) => (v >= 100 || Number.isInteger(v) ? v.toFixed(0) : v.toFixed(1));
    const lines = [
      `| metric | ${builds.map(([n]) => n).join(' | ')} |`,
      `|---|${builds.map(() => '---').join('|')}|`,
    ];
    for (const [label, unit, get] of METRICS) {
      const cells = builds.map(([n]) => {
        const st = stat(samples.get(n)!.map(get));
        return st ? `${fmt(st.median)} (${fmt(st.min)}–${fmt(st.max)})` : 'n/a';
      });
      lines.push(`| ${label}, ${unit} | ${cells.join(' | ')} |`);
    }
    const mine = samples.get(self)!;
    const apparent = mine[0]?.full.memApparentMiB ?? MEM_MIB;
    const rows: Row[] = METRICS.map(([label, unit, get]) => {
      const st = stat(mine.map(get));
      return {
        suite: 'micro',
        metric: `Snapshot (host): ${label}`,
        unit,
        ...(st ? { typervisor: st } : {}),
      };
    });
    const notes = [
      `Snapshot (host) suite: ${o.runs} rounds; tiny guests, ${MEM_MIB} MiB, 1 vCPU, Typervisor only (no QEMU column: the lab's snapshot sub-suite compares). Create: countmem.elf with track_dirty_pages, Full, then ${runMs} ms of running, then Diff; both memory files are ${apparent} MiB long and sparse (allocated bytes are what was written). Load: a Full of count.elf, ${settle} ms after the API socket is up, resume_vm. Both guests are built with COUNT_SPIN=${COUNT_SPIN} (a line every ~1-2 ms), so load -> output is not the guest's wait for its next line.`,
    ];
    return {
      rows,
      notes,
      table: lines.join('\n'),
      timelines: builds.map(([n]) => [n, samples.get(n)![0]?.timeline ?? '']),
    };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

if (isMainModule(import.meta.url)) {
  const { values: v } = parseArgs({
    options: {
      runs: { type: 'string', default: '10' },
      settle: { type: 'string', default: '200' },
      'run-ms': { type: 'string', default: '200' },
      compare: { type: 'string' },
    },
  });
  const num = (s: string, what: string) => {
    const n = Number(s);
    if (!Number.isInteger(n) || n < 0) {
      process.stderr.write(`snapshot-host: ${what} is not a whole number: ${s}\n`);
      process.exit(2);
    }
    return n;
  };
  const runs = Math.max(1, num(v.runs, '--runs'));
  const r = await snapshotHostSuite({
    runs,
    settleMs: num(v.settle, '--settle'),
    runMs: num(v['run-ms'], '--run-ms'),
    ...(v.compare ? { compare: [['compare', join(v.compare, 'bin', 'typervisor')]] } : {}),
    log: (s) => process.stderr.write(`snapshot-host: ${s}\n`),
  });
  console.log(
    `snapshot on this host, tiny guests ${MEM_MIB} MiB, ${runs} interleaved rounds; median (min–max)`,
  );
  console.log(r.table);
  for (const n of r.notes) console.log(n);
  for (const [n, t] of r.timelines) console.log(`load timeline (${n}, round 0): ${t}`);
}

/**
 * Helpers for the hostile-guest tests (issue 12; they need /dev/kvm, gcc and ld): build the
 * hostile tiny guests (test/guests/hostile-build.sh) once per process, boot one with the
 * Firecracker-style entry (`--api-sock` + `--config-file`, so the API is up while the guest
 * misbehaves), and measure the VMM from outside: VmRSS and CPU time from /proc, whether the
 * API answers, how long a stop takes.
 *
 * Every VM is killed (SIGKILL) by a hard timer and by `kill()`, which the tests call in
 * `finally`: no test can leave a VMM behind or hang the suite.
 */
import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { appendFileSync, existsSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { call } from '../api/client.js';
import { CLI, REPO, TIME_SCALE, kvmSkipReason, tempDir } from './helpers.js';

/** VMMs still running: SIGKILLed if this process exits first (a test timed out, a crash). */
const live = new Set<ChildProcess>();
process.on('exit', () => {
  for (const c of live) c.kill('SIGKILL');
});

let guestDir: string | undefined;
let guestSkip: string | undefined;

/** Why the hostile guests cannot run here, or undefined. */
export function hostileSkipReason(): string | undefined {
  if (guestDir) return undefined;
  if (guestSkip) return guestSkip;
  for (const tool of ['gcc', 'ld']) {
    if (spawnSync('sh', ['-c', `command -v ${tool}`]).status !== 0) {
      guestSkip = `${tool} is not installed: cannot build test/guests/hostile-guests.S`;
      return guestSkip;
    }
  }
  guestSkip = kvmSkipReason();
  if (guestSkip) return guestSkip;
  const dir = tempDir('typervisor-hostile-');
  // The guests' own poll limits scale with TIME_SCALE (hostile-guests.S).
  const r = spawnSync('sh', [join(REPO, 'test', 'guests', 'hostile-build.sh'), dir], {
    encoding: 'utf8',
    env: { ...process.env, EXTRA_CFLAGS: `-DTIME_SCALE=${TIME_SCALE}` },
  });
  if (r.status !== 0)
    throw new Error(`test/guests/hostile-build.sh failed (${r.status}): ${r.stderr}`);
  guestDir = dir;
  return undefined;
}

/** hostile-vsock, hostile-blk, hostile-storm, hostile-net (hostile-build.sh). */
export function hostileGuest(name: string): string {
  const skip = hostileSkipReason();
  if (skip) throw new Error(skip);
  return join(guestDir!, `${name}.elf`);
}

export interface VmOptions {
  kernel: string;
  /** Guest RAM in MiB (the guests use the first 4 MiB). */
  memMib?: number;
  drives?: Array<{ id: string; path: string; readOnly?: boolean; ioEngine?: 'Sync' | 'Async' }>;
  rng?: boolean;
  tap?: string;
  /**
   * A vsock device; its Unix socket is `uds` in the VM's temp dir (the unix backend), or the
   * host kernel's vhost-vsock (`backend: 'vhost'`, no socket).
   */
  vsock?: { cid: number; backend?: 'vhost' };
  /** SIGKILL after this long whatever happens (default 60 s times TIME_SCALE). */
  hardTimeoutMs?: number;
}

export interface HostileVm {
  child: ChildProcess;
  pid: number;
  dir: string;
  sock: string;
  metricsPath: string;
  stdout(): string;
  stderr(): string;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  /** True once the process has exited. */
  gone(): boolean;
  /** Resolves when stdout matches, rejects after ms (or if the VMM exits first). */
  waitFor(re: RegExp, ms: number): Promise<void>;
  /** Sends `signal`; resolves with the ms until the process exited, or undefined after limitMs. */
  stop(signal: NodeJS.Signals, limitMs: number): Promise<number | undefined>;
  /** SIGKILL if still running; resolves when it has exited. */
  kill(): Promise<void>;
}

/** Boots `opts.kernel` with `typervisor --api-sock S --config-file C --metrics-path M`. */
export async function startVm(opts: VmOptions): Promise<HostileVm> {
  const dir = tempDir('typervisor-hostile-vm-');
  const sock = join(dir, 'api.sock');
  const metricsPath = join(dir, 'metrics.ndjson');
  const config: Record<string, unknown> = {
    'boot-source': { kernel_image_path: opts.kernel },
    'machine-config': { vcpu_count: 1, mem_size_mib: opts.memMib ?? 64 },
    drives: (opts.drives ?? []).map((d) => ({
      drive_id: d.id,
      path_on_host: d.path,
      is_root_device: false,
      is_read_only: d.readOnly ?? true,
      ...(d.ioEngine ? { io_engine: d.ioEngine } : {}),
    })),
  };
  if (opts.rng) config.entropy = {};
  if (opts.tap) config['network-interfaces'] = [{ iface_id: 'eth0', host_dev_name: opts.tap }];
  if (opts.vsock)
    config.vsock =
      opts.vsock.backend === 'vhost'
        ? { guest_cid: opts.vsock.cid, backend: 'vhost' }
        : { guest_cid: opts.vsock.cid, uds_path: join(dir, 'uds') };
  const cfg = join(dir, 'vm.json');
  writeFileSync(cfg, JSON.stringify(config));
  const child = spawn(
    process.execPath,
    [CLI, '--api-sock', sock, '--config-file', cfg, '--metrics-path', metricsPath],
    {
      cwd: dir,
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, TYPERVISOR_LOG: undefined, TYPERVISOR_LOG_FORMAT: undefined },
    },
  );
  live.add(child);
  let out = '';
  let err = '';
  const waiters = new Set<() => void>();
  child.stdout!.setEncoding('utf8').on('data', (s: string) => {
    out += s;
    for (const w of waiters) w();
  });
  child.stderr!.setEncoding('utf8').on('data', (s: string) => (err += s));
  let done = false;
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((r) =>
    child.on('exit', (code, signal) => {
      done = true;
      live.delete(child);
      clearTimeout(hard);
      for (const w of waiters) w();
      r({ code, signal });
    }),
  );
  const hard = setTimeout(() => child.kill('SIGKILL'), opts.hardTimeoutMs ?? 60_000 * TIME_SCALE);
  const vm: HostileVm = {
    child,
    pid: child.pid!,
    dir,
    sock,
    metricsPath,
    stdout: () => out,
    stderr: () => err,
    exited,
    gone: () => done,
    waitFor(re, ms) {
      return new Promise<void>((resolve, reject) => {
        const check = () => {
          if (re.test(out)) finish();
          else if (done) finish(new Error(`the VMM exited before ${re} (stderr: ${err})`));
        };
        const timer = setTimeout(
          () =>
            finish(
              new Error(
                `no ${re} on the console in ${ms} ms: ${JSON.stringify(out.slice(-200))} (stderr: ${err.slice(-500)})`,
              ),
            ),
          ms,
        );
        const finish = (e?: Error) => {
          clearTimeout(timer);
          waiters.delete(check);
          if (e) reject(e);
          else resolve();
        };
        waiters.add(check);
        check();
      });
    },
    async stop(signal, limitMs) {
      if (done) return 0;
      const t0 = performance.now();
      child.kill(signal);
      const r = await Promise.race([
        exited.then(() => performance.now() - t0),
        new Promise<undefined>((res) => setTimeout(() => res(undefined), limitMs)),
      ]);
      return r;
    },
    async kill() {
      if (!done) child.kill('SIGKILL');
      await exited;
    },
  };
  return vm;
}

/** Waits (bounded) until the API socket accepts a GET /. */
export async function apiUp(vm: HostileVm, ms = 10_000): Promise<void> {
  const end = Date.now() + ms;
  for (;;) {
    if (existsSync(vm.sock)) {
      try {
        if ((await call(vm.sock, 'GET', '/', undefined, 1000)).status === 200) return;
      } catch {
        // not listening yet
      }
    }
    if (vm.gone()) throw new Error(`the VMM exited before its API came up: ${vm.stderr()}`);
    if (Date.now() > end) throw new Error(`API not up after ${ms} ms: ${vm.stderr()}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** One GET / with a short timeout: { ms, state } or { error }. */
export async function apiProbe(
  vm: HostileVm,
  timeoutMs = 2000,
): Promise<{ ms: number; state?: string; error?: string }> {
  const t0 = performance.now();
  try {
    const r = await call(vm.sock, 'GET', '/', undefined, timeoutMs);
    return { ms: performance.now() - t0, state: r.json?.state as string | undefined };
  } catch (e) {
    return { ms: performance.now() - t0, error: (e as Error).message };
  }
}

/** VmRSS of `pid` in KiB (0 once it is gone). */
export function rssKiB(pid: number): number {
  try {
    const m = /VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
    return m ? Number(m[1]) : 0;
  } catch {
    return 0;
  }
}

/** Clock ticks per second of /proc/<pid>/stat (USER_HZ: 100 on every Linux we run on). */
const HZ = 100;

/** utime + stime of /proc/PID/stat (or of one of its threads), in seconds. */
function cpuOf(statPath: string): number {
  try {
    const s = readFileSync(statPath, 'utf8');
    const f = s.slice(s.lastIndexOf(')') + 2).split(' ');
    return (Number(f[11]) + Number(f[12])) / HZ; // fields 14 and 15 of stat
  } catch {
    return 0;
  }
}

export const processCpuSeconds = (pid: number): number => cpuOf(`/proc/${pid}/stat`);

/** The name (comm) of thread `tid` of `pid` ("main" for the main thread), or "gone". */
function threadName(pid: number, tid: number): string {
  if (tid === pid) return 'main';
  try {
    return readFileSync(`/proc/${pid}/task/${tid}/comm`, 'utf8').trim();
  } catch {
    return 'gone';
  }
}

/** CPU seconds of each thread of `pid`, by thread id. */
export function threadCpuSeconds(pid: number): Map<number, number> {
  const m = new Map<number, number>();
  try {
    for (const t of readdirSync(`/proc/${pid}/task`))
      m.set(Number(t), cpuOf(`/proc/${pid}/task/${t}/stat`));
  } catch {
    // gone
  }
  return m;
}

export interface Window {
  /** Wall time of the window, ms. */
  ms: number;
  rssStartKiB: number;
  rssPeakKiB: number;
  rssEndKiB: number;
  /** CPU of the whole VMM over the window, % of one core. */
  cpuPercent: number;
  /** CPU of its busiest thread over the window, % of one core. */
  busiestThreadPercent: number;
  /**
   * CPU of each thread over the window, ms, by thread name: "main", our workers tv-<role>,
   * Node's and V8's helpers "node" (threads of one name summed); only names that used some.
   */
  threadsMs: Record<string, number>;
  /**
   * CPU of the whole VMM in each `sliceMs` of the window (the last one at least half as long),
   * % of one core, oldest first; empty without `sliceMs`.
   */
  slicePercents: number[];
  /** GET / during the window: each probe's latency, and any that failed. */
  api: Array<{ ms: number; state?: string; error?: string }>;
  /**
   * PUT /actions FlushMetrics once, at the end of the window: it asks the device worker for its
   * counters, so it shows whether the data plane still answers the control plane (recorded,
   * not asserted: "ms" or "failed: why").
   */
  flush: string;
}

/**
 * Samples the VMM for `ms`: VmRSS every 100 ms, CPU at both ends (and every `sliceMs`, when
 * given), and a GET / on the API every `apiEveryMs` (in sequence: one in flight at a time);
 * then one FlushMetrics.
 */
export async function measure(
  vm: HostileVm,
  ms: number,
  /** Called as the window closes, before the FlushMetrics (to read the console then). */
  atEnd?: () => void,
  apiEveryMs = 700,
  sliceMs?: number,
): Promise<Window> {
  const t0 = performance.now();
  const cpu0 = processCpuSeconds(vm.pid);
  const th0 = threadCpuSeconds(vm.pid);
  const rssStart = rssKiB(vm.pid);
  let peak = rssStart;
  const sampler = setInterval(() => (peak = Math.max(peak, rssKiB(vm.pid))), 100);
  const slicePercents: number[] = [];
  let sliceAt = t0;
  let sliceCpu = cpu0;
  /** Ends the slice begun at sliceAt, at `now`, and begins the next. */
  const endSlice = (now: number) => {
    const c = processCpuSeconds(vm.pid);
    slicePercents.push(((c - sliceCpu) / ((now - sliceAt) / 1000)) * 100);
    sliceAt = now;
    sliceCpu = c;
  };
  const slicer =
    sliceMs === undefined ? undefined : setInterval(() => endSlice(performance.now()), sliceMs);
  const api: Window['api'] = [];
  try {
    while (performance.now() - t0 < ms && !vm.gone()) {
      const left = ms - (performance.now() - t0);
      const next = Math.min(apiEveryMs, left);
      await new Promise((r) => setTimeout(r, next));
      if (performance.now() - t0 < ms - 50 && !vm.gone()) api.push(await apiProbe(vm));
    }
  } finally {
    clearInterval(sampler);
    clearInterval(slicer);
  }
  const wall = performance.now() - t0;
  // The window's last slice, which its own end may have cut short, when at least half of one.
  if (sliceMs !== undefined && t0 + wall - sliceAt >= sliceMs / 2) endSlice(t0 + wall);
  atEnd?.();
  const cpu1 = processCpuSeconds(vm.pid);
  const th1 = threadCpuSeconds(vm.pid);
  let busiest = 0;
  const threadsMs: Record<string, number> = {};
  for (const [tid, s] of th1) {
    const d = s - (th0.get(tid) ?? 0);
    busiest = Math.max(busiest, d);
    if (d <= 0) continue;
    const name = threadName(vm.pid, tid);
    threadsMs[name] = Math.round((threadsMs[name] ?? 0) + d * 1000);
  }
  const rssEnd = rssKiB(vm.pid);
  let flush: string;
  const f0 = performance.now();
  try {
    const r = await call(vm.sock, 'PUT', '/actions', { action_type: 'FlushMetrics' }, 5000);
    flush =
      r.status === 204
        ? `${Math.round(performance.now() - f0)} ms`
        : `failed: ${r.status} ${r.body}`;
  } catch (e) {
    flush = `failed: ${(e as Error).message}`;
  }
  return {
    ms: wall,
    rssStartKiB: rssStart,
    rssPeakKiB: Math.max(peak, rssEnd),
    rssEndKiB: rssEnd,
    cpuPercent: ((cpu1 - cpu0) / (wall / 1000)) * 100,
    busiestThreadPercent: (busiest / (wall / 1000)) * 100,
    threadsMs,
    slicePercents,
    api,
    flush,
  };
}

/** The last metrics line the VMM wrote (at exit it holds everything since the previous one). */
export function metricsLines(vm: HostileVm): Array<Record<string, Record<string, number>>> {
  try {
    return readFileSync(vm.metricsPath, 'utf8')
      .trim()
      .split('\n')
      .filter((l) => l.length > 0)
      .map((l) => JSON.parse(l) as Record<string, Record<string, number>>);
  } catch {
    return [];
  }
}

/** Sum of metrics[group][key] over every line written. */
export function metricSum(vm: HostileVm, group: string, key: string): number {
  return metricsLines(vm).reduce((a, l) => a + (l[group]?.[key] ?? 0), 0);
}

/**
 * The figures of one hostile run: a test diagnostic line, and a JSON line appended to
 * $TYPERVISOR_HOSTILE_FIGURES when set (for the before/after table).
 */
export function report(
  t: { diagnostic(m: string): void },
  name: string,
  figures: Record<string, unknown>,
): void {
  const line = JSON.stringify({ test: name, ...figures });
  t.diagnostic(line);
  const file = process.env.TYPERVISOR_HOSTILE_FIGURES;
  if (file) appendFileSync(file, line + '\n');
}

/** How long a storm runs while the test watches it. */
export const STORM_MS = 4000 * TIME_SCALE;
/** The VMM's RSS may grow this much while the test watches (the guests touch < 5 MiB of RAM). */
export const RSS_GROWTH_MIB = 64;
/** SIGTERM must end the VMM within this. */
export const STOP_MS = 5000;

export const mib = (kib: number): number => Math.round((kib / 1024) * 10) / 10;

type Exit = Awaited<HostileVm['exited']> | undefined;

/** The figures every hostile window reports: memory, CPU, API answers, the stop. */
export function windowFigures(w: Window, stopMs: number | undefined, ex: Exit) {
  return {
    rssStartMiB: mib(w.rssStartKiB),
    rssPeakMiB: mib(w.rssPeakKiB),
    rssGrowthMiB: mib(w.rssPeakKiB - w.rssStartKiB),
    cpuPercent: Math.round(w.cpuPercent),
    busiestThreadPercent: Math.round(w.busiestThreadPercent),
    threadsMs: w.threadsMs,
    apiMs: w.api.map((a) => (a.error ? 'failed' : Math.round(a.ms))),
    flushMetrics: w.flush,
    stopMs: stopMs === undefined ? `> ${STOP_MS}` : Math.round(stopMs),
    exit: ex ? (ex.signal ?? ex.code) : 'still running',
  };
}

/**
 * What every hostile window must show: the API answered "Running" throughout, the VMM's RSS
 * grew at most RSS_GROWTH_MIB, and SIGTERM ended it (exit 0) within STOP_MS.
 */
export function assertAnsweredBoundedStopped(
  w: Window,
  stopMs: number | undefined,
  ex: Exit,
  vm: HostileVm,
  during: string,
): void {
  assert.ok(w.api.length > 0, 'no API probe ran');
  for (const a of w.api) {
    assert.equal(a.error, undefined, `GET / during ${during}: ${a.error}`);
    assert.equal(a.state, 'Running');
  }
  assert.ok(
    w.rssPeakKiB - w.rssStartKiB <= RSS_GROWTH_MIB * 1024,
    `VmRSS grew by ${mib(w.rssPeakKiB - w.rssStartKiB)} MiB over ${during} (bound ${RSS_GROWTH_MIB} MiB)`,
  );
  assert.notEqual(stopMs, undefined, `SIGTERM did not end the VMM within ${STOP_MS} ms`);
  assert.equal(ex?.code, 0, `exit after SIGTERM: ${JSON.stringify(ex)}: ${vm.stderr()}`);
}

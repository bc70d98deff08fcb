/**
 * VmHost: VMM capacity kept warm in this process, and the VMs made from it.
 *
 * What stays warm between VMs (the start-up work issue 18 measured):
 *  - vCPU workers: a Node worker per vCPU takes ~40-100 ms to start and load its modules. The
 *    host keeps `warmVcpuWorkers` started and idle, and a worker whose VM has ended comes back
 *    for the next one (vcpu-worker.ts `reuse`): its kick handler, /dev/kvm descriptor and
 *    seccomp filter are set up once per thread.
 *  - the device worker (VMs with virtio devices): one is started ahead of each such VM.
 *  - the VM's teardown: closing a VM's descriptors makes the kernel destroy it (~10-15 ms);
 *    a closer thread does that (vmm/fd-closer.ts), at most `maxPendingReleases` VMs behind:
 *    createVm waits beyond that (counted in stats().releaseWaits).
 *  - the modules: loaded once in this process.
 * VMs with NATIVE_FROM_VCPUS vCPUs or more run on native runner threads (vcpu-mode.ts): they
 * take fresh workers, as the CLI does.
 */
import { closeSync, openSync } from 'node:fs';
import { isMainThread, type Worker } from 'node:worker_threads';
import {
  buildVm,
  checkHostCanRun,
  configFromResources,
  consolePipe,
  GuestRamPool,
  NATIVE_FROM_VCPUS,
  startFdCloser,
  validateResources,
  type BuildOptions,
  type BuiltVm,
  type FdCloser,
  type VcpuWorkerSource,
  type VmResources,
  type VmSpec,
} from '../vmm/index.js';
import {
  prewarmDeviceWorker,
  spawnVcpuWorker,
  type VcpuWorkerCollect,
  type VcpuWorkerMessage,
} from '../vmm/vcpu-pool.js';
import { configureSeccomp, installProcessFilter } from '../sandbox/seccomp/install.js';
import { fail, ok, toVmError, VmError, type Result } from './errors.js';
import { Vm } from './vm.js';
import { monoMs } from '../util/clock.js';

/** Bounds of the host's options (a bad value is INVALID_CONFIG from createVmHost). */
export const MAX_WARM_VCPU_WORKERS = 64;
export const MAX_PENDING_RELEASES = 64;

export interface VmHostOptions {
  /** Idle vCPU workers kept started and ready (default 1; 0-64). */
  warmVcpuWorkers?: number;
  /** A worker handed back while this many are idle ends instead (default 16; >= warmVcpuWorkers). */
  maxIdleVcpuWorkers?: number;
  /** Ended VMs whose descriptors may wait to be closed before createVm waits (default 4; 1-64). */
  maxPendingReleases?: number;
  /**
   * Threads that close ended VMs' descriptors (default 4; 1-16). The kernel's destruction of a
   * VM is mostly waiting (~10-30 ms here), so closes in parallel raise the sequential VM rate:
   * measured 85 VMs/s with 1, 125 with 2, 170 with 4 (micro guest, loaded 2-core host). Each is a
   * Node worker (~8 MiB).
   */
  closerThreads?: number;
  /**
   * Guest RAMs kept for the next VM of the same size after their VM ends (default 8; 0-256):
   * emptied (every page freed, the next guest reads zeros), they hold no memory while idle.
   */
  maxIdleRam?: number;
  /** Start a device worker ahead of each VM with virtio devices (default true). */
  warmDeviceWorker?: boolean;
  /**
   * Seccomp in an embedding process (docs/library.md):
   *  - `threads` (default): the threads the library starts install their role's filter, as the
   *    CLI's do (vCPU workers: the vcpu role; the device worker: the device role; the closer:
   *    the vcpu role). Your own threads, the main thread among them, get none.
   *  - `process`: also the main role's filter on every thread of the process (TSYNC), as
   *    `typervisor run` does: any system call outside that list kills the whole process, yours
   *    included. Only for a process that does nothing but run VMs.
   *  - `off`: no filters at all (process-wide: applies to workers started afterwards).
   */
  seccomp?: 'threads' | 'process' | 'off';
}

export interface CreateVmOptions {
  /**
   * The guest's serial console: `pipe` (default): `vm.console` streams; `none`: discarded
   * (counted); `{ fd }`: written to a descriptor of yours (a file, pipe or socket; it is not
   * closed, and `vm.console` is undefined).
   */
  console?: 'pipe' | 'none' | { fd: number };
  /** Start the guest at once (default false: `created`, call `vm.start()`). */
  start?: boolean;
  /** Run a stock Linux kernel on a PVM-only host anyway (as `run --allow-pvm`). */
  allowPvm?: boolean;
}

export interface VmHostStats {
  /** Idle, started vCPU workers. */
  idleVcpuWorkers: number;
  /** vCPU workers running a VM's vCPU now. */
  busyVcpuWorkers: number;
  /** vCPU workers this host has started in all (a reused one counts once). */
  vcpuWorkersStarted: number;
  vmsCreated: number;
  /** VMs created and not yet stopped. */
  vmsLive: number;
  /** Ended VMs whose descriptors are still being closed. */
  pendingReleases: number;
  /** Times createVm waited because maxPendingReleases VMs were still being closed. */
  releaseWaits: number;
  /** Guest RAMs kept idle now, and VMs that got kept RAM instead of new. */
  idleRam: number;
  ramReused: number;
}

/**
 * @internal What a VM built outside createVm takes from its host (VmHost.createVmWith): the
 * host's warm parts as buildVm / loadSnapshot options.
 */
export interface WarmParts {
  /**
   * buildVm options for a VM of `vcpus` vCPUs: the console (as createVm's `console` option), the
   * closer, kept guest RAM, and the warm vCPU workers when the vCPUs run on workers (below
   * NATIVE_FROM_VCPUS).
   */
  build(vcpus: number): BuildOptions;
  /**
   * loadSnapshot options: the console, the closer, and the warm vCPU workers if the restored
   * VM's vCPUs run on workers (chosen by its vCPU count). No kept RAM: a restored VM's RAM is a
   * mapping of its memory file.
   */
  load(): BuildOptions;
}

/** How long collectGarbage waits for the idle workers' answers. */
const COLLECT_TIMEOUT_MS = 1000;

/** The warm vCPU workers: handed to VMs (take), handed back after them (give). */
class WarmWorkers implements VcpuWorkerSource {
  private idle: Worker[] = [];
  private readonly busy = new Set<Worker>();
  private readonly ready = new WeakSet<Worker>();
  private readyWaiters: Array<() => void> = [];
  started = 0;
  closed = false;
  private refillQueued = false;

  constructor(
    private readonly warm: number,
    private readonly maxIdle: number,
  ) {}

  get idleCount(): number {
    return this.idle.length;
  }
  get busyCount(): number {
    return this.busy.size;
  }

  private spawn(): Worker {
    const w = spawnVcpuWorker();
    this.started++;
    const onReady = (m: { type?: string }) => {
      if (m?.type !== 'ready') return;
      w.off('message', onReady);
      this.ready.add(w);
      this.wakeReady();
    };
    w.on('message', onReady);
    // An idle worker's failure must not reach the embedder as an uncaught 'error'; a busy
    // worker's is its VM's (vmm.ts listens too).
    w.on('error', () => undefined);
    w.once('exit', () => {
      this.idle = this.idle.filter((x) => x !== w);
      this.busy.delete(w);
      this.wakeReady();
    });
    // After the listeners: adding a 'message' listener refs a worker again (Node's MessagePort
    // does), and an idle worker that is referenced keeps the embedder's process from exiting.
    w.unref();
    return w;
  }

  /**
   * The most recently handed back ready workers first: each worker is an isolate of its own,
   * so the one that ran the last VM has the most optimized code and the warmest caches (a
   * VM on a worker's first few runs reached its marker ~3 ms later, docs/daemon.md). Workers
   * still loading their modules come last.
   */
  take(n: number): Worker[] {
    const order = this.idle.slice().reverse();
    order.sort((a, b) => Number(this.ready.has(b)) - Number(this.ready.has(a)));
    const ws = order.slice(0, n);
    this.idle = this.idle.filter((w) => !ws.includes(w));
    while (ws.length < n) ws.push(this.spawn());
    for (const w of ws) {
      w.ref(); // a running vCPU keeps the process alive
      this.busy.add(w);
    }
    this.queueRefill();
    return ws;
  }

  give(w: Worker): void {
    this.busy.delete(w);
    if (this.closed || this.idle.length >= this.maxIdle) {
      void w.terminate();
      return;
    }
    w.unref();
    this.idle.push(w);
    this.wakeReady();
  }

  /** Tops the idle workers up to `warm`, after the current turn (not on a VM's start path). */
  queueRefill(): void {
    if (this.refillQueued || this.closed) return;
    this.refillQueued = true;
    setImmediate(() => {
      this.refillQueued = false;
      while (!this.closed && this.idle.length < this.warm) this.idle.push(this.spawn());
    });
  }

  /** Resolves when `warm` idle workers have loaded their modules (or the host closed). */
  whenReady(): Promise<void> {
    const done = () =>
      this.closed ||
      (this.idle.length >= this.warm &&
        this.idle.slice(0, this.warm).every((w) => this.ready.has(w)));
    if (done()) return Promise.resolve();
    this.queueRefill();
    return new Promise((resolve) => {
      // The idle workers are unreferenced: someone waiting for them keeps the process alive.
      const keepAlive = setInterval(() => undefined, 60_000);
      const check = () => {
        if (!done()) return void this.readyWaiters.push(check);
        clearInterval(keepAlive);
        resolve();
      };
      this.readyWaiters.push(check);
    });
  }

  private wakeReady(): void {
    const ws = this.readyWaiters;
    this.readyWaiters = [];
    for (const f of ws) f();
  }

  /**
   * Asks every idle, loaded worker for a full garbage collection (VcpuWorkerCollect) and
   * resolves with how many did one, once all answered or after `timeoutMs`. A worker taken
   * for a VM meanwhile answers before it starts (its messages are in order); its VM's own
   * listener ignores the answer.
   */
  collect(timeoutMs: number): Promise<number> {
    const ws = this.idle.filter((w) => this.ready.has(w));
    if (ws.length === 0) return Promise.resolve(0);
    return new Promise((resolve) => {
      let pending = ws.length;
      let collected = 0;
      const listeners = new Map<Worker, (m: VcpuWorkerMessage) => void>();
      const done = () => {
        clearTimeout(timer);
        for (const [w, f] of listeners) {
          w.off('message', f);
          w.off('exit', f);
        }
        listeners.clear();
        resolve(collected);
      };
      const timer = setTimeout(done, timeoutMs);
      timer.unref();
      for (const w of ws) {
        const f = (m?: VcpuWorkerMessage | number) => {
          if (typeof m === 'object' && m.type !== 'collected') return;
          if (typeof m === 'object' && m.collected) collected++;
          w.off('message', f);
          w.off('exit', f);
          listeners.delete(w);
          if (--pending === 0) done();
        };
        listeners.set(w, f);
        w.on('message', f);
        w.once('exit', f);
        // A listener refs the worker again (Node's MessagePort): an idle one must not hold
        // the process; a busy one was ref'd by take() and stays so.
        if (!this.busy.has(w)) w.unref();
        w.postMessage({ type: 'collect' } satisfies VcpuWorkerCollect);
      }
    });
  }

  async close(): Promise<void> {
    this.closed = true;
    const idle = this.idle.splice(0);
    this.wakeReady();
    await Promise.all(idle.map((w) => w.terminate()));
  }
}

function count(name: string, v: unknown, dflt: number, min: number, max: number): number | string {
  if (v === undefined) return dflt;
  if (typeof v !== 'number' || !Number.isInteger(v) || v < min || v > max)
    return `${name} must be a whole number from ${min} to ${max} (got ${JSON.stringify(v)})`;
  return v;
}

export class VmHost {
  private readonly workers: WarmWorkers;
  private readonly closer: FdCloser;
  private readonly ram: GuestRamPool;
  private readonly maxPending: number;
  private readonly warmDevice: boolean;
  private nullFd = -1;
  private created = 0;
  private live = 0;
  private releaseWaits = 0;
  private closed = false;

  /** Use createVmHost() (errors as values); this throws a VmError on bad options. */
  constructor(opts: VmHostOptions = {}) {
    const warm = count('warmVcpuWorkers', opts.warmVcpuWorkers, 1, 0, MAX_WARM_VCPU_WORKERS);
    const maxIdle = count(
      'maxIdleVcpuWorkers',
      opts.maxIdleVcpuWorkers,
      Math.max(16, typeof warm === 'number' ? warm : 0),
      typeof warm === 'number' ? warm : 0,
      1024,
    );
    const pending = count(
      'maxPendingReleases',
      opts.maxPendingReleases,
      4,
      1,
      MAX_PENDING_RELEASES,
    );
    const maxRam = count('maxIdleRam', opts.maxIdleRam, 8, 0, 256);
    const closers = count('closerThreads', opts.closerThreads, 4, 1, 16);
    const seccomp = opts.seccomp ?? 'threads';
    for (const v of [warm, maxIdle, pending, maxRam, closers])
      if (typeof v === 'string') throw new VmError('INVALID_CONFIG', v);
    if (!['threads', 'process', 'off'].includes(seccomp))
      throw new VmError(
        'INVALID_CONFIG',
        `seccomp must be threads, process or off (got ${String(seccomp)})`,
      );
    // Before any worker of ours exists: they read the setting when they start.
    if (seccomp === 'off') configureSeccomp({ mode: 'off' });
    else if (seccomp === 'process') {
      // TSYNC puts the main thread's list on every thread of the embedding program: only
      // from its main thread.
      if (!isMainThread)
        throw new VmError('INVALID_CONFIG', "seccomp: 'process' is only for the main thread");
      installProcessFilter({ mode: 'default' });
    }
    this.workers = new WarmWorkers(warm as number, maxIdle as number);
    this.maxPending = pending as number;
    this.warmDevice = opts.warmDeviceWorker ?? true;
    this.closer = startFdCloser(closers as number);
    this.ram = new GuestRamPool(maxRam as number);
    this.workers.queueRefill();
  }

  /** Resolves once the warm vCPU workers are started and have loaded their modules. */
  ready(): Promise<void> {
    return this.workers.whenReady();
  }

  /**
   * Creates a VM from Firecracker's VmResources shape (the API's and --config-file's, with the
   * same validation): `INVALID_CONFIG`, `BAD_IMAGE` or `HOST` when it cannot be made, with
   * nothing left behind. The VM is `created` (vCPUs parked before the guest's first
   * instruction) unless `start` is set.
   */
  async createVm(resources: VmResources, opts: CreateVmOptions = {}): Promise<Result<Vm>> {
    const createdAt = monoMs();
    if (this.closed) return fail('CLOSED', 'this VmHost is closed');
    let spec: VmSpec;
    try {
      if (typeof resources !== 'object' || resources === null)
        return fail('INVALID_CONFIG', 'resources must be an object (VmResources)');
      spec = validateResources(resources);
      checkHostCanRun(spec.kernelPath, opts.allowPvm === true);
    } catch (e) {
      return { ok: false, error: toVmError(e, 'INVALID_CONFIG') };
    }
    const con = opts.console ?? 'pipe';
    if (
      con !== 'pipe' &&
      con !== 'none' &&
      !(typeof con === 'object' && con !== null && Number.isInteger(con.fd) && con.fd >= 0)
    )
      return fail(
        'INVALID_CONFIG',
        `console must be 'pipe', 'none' or { fd } (got ${String(con)})`,
      );
    if (this.closer.pending >= this.maxPending) {
      this.releaseWaits++;
      await this.closer.whenBelow(this.maxPending);
      if (this.closed) return fail('CLOSED', 'this VmHost is closed');
    }
    let pipe: { readFd: number; writeFd: number } | undefined;
    let built: BuiltVm;
    try {
      let consoleFd: number;
      if (con === 'pipe') {
        pipe = consolePipe();
        consoleFd = pipe.writeFd;
      } else if (con === 'none') {
        if (this.nullFd < 0) this.nullFd = openSync('/dev/null', 'w');
        consoleFd = this.nullFd;
      } else consoleFd = con.fd;
      const pooled = spec.vcpus < NATIVE_FROM_VCPUS;
      built = buildVm(spec, {
        consoleFd,
        config: configFromResources(resources),
        paused: opts.start !== true,
        closeFds: (fds) => this.closer.close(fds),
        guestRam: this.ram,
        ...(pooled ? { vcpuWorkers: this.workers, vcpuThreads: 'worker' as const } : {}),
      });
    } catch (e) {
      if (pipe) {
        closeSync(pipe.readFd);
        closeSync(pipe.writeFd);
      }
      return { ok: false, error: toVmError(e) };
    } finally {
      // The VM writes through a description of its own (console-output.ts).
      if (pipe) {
        try {
          closeSync(pipe.writeFd);
        } catch {
          // closed above
        }
      }
    }
    if (this.warmDevice && built.deviceWorker) prewarmDeviceWorker();
    this.created++;
    this.live++;
    const vm = new Vm({
      built,
      id: `vm${this.created}`,
      createdAt,
      started: opts.start === true,
      ...(pipe ? { consoleReadFd: pipe.readFd } : {}),
    });
    void vm.wait().then(() => this.live--);
    return ok(vm);
  }

  /**
   * @internal A VM built by `make` on this host's warm parts (WarmParts) instead of by
   * createVm's own buildVm call: for a caller that builds through a builder of its own around
   * buildVm / loadSnapshot (the daemon's shared mode builds each VM through a VmmController, so
   * that the VM keeps its own Firecracker API socket). `make` resolves to the built VM, or to
   * undefined when it refused (nothing built; why is the caller's to report), and must pass
   * `warm.build(vcpus)` or `warm.load()` to the one build it makes. The Vm is counted, its
   * workers reused and its descriptors closed as createVm's are. A throw from `make` is
   * returned as an error (INTERNAL unless it is a VMM error with a code). The Vm's state
   * follows its own calls only (`started`: built running): pause and resume made through the
   * caller's builder (an API socket) do not show in it.
   */
  async createVmWith(
    make: (warm: WarmParts) => Promise<BuiltVm | undefined>,
    opts: { id?: string; console?: 'pipe' | 'none'; started?: boolean } = {},
  ): Promise<Result<Vm | undefined>> {
    const createdAt = monoMs();
    if (this.closed) return fail('CLOSED', 'this VmHost is closed');
    if (this.closer.pending >= this.maxPending) {
      this.releaseWaits++;
      await this.closer.whenBelow(this.maxPending);
      if (this.closed) return fail('CLOSED', 'this VmHost is closed');
    }
    let pipe: { readFd: number; writeFd: number } | undefined;
    let built: BuiltVm | undefined;
    try {
      let consoleFd: number;
      if (opts.console === 'none') {
        if (this.nullFd < 0) this.nullFd = openSync('/dev/null', 'w');
        consoleFd = this.nullFd;
      } else {
        pipe = consolePipe();
        consoleFd = pipe.writeFd;
      }
      const closeFds = (fds: number[]) => this.closer.close(fds);
      built = await make({
        build: (vcpus) => ({
          consoleFd,
          closeFds,
          guestRam: this.ram,
          ...(vcpus < NATIVE_FROM_VCPUS
            ? { vcpuWorkers: this.workers, vcpuThreads: 'worker' as const }
            : {}),
        }),
        load: () => ({ consoleFd, closeFds, vcpuWorkers: this.workers }),
      });
    } catch (e) {
      if (pipe) closeSync(pipe.readFd);
      return { ok: false, error: toVmError(e) };
    } finally {
      // The VM writes through a description of its own (console-output.ts).
      if (pipe) closeSync(pipe.writeFd);
    }
    if (built === undefined) {
      if (pipe) closeSync(pipe.readFd);
      return ok(undefined);
    }
    if (this.warmDevice && built.deviceWorker) prewarmDeviceWorker();
    this.created++;
    this.live++;
    const vm = new Vm({
      built,
      id: opts.id ?? `vm${this.created}`,
      createdAt,
      started: opts.started ?? true,
      ...(pipe ? { consoleReadFd: pipe.readFd } : {}),
    });
    void vm.wait().then(() => this.live--);
    return ok(vm);
  }

  /** Resolves once every ended VM's descriptors are closed (for leak checks and shutdown). */
  drain(): Promise<void> {
    return this.closer.whenBelow(1);
  }

  stats(): VmHostStats {
    return {
      idleVcpuWorkers: this.workers.idleCount,
      busyVcpuWorkers: this.workers.busyCount,
      vcpuWorkersStarted: this.workers.started,
      vmsCreated: this.created,
      vmsLive: this.live,
      pendingReleases: this.closer.pending,
      releaseWaits: this.releaseWaits,
      idleRam: this.ram.idleCount,
      ramReused: this.ram.stats.reused,
    };
  }

  /**
   * A full garbage collection of this thread's V8 heap and of every idle warm vCPU worker's,
   * for an embedder that goes idle and wants its memory back (the daemon calls it when idle,
   * src/daemon/trim.ts). Only when Node runs with `--expose-gc` (the daemon does); otherwise
   * nothing is collected. Resolves with what was collected, and how long this thread's own
   * collection held it, once the workers answered (at most COLLECT_TIMEOUT_MS later). A worker
   * taken for a VM before it answered collects first, then starts that VM.
   */
  async collectGarbage(): Promise<{ main: boolean; mainMs: number; workers: number }> {
    const gc = (globalThis as { gc?: () => void }).gc;
    const t0 = monoMs();
    gc?.();
    const mainMs = monoMs() - t0;
    const workers = gc && !this.closed ? await this.workers.collect(COLLECT_TIMEOUT_MS) : 0;
    return { main: gc !== undefined, mainMs, workers };
  }

  /**
   * Ends the warm workers and the closer thread once every VM's descriptors are closed. VMs
   * still running keep running (stop them first); their workers end with them. Later calls
   * of createVm get `CLOSED`.
   */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.workers.close();
    this.ram.close();
    await this.closer.stop();
    if (this.nullFd >= 0) {
      closeSync(this.nullFd);
      this.nullFd = -1;
    }
  }
}

/** A VmHost, or INVALID_CONFIG for options out of bounds. */
export function createVmHost(opts: VmHostOptions = {}): Result<VmHost> {
  try {
    return ok(new VmHost(opts));
  } catch (e) {
    return { ok: false, error: toVmError(e, 'INVALID_CONFIG') };
  }
}

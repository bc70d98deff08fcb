/**
 * `process` mode: every VM runs in its own VMM process (`typervisor --api-sock SOCK`), so a fault
 * stays in that process, as with Firecracker. A pool of such processes is started ahead: each
 * has loaded its modules, started its API server and prewarmed a vCPU and a device worker (the
 * API mode does that by itself, src/cli/main.ts), so a create only configures one over its own
 * API socket and starts it. The pool is refilled in the background.
 *
 * A VMM process is watched through its exit (the child's exit event: no polling); its stderr
 * tail names the reason, its stdout is the guest console (a bounded tail is kept). Its socket and
 * its pid record are removed when it ends. The daemon creates no TAP: a configuration names TAPs
 * that exist, and they stay the host's.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { renameSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { DEFAULT_MAX_PAYLOAD } from '../api/server.js';
import { unlinkIfOurs } from '../util/fs.js';
import { log } from '../util/log.js';
import { DEFAULT_MACHINE_CONFIG } from '../vmm/index.js';
import { configRequests, type CreateRequest } from './api.js';
import {
  ByteTail,
  CreateError,
  type Backend,
  type PoolInfo,
  type VmEnd,
  type VmHandle,
} from './backend.js';
import { rehearsalStem, removeBindDirs, type StateDir } from './state.js';
import { callVmm, callVmmPipelined, canConnect, faultOf, type VmmAnswer } from './vmm-client.js';
import { monoMs } from '../util/clock.js';

/** The launcher the VMM processes run (bin/typervisor, from dist/src/daemon/). */
export const CLI = fileURLToPath(new URL('../../../bin/typervisor', import.meta.url));
/** How long a warm process may take to accept connections on its socket. */
export const WARM_START_TIMEOUT_MS = 20_000;
const READY_POLL_MS = 5;
/** After SIGTERM, how long a VMM gets to stop its VM before SIGKILL. */
export const STOP_KILL_AFTER_MS = 8_000;
/** Console bytes kept per VM; stderr bytes kept per VMM process. */
export const CONSOLE_TAIL_BYTES = 64 * 1024;
const STDERR_TAIL_BYTES = 8 * 1024;
/** Back-off after consecutive failed warm starts (doubling up to the maximum). */
const BACKOFF_MIN_MS = 500;
const BACKOFF_MAX_MS = 30_000;
const MARKER_LINE = 'Guest-boot-time';
/**
 * The deadline of the call that starts the VM (PUT /vm/config with its sections, InstanceStart,
 * or a snapshot load): it reads the kernel and initrd or the memory file and builds the VM,
 * which took ~10 s in the lab (TCG) and timed out there at the other calls' 10 s.
 */
export const START_CALL_TIMEOUT_MS = 60_000;
/**
 * How long after a VM's starting call is answered the pool's refill waits for that VM's boot
 * marker (it starts as soon as the marker is seen). Starting a VMM process holds the daemon's
 * thread 2-6 ms on our hosts (spawn: the fork and the wait for the child's exec), and right
 * after the answer that was the time the marker's line waited to be read (traced).
 */
export const REFILL_AFTER_START_MS = 10;
/** The largest RAM a pool process prepares its VM with (MiB); larger VMs are built on create. */
export const PREPARE_MAX_MIB = 4096;
/** The log line's prefix (time and [instance:thread]), left out of an exit reason. */
const LOG_PREFIX = /^\S+ \[[^\]]*\] /;

/** One VMM process: warm in the pool, then a VM's. */
class VmmProcess implements VmHandle {
  readonly child: ChildProcess;
  readonly pid: number;
  apiSocket: string;
  markerAt: number | undefined;
  /** Called once, when the boot marker's line is first seen. */
  onMarker: (() => void) | undefined;
  firstOutputAt: number | undefined;
  readonly console = new ByteTail(CONSOLE_TAIL_BYTES);
  readonly stderr = new ByteTail(STDERR_TAIL_BYTES);
  readonly ended: Promise<VmEnd>;
  /** Set when the process has exited (before `ended` settles). */
  exitedEarly = false;
  private stopRequested = false;
  private killTimer: NodeJS.Timeout | undefined;

  /** Where its rehearsal's socket and image are (named after its first socket and its pid). */
  private readonly rehearsal: string;

  constructor(
    sock: string,
    name: string,
    private readonly state: StateDir,
    extraArgs: readonly string[],
  ) {
    this.apiSocket = sock;
    this.child = spawn(
      process.execPath,
      [CLI, '--api-sock', sock, '--id', name, '--boot-timer', ...extraArgs],
      {
        stdio: ['ignore', 'pipe', 'pipe'],
        env: { ...process.env, TYPERVISOR_LOG: undefined, TYPERVISOR_LOG_FORMAT: undefined },
      },
    );
    if (this.child.pid === undefined) throw new Error('cannot start a VMM process');
    this.pid = this.child.pid;
    this.rehearsal = rehearsalStem(sock, this.pid);
    state.record(this.pid);
    let lineStart = 0;
    this.child.stdout!.on('data', (b: Buffer) => {
      this.firstOutputAt ??= monoMs();
      this.console.push(b);
    });
    this.child.stderr!.on('data', (b: Buffer) => {
      this.stderr.push(b);
      if (this.markerAt === undefined) {
        const t = this.stderr.text();
        if (t.indexOf(MARKER_LINE, Math.max(0, lineStart - MARKER_LINE.length)) >= 0) {
          this.markerAt = monoMs();
          this.onMarker?.();
        }
        lineStart = t.length;
      }
    });
    this.child.on('error', () => undefined); // reported through 'close'
    this.ended = new Promise<VmEnd>((resolve) => {
      this.child.once('close', (code, signal) => {
        this.exitedEarly = true;
        if (this.killTimer) clearTimeout(this.killTimer);
        this.cleanup(signal !== null);
        resolve(this.endOf(code, signal));
      });
    });
  }

  private endOf(code: number | null, signal: NodeJS.Signals | null): VmEnd {
    const lines = this.stderr
      .text()
      .split('\n')
      .map((l) => l.trim())
      .map((l) => l.replace(LOG_PREFIX, ''))
      .filter(
        (l) => l !== '' && !/exiting (successfully|with error)/.test(l) && !l.includes(MARKER_LINE),
      );
    const last = lines.at(-1) ?? '';
    if (this.stopRequested && (code === 0 || signal !== null))
      return { state: 'stopped', code, signal, reason: 'stopped on request' };
    if (code === 0)
      return { state: 'exited', code, signal, reason: last || 'the guest powered off' };
    const why = signal !== null ? `killed by ${signal}` : `exit code ${code}`;
    return { state: 'crashed', code, signal, reason: last ? `${why}: ${last}` : why };
  }

  /**
   * Its socket (whatever name it has now), its record, and what its rehearsal left if it ended
   * during one (a pool process stopped or killed as the daemon closes: CI of 39b6a76 found its
   * rehearsal's socket and image left in the state directory), and, if a signal ended it, the
   * directory it may have been binding a socket in (a process that exits removes its own).
   */
  private cleanup(killed: boolean): void {
    unlinkIfOurs(this.apiSocket, (st) => st.isSocket());
    unlinkIfOurs(`${this.rehearsal}.sock`, (st) => st.isSocket());
    unlinkIfOurs(`${this.rehearsal}.elf`, (st) => st.isFile());
    if (killed) removeBindDirs(this.state.dir, this.pid);
    this.state.forget(this.pid);
  }

  /** Resolves once the socket accepts connections; rejects if the process ends first. */
  async waitReady(): Promise<void> {
    const deadline = monoMs() + WARM_START_TIMEOUT_MS;
    while (!(await canConnect(this.apiSocket))) {
      if (this.exitedEarly) throw new Error(`the VMM process exited: ${(await this.ended).reason}`);
      if (monoMs() > deadline) throw new Error(`no API socket within ${WARM_START_TIMEOUT_MS} ms`);
      await new Promise((r) => setTimeout(r, READY_POLL_MS));
    }
  }

  stop(): void {
    if (this.exitedEarly || this.stopRequested) return;
    this.stopRequested = true;
    this.child.kill('SIGTERM');
    this.killTimer = setTimeout(() => this.child.kill('SIGKILL'), STOP_KILL_AFTER_MS);
  }

  kill(): void {
    if (!this.exitedEarly) this.child.kill('SIGKILL');
  }

  consoleTail(): string {
    return this.console.text();
  }
}

/** An error answer to a configuring call: the VMM is killed and the create fails with it. */
function refuseOnError(
  p: VmmProcess,
  [method, path]: readonly [string, string, ...unknown[]],
  a: VmmAnswer,
): void {
  if (a.status < 300) return;
  p.kill();
  // PUT /vm/config's faults name their section themselves.
  const what = path === '/vm/config' ? '' : `${method} ${path}: `;
  throw new CreateError(a.status >= 500 ? 500 : 400, `${what}${faultOf(a)}`);
}

export class ProcessBackend implements Backend {
  readonly mode = 'process' as const;
  private readonly warm: VmmProcess[] = [];
  /** Processes being started (for close() to end them too). */
  private readonly startingSet = new Set<VmmProcess>();
  private starting = 0;
  private seq = 0;
  private closed = false;
  private startedTotal = 0;
  private failedTotal = 0;
  private coldStarts = 0;
  private lastError: string | undefined;
  private failuresInRow = 0;
  private backoffTimer: NodeJS.Timeout | undefined;
  /** The RAM of the last VM created from a configuration (MiB): what new pool processes prepare. */
  private memMib = DEFAULT_MACHINE_CONFIG.mem_size_mib;

  constructor(
    private readonly size: number,
    private readonly state: StateDir,
    /** More flags for every VMM process (--no-seccomp). */
    private readonly vmmArgs: readonly string[] = [],
  ) {
    this.fill();
  }

  pool(): PoolInfo {
    return {
      mode: this.mode,
      size: this.size,
      ready: this.warm.length,
      starting: this.starting,
      started_total: this.startedTotal,
      failed_total: this.failedTotal,
      cold_starts: this.coldStarts,
      ...(this.lastError !== undefined ? { last_error: this.lastError } : {}),
    };
  }

  /**
   * Starts one VMM process and waits until its socket accepts connections. A pool's process
   * first runs a rehearsal VM (`--rehearse`, src/cli/api-rehearsal.ts: ~70-130 ms more before
   * its socket listens), so that the VM it is given starts on warm code; a cold start, which a
   * create waits for, does not.
   */
  private async startOne(rehearse: boolean): Promise<VmmProcess> {
    const name = `pool-${process.pid}-${++this.seq}`;
    // A pool process also makes its VM ahead, with the RAM of the last VM created (--prepare-
    // mem, vmm/prepared-vm.ts); a create of another size builds it as usual. Not past
    // PREPARE_MAX_MIB: KVM sizes a memory slot's bookkeeping by its RAM, and an idle pool
    // process would hold that for a VM nobody may ask for again.
    const prepare = this.memMib <= PREPARE_MAX_MIB ? ['--prepare-mem', String(this.memMib)] : [];
    const args = rehearse ? ['--rehearse', ...prepare, ...this.vmmArgs] : this.vmmArgs;
    const p = new VmmProcess(this.state.path(`${name}.sock`), name, this.state, args);
    this.startedTotal++;
    this.startingSet.add(p);
    try {
      await p.waitReady();
      return p;
    } catch (e) {
      p.kill();
      throw e;
    } finally {
      this.startingSet.delete(p);
    }
  }

  /** Tops the pool up to its size, in the background. */
  private fill(): void {
    while (
      !this.closed &&
      this.backoffTimer === undefined &&
      this.warm.length + this.starting < this.size
    ) {
      this.starting++;
      this.startOne(true).then(
        (p) => {
          this.starting--;
          this.failuresInRow = 0;
          if (this.closed) {
            p.kill();
            return;
          }
          this.warm.push(p);
          // A warm process that dies before it is used leaves the pool (and is replaced).
          void p.ended.then((end) => {
            const i = this.warm.indexOf(p);
            if (i < 0) return;
            this.warm.splice(i, 1);
            this.failed(`a warm VMM process ended: ${end.reason}`);
          });
        },
        (e: Error) => {
          this.starting--;
          this.failed(`cannot start a warm VMM process: ${e.message}`);
        },
      );
    }
  }

  private failed(why: string): void {
    this.failedTotal++;
    this.lastError = why;
    log('warn', `daemon: ${why}`);
    if (this.closed) return;
    if (++this.failuresInRow >= 3) {
      const ms = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** (this.failuresInRow - 3));
      this.backoffTimer ??= setTimeout(() => {
        this.backoffTimer = undefined;
        this.fill();
      }, ms);
      return;
    }
    this.fill();
  }

  async create(id: string, apiSocket: string, req: CreateRequest): Promise<VmHandle> {
    if (this.closed) throw new CreateError(503, 'the daemon is shutting down');
    if (req.kind === 'config') {
      const mem = (req.config['machine-config'] as { mem_size_mib?: unknown } | undefined)
        ?.mem_size_mib;
      this.memMib = typeof mem === 'number' ? mem : DEFAULT_MACHINE_CONFIG.mem_size_mib;
    }
    let p = this.warm.shift();
    // One that has just exited (its exit not yet handled) is skipped: its socket is gone.
    while (p?.exitedEarly) p = this.warm.shift();
    // The refill starts once this VM runs (a new VMM process's start-up, ~0.3 s of CPU, would
    // otherwise compete with this VM's start on the same CPUs), and once its boot marker is in.
    let started: VmmProcess | undefined;
    try {
      return (started = await this.configure(p, apiSocket, req));
    } finally {
      if (started) this.fillAfterStart(started);
      else this.fill();
    }
  }

  /**
   * The refill after a VM started: when its boot marker's line is read, or REFILL_AFTER_START_MS
   * after its start was answered, whichever comes first, so that the spawn does not hold the
   * thread that reads the marker (a guest that writes none waits the few ms).
   */
  private fillAfterStart(p: VmmProcess): void {
    if (p.markerAt !== undefined) return this.fill();
    const go = () => {
      clearTimeout(timer);
      p.onMarker = undefined;
      this.fill();
    };
    const timer = setTimeout(go, REFILL_AFTER_START_MS);
    p.onMarker = () => setImmediate(go);
  }

  private async configure(
    warm: VmmProcess | undefined,
    apiSocket: string,
    req: CreateRequest,
  ): Promise<VmmProcess> {
    let p = warm;
    if (p === undefined) {
      this.coldStarts++;
      try {
        p = await this.startOne(false);
      } catch (e) {
        throw new CreateError(500, `no VMM process: ${(e as Error).message}`);
      }
    }
    // The VM's socket gets its name: a Unix socket is reached through its inode, so the VMM
    // keeps serving it under the new name.
    try {
      renameSync(p.apiSocket, apiSocket);
      p.apiSocket = apiSocket;
    } catch (e) {
      p.kill();
      throw new CreateError(
        500,
        `cannot name the VM's API socket ${apiSocket}: ${(e as Error).message}`,
      );
    }
    // The whole configuration in one request (PUT /vm/config: its sections, then InstanceStart,
    // inside the VMM; one round trip instead of the PUTs and InstanceStart after them, ~2 ms
    // less, docs/daemon.md), when it fits the VMM's request limit; else a PUT per section.
    const whole = req.kind === 'config' ? JSON.stringify(req.config) : undefined;
    const single = whole !== undefined && Buffer.byteLength(whole) <= DEFAULT_MAX_PAYLOAD;
    const calls: Array<[string, string, unknown]> =
      req.kind === 'config'
        ? single
          ? [['PUT', '/vm/config', req.config]]
          : configRequests(req.config)
        : [['PUT', '/snapshot/load', req.load]];
    // The pre-boot PUTs on one connection, written at once (one round trip, not one each: ~2 ms
    // apiece to a warm VMM, docs/daemon.md); InstanceStart only once every one of them is in.
    const pre = calls.length > 1 ? calls.slice(0, -1) : [];
    if (pre.length > 0) {
      let answers;
      try {
        answers = await callVmmPipelined(apiSocket, pre);
      } catch (e) {
        p.kill();
        const end = await p.ended;
        throw new CreateError(500, `configuring the VMM: ${(e as Error).message} (${end.reason})`);
      }
      answers.forEach((a, i) => refuseOnError(p!, pre[i]!, a));
    }
    // The last call: the whole configuration, InstanceStart, or the snapshot load.
    const [method, path, body] = calls.at(-1)!;
    let a;
    try {
      a = await callVmm(apiSocket, method, path, body, START_CALL_TIMEOUT_MS);
    } catch (e) {
      p.kill();
      const end = await p.ended;
      throw new CreateError(500, `${method} ${path}: ${(e as Error).message} (${end.reason})`);
    }
    refuseOnError(p, [method, path], a);
    return p;
  }

  async close(): Promise<void> {
    this.closed = true;
    if (this.backoffTimer) clearTimeout(this.backoffTimer);
    const all = [...this.warm.splice(0), ...this.startingSet];
    for (const p of all) p.kill();
    await Promise.all(all.map((p) => p.ended));
  }
}

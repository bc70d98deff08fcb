/**
 * `shared` mode: many VMs in the daemon's own process (trusted workloads: a guest that breaks
 * the VMM breaks every VM here), on the library's warm host (src/lib/host.ts, one VmHost per
 * daemon): vCPU workers started ahead and reused from VM to VM, guest RAM kept and emptied for
 * the next VM of the same size, each ended VM's descriptors closed on closer threads.
 *
 * Each VM keeps its own Firecracker-compatible API socket (`<state-dir>/<id>.sock`): it is a
 * VmmController (the API's own state machine, src/api/controller.ts) whose build goes through
 * the host (VmHost.createVmWith: buildVm / loadSnapshot with the host's warm parts), so pause,
 * resume, snapshot create, balloon, MMDS, metrics and GET /vm/config work on it as on a VMM
 * process. The daemon applies the request's configuration to the controller directly (the
 * actions a config file makes), then leaves the socket to the VM's clients. Stop, the end and
 * the console are the library Vm's: stop() is Vm.stop(), the end is Vm.wait(), and the console
 * is the Vm's output stream, of which the last CONSOLE_TAIL_BYTES are kept (as process mode).
 */
import { VmmController } from '../api/controller.js';
import { LoggerControl } from '../api/logger.js';
import { MetricsSystem } from '../api/metrics.js';
import { startApiServer, type ApiServer } from '../api/server.js';
import { VmHost, type Vm, type VmExit } from '../lib/index.js';
import { buildVm, loadSnapshot, type BuiltVm } from '../vmm/index.js';
import type { CreateRequest } from './api.js';
import {
  ByteTail,
  CreateError,
  type Backend,
  type Collected,
  type PoolInfo,
  type VmEnd,
  type VmHandle,
} from './backend.js';
import { CONSOLE_TAIL_BYTES, STOP_KILL_AFTER_MS } from './process-backend.js';
import { monoMs } from '../util/clock.js';

/** Sections that configure the process, not the VM: refused here (one process, many VMs). */
const PROCESS_SECTIONS = ['logger', 'metrics'];

/** How long a VM's end waits for its console output to drain (it normally takes ~1 ms). */
const OUTPUT_DRAIN_MS = 1000;

/** What the VmHandle needs of the VM's vCPU control block: the boot marker's time. */
interface MarkerSource {
  readonly bootMarkerMs: number;
}

class SharedVm implements VmHandle {
  firstOutputAt: number | undefined;
  server: ApiServer | undefined;
  readonly ended: Promise<VmEnd>;
  private resolveEnd!: (e: VmEnd) => void;
  private vm: Vm | undefined;
  private marker: MarkerSource | undefined;
  private readonly console = new ByteTail(CONSOLE_TAIL_BYTES);
  private stopRequested = false;
  private done = false;

  constructor(readonly apiSocket: string) {
    this.ended = new Promise((r) => (this.resolveEnd = r));
  }

  /**
   * monoMs() when the guest wrote its boot marker: the vCPU thread's own time stamp, read when
   * asked, so a VM that never writes it holds no waiter.
   */
  get markerAt(): number | undefined {
    const ms = this.marker?.bootMarkerMs ?? 0;
    return ms > 0 ? ms : undefined;
  }

  /** The VM runs: its console, marker and end. */
  attach(vm: Vm, built: BuiltVm): void {
    this.vm = vm;
    this.marker = built.vmm.control;
    const output = vm.console?.output;
    output?.on('data', (b: Buffer) => {
      this.firstOutputAt ??= monoMs();
      this.console.push(b);
    });
    // The guest's last bytes may still be in the console pipe when wait() resolves: the end
    // is reported once they are in the tail (as process mode waits for the child's stdout),
    // or after OUTPUT_DRAIN_MS if the stream never ends.
    const drained = output
      ? new Promise<void>((resolve) => {
          output.once('end', resolve).once('close', resolve);
          if (output.readableEnded || output.destroyed) resolve();
        })
      : Promise.resolve();
    void vm.wait().then(async (exit) => {
      let t: NodeJS.Timeout | undefined;
      await Promise.race([drained, new Promise((r) => (t = setTimeout(r, OUTPUT_DRAIN_MS)))]);
      clearTimeout(t);
      await this.finish(exit);
    });
  }

  /** The VM ended (or was never made): its API server goes, then `ended` settles. */
  async finish(exit: VmExit | { reason: 'failed'; message: string }): Promise<void> {
    if (this.done) return;
    this.done = true;
    await this.server?.close();
    let end: VmEnd;
    switch (exit.reason) {
      case 'poweroff':
      case 'reset':
        end = {
          state: 'exited',
          code: 0,
          signal: null,
          reason: `the guest ${exit.reason === 'reset' ? 'rebooted' : 'powered off'}`,
        };
        break;
      case 'stopped':
        end = this.stopRequested
          ? { state: 'stopped', code: 0, signal: null, reason: 'stopped on request' }
          : { state: 'exited', code: 0, signal: null, reason: 'the VM stopped' };
        break;
      default:
        end = { state: 'crashed', code: 1, signal: null, reason: exit.message ?? 'failed' };
    }
    this.resolveEnd(end);
  }

  stop(): void {
    if (this.done || this.stopRequested) return;
    this.stopRequested = true;
    if (this.vm) void this.vm.stop();
    else void this.finish({ reason: 'stopped' } as VmExit);
    // A VMM that does not stop within the bound: reported, since nothing can be killed here.
    const t = setTimeout(() => {
      if (!this.done)
        void this.finish({
          reason: 'failed',
          message: `did not stop within ${STOP_KILL_AFTER_MS} ms`,
        });
    }, STOP_KILL_AFTER_MS);
    t.unref();
  }

  consoleTail(): string {
    return this.console.text();
  }
}

export interface SharedOptions {
  /** No seccomp filters on the host's threads (--no-seccomp). */
  noSeccomp?: boolean;
}

export class SharedBackend implements Backend {
  readonly mode = 'shared' as const;
  private readonly host: VmHost;
  private failed = 0;
  private coldStarts = 0;
  private lastError: string | undefined;
  private closed = false;

  /**
   * `size`: vCPU workers kept idle and ready (--pool; a VM takes one per vCPU and gives it
   * back when it ends). The daemon has installed the process's main-role filter already
   * (serve.ts); the host's threads add their own roles' (vcpu, device), as the CLI's do.
   */
  constructor(
    private readonly size: number,
    opts: SharedOptions = {},
  ) {
    this.host = new VmHost({
      warmVcpuWorkers: size,
      seccomp: opts.noSeccomp ? 'off' : 'threads',
    });
  }

  /** Resolves once the warm workers have loaded their modules. */
  ready(): Promise<void> {
    return this.host.ready();
  }

  collectGarbage(): Promise<Collected> {
    return this.host.collectGarbage();
  }

  pool(): PoolInfo {
    const s = this.host.stats();
    return {
      mode: this.mode,
      size: this.size,
      ready: Math.min(s.idleVcpuWorkers, this.size),
      starting: 0,
      started_total: s.vcpuWorkersStarted,
      failed_total: this.failed,
      cold_starts: this.coldStarts,
      ...(this.lastError !== undefined ? { last_error: this.lastError } : {}),
    };
  }

  async create(id: string, apiSocket: string, req: CreateRequest): Promise<VmHandle> {
    if (this.closed) throw new CreateError(503, 'the daemon is shutting down');
    if (req.kind === 'config') {
      const bad = PROCESS_SECTIONS.find(
        (k) => req.config[k] !== undefined && req.config[k] !== null,
      );
      if (bad)
        throw new CreateError(
          400,
          `"${bad}" configures a VMM process: not available in shared mode (use process mode)`,
        );
    }
    const vm = new SharedVm(apiSocket);
    const metrics = new MetricsSystem(id);
    const logger = new LoggerControl(metrics.counters);
    let refused: CreateError | undefined;
    let built: BuiltVm | undefined;
    if (this.host.stats().idleVcpuWorkers === 0) this.coldStarts++;
    const made = await this.host.createVmWith(
      async (warm) => {
        const controller = new VmmController({
          instanceId: id,
          version: 'daemon',
          metrics,
          logger,
          // No PUT /serial here: the host's console pipe; the host's warm parts go with it.
          build: (spec, o) => buildVm(spec, { ...o, ...warm.build(spec.vcpus) }),
          loadSnapshot: (p, o) => loadSnapshot(p, { ...o, ...warm.load() }),
        });
        for (const a of req.actions) {
          const out = await controller.handle(a);
          if (out.status >= 300) {
            refused = new CreateError(
              out.status >= 500 ? 500 : 400,
              `${a.kind}: ${'fault' in out ? out.fault : out.status}`,
            );
            break;
          }
        }
        // A VM built before a later action was refused is still the host's to release.
        built = controller.vm;
        // The VM's own API socket, once its vCPUs run (binding it took ~0.5 ms, off the
        // guest's start now); the create is answered after it listens. A socket that cannot
        // be bound fails the create, and the VM is stopped as for a refused action.
        if (refused === undefined) {
          try {
            vm.server = await startApiServer({
              socketPath: apiSocket,
              counters: metrics.counters,
              handle: (a) => controller.handle(a),
            });
          } catch (e) {
            refused = new CreateError(500, `the VM's API socket: ${(e as Error).message}`);
          }
        }
        return built;
      },
      { id },
    );
    if (made.ok && made.value !== undefined && built !== undefined && refused === undefined) {
      vm.attach(made.value, built);
      return vm;
    }
    if (made.ok && made.value !== undefined) await made.value.stop();
    await vm.finish({ reason: 'failed', message: 'not created' });
    const err =
      refused ?? new CreateError(500, made.ok ? 'the VM was not built' : made.error.message);
    if (err.status === 500) {
      this.failed++;
      this.lastError = err.message;
    }
    throw err;
  }

  async close(): Promise<void> {
    this.closed = true;
    await this.host.close();
  }
}

/**
 * `shared` mode: many VMs in the daemon's own process (trusted workloads: a guest that breaks
 * the VMM breaks every VM here). Each VM is a VmmController (the Firecracker-compatible API's
 * own state machine, src/api/controller.ts) over buildVm / loadSnapshot, with its own API server
 * on `<state-dir>/<id>.sock`; the daemon applies the request's configuration to the controller
 * directly (the same actions the config file makes), then leaves the socket to the VM's clients.
 *
 * This is the internal VMM surface; the public library API (src/lib/, issue 19 part A) is meant
 * to replace it behind the Backend interface.
 *
 * The warm capacity is the VMM's own prewarm (src/vmm/vcpu-pool.ts): one vCPU worker and one
 * device worker started ahead, taken by the next VM and started again after each create. The
 * prewarm holds one VM's workers (takeVcpuWorkers ends surplus ones), so --pool above 1 warms no
 * more in this mode.
 *
 * Each VM's console goes to `<state-dir>/<id>.console` (removed when the VM ends); the file is
 * closed by the VM's teardown, so no descriptor outlives its VM.
 */
import { closeSync, openSync, readSync, fstatSync, unlinkSync } from 'node:fs';
import { VmmController } from '../api/controller.js';
import { LoggerControl } from '../api/logger.js';
import { MetricsSystem } from '../api/metrics.js';
import { startApiServer, type ApiServer } from '../api/server.js';
import { buildVm, loadSnapshot, type BuiltVm, type VmExitEvent } from '../vmm/index.js';
import { prewarmDeviceWorker, prewarmVcpuWorkers } from '../vmm/vcpu-pool.js';
import type { CreateRequest } from './api.js';
import { CreateError, type Backend, type PoolInfo, type VmEnd, type VmHandle } from './backend.js';
import { CONSOLE_TAIL_BYTES, STOP_KILL_AFTER_MS } from './process-backend.js';
import type { StateDir } from './state.js';

/** Off: see prewarm(). */
const DEVICE_WORKER_PREWARM = process.env.TYPERVISOR_DAEMON_PREWARM_DEVICE === '1';

/** Sections that configure the process, not the VM: refused here (one process, many VMs). */
const PROCESS_SECTIONS = ['logger', 'metrics'];

class SharedVm implements VmHandle {
  markerAt: number | undefined;
  firstOutputAt: number | undefined;
  built: BuiltVm | undefined;
  server: ApiServer | undefined;
  readonly ended: Promise<VmEnd>;
  private resolveEnd!: (e: VmEnd) => void;
  private stopRequested = false;
  private done = false;

  constructor(
    readonly apiSocket: string,
    readonly consolePath: string,
  ) {
    this.ended = new Promise((r) => (this.resolveEnd = r));
  }

  /** The VM ended: its API server and console file go, then `ended` settles. */
  async finish(ev: VmExitEvent | { kind: 'failed'; message: string }): Promise<void> {
    if (this.done) return;
    this.done = true;
    await this.server?.close();
    try {
      unlinkSync(this.consolePath);
    } catch {
      // never made
    }
    let end: VmEnd;
    switch (ev.kind) {
      case 'poweroff':
      case 'reset':
        end = {
          state: 'exited',
          code: 0,
          signal: null,
          reason: `the guest ${ev.kind === 'reset' ? 'rebooted' : 'powered off'}`,
        };
        break;
      case 'stopped':
        end = this.stopRequested
          ? { state: 'stopped', code: 0, signal: null, reason: 'stopped on request' }
          : { state: 'exited', code: 0, signal: null, reason: 'the VM stopped' };
        break;
      default:
        end = { state: 'crashed', code: 1, signal: null, reason: ev.message };
    }
    this.resolveEnd(end);
  }

  stop(): void {
    if (this.done || this.stopRequested) return;
    this.stopRequested = true;
    if (this.built) this.built.vmm.requestStop();
    else void this.finish({ kind: 'stopped' } as VmExitEvent);
    // A VMM that does not stop within the bound: reported, since nothing can be killed here.
    const t = setTimeout(() => {
      if (!this.done)
        void this.finish({
          kind: 'failed',
          message: `did not stop within ${STOP_KILL_AFTER_MS} ms`,
        });
    }, STOP_KILL_AFTER_MS);
    t.unref();
  }

  consoleTail(): string {
    let fd: number;
    try {
      fd = openSync(this.consolePath, 'r');
    } catch {
      return '';
    }
    try {
      const size = fstatSync(fd).size;
      const n = Math.min(size, CONSOLE_TAIL_BYTES);
      const buf = Buffer.alloc(n);
      readSync(fd, buf, 0, n, size - n);
      return buf.toString('utf8');
    } finally {
      closeSync(fd);
    }
  }
}

export class SharedBackend implements Backend {
  readonly mode = 'shared' as const;
  private created = 0;
  private closed = false;

  constructor(
    private readonly size: number,
    private readonly state: StateDir,
  ) {
    this.prewarm();
  }

  private prewarm(): void {
    if (this.size === 0 || this.closed) return;
    prewarmVcpuWorkers(1);
    // No device worker ahead: one the next VM does not use (no virtio device) is terminated
    // by takeVcpuWorkers, often while it still loads its modules, and Node 20 then leaves the
    // module files it was reading open (~1.5 descriptors per VM, measured over 300 VMs).
    // A VM with virtio devices starts its device worker when it is built.
    if (DEVICE_WORKER_PREWARM) prewarmDeviceWorker();
  }

  pool(): PoolInfo {
    return {
      mode: this.mode,
      size: Math.min(this.size, 1),
      ready: this.size > 0 ? 1 : 0,
      starting: 0,
      started_total: this.created,
      failed_total: 0,
      cold_starts: this.size === 0 ? this.created : 0,
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
    const consolePath = this.state.path(`${id}.console`);
    const vm = new SharedVm(apiSocket, consolePath);
    const metrics = new MetricsSystem(id);
    const logger = new LoggerControl(metrics.counters);
    /** The console file is the VM's: closed by its teardown (the controller leaves it open). */
    const own = (built: BuiltVm, consoleFd: number | undefined): BuiltVm => {
      if (consoleFd !== undefined) built.vmm.onTeardown(() => closeSync(consoleFd));
      return built;
    };
    const controller = new VmmController({
      instanceId: id,
      version: 'daemon',
      metrics,
      logger,
      build: (spec, o) => own(buildVm(spec, o), o.consoleFd),
      loadSnapshot: async (p, o) => own(await loadSnapshot(p, o), o.consoleFd),
      onStarted: (built) => {
        vm.built = built;
        void built.vmm.control.waitBootMarker().then(() => (vm.markerAt ??= performance.now()));
      },
      onExit: (ev) => void vm.finish(ev),
    });
    this.created++;
    try {
      vm.server = await startApiServer({
        socketPath: apiSocket,
        counters: metrics.counters,
        handle: (a) => controller.handle(a),
      });
      const actions = [
        { kind: 'PutSerial' as const, config: { serial_out_path: consolePath } },
        ...req.actions,
      ];
      for (const a of actions) {
        const out = await controller.handle(a);
        if (out.status >= 300) {
          await vm.finish({ kind: 'failed', message: 'not created' });
          throw new CreateError(
            out.status >= 500 ? 500 : 400,
            `${a.kind}: ${'fault' in out ? out.fault : out.status}`,
          );
        }
      }
    } catch (e) {
      await vm.finish({ kind: 'failed', message: 'not created' });
      if (e instanceof CreateError) throw e;
      throw new CreateError(500, (e as Error).message);
    } finally {
      // The next VM's workers start now, off this request's path.
      setImmediate(() => this.prewarm());
    }
    return vm;
  }

  async close(): Promise<void> {
    this.closed = true;
  }
}

/**
 * The VMM's control logic behind the API and --config-file, as Firecracker's
 * PrebootApiController / RuntimeApiController: before InstanceStart it edits a VmConfig (every
 * change is validated on a copy and committed only if valid, so a failed request changes
 * nothing); InstanceStart builds the VM through buildVm(), the same path as `typervisor run`;
 * after that only runtime actions are allowed. One action runs at a time (the server queues).
 */
import { closeSync, readFileSync } from 'node:fs';
import { TypervisorError } from '../util/errors.js';
import { log } from '../util/log.js';
import { buildVm, type BuildOptions, type BuiltVm } from '../vmm/index.js';
import {
  createSnapshot,
  DIFF_NEEDS_TRACKING,
  loadSnapshot,
  type CreateParams,
  type LoadParams,
} from '../vmm/index.js';
import {
  checkHostCanRun,
  deviceRateLimiter,
  ExitKind,
  replaceDriveImage,
  updateRateLimiter,
} from '../vmm/index.js';
import {
  DEFAULT_MACHINE_CONFIG,
  emptyVmConfig,
  resourcesFromConfig,
  validateBalloon,
  validateBootSource,
  validateDrive,
  validateMachineConfig,
  validateResources,
  validateVsock,
  withDrive,
  withNetworkInterface,
  validatePmem,
  withPmem,
  validateMemoryHotplug,
  hotplugStatus,
  requestHotplugSize,
  afterFailedInterfacePut,
  wireMachineConfig,
  wireVmConfig,
  type BalloonConfig,
  type BalloonDescription,
  type BalloonRequest,
  type DriveConfig,
  type RateLimiter,
  type RateLimiterConfig,
  type VmConfig,
  type VmSpec,
} from '../vmm/index.js';
import type { VmExitEvent } from '../vmm/index.js';
import { parseVmConfig } from './config-file.js';
import { latencyLine, type LoggerControl } from './logger.js';
import type { MetricGroups, MetricsSystem } from './metrics.js';
import { openOutputFile } from './output-file.js';
import type { SerialBody, SnapshotCreateBody, SnapshotLoadBody, VmmAction } from './routes.js';
import {
  checkMmdsConfig,
  jsonDepth,
  MMDS_MAX_DEPTH,
  MMDS_NOT_INITIALIZED,
  MmdsStore,
} from '../mmds/store.js';
import { monoMs } from '../util/clock.js';

export type ApiOutcome =
  { status: 200; body: unknown } | { status: 204 } | { status: 400 | 500; fault: string };

export const PRE_BOOT_ONLY = 'The requested operation is not supported after starting the microVM.';
export const POST_BOOT_ONLY =
  'The requested operation is not supported before starting the microVM.';
const notSupported = (what: string): ApiOutcome => ({
  status: 400,
  fault: `The requested operation is not supported: ${what}.`,
});
const bad = (fault: string): ApiOutcome => ({ status: 400, fault });
const NO_CONTENT: ApiOutcome = { status: 204 };
/** Firecracker's LoadSnapshotNotAllowed: a load needs a process that has configured nothing. */
export const LOAD_AFTER_BOOT_RESOURCES =
  'Loading a microVM snapshot not allowed after configuring boot-specific resources.';
const CREATE_PREFIX = 'Create snapshot error: ';
const LOAD_PREFIX = 'Load snapshot error: ';
const prefixed = (prefix: string, m: string) => (m.startsWith(prefix) ? m : prefix + m);

export interface ControllerOptions {
  instanceId: string;
  version: string;
  metrics: MetricsSystem;
  logger: LoggerControl;
  /** Called once the VM runs (console, boot timer...). */
  onStarted?: (built: BuiltVm) => void;
  /**
   * Called after each accepted machine-config (PUT or PATCH) with its vCPU count: the API mode
   * starts the vCPU workers a VM of that many vCPUs will run on, ahead of InstanceStart.
   */
  onMachineConfig?: (vcpus: number) => void;
  /** Called once when the VM has ended. */
  onExit?: (event: VmExitEvent) => void;
  /** For tests: replaces buildVm. */
  build?: (spec: VmSpec, opts: BuildOptions) => BuiltVm;
  /**
   * For tests: replaces the host check InstanceStart makes before building (checkHostCanRun:
   * a usable /dev/kvm, a kernel it can run), for a test whose `build` needs no KVM.
   */
  hostCheck?: (kernelPath: string) => void;
  /** For tests: replace the snapshot functions. */
  createSnapshot?: (built: BuiltVm, p: CreateParams) => Promise<void>;
  loadSnapshot?: (p: LoadParams, opts: BuildOptions) => Promise<BuiltVm>;
  /** --mmds-size-limit: the MMDS data store's limit in bytes (default: Firecracker's 51200). */
  mmdsSizeLimit?: number;
}

/**
 * The deprecation warning a request carries, as Firecracker's parsed requests do: the API server
 * logs it and answers with a `Deprecation: true` header, whatever the outcome. The fields are
 * still honoured.
 */
export function deprecationOf(a: VmmAction): string | undefined {
  switch (a.kind) {
    case 'PutMachineConfig':
      return a.config.cpu_template !== undefined
        ? 'PUT /machine-config: cpu_template field is deprecated.'
        : undefined;
    case 'PatchMachineConfig':
      return a.update.cpu_template !== undefined
        ? 'PATCH /machine-config: cpu_template field is deprecated.'
        : undefined;
    case 'PutVsock':
      return a.config.vsock_id !== undefined
        ? 'PUT /vsock: vsock_id field is deprecated.'
        : undefined;
    case 'PutMmdsConfig':
      return (a.config.version ?? 'V1') === 'V1'
        ? 'PUT /mmds/config: V1 is deprecated. Use V2 instead.'
        : undefined;
    case 'LoadSnapshot':
      return a.params.mem_file_path !== undefined || a.params.enable_diff_snapshots === true
        ? 'PUT /snapshot/load: mem_file_path and enable_diff_snapshots fields are deprecated.'
        : undefined;
    default:
      return undefined;
  }
}

export class VmmController {
  private config: VmConfig = emptyVmConfig();
  private built: BuiltVm | undefined;
  /**
   * Firecracker's boot_path: set by every pre-boot setter that shapes the VM (not logger or
   * metrics). A snapshot load is refused once it is set: the VM comes from the snapshot alone.
   */
  private bootPath = false;
  /** PUT /serial: where the UART's output goes (undefined: stdout, or the builder's default). */
  private serial: SerialBody = {};
  /** The MMDS data store (PUT/PATCH/GET /mmds); the guest reads a copy in the device worker. */
  private readonly mmds: MmdsStore;
  /**
   * Firecracker creates its MMDS on the first PUT /mmds or PUT /mmds/config before boot (or a
   * snapshot whose VM had one); after boot, /mmds without one is refused (not initialized).
   */
  private mmdsCreated = false;

  constructor(private readonly opts: ControllerOptions) {
    this.mmds = new MmdsStore(opts.mmdsSizeLimit);
  }

  get started(): boolean {
    return this.built !== undefined;
  }

  get vm(): BuiltVm | undefined {
    return this.built;
  }

  /** The configuration as held (what InstanceStart builds from and a snapshot records). */
  fullConfig(): VmConfig {
    return structuredClone(this.config);
  }

  async handle(a: VmmAction): Promise<ApiOutcome> {
    try {
      return await this.dispatch(a);
    } catch (e) {
      if (e instanceof TypervisorError) return bad(e.message);
      log('error', `internal error handling ${a.kind}: ${(e as Error).stack ?? String(e)}`);
      return { status: 500, fault: `Internal error: ${(e as Error).message}` };
    }
  }

  private async dispatch(a: VmmAction): Promise<ApiOutcome> {
    const pre = !this.built;
    switch (a.kind) {
      case 'GetInstanceInfo':
        return {
          status: 200,
          body: {
            id: this.opts.instanceId,
            state: this.stateName(),
            vmm_version: this.opts.version,
            app_name: 'Typervisor',
          },
        };
      case 'GetVersion':
        return { status: 200, body: { firecracker_version: this.opts.version } };
      case 'GetMachineConfig':
        return { status: 200, body: wireMachineConfig(this.config['machine-config']) };
      case 'GetFullVmConfig':
        // Exactly Firecracker's shape (resources.ts wireVmConfig): clients compare it.
        return { status: 200, body: wireVmConfig(this.config) };
      case 'ApplyVmConfig':
        return this.applyConfig(a.text);
      case 'NotSupported':
        return notSupported(`${a.feature} is not implemented in Typervisor yet`);
      case 'GetMmds':
        if (!pre && !this.mmdsCreated) return bad(MMDS_NOT_INITIALIZED);
        return { status: 200, body: this.mmds.value() ?? {} };
      case 'PutMmds':
      case 'PatchMmds': {
        if (!pre && !this.mmdsCreated) return bad(MMDS_NOT_INITIALIZED);
        const r = a.kind === 'PutMmds' ? this.mmds.put(a.data) : this.mmds.patch(a.patch);
        if (!r.ok) return bad(r.error);
        this.mmdsCreated = true;
        if (this.built) await this.pushMmds(this.built);
        return NO_CONTENT;
      }
      case 'PutMmdsConfig': {
        if (!pre) return bad(PRE_BOOT_ONLY);
        const problem = checkMmdsConfig(
          a.config,
          this.config['network-interfaces'].map((n) => n.iface_id),
        );
        if (problem) return bad(problem);
        this.config['mmds-config'] = structuredClone(a.config);
        this.mmdsCreated = true;
        this.bootPath = true;
        return NO_CONTENT;
      }
      case 'PutMachineConfig':
        if (!pre) return bad(PRE_BOOT_ONLY);
        this.config['machine-config'] = validateMachineConfig({
          ...DEFAULT_MACHINE_CONFIG,
          // Without cpu_template a PUT keeps the template set before (Firecracker's update).
          ...(this.config['machine-config'].cpu_template !== undefined
            ? { cpu_template: this.config['machine-config'].cpu_template }
            : {}),
          ...a.config,
        });
        // A static template (even "None") replaces a custom one, as in Firecracker.
        if (a.config.cpu_template !== undefined) this.config['cpu-config'] = null;
        this.bootPath = true;
        this.opts.onMachineConfig?.(this.config['machine-config'].vcpu_count);
        return NO_CONTENT;
      case 'PatchMachineConfig':
        if (!pre) return bad(PRE_BOOT_ONLY);
        this.config['machine-config'] = validateMachineConfig({
          ...this.config['machine-config'],
          ...a.update,
        });
        if (a.update.cpu_template !== undefined) this.config['cpu-config'] = null;
        this.bootPath = true;
        this.opts.onMachineConfig?.(this.config['machine-config'].vcpu_count);
        return NO_CONTENT;
      case 'PutCpuConfig': {
        if (!pre) return bad(PRE_BOOT_ONLY);
        // A custom template replaces a static one (machine-config then reports none).
        const { cpu_template: _replaced, ...machine } = this.config['machine-config'];
        this.config['machine-config'] = machine;
        this.config['cpu-config'] = a.config;
        this.bootPath = true;
        return NO_CONTENT;
      }
      case 'PutBootSource':
        if (!pre) return bad(PRE_BOOT_ONLY);
        this.config['boot-source'] = validateBootSource({ ...a.config });
        this.bootPath = true;
        return NO_CONTENT;
      case 'PutDrive':
        if (!pre)
          return notSupported('hot-plugging block devices is not implemented in Typervisor yet');
        // is_read_only defaults to false, as in Firecracker (and is echoed so).
        this.config.drives = withDrive(
          this.config.drives,
          validateDrive({ ...a.config, is_read_only: a.config.is_read_only ?? false }),
        );
        this.bootPath = true;
        return NO_CONTENT;
      case 'PutNetworkInterface':
        if (!pre)
          return notSupported(
            'hot-plugging network interfaces is not implemented in Typervisor yet',
          );
        {
          const nets = this.config['network-interfaces'];
          try {
            this.config['network-interfaces'] = withNetworkInterface(nets, a.config);
            this.bootPath = true;
          } catch (e) {
            // As Firecracker: the old interface with this id is removed before the new one is
            // made, so a failed replacement leaves none (unless its MAC was the problem).
            this.config['network-interfaces'] = afterFailedInterfacePut(nets, a.config);
            throw e;
          }
          return NO_CONTENT;
        }
      case 'PatchDrive':
        if (!this.built) return bad(POST_BOOT_ONLY);
        return this.patchDrive(this.built, a.update);
      case 'PatchNetworkInterface':
        if (!this.built) return bad(POST_BOOT_ONLY);
        return this.patchNetworkInterface(this.built, a.update);
      case 'PutVsock':
        if (!pre) return bad(PRE_BOOT_ONLY);
        this.config.vsock = validateVsock({ ...a.config });
        this.bootPath = true;
        return NO_CONTENT;
      case 'PatchPmem':
        if (!this.built) return bad(POST_BOOT_ONLY);
        return this.patchPmem(this.built, a.update);
      case 'PutPmem':
        if (!pre)
          return notSupported('hot-plugging pmem devices is not implemented in Typervisor yet');
        this.config.pmem = withPmem(this.config.pmem, validatePmem(a.config));
        this.bootPath = true;
        return NO_CONTENT;
      case 'PutMemoryHotplug':
        if (!pre) return bad(PRE_BOOT_ONLY);
        this.config['memory-hotplug'] = validateMemoryHotplug(a.config);
        this.bootPath = true;
        return NO_CONTENT;
      case 'PatchMemoryHotplug': {
        if (!this.built) return bad(POST_BOOT_ONLY);
        const hp = this.config['memory-hotplug'];
        if (!hp)
          return bad(
            'memory hotplug is not configured on this VM (PUT /hotplug/memory before boot)',
          );
        requestHotplugSize(validateMemoryHotplug(hp), this.built, a.requestedMib);
        return NO_CONTENT;
      }
      case 'GetMemoryHotplug': {
        const hp = this.config['memory-hotplug'];
        if (!hp)
          return bad(
            'memory hotplug is not configured on this VM (PUT /hotplug/memory before boot)',
          );
        return { status: 200, body: hotplugStatus(validateMemoryHotplug(hp), this.built) };
      }
      case 'PutEntropy':
        if (!pre) return bad(PRE_BOOT_ONLY);
        this.config.entropy = { ...a.config };
        this.bootPath = true;
        return NO_CONTENT;
      case 'PutBalloon':
        if (!pre) return bad(PRE_BOOT_ONLY);
        this.config.balloon = validateBalloon(
          { ...a.config },
          this.config['machine-config'].mem_size_mib,
        );
        this.bootPath = true;
        return NO_CONTENT;
      case 'GetBalloon':
      case 'GetBalloonStats':
      case 'PatchBalloon':
      case 'PatchBalloonStats':
      case 'StartBalloonHinting':
      case 'GetBalloonHintingStatus':
      case 'StopBalloonHinting':
        return this.balloon(a);
      case 'PutLogger':
        if (!pre) return bad(PRE_BOOT_ONLY);
        this.opts.logger.configure(a.config);
        this.config.logger = { ...(this.config.logger ?? {}), ...a.config };
        return NO_CONTENT;
      case 'PutMetrics':
        if (!pre) return bad(PRE_BOOT_ONLY);
        this.opts.metrics.init(a.config);
        this.config.metrics = { ...a.config };
        return NO_CONTENT;
      case 'PutSerial':
        if (!pre) return bad(PRE_BOOT_ONLY);
        return this.putSerial(a.config);
      case 'InstanceStart':
        if (!pre) return bad(PRE_BOOT_ONLY);
        return this.start();
      case 'FlushMetrics':
        if (pre) return bad(POST_BOOT_ONLY);
        await this.opts.metrics.flush();
        return NO_CONTENT;
      case 'SendCtrlAltDel':
        if (!this.built) return bad(POST_BOOT_ONLY);
        return this.built.devices.i8042.sendCtrlAltDel()
          ? NO_CONTENT
          : bad('i8042 internal buffer full.');
      case 'Pause': {
        if (!this.built) return bad(POST_BOOT_ONLY);
        const t0 = monoMs();
        try {
          // The vCPUs, then the device worker: guest RAM does not change while paused.
          await this.built.vmm.pauseAll(this.built.deviceWorker);
        } catch (e) {
          return bad(`Internal VMM error: ${(e as Error).message}`);
        }
        this.latency('pause_vm', t0);
        return NO_CONTENT;
      }
      case 'Resume': {
        if (!this.built) return bad(POST_BOOT_ONLY);
        const t0 = monoMs();
        try {
          await this.built.vmm.resumeAll(this.built.deviceWorker);
        } catch (e) {
          return bad(`Internal VMM error: ${(e as Error).message}`);
        }
        this.latency('resume_vm', t0);
        return NO_CONTENT;
      }
      case 'CreateSnapshot':
        if (!this.built) return bad(POST_BOOT_ONLY);
        // The memory file carries the hotplugged memory after RAM (snapshot.ts).
        return this.create(this.built, a.params);
      case 'LoadSnapshot':
        if (this.built) return bad(PRE_BOOT_ONLY);
        if (this.bootPath) return bad(LOAD_AFTER_BOOT_RESOURCES);
        return this.load(a.params);
    }
  }

  /**
   * PATCH /drives/{id} after boot (helper P): a new path_on_host is opened with the start-up
   * checks and swapped in by the device (new capacity in its config space, a config-change
   * interrupt); a new rate_limiter is merged into the stored one and applied to the running
   * device (issue 16). The image is swapped first: if it fails, nothing is changed.
   */
  private async patchDrive(
    built: BuiltVm,
    u: { drive_id: string; path_on_host?: string; rate_limiter?: RateLimiter },
  ): Promise<ApiOutcome> {
    const prefix = 'Unable to patch the block device: ';
    const i = this.config.drives.findIndex((x) => x.drive_id === u.drive_id);
    const d = this.config.drives[i];
    if (!d)
      return bad(`${prefix}no drive with id ${u.drive_id}. Please verify the request arguments.`);
    if (u.path_on_host === undefined && u.rate_limiter === undefined)
      return bad(
        `${prefix}drive ${u.drive_id}: the request changes nothing (give path_on_host and/or rate_limiter)`,
      );
    const next: DriveConfig = { ...d };
    // The new limits are checked before anything changes.
    let limiter: RateLimiterConfig | undefined;
    try {
      if (u.rate_limiter !== undefined) {
        next.rate_limiter = mergeRateLimiter(d.rate_limiter, u.rate_limiter);
        limiter = deviceRateLimiter(next.rate_limiter, 'rate_limiter') ?? {};
      }
    } catch (e) {
      if (e instanceof TypervisorError) return bad(prefix + e.message);
      throw e;
    }
    if (u.path_on_host !== undefined) {
      try {
        await replaceDriveImage(built, d, u.path_on_host);
      } catch (e) {
        if (e instanceof TypervisorError) return bad(prefix + e.message);
        throw e;
      }
      // As given (GET /vm/config and a snapshot show the path the client named).
      next.path_on_host = u.path_on_host;
    }
    if (limiter !== undefined) {
      try {
        await updateRateLimiter(built, { kind: 'block', id: u.drive_id, limiter });
      } catch (e) {
        if (e instanceof TypervisorError) return bad(prefix + e.message);
        throw e;
      }
    }
    this.config.drives = this.config.drives.map((x, j) => (j === i ? next : x));
    this.toVm(built);
    return NO_CONTENT;
  }

  /**
   * PATCH /network-interfaces/{id} after boot (helper P): the rate limiters are merged into the
   * stored configuration (GET /vm/config, snapshots) and applied to the running device through
   * the device worker's mailbox (issue 16); bad values change nothing.
   */
  private async patchNetworkInterface(
    built: BuiltVm,
    u: {
      iface_id: string;
      rx_rate_limiter?: RateLimiter;
      tx_rate_limiter?: RateLimiter;
    },
  ): Promise<ApiOutcome> {
    const ifaces = this.config['network-interfaces'];
    const i = ifaces.findIndex((x) => x.iface_id === u.iface_id);
    const n = ifaces[i];
    if (!n)
      return bad(`Unable to update the net device: no network interface with id ${u.iface_id}`);
    const next = { ...n };
    const prefix = 'Unable to update the net device: ';
    let rx: RateLimiterConfig | undefined;
    let tx: RateLimiterConfig | undefined;
    try {
      if (u.rx_rate_limiter !== undefined) {
        next.rx_rate_limiter = mergeRateLimiter(n.rx_rate_limiter, u.rx_rate_limiter);
        rx = deviceRateLimiter(next.rx_rate_limiter, 'rx_rate_limiter') ?? {};
      }
      if (u.tx_rate_limiter !== undefined) {
        next.tx_rate_limiter = mergeRateLimiter(n.tx_rate_limiter, u.tx_rate_limiter);
        tx = deviceRateLimiter(next.tx_rate_limiter, 'tx_rate_limiter') ?? {};
      }
      if (rx !== undefined || tx !== undefined)
        await updateRateLimiter(built, {
          kind: 'net',
          id: u.iface_id,
          ...(rx ? { rx } : {}),
          ...(tx ? { tx } : {}),
        });
    } catch (e) {
      if (e instanceof TypervisorError) return bad(prefix + e.message);
      throw e;
    }
    if (next.rx_rate_limiter === undefined) delete next.rx_rate_limiter;
    if (next.tx_rate_limiter === undefined) delete next.tx_rate_limiter;
    this.config['network-interfaces'] = ifaces.map((x, j) => (j === i ? next : x));
    this.toVm(built);
    return NO_CONTENT;
  }

  /**
   * PATCH /pmem/{id} after boot (helper P): the rate limiter (on flush requests) is merged per
   * bucket into the stored configuration and applied to the running device, as for drives; no
   * rate_limiter changes nothing (Firecracker answers 204 too). Bad values change nothing.
   */
  private async patchPmem(
    built: BuiltVm,
    u: { id: string; rate_limiter?: RateLimiter },
  ): Promise<ApiOutcome> {
    const prefix = 'Unable to patch the pmem device: ';
    const list = this.config.pmem;
    const i = list.findIndex((x) => x.id === u.id);
    const p = list[i];
    if (!p)
      return bad(`${prefix}no pmem device with id ${u.id}. Please verify the request arguments.`);
    if (u.rate_limiter === undefined) return NO_CONTENT;
    const next = { ...p };
    try {
      next.rate_limiter = mergeRateLimiter(p.rate_limiter, u.rate_limiter);
      const limiter = deviceRateLimiter(next.rate_limiter, 'rate_limiter') ?? {};
      await updateRateLimiter(built, { kind: 'pmem', id: u.id, limiter });
    } catch (e) {
      if (e instanceof TypervisorError) return bad(prefix + e.message);
      throw e;
    }
    if (next.rate_limiter === undefined) delete next.rate_limiter;
    this.config.pmem = list.map((x, j) => (j === i ? next : x));
    this.toVm(built);
    return NO_CONTENT;
  }

  /**
   * A PATCHed drive, interface or pmem device into the VM's own copy of its configuration, which a snapshot
   * saves (a loaded VM's is not this.config: it was cloned at load).
   */
  private toVm(built: BuiltVm): void {
    const c = built.parts?.config;
    if (!c || c === this.config) return;
    c.drives = structuredClone(this.config.drives);
    c['network-interfaces'] = structuredClone(this.config['network-interfaces']);
    c.pmem = structuredClone(this.config.pmem);
    c.balloon = structuredClone(this.config.balloon);
  }

  /**
   * The balloon's requests (issue 16), as Firecracker answers them: GET /balloon is the
   * configuration (the target and polling interval as last set; the driver's actual size is in
   * GET /balloon/statistics); the rest act on the running device through the device worker and
   * are refused before boot.
   */
  private async balloon(a: VmmAction): Promise<ApiOutcome> {
    const cfg = this.config.balloon;
    if (!cfg) return bad('No balloon device found.');
    const built = this.built;
    // Only the configuration (as Firecracker): what the driver holds is in the statistics.
    if (a.kind === 'GetBalloon') return { status: 200, body: wireBalloon(cfg) };
    if (!built) return bad(POST_BOOT_ONLY);
    const worker = built.deviceWorker;
    if (!worker) return bad('No balloon device found.');
    const ask = async (request: BalloonRequest): Promise<unknown> =>
      worker.request({ op: 'balloon', request });
    const fail = (prefix: string) => (e: unknown) => bad(prefix + (e as Error).message);
    const describe = async () => (await ask({ op: 'describe' })) as BalloonDescription;
    const mib = (pages: number) => Math.floor(pages / 256);
    switch (a.kind) {
      case 'GetBalloonStats': {
        if ((cfg.stats_polling_interval_s ?? 0) === 0)
          return bad('Received stats query when stats are disabled.');
        const d = await describe();
        return {
          status: 200,
          body: {
            target_pages: d.targetPages,
            actual_pages: d.actualPages,
            target_mib: mib(d.targetPages),
            actual_mib: mib(d.actualPages),
            ...d.stats,
          },
        };
      }
      case 'PatchBalloon': {
        if (a.amountMib > this.config['machine-config'].mem_size_mib)
          return bad('Amount of pages requested is too large.');
        try {
          await ask({ op: 'set-target', amountMib: a.amountMib });
        } catch (e) {
          return fail('Balloon update error: ')(e);
        }
        this.config.balloon = { ...cfg, amount_mib: a.amountMib };
        this.toVm(built);
        return NO_CONTENT;
      }
      case 'PatchBalloonStats': {
        try {
          await ask({ op: 'set-stats-interval', seconds: a.seconds });
        } catch (e) {
          return fail('Balloon update error: ')(e);
        }
        this.config.balloon = { ...cfg, stats_polling_interval_s: a.seconds };
        this.toVm(built);
        return NO_CONTENT;
      }
      case 'StartBalloonHinting':
      case 'StopBalloonHinting':
      case 'GetBalloonHintingStatus':
        try {
          const value = await ask(
            a.kind === 'StartBalloonHinting'
              ? { op: 'hint-start', acknowledgeOnStop: a.acknowledgeOnStop }
              : a.kind === 'StopBalloonHinting'
                ? { op: 'hint-stop' }
                : { op: 'hint-status' },
          );
          return a.kind === 'GetBalloonHintingStatus' ? { status: 200, body: value } : NO_CONTENT;
        } catch (e) {
          return fail('')(e);
        }
      default:
        return bad('not a balloon request');
    }
  }

  /**
   * PUT /serial (helper P): stored as Firecracker stores it (it does not shape the VM, so a
   * snapshot load may still follow), after one open with the output-file rules (output-file.ts:
   * no symlink, created 0600, a regular file with one link or a FIFO) so a bad path is refused
   * now, naming why. The file is opened again, with the same checks, when the VM is built.
   */
  private putSerial(config: SerialBody): ApiOutcome {
    if (config.serial_out_path !== undefined)
      closeSync(openOutputFile('serial_out_path', config.serial_out_path));
    this.serial = { ...config };
    return NO_CONTENT;
  }

  /**
   * The console for a build: the serial_out_path file, opened with the output-file checks, or
   * undefined (stdout), and the output's rate limiter. The VM writes it until the process ends, so it stays open;
   * `fail` closes it when the build did not happen.
   */
  private serialOutput(): {
    opts: Pick<BuildOptions, 'consoleFd' | 'serialRateLimiter'>;
    fail(): void;
  } {
    const { serial_out_path: path, rate_limiter: limit } = this.serial;
    const opts = limit ? { serialRateLimiter: { ...limit } } : {};
    if (path === undefined) return { opts, fail: () => undefined };
    const fd = openOutputFile('serial_out_path', path);
    return { opts: { ...opts, consoleFd: fd }, fail: () => closeSync(fd) };
  }

  /** Firecracker's latencies_us group: `name` (the request) and `vmm_name` (the VMM's part). */
  private latency(name: string, t0: number, vmmT0 = t0, vmmT1 = monoMs()): void {
    const us = (ms: number) => Math.round(ms * 1000);
    const total = us(monoMs() - t0);
    this.opts.metrics.store('latencies_us', name, total);
    const line = latencyLine(name, total);
    if (line) log('info', line, { thread: 'fc_api' });
    this.opts.metrics.store('latencies_us', `vmm_${name}`, us(vmmT1 - vmmT0));
  }

  /** PUT /snapshot/create: the VM must be paused; it stays paused. */
  private async create(built: BuiltVm, p: SnapshotCreateBody): Promise<ApiOutcome> {
    const t0 = monoMs();
    const type = p.snapshot_type ?? 'Full';
    // Firecracker checks this first, whatever the VM's state (a VM that tracks dirty pages has
    // the device-dirty bitmap in its RAM layout).
    if (type === 'Diff' && built.parts?.layout.deviceDirty === undefined)
      return bad(`${CREATE_PREFIX}${DIFF_NEEDS_TRACKING}`);
    if (built.vmm.state !== 'paused') {
      const now = built.vmm.state === 'running' ? 'Running' : 'Stopped';
      return bad(`${CREATE_PREFIX}the microVM must be paused (it is ${now})`);
    }
    const vmmT0 = monoMs();
    try {
      await (this.opts.createSnapshot ?? createSnapshot)(built, {
        snapshotPath: p.snapshot_path,
        memFilePath: p.mem_file_path,
        type,
      });
    } catch (e) {
      if (e instanceof TypervisorError) return bad(prefixed(CREATE_PREFIX, e.message));
      throw e;
    }
    this.latency(type === 'Full' ? 'full_create_snapshot' : 'diff_create_snapshot', t0, vmmT0);
    return NO_CONTENT;
  }

  /**
   * PUT /snapshot/load, in a fresh process only. A failed load creates nothing (loadSnapshot
   * undoes what it made), so the process stays fresh and a corrected load may follow.
   */
  private async load(p: SnapshotLoadBody): Promise<ApiOutcome> {
    const t0 = monoMs();
    if (p.huge_pages === 'Transparent')
      return bad(`${LOAD_PREFIX}huge_pages "Transparent" is not supported yet`);
    if (p.huge_pages === '2M')
      return bad(
        `${LOAD_PREFIX}huge_pages "2M" needs a Uffd memory backend, and the snapshot was not made with huge pages`,
      );
    const memBackend = p.mem_backend
      ? { type: p.mem_backend.backend_type, path: p.mem_backend.backend_path }
      : { type: 'File' as const, path: p.mem_file_path! };
    const params: LoadParams = {
      snapshotPath: p.snapshot_path,
      memBackend,
      trackDirtyPages: (p.track_dirty_pages ?? false) || (p.enable_diff_snapshots ?? false),
      resumeVm: p.resume_vm ?? false,
      clockRealtime: p.clock_realtime ?? false,
      networkOverrides: (p.network_overrides ?? []).map((o) => ({
        ifaceId: o.iface_id,
        hostDevName: o.host_dev_name,
      })),
      ...(p.vsock_override ? { vsockOverride: { udsPath: p.vsock_override.uds_path } } : {}),
    };
    const vmmT0 = monoMs();
    let built: BuiltVm;
    let serial: ReturnType<VmmController['serialOutput']> | undefined;
    try {
      serial = this.serialOutput();
      built = await (this.opts.loadSnapshot ?? loadSnapshot)(params, serial.opts);
    } catch (e) {
      serial?.fail();
      if (e instanceof TypervisorError) return bad(prefixed(LOAD_PREFIX, e.message));
      throw e;
    }
    const vmmT1 = monoMs();
    this.built = built;
    // GET /vm/config: the saved configuration with the overrides applied. Logger and metrics
    // configured in this process stay (Firecracker does not save them either).
    const saved = built.parts?.config;
    if (saved)
      this.config = {
        ...structuredClone(saved),
        logger: this.config.logger,
        metrics: this.config.metrics,
      };
    // The MMDS configuration came with the snapshot, its data store did not (as Firecracker).
    if (this.config['mmds-config']) this.mmdsCreated = true;
    this.running(built);
    if (this.mmds.initialized)
      this.pushMmds(built).catch((e: Error) =>
        log('error', `MMDS: the data store did not reach the device worker: ${e.message}`),
      );
    this.latency('load_snapshot', t0, vmmT0, vmmT1);
    return NO_CONTENT;
  }

  /** The data store to the device worker's responders (the guest sees it from then on). */
  private async pushMmds(built: BuiltVm): Promise<void> {
    if (!this.config['mmds-config'] || !built.deviceWorker) return;
    await built.deviceWorker.request({ op: 'mmds-data', json: this.mmds.text() });
  }

  /**
   * --metadata FILE: the data store's first content, as a PUT /mmds before anything else
   * (Firecracker's flag). Returns the problem, or undefined.
   */
  loadMetadata(json: unknown): string | undefined {
    if (typeof json !== 'object' || json === null || Array.isArray(json))
      return 'the metadata must be a JSON object';
    if (jsonDepth(json) > MMDS_MAX_DEPTH) return `nested deeper than ${MMDS_MAX_DEPTH}`;
    const r = this.mmds.put(json);
    if (!r.ok) return r.error;
    this.mmdsCreated = true;
    return undefined;
  }

  /** The VM exists (booted or loaded): metrics, exit and console hooks. */
  private running(built: BuiltVm): void {
    this.opts.metrics.addSource(() => deviceMetrics(built));
    void built.vmm.exited.then((ev) => this.opts.onExit?.(ev));
    this.opts.onStarted?.(built);
  }

  private stateName(): 'Not started' | 'Running' | 'Paused' {
    if (!this.built) return 'Not started';
    return this.built.vmm.state === 'paused' ? 'Paused' : 'Running';
  }

  /** InstanceStart: the configuration -> VmResources -> buildVm(), as `typervisor run` does. */
  private start(): ApiOutcome {
    try {
      const spec = validateResources(resourcesFromConfig(this.config));
      (this.opts.hostCheck ?? ((k: string) => checkHostCanRun(k, false)))(spec.kernelPath);
      const serial = this.serialOutput();
      try {
        // The configuration as given (rate limiters, cache_type, mtu...): a snapshot saves it.
        this.built = (this.opts.build ?? buildVm)(spec, {
          config: this.config,
          ...serial.opts,
        });
      } catch (e) {
        serial.fail();
        throw e;
      }
    } catch (e) {
      if (e instanceof TypervisorError) return bad(`Start microvm error: ${e.message}`);
      throw e;
    }
    this.running(this.built);
    if (this.mmds.initialized)
      this.pushMmds(this.built).catch((e: Error) =>
        log('error', `MMDS: the data store did not reach the device worker: ${e.message}`),
      );
    return NO_CONTENT;
  }

  /**
   * PUT /vm/config: the text of a --config-file, applied as the file is (each section as its
   * PUT, in the file's order, then InstanceStart), in one request: what the daemon's process
   * mode sends a pooled VMM (one round trip instead of a PUT per section and InstanceStart after
   * them, docs/daemon.md). The first failure ends it and is answered, named by its section;
   * the sections before it stay applied, as their own PUTs would have.
   */
  private async applyConfig(text: string): Promise<ApiOutcome> {
    const parsed = parseVmConfig(text);
    if ('fault' in parsed) return bad(parsed.fault);
    const failed = await this.applyActions(parsed.actions);
    if (!failed) return NO_CONTENT;
    const { action, outcome } = failed;
    return { status: outcome.status, fault: `${sectionOf(action)}: ${outcome.fault}` };
  }

  /**
   * --config-file: the JSON of GET /vm/config, applied section by section as the matching PUT
   * requests would be, then InstanceStart; or a "snapshot-load" section, applied as PUT
   * /snapshot/load (config-file.ts). Returns the first failure's message.
   */
  async applyConfigFile(path: string, opts: { noApi?: boolean } = {}): Promise<string | undefined> {
    let text: string;
    try {
      text = readFileSync(path, 'utf8');
    } catch (e) {
      return `cannot read the configuration file ${path}: ${(e as Error).message}`;
    }
    const parsed = parseVmConfig(text, opts);
    if ('fault' in parsed) return parsed.fault;
    const failed = await this.applyActions(parsed.actions);
    return failed?.outcome.fault;
  }

  /** A parsed configuration's actions in order, up to the first that fails (returned). */
  private async applyActions(
    actions: readonly VmmAction[],
  ): Promise<{ action: VmmAction; outcome: Extract<ApiOutcome, { fault: string }> } | undefined> {
    for (const action of actions) {
      const outcome = await this.handle(action);
      if ('fault' in outcome) return { action, outcome };
    }
    return undefined;
  }
}

/** The configuration section (or action) a config-file action comes from, for a fault. */
function sectionOf(a: VmmAction): string {
  switch (a.kind) {
    case 'PutLogger':
      return 'logger';
    case 'PutMetrics':
      return 'metrics';
    case 'PutMachineConfig':
      return 'machine-config';
    case 'PutCpuConfig':
      return 'cpu-config';
    case 'PutBootSource':
      return 'boot-source';
    case 'PutDrive':
      return `drives (${a.config.drive_id})`;
    case 'PutNetworkInterface':
      return `network-interfaces (${a.config.iface_id})`;
    case 'PutMmdsConfig':
      return 'mmds-config';
    case 'PutVsock':
      return 'vsock';
    case 'PutEntropy':
      return 'entropy';
    case 'PutBalloon':
      return 'balloon';
    case 'PutPmem':
      return `pmem (${a.config.id})`;
    case 'PutMemoryHotplug':
      return 'memory-hotplug';
    case 'LoadSnapshot':
      return 'snapshot-load';
    default:
      return a.kind;
  }
}

/**
 * The running VM's per-device and per-vCPU counters, for the metrics lines. Virtio devices are
 * asked of the device worker (its mailbox), in Firecracker's shape: one group per kind summed
 * over its devices (`block`, `net`, `vsock`, `entropy`) and one per device (`block_<drive_id>`,
 * `net_<iface_id>`), each with the transport's own counters beside the device's.
 */
async function deviceMetrics(built: BuiltVm): Promise<MetricGroups> {
  const { vmm, devices } = built;
  const virtio: MetricGroups = {};
  for (const d of (await built.deviceWorker?.counters()) ?? []) {
    // An interface's MMDS responder counts into the mmds group (summed over interfaces).
    const device: Record<string, number> = {};
    for (const [k, v] of Object.entries(d.device)) {
      if (!k.startsWith('mmds_')) device[k] = v;
      else {
        const m = (virtio.mmds ??= {});
        m[k.slice(5)] = (m[k.slice(5)] ?? 0) + v;
      }
    }
    const own: Record<string, number> = {
      ...device,
      guest_errors: d.transport.guestErrors,
      bad_register_accesses: d.transport.badAccesses,
      illegal_status_writes: d.transport.illegalStatus,
      device_resets_needed: d.transport.needsReset,
      interrupts: d.transport.interrupts,
    };
    const perDevice = d.group === 'block' || d.group === 'net' ? `${d.group}_${d.id}` : undefined;
    if (perDevice) virtio[perDevice] = own;
    const sum = (virtio[d.group] ??= {});
    for (const [k, v] of Object.entries(own)) sum[k] = (sum[k] ?? 0) + v;
  }
  // Firecracker's vcpu group: the exits by kind, summed over the vCPUs.
  const vcpu: Record<string, number> = {
    exit_io_in: 0,
    exit_io_out: 0,
    exit_mmio_read: 0,
    exit_mmio_write: 0,
  };
  for (let i = 0; i < vmm.vcpuCount; i++) {
    vcpu.exit_io_in! += vmm.control.exitsOfKind(i, ExitKind.IoIn);
    vcpu.exit_io_out! += vmm.control.exitsOfKind(i, ExitKind.IoOut);
    vcpu.exit_mmio_read! += vmm.control.exitsOfKind(i, ExitKind.MmioRead);
    vcpu.exit_mmio_write! += vmm.control.exitsOfKind(i, ExitKind.MmioWrite);
  }
  return {
    ...virtio,
    vcpu,
    // The UART's registers and its output path (missed_write_count: bytes dropped because the
    // console reader did not keep up or had gone).
    uart: { ...devices.serial.stats(), ...devices.console.stats() },
    i8042: { ...devices.i8042.stats() },
    unhandled: { ...devices.unhandled.stats() },
  };
}

/** GET /balloon: the configuration, every field written (Firecracker's BalloonDeviceConfig). */
function wireBalloon(b: BalloonConfig): Record<string, unknown> {
  return {
    amount_mib: b.amount_mib,
    deflate_on_oom: b.deflate_on_oom,
    stats_polling_interval_s: b.stats_polling_interval_s ?? 0,
    free_page_hinting: b.free_page_hinting === true,
    free_page_reporting: b.free_page_reporting === true,
  };
}

/**
 * A rate limiter update as Firecracker applies one (RateLimiterUpdate): a bucket left out keeps
 * its value, a bucket given replaces it, a bucket with size or refill_time 0 disables it.
 */
export function mergeRateLimiter(
  old: RateLimiter | undefined,
  update: RateLimiter,
): RateLimiter | undefined {
  const out: RateLimiter = { ...(old ?? {}) };
  for (const k of ['bandwidth', 'ops'] as const) {
    const b = update[k];
    if (b === undefined) continue;
    if (b.size === 0 || b.refill_time === 0) delete out[k];
    else out[k] = { ...b };
  }
  return out.bandwidth || out.ops ? out : undefined;
}

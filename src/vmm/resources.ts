/**
 * VmResources: the validated description of a VM, before it is built. The CLI (`typervisor
 * run`), the REST API and `--config-file` all fill this same structure, in Firecracker's field
 * names, and buildVm() builds from it: one path, not two.
 *
 * Besides the machine and the boot source it carries Firecracker's other resources (drives,
 * network interfaces, vsock, entropy, logger, metrics) as validated data. Which of them buildVm()
 * can attach yet is buildVm()'s business; these functions only say whether a description is
 * valid and consistent. Everything here is a pure check or a copy: a caller that gets a
 * ConfigError has changed nothing.
 */
import { checkMmdsConfig, MMDS_DEFAULT_IPV4, type MmdsConfig } from '../mmds/store.js';
import { closeSync } from 'node:fs';
import { checkBootImage, openHostFile } from '../loader/image-file.js';
import { CMDLINE_MAX_SIZE, MAX_VCPUS } from '../arch/x86_64/layout.js';
import {
  parseCpuTemplate,
  templateMsrAddrs,
  wireCpuTemplate,
  type CpuTemplate,
} from '../arch/x86_64/cpu-template.js';
import {
  CPU_TEMPLATE_NAMES,
  isStaticCpuTemplate,
  staticCpuTemplate,
} from '../arch/x86_64/cpu-template-static.js';
import { BLK_ID_BYTES } from '../devices/virtio/block/request.js';
import {
  bucketEnabled,
  type RateLimiterConfig,
  type TokenBucketConfig,
} from '../devices/virtio/rate-limiter.js';
import { checkMemSizes } from '../devices/virtio/mem/descriptor.js';
import { ConfigError } from '../util/errors.js';
import { isGuestCid, MAX_GUEST_CID, MIN_GUEST_CID } from '../util/vhost-abi.js';
import { MAX_VIRTIO_DEVICES, type VirtioConfig } from './virtio-plan.js';

export { MAX_VCPUS } from '../arch/x86_64/layout.js';
export { MAX_VIRTIO_DEVICES } from './virtio-plan.js';

export interface MachineConfig {
  vcpu_count: number;
  mem_size_mib: number;
  /** Two threads per core in the guest's CPUID topology: vcpu_count must be 1 or even. */
  smt?: boolean;
  /** KVM's dirty log on every RAM slot plus the device-dirty bitmap: for Diff snapshots. */
  track_dirty_pages?: boolean;
  huge_pages?: 'None' | 'Transparent' | '2M';
  /** A static CPU template by name (cpu-template-static.ts): C3, T2, T2S, T2CL, T2A or None. */
  cpu_template?: string;
}

/**
 * A custom CPU template (PUT /cpu-config) as JSON in Firecracker's shape, normalized by
 * parseCpuTemplate + wireCpuTemplate (plain JSON: it goes into snapshots as it is).
 */
export type CpuConfigJson = Record<string, unknown>;

/** The MSRs the configuration's CPU template (custom or static) changes: a snapshot saves them. */
export function cpuTemplateMsrAddrs(c: VmConfig): number[] {
  const custom = c['cpu-config'];
  if (custom) return templateMsrAddrs(parseCpuTemplate(custom));
  const name = c['machine-config'].cpu_template;
  return name !== undefined && isStaticCpuTemplate(name)
    ? templateMsrAddrs(staticCpuTemplate(name))
    : [];
}

/** Checks a custom CPU template and gives its normalized JSON (ConfigError naming the field). */
export function normalizeCpuConfig(json: unknown): CpuConfigJson {
  return wireCpuTemplate(parseCpuTemplate(json));
}

export interface BootSource {
  kernel_image_path: string;
  initrd_path?: string;
  boot_args?: string;
}

export interface TokenBucket {
  size: number;
  one_time_burst?: number;
  refill_time: number;
}

export interface RateLimiter {
  bandwidth?: TokenBucket;
  ops?: TokenBucket;
}

/**
 * A drive's engine when its io_engine is unset: "Async" (io_uring) since it led Sync and QEMU in
 * every fio job of three lab boots (issue 17); served with Sync where io_uring is unavailable.
 */
export const DEFAULT_IO_ENGINE = 'Async';

export interface DriveConfig {
  drive_id: string;
  is_root_device: boolean;
  partuuid?: string;
  cache_type?: 'Unsafe' | 'Writeback';
  is_read_only?: boolean;
  path_on_host?: string;
  rate_limiter?: RateLimiter;
  /**
   * Unset: DEFAULT_IO_ENGINE, "Async" (Firecracker's default is "Sync"). Left unset in the
   * stored config, so that the device knows the engine was not asked for.
   */
  io_engine?: 'Sync' | 'Async';
  /**
   * Typervisor's own: path_on_host may be a host block device only when this is true (a
   * regular file otherwise). Firecracker has no such field; it accepts either.
   */
  allow_block_device?: boolean;
  /** vhost-user-block backend socket (not supported: refused by validateDrive). */
  socket?: string;
}

export interface NetworkInterfaceConfig {
  iface_id: string;
  host_dev_name: string;
  guest_mac?: string;
  mtu?: number;
  rx_rate_limiter?: RateLimiter;
  tx_rate_limiter?: RateLimiter;
}

/** Who serves a vsock device's data queues (VsockConfig.backend). */
export type VsockBackend = 'unix' | 'vhost';
export const VSOCK_BACKENDS: readonly VsockBackend[] = ['unix', 'vhost'];

export interface VsockConfig {
  guest_cid: number;
  /** The unix backend's listening socket: required with it, refused with "vhost". */
  uds_path?: string;
  /**
   * Typervisor's own: "unix" (unset: Firecracker's host side, Unix sockets at uds_path) or
   * "vhost" (the host kernel's vhost-vsock serves the rx/tx queues; host programs reach the
   * guest over AF_VSOCK at guest_cid). Firecracker has no such field; validateVsock drops
   * "unix", so a configuration that does not ask for vhost reads back as Firecracker's would.
   */
  backend?: VsockBackend;
  /** Deprecated in Firecracker; kept so a config round-trips. */
  vsock_id?: string;
}

export interface EntropyConfig {
  rate_limiter?: RateLimiter;
}

/** PUT /balloon (Firecracker's Balloon): the target, and the features the device offers. */
export interface BalloonConfig {
  amount_mib: number;
  deflate_on_oom: boolean;
  /** 0 (default): no statistics. */
  stats_polling_interval_s?: number;
  free_page_hinting?: boolean;
  free_page_reporting?: boolean;
}

/**
 * Checks a balloon section against the machine's memory (Firecracker: the target may not exceed
 * the guest's memory; the polling interval is a u16).
 */
export function validateBalloon(b: BalloonConfig, memMib: number): BalloonConfig {
  const u32 = (v: unknown) =>
    Number.isInteger(v) && (v as number) >= 0 && (v as number) <= 0xffff_ffff;
  if (!u32(b.amount_mib)) throw new ConfigError('balloon: amount_mib must be a u32');
  if (typeof b.deflate_on_oom !== 'boolean')
    throw new ConfigError('balloon: deflate_on_oom must be a boolean');
  const s = b.stats_polling_interval_s ?? 0;
  if (!Number.isInteger(s) || s < 0 || s > 0xffff)
    throw new ConfigError('balloon: stats_polling_interval_s must be a u16');
  if (b.amount_mib > memMib) throw new ConfigError('Amount of pages requested is too large.');
  return {
    amount_mib: b.amount_mib,
    deflate_on_oom: b.deflate_on_oom,
    stats_polling_interval_s: s,
    free_page_hinting: b.free_page_hinting === true,
    free_page_reporting: b.free_page_reporting === true,
  };
}

export type LoggerLevel = 'Error' | 'Warning' | 'Info' | 'Debug' | 'Trace' | 'Off';

export interface LoggerConfig {
  level?: string;
  log_path?: string;
  show_level?: boolean;
  show_log_origin?: boolean;
  module?: string;
}

export interface MetricsConfig {
  metrics_path: string;
  emit_id?: boolean;
  properties?: Record<string, string>;
}

/** PUT /pmem/{id} and the config file's `pmem` entries (Firecracker's Pmem). */
export interface PmemApiConfig {
  id: string;
  path_on_host: string;
  root_device?: boolean;
  read_only?: boolean;
  rate_limiter?: RateLimiter;
}

/** PUT /hotplug/memory and the config file's `memory-hotplug` (Firecracker's MemoryHotplugConfig). */
export interface MemoryHotplugConfig {
  total_size_mib: number;
  block_size_mib?: number;
  slot_size_mib?: number;
}

export const DEFAULT_HOTPLUG_BLOCK_MIB = 2;
export const DEFAULT_HOTPLUG_SLOT_MIB = 128;

/** Checks a memory hotplug configuration; returns it with the defaults filled in. */
export function validateMemoryHotplug(m: MemoryHotplugConfig): Required<MemoryHotplugConfig> {
  const full = {
    total_size_mib: m.total_size_mib,
    block_size_mib: m.block_size_mib ?? DEFAULT_HOTPLUG_BLOCK_MIB,
    slot_size_mib: m.slot_size_mib ?? DEFAULT_HOTPLUG_SLOT_MIB,
  };
  checkMemSizes({
    totalMib: full.total_size_mib,
    blockMib: full.block_size_mib,
    slotMib: full.slot_size_mib,
  });
  return full;
}

export interface VmResources {
  machine: MachineConfig;
  boot: BootSource;
  drives?: DriveConfig[];
  pmem?: PmemApiConfig[];
  memory_hotplug?: MemoryHotplugConfig;
  network_interfaces?: NetworkInterfaceConfig[];
  vsock?: VsockConfig;
  entropy?: EntropyConfig;
  balloon?: BalloonConfig;
  logger?: LoggerConfig;
  metrics?: MetricsConfig;
  /** A custom CPU template; exclusive with machine.cpu_template (the last one set wins). */
  cpu_config?: CpuConfigJson;
  /** PUT /mmds/config: the interfaces whose frames to the MMDS address are answered. */
  mmds_config?: MmdsConfig;
}

export const MIN_MEM_MIB = 16;
export const MAX_MEM_MIB = 1024 * 1024; // 1 TiB: far beyond any host we run on, still a sane cap
export const DEFAULT_BOOT_ARGS =
  'console=ttyS0 reboot=k panic=1 pci=off quiet 8250.nr_uarts=1 i8042.noaux i8042.nomux';
/** Firecracker's defaults before any PUT /machine-config. */
export const DEFAULT_MACHINE_CONFIG: Readonly<MachineConfig> = {
  vcpu_count: 1,
  mem_size_mib: 128,
  smt: false,
  track_dirty_pages: false,
  huge_pages: 'None',
};
/** Linux IFNAMSIZ - 1. */
export const MAX_TAP_NAME = 15;
/** sizeof(sockaddr_un.sun_path) - 1. */
export const MAX_UDS_PATH = 107;

export function validateMachineConfig(m: MachineConfig): MachineConfig {
  if (!Number.isInteger(m.vcpu_count) || m.vcpu_count < 1 || m.vcpu_count > MAX_VCPUS) {
    throw new ConfigError(
      `vcpu_count must be an integer from 1 to ${MAX_VCPUS} (got ${m.vcpu_count})`,
    );
  }
  if (
    !Number.isInteger(m.mem_size_mib) ||
    m.mem_size_mib < MIN_MEM_MIB ||
    m.mem_size_mib > MAX_MEM_MIB
  ) {
    throw new ConfigError(
      `mem_size_mib must be an integer from ${MIN_MEM_MIB} to ${MAX_MEM_MIB} (got ${m.mem_size_mib})`,
    );
  }
  if (m.smt === true && m.vcpu_count > 1 && m.vcpu_count % 2 === 1)
    throw new ConfigError(
      `vcpu_count must be 1 or an even number when smt is enabled (got ${m.vcpu_count})`,
    );
  if (m.huge_pages !== undefined && m.huge_pages !== 'None' && m.huge_pages !== '2M') {
    throw new ConfigError(
      `huge_pages: "${String(m.huge_pages).slice(0, 32)}" is not supported (use "None" or "2M")`,
    );
  }
  if (m.huge_pages === '2M' && m.mem_size_mib % 2 !== 0)
    throw new ConfigError(
      `mem_size_mib must be a multiple of 2 with huge_pages "2M" (got ${m.mem_size_mib})`,
    );
  if (m.cpu_template === 'V1N1')
    throw new ConfigError('cpu_template: V1N1 is for aarch64 hosts; this is an x86_64 host');
  if (m.cpu_template !== undefined && !CPU_TEMPLATE_NAMES.includes(m.cpu_template)) {
    throw new ConfigError(
      `cpu_template: "${String(m.cpu_template).slice(0, 64)}" is not a CPU template (one of ${CPU_TEMPLATE_NAMES.join(', ')})`,
    );
  }
  return m;
}

/**
 * A regular, readable, non-empty file, or a ConfigError naming the field, the path and what is
 * wrong with it. Checked on an opened descriptor (loader/image-file.ts); the builder opens and
 * checks the file again when it reads it, and uses only what it read then.
 */
export function checkReadableFile(field: string, path: string): void {
  checkBootImage(field, path);
}

export function validateBootSource(b: BootSource): BootSource {
  checkReadableFile('kernel_image_path', b.kernel_image_path);
  if (b.initrd_path !== undefined) checkReadableFile('initrd_path', b.initrd_path);
  if (b.boot_args !== undefined) {
    if (b.boot_args.length >= CMDLINE_MAX_SIZE) {
      throw new ConfigError(
        `kernel command line is ${b.boot_args.length} bytes; the limit is ${CMDLINE_MAX_SIZE - 1}`,
      );
    }
    if (b.boot_args.includes('\0'))
      throw new ConfigError('kernel command line contains a NUL byte');
  }
  return b;
}

/** One drive's fields on their own (no file access: the device opens the image at start). */
export function checkDrive(d: DriveConfig): DriveConfig {
  const what = `drive ${d.drive_id}`;
  if (d.socket !== undefined)
    throw new ConfigError(`${what}: vhost-user block devices (socket) are not supported`);
  if (d.path_on_host === undefined) throw new ConfigError(`${what}: path_on_host is required`);
  if (d.is_read_only === undefined) throw new ConfigError(`${what}: is_read_only is required`);
  if (d.io_engine !== undefined && d.io_engine !== 'Sync' && d.io_engine !== 'Async')
    throw new ConfigError(
      `${what}: io_engine must be "Sync" or "Async", not ${JSON.stringify(d.io_engine)}`,
    );
  return d;
}

/**
 * One drive at PUT time, as Firecracker checks it then: the fields, and a backing file that
 * exists and allows the access asked for (the image is opened, and checked again, at start).
 */
export function validateDrive(d: DriveConfig): DriveConfig {
  const what = `drive ${d.drive_id}`;
  checkDrive(d);
  if (d.path_on_host === undefined) return d;
  // Opened with the access asked for and checked on the descriptor; the device opens (and
  // checks) it again at start and serves only what it opened then.
  const { fd } = openHostFile(`${what}: path_on_host`, d.path_on_host, {
    write: d.is_read_only !== true,
    allowBlockDevice: d.allow_block_device === true,
    blockDeviceHint: 'set "allow_block_device": true on the drive, or ,blockdev on --drive',
  });
  closeSync(fd);
  return d;
}

/** Inserts or replaces drive `d` in a copy of `drives`; at most one root device. */
export function withDrive(drives: readonly DriveConfig[], d: DriveConfig): DriveConfig[] {
  checkDrive(d);
  const others = drives.filter((x) => x.drive_id !== d.drive_id);
  if (d.is_root_device && others.some((x) => x.is_root_device))
    throw new ConfigError('A root block device already exists!');
  const i = drives.findIndex((x) => x.drive_id === d.drive_id);
  const out = [...drives];
  // Firecracker's BlockBuilder: an update stays in its slot (a new root swaps with slot 0); a
  // new root goes first, any other new drive last.
  if (i >= 0) {
    out[i] = d;
    if (d.is_root_device && i !== 0) [out[0], out[i]] = [out[i]!, out[0]!];
  } else {
    if (drives.length >= MAX_VIRTIO_DEVICES)
      throw new ConfigError(`at most ${MAX_VIRTIO_DEVICES} virtio devices fit`);
    if (d.is_root_device) out.unshift(d);
    else out.push(d);
  }
  return out;
}

/** One pmem device's fields (no file access: the device opens and checks the file at start). */
export function checkPmem(p: PmemApiConfig): PmemApiConfig {
  const what = `pmem ${p.id}`;
  if (typeof p.path_on_host !== 'string' || p.path_on_host === '')
    throw new ConfigError(`${what}: path_on_host is required`);
  // The rate limiter's values (it limits flushes: 1 op and the file's size in bytes each).
  deviceRateLimiter(p.rate_limiter, `${what}: rate_limiter`);
  return p;
}

/**
 * One pmem device at PUT time: the fields, and a backing file that exists and allows the access
 * asked for (the device opens it again at start, and checks its size there).
 */
export function validatePmem(p: PmemApiConfig): PmemApiConfig {
  checkPmem(p);
  const { fd } = openHostFile(`pmem ${p.id}: path_on_host`, p.path_on_host, {
    write: p.read_only !== true,
    allowBlockDevice: false,
    blockDeviceHint: 'pmem devices are backed by regular files',
  });
  closeSync(fd);
  return p;
}

/**
 * Inserts or replaces pmem device `p` in a copy of `list`; at most one root device, which goes
 * first (the guest names pmem devices in order: the root one is /dev/pmem0).
 */
export function withPmem(list: readonly PmemApiConfig[], p: PmemApiConfig): PmemApiConfig[] {
  checkPmem(p);
  const others = list.filter((x) => x.id !== p.id);
  if (p.root_device === true && others.some((x) => x.root_device === true))
    throw new ConfigError('A root pmem device already exists!');
  const i = list.findIndex((x) => x.id === p.id);
  const out = [...list];
  if (i >= 0) {
    out[i] = p;
    if (p.root_device === true && i !== 0) [out[0], out[i]] = [out[i]!, out[0]!];
  } else {
    if (list.length >= MAX_VIRTIO_DEVICES)
      throw new ConfigError(`at most ${MAX_VIRTIO_DEVICES} virtio devices fit`);
    if (p.root_device === true) out.unshift(p);
    else out.push(p);
  }
  return out;
}

const MAC_RE = /^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$/;

export function validateNetworkInterface(n: NetworkInterfaceConfig): NetworkInterfaceConfig {
  const what = `network interface ${n.iface_id}`;
  if (
    n.host_dev_name.length === 0 ||
    Buffer.byteLength(n.host_dev_name) > MAX_TAP_NAME ||
    /[/\s\0:]/.test(n.host_dev_name)
  ) {
    throw new ConfigError(
      `${what}: host_dev_name must be a TAP name of 1 to ${MAX_TAP_NAME} bytes without '/', ':' or spaces`,
    );
  }
  if (n.guest_mac !== undefined && !MAC_RE.test(n.guest_mac)) {
    throw new ConfigError(
      `${what}: guest_mac must look like 06:00:AC:10:00:02 (got "${n.guest_mac.slice(0, 32)}")`,
    );
  }
  // Any six hex bytes, as Firecracker's MacAddr takes them (a multicast bit included: the guest
  // driver decides what to make of it). Stored as Firecracker echoes it: lower case.
  return n.guest_mac !== undefined ? { ...n, guest_mac: n.guest_mac.toLowerCase() } : n;
}

/** Another interface (not `n`'s id) with `n`'s MAC: the one error Firecracker checks first. */
function macConflict(nets: readonly NetworkInterfaceConfig[], n: NetworkInterfaceConfig): boolean {
  const mac = n.guest_mac?.toLowerCase();
  return (
    mac !== undefined &&
    nets.some((x) => x.iface_id !== n.iface_id && x.guest_mac?.toLowerCase() === mac)
  );
}

/** Firecracker's NetBuilder: an update removes the old entry (swap_remove), the new one goes last. */
function withoutInterface(
  nets: readonly NetworkInterfaceConfig[],
  id: string,
): NetworkInterfaceConfig[] {
  const out = [...nets];
  const i = out.findIndex((x) => x.iface_id === id);
  if (i >= 0) {
    const last = out.pop()!;
    if (i < out.length) out[i] = last;
  }
  return out;
}

/**
 * Inserts or replaces interface `n` in a copy of `nets`, in Firecracker's order (a replaced
 * interface moves to the end, the last one taking its place); MACs and TAP names stay unique.
 */
export function withNetworkInterface(
  nets: readonly NetworkInterfaceConfig[],
  n: NetworkInterfaceConfig,
): NetworkInterfaceConfig[] {
  if (macConflict(nets, n))
    throw new ConfigError(`The MAC address is already in use: ${n.guest_mac?.slice(0, 32)}`);
  const others = withoutInterface(nets, n.iface_id);
  const checked = validateNetworkInterface(n);
  if (others.some((x) => x.host_dev_name === n.host_dev_name)) {
    throw new ConfigError(
      `Could not create the network device: TAP ${n.host_dev_name} is already used by another interface`,
    );
  }
  if (others.length >= MAX_VIRTIO_DEVICES)
    throw new ConfigError(`at most ${MAX_VIRTIO_DEVICES} virtio devices fit`);
  return [...others, checked];
}

/**
 * What a failed PUT /network-interfaces/{id} leaves, as in Firecracker: the old interface with
 * that id is gone (it is removed before the new one is made), unless the request failed on a
 * MAC address another interface uses (checked before the removal).
 */
export function afterFailedInterfacePut(
  nets: readonly NetworkInterfaceConfig[],
  n: NetworkInterfaceConfig,
): NetworkInterfaceConfig[] {
  return macConflict(nets, n) ? [...nets] : withoutInterface(nets, n.iface_id);
}

/**
 * Checks a vsock section; returns it normalized: `backend` is kept only when it is "vhost" (the
 * unix backend is the default, and Firecracker's configurations have no such field).
 */
export function validateVsock(v: VsockConfig): VsockConfig {
  if (!isGuestCid(v.guest_cid)) {
    throw new ConfigError(
      `vsock guest_cid must be from ${MIN_GUEST_CID} to ${MAX_GUEST_CID} (got ${v.guest_cid})`,
    );
  }
  const backend: unknown = v.backend ?? 'unix';
  if (!VSOCK_BACKENDS.includes(backend as VsockBackend))
    throw new ConfigError(
      `vsock backend must be "unix" or "vhost" (got ${JSON.stringify(String(backend).slice(0, 32))})`,
    );
  if (backend === 'vhost') {
    // The kernel's device has no Unix socket: a path here would be a mistake, not a choice.
    if (v.uds_path !== undefined)
      throw new ConfigError(
        "vsock: uds_path is for the unix backend; the vhost backend's host side is AF_VSOCK at guest_cid",
      );
    return {
      guest_cid: v.guest_cid,
      backend: 'vhost',
      ...(v.vsock_id !== undefined ? { vsock_id: v.vsock_id } : {}),
    };
  }
  if (v.uds_path === undefined)
    throw new ConfigError('vsock uds_path is required (unless backend is "vhost")');
  if (v.uds_path.length === 0 || Buffer.byteLength(v.uds_path) > MAX_UDS_PATH) {
    throw new ConfigError(`vsock uds_path must be 1 to ${MAX_UDS_PATH} bytes (a Unix socket path)`);
  }
  if (v.backend === undefined) return v;
  const unix = { ...v };
  delete unix.backend;
  return unix;
}

/**
 * What the vhost backend cannot be combined with (a ConfigError), checked at boot and at a
 * snapshot load. `trackDirtyPages` is the VM's to be (machine-config at boot, the load's
 * track_dirty_pages at a load), not a saved one.
 */
export function checkVsockBackend(
  vsock: VsockConfig | undefined | null,
  vm: { trackDirtyPages: boolean; memoryHotplug: boolean },
): void {
  if (vsock?.backend !== 'vhost') return;
  // The host kernel writes the guest's rx buffers (and used rings) itself: neither KVM's dirty
  // log nor the device-dirty bitmap sees those writes, so a Diff snapshot would miss them. Its
  // own dirty log (VHOST_F_LOG_ALL) would not help: vhost-vsock logs no rx buffer (vhost.ts).
  if (vm.trackDirtyPages)
    throw new ConfigError(
      "vsock: the vhost backend cannot be used with track_dirty_pages: the host kernel's vhost-vsock writes into guest memory without the dirty page tracking seeing it, so a Diff snapshot would miss those pages; use the unix backend",
    );
  // VHOST_SET_MEM_TABLE is given the boot RAM regions; hotplugged blocks are not in it, so a
  // buffer the guest posted there could not be reached by the kernel.
  if (vm.memoryHotplug)
    throw new ConfigError(
      "vsock: the vhost backend cannot be used with memory hotplug (memory-hotplug): the vhost backend's memory table covers boot RAM only; use the unix backend",
    );
}

const LEVELS: readonly string[] = ['error', 'warning', 'warn', 'info', 'debug', 'trace', 'off'];

export function validateLogger(l: LoggerConfig): LoggerConfig {
  if (l.level !== undefined && !LEVELS.includes(l.level.toLowerCase())) {
    throw new ConfigError(
      `logger level must be one of Error, Warning, Info, Debug, Trace, Off (got "${l.level.slice(0, 32)}")`,
    );
  }
  return l;
}

declare const checked: unique symbol;

/**
 * A VM description that validateResources() accepted: the only input buildVm() takes. Devices
 * are in slot order (drives with the root drive first, entropy, network interfaces, vsock), as
 * the registry's configs; the host sides (images, TAPs, sockets) are opened by the builder.
 */
export interface VmSpec {
  readonly [checked]: true;
  readonly vcpus: number;
  readonly memMib: number;
  /** machine-config track_dirty_pages: KVM's dirty log and the device-dirty bitmap are kept. */
  readonly trackDirtyPages?: boolean;
  readonly kernelPath: string;
  readonly initrdPath?: string;
  /** The user's part of the kernel command line; the builder adds root= and the devices. */
  readonly bootArgs: string;
  readonly devices: readonly VirtioConfig[];
  /**
   * The root device: the root drive (devices[0]: root=PARTUUID=... when given, else
   * root=/dev/vda) or the root pmem device (`device` /dev/pmem0).
   */
  readonly root?: { partuuid?: string; readOnly: boolean; device?: string };
  /** machine-config smt: two threads per core in the guest's CPUID. */
  readonly smt?: boolean;
  /**
   * machine-config huge_pages "2M": guest RAM is a hugetlbfs memfd of 2 MiB pages, all
   * reserved when it is mapped (the host's vm.nr_hugepages pool).
   */
  readonly hugePages?: '2M';
  /**
   * The CPU template: a static one by name (checked against the host at build), or a custom
   * one, parsed. Absent: none.
   */
  readonly cpuTemplate?: { static: string } | { custom: CpuTemplate };
}

/** The first `max` bytes of an ASCII-or-UTF-8 id, cut on a character boundary. */
function truncateUtf8(s: string, max: number): string {
  let out = '';
  for (const ch of s) {
    if (Buffer.byteLength(out + ch) > max) break;
    out += ch;
  }
  return out;
}

/**
 * A rate limiter as the device takes it (issue 16): values checked (non-negative integers, as
 * Firecracker's u64 fields), buckets with size or refill_time 0 left out (no limit), undefined
 * when no bucket is left. Throws ConfigError naming the field.
 */
export function deviceRateLimiter(
  r: RateLimiter | undefined,
  what: string,
): RateLimiterConfig | undefined {
  if (r === undefined || r === null) return undefined;
  const out: RateLimiterConfig = {};
  for (const k of ['bandwidth', 'ops'] as const) {
    const b = r[k];
    if (b === undefined || b === null) continue;
    for (const f of ['size', 'one_time_burst', 'refill_time'] as const) {
      const v = b[f];
      if (v === undefined && f === 'one_time_burst') continue;
      if (typeof v !== 'number' || !Number.isInteger(v) || v < 0 || v >= 2 ** 64)
        throw new ConfigError(`${what}.${k}.${f}: ${String(v)} is not an integer in [0, 2^64)`);
    }
    const c: TokenBucketConfig = {
      size: b.size,
      refill_time: b.refill_time,
      ...(b.one_time_burst ? { one_time_burst: b.one_time_burst } : {}),
    };
    if (bucketEnabled(c)) out[k] = c;
  }
  return out.bandwidth || out.ops ? out : undefined;
}

/** A device's rate limiter back into the API's form (GET /vm/config, snapshots). */
function apiRateLimiter(c: RateLimiterConfig | undefined): RateLimiter | undefined {
  if (!c) return undefined;
  const out: RateLimiter = {};
  if (c.bandwidth) out.bandwidth = { ...c.bandwidth };
  if (c.ops) out.ops = { ...c.ops };
  return out;
}

/**
 * The sections that become virtio devices, checked and in slot order (drives with the root drive
 * first, entropy, network interfaces, vsock), as the builder and a snapshot take them.
 */
function limiterField<K extends string>(
  key: K,
  r: RateLimiter | undefined,
  what: string,
): Partial<Record<K, RateLimiterConfig>> {
  const c = deviceRateLimiter(r, what);
  return c ? ({ [key]: c } as Record<K, RateLimiterConfig>) : {};
}

function checkDevices(r: Omit<VmResources, 'boot'>): {
  drives: DriveConfig[];
  pmem: PmemApiConfig[];
  devices: VirtioConfig[];
} {
  let drives: DriveConfig[] = [];
  for (const d of r.drives ?? []) drives = withDrive(drives, d);
  let pmem: PmemApiConfig[] = [];
  for (const p of r.pmem ?? []) pmem = withPmem(pmem, p);
  if (drives[0]?.is_root_device === true && pmem[0]?.root_device === true)
    throw new ConfigError(
      `both drive ${drives[0].drive_id} and pmem ${pmem[0].id} are root devices; at most one root device`,
    );
  let nets: NetworkInterfaceConfig[] = [];
  for (const n of r.network_interfaces ?? []) nets = withNetworkInterface(nets, n);
  const mmds = r.mmds_config;
  if (mmds) {
    const problem = checkMmdsConfig(
      mmds,
      nets.map((n) => n.iface_id),
    );
    if (problem) throw new ConfigError(problem);
  }
  const vsock = r.vsock ? validateVsock(r.vsock) : undefined;
  if (r.logger) validateLogger(r.logger);
  const devices: VirtioConfig[] = [
    ...drives.map((d): VirtioConfig => ({
      kind: 'block',
      id: d.drive_id,
      path: d.path_on_host!,
      readOnly: d.is_read_only === true,
      ...(d.allow_block_device === true ? { allowBlockDevice: true } : {}),
      // GET_ID answers the drive's id, as Firecracker's does (cut to the 20 bytes it holds).
      serial: truncateUtf8(d.drive_id, BLK_ID_BYTES),
      ...limiterField('rateLimiter', d.rate_limiter, `drive ${d.drive_id}: rate_limiter`),
      // Unset: the default engine (Async since issue 17; Sync where io_uring is unavailable).
      ioEngine: d.io_engine ?? DEFAULT_IO_ENGINE,
      ...(d.io_engine === undefined ? { ioEngineDefaulted: true } : {}),
    })),
    ...(r.entropy
      ? [
          {
            kind: 'rng',
            id: 'entropy',
            ...limiterField('rateLimiter', r.entropy.rate_limiter, 'entropy: rate_limiter'),
          } as const,
        ]
      : []),
    ...nets.map((n): VirtioConfig => ({
      kind: 'net',
      id: n.iface_id,
      tap: n.host_dev_name,
      ...(n.guest_mac !== undefined ? { mac: n.guest_mac } : {}),
      ...limiterField('rxRateLimiter', n.rx_rate_limiter, `iface ${n.iface_id}: rx_rate_limiter`),
      ...limiterField('txRateLimiter', n.tx_rate_limiter, `iface ${n.iface_id}: tx_rate_limiter`),
      ...(mmds?.network_interfaces.includes(n.iface_id)
        ? {
            mmds: {
              version: mmds.version ?? 'V1',
              ipv4: mmds.ipv4_address ?? MMDS_DEFAULT_IPV4,
              imdsCompat: mmds.imds_compat === true,
            },
          }
        : {}),
    })),
    ...(vsock ? [vsockDeviceConfig(vsock)] : []),
    // Last, so that the slots of VMs without one (and their snapshots) do not move.
    ...(r.balloon
      ? [
          {
            kind: 'balloon',
            id: 'balloon',
            ...balloonOptions(validateBalloon(r.balloon, r.machine.mem_size_mib)),
          } as const,
        ]
      : []),
    ...pmem.map((p): VirtioConfig => ({
      kind: 'pmem',
      id: p.id,
      path: p.path_on_host,
      readOnly: p.read_only === true,
      ...limiterField('rateLimiter', p.rate_limiter, `pmem ${p.id}: rate_limiter`),
    })),
    ...(r.memory_hotplug ? [memDeviceConfig(validateMemoryHotplug(r.memory_hotplug))] : []),
  ];
  if (devices.length > MAX_VIRTIO_DEVICES)
    throw new ConfigError(
      `${devices.length} virtio devices configured; at most ${MAX_VIRTIO_DEVICES} fit`,
    );
  return { drives, pmem, devices };
}

/** The device's config from a checked vsock section (the unix backend stays implicit). */
function vsockDeviceConfig(v: VsockConfig): VirtioConfig {
  const id = v.vsock_id ?? 'vsock';
  return v.backend === 'vhost'
    ? { kind: 'vsock', id, cid: v.guest_cid, backend: 'vhost' }
    : { kind: 'vsock', id, cid: v.guest_cid, uds: v.uds_path! };
}

function memDeviceConfig(m: Required<MemoryHotplugConfig>): VirtioConfig {
  return {
    kind: 'mem',
    id: 'memory-hotplug',
    totalMib: m.total_size_mib,
    blockMib: m.block_size_mib,
    slotMib: m.slot_size_mib,
  };
}

/** The device's options from the API's balloon section (checked). */
function balloonOptions(b: BalloonConfig) {
  return {
    amountMib: b.amount_mib,
    deflateOnOom: b.deflate_on_oom,
    statsPollingIntervalS: b.stats_polling_interval_s ?? 0,
    freePageHinting: b.free_page_hinting === true,
    freePageReporting: b.free_page_reporting === true,
  };
}

/**
 * Checks the whole description, including how the parts fit together, and gives the checked
 * form the builder takes. Pure: no file is opened (the builder opens each device's host side
 * once, and that open is the check of the file).
 */
export function validateResources(r: VmResources): VmSpec {
  validateMachineConfig(r.machine);
  if (r.balloon && r.machine.huge_pages === '2M')
    throw new ConfigError(
      'balloon: not available with huge_pages "2M" (a 2 MiB hugetlbfs page cannot be given back 4 KiB at a time; Firecracker refuses it too)',
    );
  validateBootSource(r.boot);
  const { drives, pmem, devices } = checkDevices(r);
  checkVsockBackend(r.vsock, {
    trackDirtyPages: r.machine.track_dirty_pages === true,
    memoryHotplug: r.memory_hotplug !== undefined,
  });
  const rootDrive = drives[0]?.is_root_device ? drives[0] : undefined;
  const staticTemplate = r.machine.cpu_template;
  const cpuTemplate =
    staticTemplate !== undefined && staticTemplate !== 'None'
      ? { static: staticTemplate }
      : r.cpu_config !== undefined
        ? { custom: parseCpuTemplate(r.cpu_config) }
        : undefined;
  const rootPmem = pmem[0]?.root_device === true ? pmem[0] : undefined;
  return {
    ...(r.machine.smt === true ? { smt: true } : {}),
    ...(cpuTemplate ? { cpuTemplate } : {}),
    vcpus: r.machine.vcpu_count,
    memMib: r.machine.mem_size_mib,
    ...(r.machine.track_dirty_pages === true ? { trackDirtyPages: true } : {}),
    ...(r.machine.huge_pages === '2M' ? { hugePages: '2M' } : {}),
    kernelPath: r.boot.kernel_image_path,
    ...(r.boot.initrd_path !== undefined ? { initrdPath: r.boot.initrd_path } : {}),
    bootArgs: r.boot.boot_args ?? DEFAULT_BOOT_ARGS,
    devices,
    ...(rootDrive
      ? {
          root: {
            readOnly: rootDrive.is_read_only === true,
            ...(rootDrive.partuuid !== undefined ? { partuuid: rootDrive.partuuid } : {}),
          },
        }
      : rootPmem
        ? { root: { readOnly: rootPmem.read_only === true, device: '/dev/pmem0' } }
        : {}),
  } as unknown as VmSpec;
}

/**
 * The whole configuration in Firecracker's JSON shape: what GET /vm/config answers and what
 * --config-file reads. Absent optional sections are null, as Firecracker writes them.
 */
export interface VmConfig {
  'boot-source': BootSource | null;
  'machine-config': MachineConfig;
  drives: DriveConfig[];
  'network-interfaces': NetworkInterfaceConfig[];
  vsock: VsockConfig | null;
  entropy: EntropyConfig | null;
  balloon: BalloonConfig | null;
  logger: LoggerConfig | null;
  metrics: MetricsConfig | null;
  /** PUT /cpu-config's custom CPU template (absent or null: none). */
  'cpu-config'?: CpuConfigJson | null;
  pmem: PmemApiConfig[];
  'memory-hotplug': MemoryHotplugConfig | null;
  /** PUT /mmds/config (absent or null: MMDS answers on no interface). */
  'mmds-config'?: MmdsConfig | null;
}

export function emptyVmConfig(): VmConfig {
  return {
    'boot-source': null,
    'machine-config': { ...DEFAULT_MACHINE_CONFIG },
    drives: [],
    'network-interfaces': [],
    vsock: null,
    entropy: null,
    balloon: null,
    logger: null,
    metrics: null,
    'cpu-config': null,
    pmem: [],
    'memory-hotplug': null,
  };
}

/** VmResources from a configuration; a ConfigError when it cannot be booted (no kernel). */
export function resourcesFromConfig(c: VmConfig): VmResources {
  const boot = c['boot-source'];
  if (!boot) throw new ConfigError('Cannot start microvm without kernel configuration.');
  const r: VmResources = { machine: { ...c['machine-config'] }, boot: { ...boot } };
  if (c.drives.length > 0) r.drives = c.drives.map((d) => ({ ...d }));
  if (c['network-interfaces'].length > 0)
    r.network_interfaces = c['network-interfaces'].map((n) => ({ ...n }));
  if (c.vsock) r.vsock = { ...c.vsock };
  if (c.entropy) r.entropy = { ...c.entropy };
  if (c.balloon) r.balloon = { ...c.balloon };
  if (c.pmem.length > 0) r.pmem = c.pmem.map((p) => ({ ...p }));
  if (c['memory-hotplug']) r.memory_hotplug = { ...c['memory-hotplug'] };
  if (c.logger) r.logger = { ...c.logger };
  if (c.metrics) r.metrics = { ...c.metrics };
  if (c['cpu-config']) r.cpu_config = structuredClone(c['cpu-config']);
  const mmds = c['mmds-config'];
  if (mmds) r.mmds_config = structuredClone(mmds);
  return r;
}

export function configFromResources(r: VmResources): VmConfig {
  return {
    'boot-source': { ...r.boot },
    'machine-config': { ...DEFAULT_MACHINE_CONFIG, ...r.machine },
    drives: (r.drives ?? []).map((d) => ({ ...d })),
    'network-interfaces': (r.network_interfaces ?? []).map((n) => ({ ...n })),
    vsock: r.vsock ? { ...r.vsock } : null,
    entropy: r.entropy ? { ...r.entropy } : null,
    balloon: r.balloon ? { ...r.balloon } : null,
    logger: r.logger ? { ...r.logger } : null,
    metrics: r.metrics ? { ...r.metrics } : null,
    'cpu-config': r.cpu_config ? structuredClone(r.cpu_config) : null,
    pmem: (r.pmem ?? []).map((p) => ({ ...p })),
    'memory-hotplug': r.memory_hotplug ? { ...r.memory_hotplug } : null,
    ...(r.mmds_config ? { 'mmds-config': structuredClone(r.mmds_config) } : {}),
  };
}

/**
 * The configuration a spec was checked from, in Firecracker's shape (what a snapshot records
 * when the caller gave no configuration of its own). Logger and metrics are the process's, not
 * the VM's: null.
 */
export function configFromSpec(spec: VmSpec): VmConfig {
  const config = emptyVmConfig();
  config['boot-source'] = {
    kernel_image_path: spec.kernelPath,
    ...(spec.initrdPath !== undefined ? { initrd_path: spec.initrdPath } : {}),
    boot_args: spec.bootArgs,
  };
  config['machine-config'] = {
    ...DEFAULT_MACHINE_CONFIG,
    vcpu_count: spec.vcpus,
    mem_size_mib: spec.memMib,
    track_dirty_pages: spec.trackDirtyPages === true,
    ...(spec.hugePages ? { huge_pages: spec.hugePages } : {}),
    ...(spec.smt === true ? { smt: true } : {}),
    ...(spec.cpuTemplate && 'static' in spec.cpuTemplate
      ? { cpu_template: spec.cpuTemplate.static }
      : {}),
  };
  if (spec.cpuTemplate && 'custom' in spec.cpuTemplate)
    config['cpu-config'] = wireCpuTemplate(spec.cpuTemplate.custom);
  spec.devices.forEach((d, i) => {
    if (d.kind === 'block') {
      const root = i === 0 && spec.root !== undefined;
      config.drives.push({
        drive_id: d.id,
        path_on_host: d.path,
        is_read_only: d.readOnly,
        is_root_device: root,
        ...(root && spec.root?.partuuid !== undefined ? { partuuid: spec.root.partuuid } : {}),
        ...(d.allowBlockDevice === true ? { allow_block_device: true } : {}),
        ...(d.rateLimiter ? { rate_limiter: apiRateLimiter(d.rateLimiter)! } : {}),
        // Unset stays unset (the default); an engine asked for is kept.
        ...(d.ioEngineDefaulted === true ? {} : { io_engine: d.ioEngine }),
      });
    } else if (d.kind === 'rng')
      config.entropy = d.rateLimiter ? { rate_limiter: apiRateLimiter(d.rateLimiter)! } : {};
    else if (d.kind === 'pmem') {
      const root = spec.root?.device === '/dev/pmem0' && config.pmem.length === 0;
      config.pmem.push({
        id: d.id,
        path_on_host: d.path,
        root_device: root,
        read_only: d.readOnly,
        ...(d.rateLimiter ? { rate_limiter: apiRateLimiter(d.rateLimiter)! } : {}),
      });
    } else if (d.kind === 'mem') {
      config['memory-hotplug'] = {
        total_size_mib: d.totalMib,
        block_size_mib: d.blockMib,
        slot_size_mib: d.slotMib,
      };
    } else if (d.kind === 'net') {
      config['network-interfaces'].push({
        iface_id: d.id,
        host_dev_name: d.tap,
        ...(d.mac !== undefined ? { guest_mac: d.mac } : {}),
        ...(d.rxRateLimiter ? { rx_rate_limiter: apiRateLimiter(d.rxRateLimiter)! } : {}),
        ...(d.txRateLimiter ? { tx_rate_limiter: apiRateLimiter(d.txRateLimiter)! } : {}),
      });
    } else if (d.kind === 'balloon') {
      config.balloon = {
        amount_mib: d.amountMib,
        deflate_on_oom: d.deflateOnOom,
        stats_polling_interval_s: d.statsPollingIntervalS,
        free_page_hinting: d.freePageHinting,
        free_page_reporting: d.freePageReporting,
      };
    } else if (d.kind === 'vsock')
      config.vsock =
        d.backend === 'vhost'
          ? { guest_cid: d.cid, backend: 'vhost', vsock_id: d.id }
          : { guest_cid: d.cid, uds_path: d.uds, vsock_id: d.id };
  });
  return config;
}

/** What a snapshot's configuration gives a restore: the machine and the devices, checked. */
export interface RestoreSpec {
  readonly vcpus: number;
  readonly memMib: number;
  /** In slot order, as validateResources gives them (the saved devices are in this order). */
  readonly devices: readonly VirtioConfig[];
  /** The configuration with the overrides applied: what GET /vm/config answers after a load. */
  readonly config: VmConfig;
}

/**
 * A load's replacements for host-side names (Firecracker's network_overrides, vsock_override),
 * and its own choices the saved devices must allow.
 */
export interface RestoreOverrides {
  network?: ReadonlyArray<{ ifaceId: string; hostDevName: string }>;
  vsockUdsPath?: string;
  /** The load's track_dirty_pages (a vhost vsock device refuses it). */
  trackDirtyPages?: boolean;
}

type Json = Record<string, unknown>;
type FieldType = 'string' | 'number' | 'boolean' | 'object' | 'array';

/** Checks one JSON object's field types (hostile input: a snapshot file can be crafted). */
function shape(
  v: unknown,
  what: string,
  fields: Record<string, FieldType>,
  required: readonly string[] = [],
): Json {
  if (typeof v !== 'object' || v === null || Array.isArray(v))
    throw new ConfigError(`${what}: expected an object`);
  const o = v as Json;
  for (const [k, x] of Object.entries(o)) {
    const t = fields[k];
    if (t === undefined) throw new ConfigError(`${what}: unknown field \`${k.slice(0, 64)}\``);
    if (x === undefined || x === null) continue;
    const ok =
      t === 'array'
        ? Array.isArray(x)
        : t === 'object'
          ? typeof x === 'object' && !Array.isArray(x)
          : typeof x === t;
    if (!ok)
      throw new ConfigError(
        `${what}.${k}: expected ${t === 'array' || t === 'object' ? 'an' : 'a'} ${t}`,
      );
  }
  for (const k of required) {
    if (o[k] === undefined || o[k] === null)
      throw new ConfigError(`${what}: missing field \`${k}\``);
  }
  return o;
}

function shapeRateLimiter(v: unknown, what: string): void {
  if (v === undefined || v === null) return;
  const r = shape(v, what, { bandwidth: 'object', ops: 'object' });
  for (const k of ['bandwidth', 'ops'] as const) {
    if (r[k] === undefined || r[k] === null) continue;
    shape(
      r[k],
      `${what}.${k}`,
      { size: 'number', one_time_burst: 'number', refill_time: 'number' },
      ['size', 'refill_time'],
    );
  }
}

function shapeArray(v: unknown, what: string, max: number): unknown[] {
  if (v === undefined || v === null) return [];
  if (!Array.isArray(v)) throw new ConfigError(`${what}: expected an array`);
  if (v.length > max) throw new ConfigError(`${what}: ${v.length} entries; at most ${max}`);
  return v;
}

/** Drops null optional fields (Firecracker writes absent ones as null). */
function defined<T>(o: Json): T {
  return Object.fromEntries(
    Object.entries(o).filter(([, x]) => x !== null && x !== undefined),
  ) as T;
}

/**
 * A snapshot's saved configuration (the JSON of a VmConfig) -> the machine and devices to
 * restore. The input is untrusted: every section's shape and values are checked with the same
 * rules as at boot (the kernel is not needed: a restored VM does not boot; boot-source is kept
 * for GET /vm/config only). `overrides` replace TAP names and the vsock socket path before the
 * checks; an override naming a device the configuration lacks is refused. Throws ConfigError.
 */
export function validateRestoreConfig(cfg: unknown, overrides: RestoreOverrides = {}): RestoreSpec {
  const c = shape(
    cfg,
    'config',
    {
      'boot-source': 'object',
      'machine-config': 'object',
      drives: 'array',
      'network-interfaces': 'array',
      vsock: 'object',
      entropy: 'object',
      balloon: 'object',
      logger: 'object',
      metrics: 'object',
      'cpu-config': 'object',
      pmem: 'array',
      'memory-hotplug': 'object',
      'mmds-config': 'object',
    },
    ['machine-config'],
  );
  // The custom CPU template is kept for GET /vm/config (the vCPUs' saved CPUID and MSRs already
  // carry its effect); checked as at boot.
  const cpuConfig = c['cpu-config'] == null ? null : normalizeCpuConfig(c['cpu-config']);

  const boot =
    c['boot-source'] == null
      ? null
      : defined<BootSource>(
          shape(
            c['boot-source'],
            'boot-source',
            { kernel_image_path: 'string', initrd_path: 'string', boot_args: 'string' },
            ['kernel_image_path'],
          ),
        );
  const machine = defined<MachineConfig>(
    shape(
      c['machine-config'],
      'machine-config',
      {
        vcpu_count: 'number',
        mem_size_mib: 'number',
        smt: 'boolean',
        track_dirty_pages: 'boolean',
        huge_pages: 'string',
        cpu_template: 'string',
      },
      ['vcpu_count', 'mem_size_mib'],
    ),
  );
  // Dirty page tracking is the load's choice (track_dirty_pages), not the saved VM's.
  validateMachineConfig({ ...machine, track_dirty_pages: false });

  const drives = shapeArray(c.drives, 'drives', MAX_VIRTIO_DEVICES).map((v, i) => {
    const what = `drives[${i}]`;
    const d = shape(
      v,
      what,
      {
        drive_id: 'string',
        is_root_device: 'boolean',
        partuuid: 'string',
        cache_type: 'string',
        is_read_only: 'boolean',
        path_on_host: 'string',
        allow_block_device: 'boolean',
        rate_limiter: 'object',
        io_engine: 'string',
        socket: 'string',
      },
      ['drive_id', 'is_root_device'],
    );
    shapeRateLimiter(d.rate_limiter, `${what}.rate_limiter`);
    return validateDrive(defined<DriveConfig>(d));
  });

  const nets = shapeArray(c['network-interfaces'], 'network-interfaces', MAX_VIRTIO_DEVICES).map(
    (v, i) => {
      const what = `network-interfaces[${i}]`;
      const n = shape(
        v,
        what,
        {
          iface_id: 'string',
          host_dev_name: 'string',
          guest_mac: 'string',
          mtu: 'number',
          rx_rate_limiter: 'object',
          tx_rate_limiter: 'object',
        },
        ['iface_id', 'host_dev_name'],
      );
      shapeRateLimiter(n.rx_rate_limiter, `${what}.rx_rate_limiter`);
      shapeRateLimiter(n.tx_rate_limiter, `${what}.tx_rate_limiter`);
      return defined<NetworkInterfaceConfig>(n);
    },
  );
  for (const o of overrides.network ?? []) {
    const i = nets.findIndex((n) => n.iface_id === o.ifaceId);
    if (i < 0) throw new ConfigError(`Unknown Network Device: ${o.ifaceId.slice(0, 64)}`);
    nets[i] = { ...nets[i]!, host_dev_name: o.hostDevName };
  }

  let vsock =
    c.vsock == null
      ? null
      : defined<VsockConfig>(
          shape(
            c.vsock,
            'vsock',
            { guest_cid: 'number', uds_path: 'string', backend: 'string', vsock_id: 'string' },
            ['guest_cid'],
          ),
        );
  if (overrides.vsockUdsPath !== undefined) {
    if (!vsock) throw new ConfigError('Unknown Vsock Device');
    if (vsock.backend === 'vhost')
      throw new ConfigError(
        `vsock_override: the snapshot's vsock device uses the vhost backend, which has no Unix socket to re-point (its host side is AF_VSOCK at guest_cid ${vsock.guest_cid})`,
      );
    vsock = { ...vsock, uds_path: overrides.vsockUdsPath };
  }
  if (vsock) vsock = validateVsock(vsock);

  let entropy: EntropyConfig | null = null;
  if (c.entropy != null) {
    const e = shape(c.entropy, 'entropy', { rate_limiter: 'object' });
    shapeRateLimiter(e.rate_limiter, 'entropy.rate_limiter');
    entropy = defined<EntropyConfig>(e);
  }
  const balloon =
    c.balloon == null
      ? null
      : validateBalloon(
          defined<BalloonConfig>(
            shape(
              c.balloon,
              'balloon',
              {
                amount_mib: 'number',
                deflate_on_oom: 'boolean',
                stats_polling_interval_s: 'number',
                free_page_hinting: 'boolean',
                free_page_reporting: 'boolean',
              },
              ['amount_mib', 'deflate_on_oom'],
            ),
          ),
          machine.mem_size_mib,
        );
  const pmem = shapeArray(c.pmem, 'pmem', MAX_VIRTIO_DEVICES).map((v, i) => {
    const what = `pmem[${i}]`;
    const p = shape(
      v,
      what,
      {
        id: 'string',
        path_on_host: 'string',
        root_device: 'boolean',
        read_only: 'boolean',
        rate_limiter: 'object',
      },
      ['id', 'path_on_host'],
    );
    shapeRateLimiter(p.rate_limiter, `${what}.rate_limiter`);
    return checkPmem(defined<PmemApiConfig>(p));
  });
  // MMDS: its configuration travels with the snapshot (Firecracker's docs/mmds), its data
  // store does not.
  let mmds: MmdsConfig | null = null;
  if (c['mmds-config'] != null) {
    const m = shape(
      c['mmds-config'],
      'mmds-config',
      {
        version: 'string',
        network_interfaces: 'array',
        ipv4_address: 'string',
        imds_compat: 'boolean',
      },
      ['network_interfaces'],
    );
    const ifs = shapeArray(
      m.network_interfaces,
      'mmds-config.network_interfaces',
      MAX_VIRTIO_DEVICES,
    );
    if (ifs.some((x) => typeof x !== 'string'))
      throw new ConfigError('mmds-config.network_interfaces: expected strings');
    if (m.version != null && m.version !== 'V1' && m.version !== 'V2')
      throw new ConfigError('mmds-config.version: expected "V1" or "V2"');
    mmds = { ...defined<MmdsConfig>(m), network_interfaces: ifs as string[] };
  }
  // Logger and metrics belong to the process, not the VM: a load keeps the process's own (the
  // sections are only checked to be objects, above, and dropped).
  const hotplug =
    c['memory-hotplug'] == null
      ? null
      : defined<MemoryHotplugConfig>(
          shape(
            c['memory-hotplug'],
            'memory-hotplug',
            { total_size_mib: 'number', block_size_mib: 'number', slot_size_mib: 'number' },
            ['total_size_mib'],
          ),
        );
  const checked = checkDevices({
    machine,
    drives,
    pmem,
    ...(hotplug ? { memory_hotplug: hotplug } : {}),
    network_interfaces: nets,
    ...(vsock ? { vsock } : {}),
    ...(entropy ? { entropy } : {}),
    ...(balloon ? { balloon } : {}),
    ...(mmds ? { mmds_config: mmds } : {}),
  });
  checkVsockBackend(vsock, {
    trackDirtyPages: overrides.trackDirtyPages === true,
    memoryHotplug: hotplug !== null,
  });
  return {
    vcpus: machine.vcpu_count,
    memMib: machine.mem_size_mib,
    devices: checked.devices,
    config: {
      'boot-source': boot,
      'machine-config': { ...DEFAULT_MACHINE_CONFIG, ...machine },
      drives: checked.drives,
      'network-interfaces': nets,
      vsock,
      entropy,
      balloon,
      logger: null,
      metrics: null,
      'cpu-config': cpuConfig,
      pmem: checked.pmem,
      'memory-hotplug': hotplug ? validateMemoryHotplug(hotplug) : null,
      ...(mmds ? { 'mmds-config': mmds } : {}),
    },
  };
}

/** JSON as it goes on the wire (GET /vm/config, GET /machine-config). */
type Wire = { [k: string]: unknown };

/** A token bucket as Firecracker echoes it: a bucket that limits nothing (0) is null. */
function wireBucket(b: TokenBucket | undefined): Wire | null {
  if (b === undefined || b.size === 0 || b.refill_time === 0) return null;
  return {
    size: b.size,
    one_time_burst: b.one_time_burst ? b.one_time_burst : null,
    refill_time: b.refill_time,
  };
}

/** A rate limiter as Firecracker echoes it: null when neither bucket limits anything. */
function wireRateLimiter(r: RateLimiter | undefined): Wire | null {
  const bandwidth = wireBucket(r?.bandwidth);
  const ops = wireBucket(r?.ops);
  return bandwidth === null && ops === null ? null : { bandwidth, ops };
}

/** GET /machine-config: cpu_template only when a static template other than "None" is set. */
export function wireMachineConfig(m: MachineConfig): Wire {
  return {
    vcpu_count: m.vcpu_count,
    mem_size_mib: m.mem_size_mib,
    smt: m.smt === true,
    ...(m.cpu_template !== undefined && m.cpu_template !== 'None'
      ? { cpu_template: m.cpu_template }
      : {}),
    track_dirty_pages: m.track_dirty_pages === true,
    huge_pages: m.huge_pages ?? 'None',
  };
}

/**
 * GET /vm/config: the configuration exactly as Firecracker serialises its VmmConfig. Every key
 * it always writes is present (optional values as null, pmem as []); sections of features we do
 * not have are null or []; logger and metrics are null (Firecracker never echoes them); a
 * fresh VM's boot-source is Firecracker's default one (empty kernel path). Drives echo their
 * defaults (cache_type "Unsafe"; io_engine "Async", ours: Firecracker's is "Sync"); vsock_id is
 * dropped (deprecated: Firecracker drops it too); interface MACs are lower case. Our own
 * `allow_block_device` appears only when true, and vsock's `backend` only when "vhost", so a
 * configuration that does not use them reads back as Firecracker's would (but for the io_engine
 * a drive left unset).
 */
export function wireVmConfig(c: VmConfig): Wire {
  const boot = c['boot-source'];
  return {
    balloon: c.balloon
      ? {
          amount_mib: c.balloon.amount_mib,
          deflate_on_oom: c.balloon.deflate_on_oom,
          stats_polling_interval_s: c.balloon.stats_polling_interval_s ?? 0,
          free_page_hinting: c.balloon.free_page_hinting === true,
          free_page_reporting: c.balloon.free_page_reporting === true,
        }
      : null,
    drives: c.drives.map((d) => ({
      drive_id: d.drive_id,
      partuuid: d.partuuid ?? null,
      is_root_device: d.is_root_device,
      cache_type: d.cache_type ?? 'Unsafe',
      is_read_only: d.is_read_only ?? null,
      path_on_host: d.path_on_host ?? null,
      rate_limiter: wireRateLimiter(d.rate_limiter),
      io_engine: d.io_engine ?? DEFAULT_IO_ENGINE,
      socket: d.socket ?? null,
      ...(d.allow_block_device === true ? { allow_block_device: true } : {}),
    })),
    'boot-source': {
      kernel_image_path: boot?.kernel_image_path ?? '',
      initrd_path: boot?.initrd_path ?? null,
      boot_args: boot?.boot_args ?? null,
    },
    // Firecracker always writes null here; we echo the custom template that is set (see
    // docs/api.md, Differences from Firecracker).
    'cpu-config': c['cpu-config'] ?? null,
    logger: null,
    'machine-config': wireMachineConfig(c['machine-config']),
    metrics: null,
    'mmds-config': wireMmdsConfig(c['mmds-config']),
    'network-interfaces': c['network-interfaces'].map((n) => ({
      iface_id: n.iface_id,
      host_dev_name: n.host_dev_name,
      guest_mac: n.guest_mac?.toLowerCase() ?? null,
      mtu: n.mtu ?? null,
      rx_rate_limiter: wireRateLimiter(n.rx_rate_limiter),
      tx_rate_limiter: wireRateLimiter(n.tx_rate_limiter),
    })),
    vsock: c.vsock ? wireVsock(c.vsock) : null,
    entropy: c.entropy ? { rate_limiter: wireRateLimiter(c.entropy.rate_limiter) } : null,
    pmem: c.pmem.map((p) => ({
      id: p.id,
      path_on_host: p.path_on_host,
      root_device: p.root_device === true,
      read_only: p.read_only === true,
      rate_limiter: wireRateLimiter(p.rate_limiter),
    })),
    'memory-hotplug': c['memory-hotplug'] ? validateMemoryHotplug(c['memory-hotplug']) : null,
  };
}

/**
 * GET /vm/config's vsock: Firecracker's two fields for the unix backend (the default), so its
 * configurations read back unchanged; our `backend` only when it is "vhost" (no uds_path then).
 */
function wireVsock(v: VsockConfig): Wire {
  return v.backend === 'vhost'
    ? { guest_cid: v.guest_cid, backend: 'vhost' }
    : { guest_cid: v.guest_cid, uds_path: v.uds_path ?? null };
}

/** GET /vm/config's mmds-config, as Firecracker writes its MmdsConfig (defaults filled in). */
function wireMmdsConfig(m: MmdsConfig | null | undefined): Wire | null {
  if (!m) return null;
  return {
    version: m.version ?? 'V1',
    network_interfaces: [...m.network_interfaces],
    ipv4_address: m.ipv4_address ?? MMDS_DEFAULT_IPV4,
    imds_compat: m.imds_compat === true,
  };
}

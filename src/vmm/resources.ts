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
import { BLK_ID_BYTES } from '../devices/virtio/block/request.js';
import { ConfigError } from '../util/errors.js';
import { MAX_VIRTIO_DEVICES, type VirtioConfig } from './virtio-plan.js';

export { MAX_VCPUS } from '../arch/x86_64/layout.js';
export { MAX_VIRTIO_DEVICES } from './virtio-plan.js';

export interface MachineConfig {
  vcpu_count: number;
  mem_size_mib: number;
  /** Firecracker's optional fields; we support only their default values for now, but: */
  smt?: boolean;
  /** KVM's dirty log on every RAM slot plus the device-dirty bitmap: for Diff snapshots. */
  track_dirty_pages?: boolean;
  huge_pages?: 'None' | 'Transparent' | '2M';
  cpu_template?: string;
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

export interface DriveConfig {
  drive_id: string;
  is_root_device: boolean;
  partuuid?: string;
  cache_type?: 'Unsafe' | 'Writeback';
  is_read_only?: boolean;
  path_on_host?: string;
  rate_limiter?: RateLimiter;
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

export interface VsockConfig {
  guest_cid: number;
  uds_path: string;
  /** Deprecated in Firecracker; kept so a config round-trips. */
  vsock_id?: string;
}

export interface EntropyConfig {
  rate_limiter?: RateLimiter;
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

export interface VmResources {
  machine: MachineConfig;
  boot: BootSource;
  drives?: DriveConfig[];
  network_interfaces?: NetworkInterfaceConfig[];
  vsock?: VsockConfig;
  entropy?: EntropyConfig;
  logger?: LoggerConfig;
  metrics?: MetricsConfig;
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
  if (m.smt === true)
    throw new ConfigError('smt: simultaneous multithreading is not supported yet (only false)');
  if (m.huge_pages !== undefined && m.huge_pages !== 'None') {
    throw new ConfigError(`huge_pages: "${m.huge_pages}" is not supported yet (only "None")`);
  }
  if (m.cpu_template !== undefined && m.cpu_template !== 'None') {
    throw new ConfigError(`cpu_template: "${m.cpu_template}" is not supported (only "None")`);
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

export function validateVsock(v: VsockConfig): VsockConfig {
  if (!Number.isInteger(v.guest_cid) || v.guest_cid < 3 || v.guest_cid > 0xffff_fffe) {
    throw new ConfigError(`vsock guest_cid must be from 3 to ${0xffff_fffe} (got ${v.guest_cid})`);
  }
  if (v.uds_path.length === 0 || Buffer.byteLength(v.uds_path) > MAX_UDS_PATH) {
    throw new ConfigError(`vsock uds_path must be 1 to ${MAX_UDS_PATH} bytes (a Unix socket path)`);
  }
  return v;
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
  /** The root drive (devices[0]): root=PARTUUID=... when given, else root=/dev/vda. */
  readonly root?: { partuuid?: string; readOnly: boolean };
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
 * The sections that become virtio devices, checked and in slot order (drives with the root drive
 * first, entropy, network interfaces, vsock), as the builder and a snapshot take them.
 */
function checkDevices(r: Omit<VmResources, 'boot'>): {
  drives: DriveConfig[];
  devices: VirtioConfig[];
} {
  let drives: DriveConfig[] = [];
  for (const d of r.drives ?? []) drives = withDrive(drives, d);
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
  if (r.vsock) validateVsock(r.vsock);
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
    })),
    ...(r.entropy ? [{ kind: 'rng', id: 'entropy' } as const] : []),
    ...nets.map((n): VirtioConfig => ({
      kind: 'net',
      id: n.iface_id,
      tap: n.host_dev_name,
      ...(n.guest_mac !== undefined ? { mac: n.guest_mac } : {}),
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
    ...(r.vsock
      ? [
          {
            kind: 'vsock',
            id: r.vsock.vsock_id ?? 'vsock',
            cid: r.vsock.guest_cid,
            uds: r.vsock.uds_path,
          } as const,
        ]
      : []),
  ];
  if (devices.length > MAX_VIRTIO_DEVICES)
    throw new ConfigError(
      `${devices.length} virtio devices configured; at most ${MAX_VIRTIO_DEVICES} fit`,
    );
  return { drives, devices };
}

/**
 * Checks the whole description, including how the parts fit together, and gives the checked
 * form the builder takes. Pure: no file is opened (the builder opens each device's host side
 * once, and that open is the check of the file).
 */
export function validateResources(r: VmResources): VmSpec {
  validateMachineConfig(r.machine);
  validateBootSource(r.boot);
  const { drives, devices } = checkDevices(r);
  const rootDrive = drives[0]?.is_root_device ? drives[0] : undefined;
  return {
    vcpus: r.machine.vcpu_count,
    memMib: r.machine.mem_size_mib,
    ...(r.machine.track_dirty_pages === true ? { trackDirtyPages: true } : {}),
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
  logger: LoggerConfig | null;
  metrics: MetricsConfig | null;
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
    logger: null,
    metrics: null,
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
  if (c.logger) r.logger = { ...c.logger };
  if (c.metrics) r.metrics = { ...c.metrics };
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
    logger: r.logger ? { ...r.logger } : null,
    metrics: r.metrics ? { ...r.metrics } : null,
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
  };
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
      });
    } else if (d.kind === 'rng') config.entropy = {};
    else if (d.kind === 'net') {
      config['network-interfaces'].push({
        iface_id: d.id,
        host_dev_name: d.tap,
        ...(d.mac !== undefined ? { guest_mac: d.mac } : {}),
      });
    } else config.vsock = { guest_cid: d.cid, uds_path: d.uds, vsock_id: d.id };
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

/** A load's replacements for host-side names (Firecracker's network_overrides, vsock_override). */
export interface RestoreOverrides {
  network?: ReadonlyArray<{ ifaceId: string; hostDevName: string }>;
  vsockUdsPath?: string;
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
      logger: 'object',
      metrics: 'object',
      'mmds-config': 'object',
    },
    ['machine-config'],
  );

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
          shape(c.vsock, 'vsock', { guest_cid: 'number', uds_path: 'string', vsock_id: 'string' }, [
            'guest_cid',
            'uds_path',
          ]),
        );
  if (overrides.vsockUdsPath !== undefined) {
    if (!vsock) throw new ConfigError('Unknown Vsock Device');
    vsock = { ...vsock, uds_path: overrides.vsockUdsPath };
  }

  let entropy: EntropyConfig | null = null;
  if (c.entropy != null) {
    const e = shape(c.entropy, 'entropy', { rate_limiter: 'object' });
    shapeRateLimiter(e.rate_limiter, 'entropy.rate_limiter');
    entropy = defined<EntropyConfig>(e);
  }
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
  const checked = checkDevices({
    machine,
    drives,
    network_interfaces: nets,
    ...(vsock ? { vsock } : {}),
    ...(entropy ? { entropy } : {}),
    ...(mmds ? { mmds_config: mmds } : {}),
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
      logger: null,
      metrics: null,
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
 * defaults (cache_type "Unsafe", io_engine "Sync"); vsock_id is dropped (deprecated: Firecracker
 * drops it too); interface MACs are lower case. Our own `allow_block_device` appears only when
 * true, so a configuration that does not use it reads back exactly as Firecracker's would.
 */
export function wireVmConfig(c: VmConfig): Wire {
  const boot = c['boot-source'];
  return {
    balloon: null,
    drives: c.drives.map((d) => ({
      drive_id: d.drive_id,
      partuuid: d.partuuid ?? null,
      is_root_device: d.is_root_device,
      cache_type: d.cache_type ?? 'Unsafe',
      is_read_only: d.is_read_only ?? null,
      path_on_host: d.path_on_host ?? null,
      rate_limiter: wireRateLimiter(d.rate_limiter),
      io_engine: d.io_engine ?? 'Sync',
      socket: d.socket ?? null,
      ...(d.allow_block_device === true ? { allow_block_device: true } : {}),
    })),
    'boot-source': {
      kernel_image_path: boot?.kernel_image_path ?? '',
      initrd_path: boot?.initrd_path ?? null,
      boot_args: boot?.boot_args ?? null,
    },
    'cpu-config': null,
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
    vsock: c.vsock ? { guest_cid: c.vsock.guest_cid, uds_path: c.vsock.uds_path } : null,
    entropy: c.entropy ? { rate_limiter: wireRateLimiter(c.entropy.rate_limiter) } : null,
    pmem: [],
    'memory-hotplug': null,
  };
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

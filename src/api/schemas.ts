/**
 * Our schemas for the request bodies of the Firecracker-compatible API and the config file,
 * written from Firecracker's OpenAPI description (see docs/api.md for the resulting reference).
 * Limits that the OpenAPI file leaves open are bounded here so no value can be absurd: strings
 * are at most PATH_MAX, integers are safe JavaScript integers.
 */
import { MAX_VCPUS } from '../vmm/index.js';
import { MAX_MEM_MIB, MAX_VIRTIO_DEVICES } from '../vmm/index.js';
import { MAX_GUEST_CID, MIN_GUEST_CID } from '../util/vhost-abi.js';
import { PATH_MAX, type Schema } from './schema.js';

const U64 = Number.MAX_SAFE_INTEGER;
const str = (description: string, maxLength = PATH_MAX): Schema => ({
  type: 'string',
  maxLength,
  description,
});
const bool = (description: string): Schema => ({ type: 'boolean', description });
const int = (minimum: number, maximum: number, description: string): Schema => ({
  type: 'integer',
  minimum,
  maximum,
  description,
});
const oneOf = (values: readonly string[], description: string): Schema => ({
  type: 'string',
  enum: values,
  description,
});

export const TokenBucket: Schema = {
  type: 'object',
  description:
    'A token bucket: `size` tokens, refilled over `refill_time` ms, plus a one-time burst.',
  properties: {
    size: int(0, U64, 'Total number of tokens the bucket can hold.'),
    one_time_burst: int(0, U64, 'Initial extra tokens.'),
    refill_time: int(0, U64, 'Milliseconds to refill the bucket.'),
  },
  required: ['size', 'refill_time'],
};

export const RateLimiter: Schema = {
  type: 'object',
  description:
    'Independent token buckets for bytes (bandwidth) and requests (ops); a request over the limit waits on its queue.',
  properties: { bandwidth: TokenBucket, ops: TokenBucket },
};

export const MachineConfiguration: Schema = {
  type: 'object',
  description:
    'vCPUs and memory. huge_pages: "None" or "2M" (hugetlbfs pages the host reserved, vm.nr_hugepages).',
  properties: {
    vcpu_count: int(1, MAX_VCPUS, 'Number of vCPUs.'),
    mem_size_mib: int(1, MAX_MEM_MIB, 'Guest memory in MiB (at least 16).'),
    smt: bool(
      'Simultaneous multithreading: two threads per core in the CPUID topology the guest sees (vcpu_count must then be 1 or even).',
    ),
    track_dirty_pages: bool(
      "Keep KVM's dirty log and the devices' writes to guest memory, so Diff snapshots can be taken (default false).",
    ),
    huge_pages: oneOf(
      ['None', 'Transparent', '2M'],
      'Huge pages backing guest memory: "None" (default) or "2M" (a hugetlbfs memfd of 2 MiB pages, all reserved at InstanceStart from the host\'s vm.nr_hugepages pool; mem_size_mib a multiple of 2; no balloon). "Transparent" is refused.',
    ),
    cpu_template: oneOf(
      ['C3', 'T2', 'T2S', 'T2CL', 'T2A', 'V1N1', 'None'],
      'Deprecated static CPU template (answered with `Deprecation: true`): C3, T2, T2S, T2CL on Intel hosts of the models Firecracker lists, T2A on AMD Milan; refused at InstanceStart on other hosts. V1N1 is aarch64 only. "None" (or a PUT /cpu-config) removes it.',
    ),
  },
  required: ['vcpu_count', 'mem_size_mib'],
};

/** PATCH /machine-config: the same fields, none required (but at least one present). */
export const MachineConfigurationUpdate: Schema = {
  ...MachineConfiguration,
  required: [],
} as Schema;

export const BootSource: Schema = {
  type: 'object',
  description: 'The guest kernel, initrd and command line.',
  properties: {
    kernel_image_path: str(
      'Host path of the kernel: bzImage, or ELF vmlinux (PVH note or 64-bit entry).',
    ),
    initrd_path: str('Host path of the initrd.'),
    boot_args: str('Kernel command line (default: console=ttyS0 reboot=k panic=1 pci=off ...).'),
  },
  required: ['kernel_image_path'],
};

export const Drive: Schema = {
  type: 'object',
  description: 'A virtio-blk drive (the root drive becomes /dev/vda).',
  properties: {
    drive_id: str('Drive id; must equal the id in the path.', 256),
    partuuid: str('Partition UUID of the root partition (used when is_root_device).', 256),
    is_root_device: bool('Make this the root device (at most one).'),
    cache_type: oneOf(['Unsafe', 'Writeback'], 'Flush handling (default "Unsafe").'),
    is_read_only: bool('Open the backing file read-only (default false).'),
    path_on_host: str('Host path of the backing file (required).'),
    allow_block_device: bool(
      'Typervisor only: path_on_host may be a host block device (default false: regular files only).',
    ),
    rate_limiter: RateLimiter,
    io_engine: oneOf(
      ['Sync', 'Async'],
      'I/O engine (default "Async"; falls back to "Sync" where io_uring is unavailable).',
    ),
    socket: str('vhost-user-block socket: not supported.'),
  },
  required: ['drive_id', 'is_root_device'],
};

export const Pmem: Schema = {
  type: 'object',
  description:
    'A virtio-pmem device: a file (a multiple of 2 MiB) mapped into guest memory above RAM; the guest sees /dev/pmem0, /dev/pmem1... in order, the root one first.',
  properties: {
    id: str('Device id; must equal the id in the path.', 256),
    path_on_host: str('Host path of the backing file (required).'),
    root_device: bool('Boot from it: root=/dev/pmem0 (at most one root device, drive or pmem).'),
    read_only: bool('Map the file read-only (a read-only KVM memory slot; default false).'),
    rate_limiter: RateLimiter,
  },
  required: ['id', 'path_on_host'],
};

export const PartialPmem: Schema = {
  type: 'object',
  description:
    "Post-boot update of a pmem device's rate limiter (on its flush requests: 1 op and the file's size in bytes each), merged per bucket and applied to the running device.",
  properties: {
    id: str('Device id; must equal the id in the path.', 256),
    rate_limiter: RateLimiter,
  },
  required: ['id'],
};

export const MemoryHotplugConfig: Schema = {
  type: 'object',
  description:
    'The hotpluggable memory (virtio-mem), pre-boot: a region above RAM, all unplugged at start.',
  properties: {
    total_size_mib: int(
      0,
      4294967295,
      'Largest hotpluggable size in MiB; a multiple of slot_size_mib.',
    ),
    slot_size_mib: int(
      128,
      4294967295,
      'KVM memory slot size in MiB (default 128; at least 128, a multiple of block_size_mib).',
    ),
    block_size_mib: int(2, 4294967295, 'Block size in MiB (default 2; a power of 2, at least 2).'),
  },
  required: ['total_size_mib'],
};

export const MemoryHotplugSizeUpdate: Schema = {
  type: 'object',
  description:
    'A new target size for the hotplugged memory (post-boot): the guest plugs or unplugs blocks to reach it.',
  properties: {
    requested_size_mib: int(
      0,
      4294967295,
      'Target in MiB: a multiple of block_size_mib, at most total_size_mib.',
    ),
  },
  required: ['requested_size_mib'],
};

export const PartialDrive: Schema = {
  type: 'object',
  description:
    'Post-boot update of a drive: a new backing file (opened with the same checks as at start; the guest sees the new capacity) and/or its rate limiter (merged per bucket, applied to the running device). At least one.',
  properties: {
    drive_id: str('Drive id; must equal the id in the path.', 256),
    path_on_host: str('New backing file.'),
    rate_limiter: RateLimiter,
  },
  required: ['drive_id'],
};

export const NetworkInterface: Schema = {
  type: 'object',
  description: 'A virtio-net interface over a TAP device, attached at InstanceStart.',
  properties: {
    iface_id: str('Interface id; must equal the id in the path.', 256),
    host_dev_name: str('Host TAP device name.', 256),
    guest_mac: str(
      'Guest MAC address: six hex bytes, e.g. 06:00:AC:10:00:02 (echoed in lower case).',
      64,
    ),
    mtu: int(68, 65535, 'MTU advertised to the guest (VIRTIO_NET_F_MTU).'),
    rx_rate_limiter: RateLimiter,
    tx_rate_limiter: RateLimiter,
  },
  required: ['iface_id', 'host_dev_name'],
};

export const PartialNetworkInterface: Schema = {
  type: 'object',
  description:
    "Post-boot update of an interface's rate limiters (merged per bucket, applied to the running device).",
  properties: {
    iface_id: str('Interface id; must equal the id in the path.', 256),
    rx_rate_limiter: RateLimiter,
    tx_rate_limiter: RateLimiter,
  },
  required: ['iface_id'],
};

export const Vsock: Schema = {
  type: 'object',
  description:
    'A virtio-vsock device proxied to Unix sockets (or, with backend "vhost", served by the host kernel). Stored and validated; attached later.',
  properties: {
    guest_cid: int(MIN_GUEST_CID, MAX_GUEST_CID, 'Guest context id.'),
    uds_path: str(
      'Host Unix socket path (at most 107 bytes). Required unless backend is "vhost", which refuses it.',
    ),
    backend: oneOf(
      ['unix', 'vhost'],
      'Typervisor only: "unix" (default: Firecracker\'s Unix sockets at uds_path) or "vhost": the host kernel\'s vhost-vsock (/dev/vhost-vsock) serves the rx/tx queues and host programs reach the guest over AF_VSOCK at guest_cid; not with track_dirty_pages or memory hotplug. Echoed only when "vhost".',
    ),
    vsock_id: str('Deprecated (answered with `Deprecation: true`); not echoed.', 256),
  },
  // uds_path is required for the unix backend: validateVsock says so (the schema cannot).
  required: ['guest_cid'],
};

export const EntropyDevice: Schema = {
  type: 'object',
  description: 'A virtio-rng device.',
  properties: { rate_limiter: RateLimiter },
};

export const Balloon: Schema = {
  type: 'object',
  description:
    'A virtio-balloon device (pre-boot): its target size and the features it offers the driver.',
  properties: {
    amount_mib: int(0, 0xffff_ffff, 'Target balloon size in MiB (at most the guest memory).'),
    deflate_on_oom: bool('Let the guest deflate the balloon when it runs out of memory.'),
    stats_polling_interval_s: int(
      0,
      0xffff,
      'Seconds between statistics updates; 0 (default) disables statistics.',
    ),
    free_page_hinting: bool('Offer free page hinting (/balloon/hinting/*).'),
    free_page_reporting: bool('Offer free page reporting (the guest reports free ranges).'),
  },
  required: ['amount_mib', 'deflate_on_oom'],
};

export const BalloonUpdate: Schema = {
  type: 'object',
  description: 'A new target size for the running balloon.',
  properties: { amount_mib: int(0, 0xffff_ffff, 'Target balloon size in MiB.') },
  required: ['amount_mib'],
};

export const BalloonStatsUpdate: Schema = {
  type: 'object',
  description:
    'A new statistics polling interval (first update at once; statistics cannot be turned on or off after boot).',
  properties: {
    stats_polling_interval_s: int(0, 0xffff, 'Seconds between statistics updates.'),
  },
  required: ['stats_polling_interval_s'],
};

export const BalloonStartCmd: Schema = {
  type: 'object',
  description: 'Starts a free page hinting run.',
  properties: {
    acknowledge_on_stop: bool(
      "Answer the driver's STOP with DONE at once, so the guest takes its pages back (default true).",
    ),
  },
};

export const Logger: Schema = {
  type: 'object',
  description: 'Where and how much the VMM logs.',
  properties: {
    level: str('Error, Warning, Info, Debug, Trace or Off (any case; default Info).', 16),
    log_path: str(
      'File or named pipe for the log (created 0600 if missing; not a symlink; appended to).',
    ),
    show_level: bool('Show the level on each line.'),
    show_log_origin: bool('Accepted; we log no source locations.'),
    module: str('Accepted and stored; we do not filter by module.', 256),
  },
};

export const Metrics: Schema = {
  type: 'object',
  description: 'Where metrics go: one JSON object per line, every 60 s and on FlushMetrics.',
  properties: {
    metrics_path: str(
      'File or named pipe for the metrics (created 0600 if missing; not a symlink; appended to).',
    ),
    emit_id: bool('Add the instance id (--id) as a top-level "id" field.'),
    properties: {
      type: 'object',
      description: 'Operator key/value pairs added under "properties".',
      properties: {},
      values: str('Property value.', 1024),
      maxProperties: 64,
    },
  },
  required: ['metrics_path'],
};

export const InstanceActionInfo: Schema = {
  type: 'object',
  description: 'A synchronous action.',
  properties: {
    action_type: oneOf(['FlushMetrics', 'InstanceStart', 'SendCtrlAltDel'], 'The action.'),
  },
  required: ['action_type'],
};

export const Vm: Schema = {
  type: 'object',
  description: 'The desired microVM state.',
  properties: { state: oneOf(['Paused', 'Resumed'], 'Paused or Resumed.') },
  required: ['state'],
};

/** Longest TAP name (IFNAMSIZ - 1) and vsock socket path (sun_path - 1), as resources.ts checks. */
const TAP_NAME_MAX = 15;
const UDS_PATH_MAX = 107;

export const SnapshotCreateParams: Schema = {
  type: 'object',
  description: 'PUT /snapshot/create: writes the paused microVM to a state file and a memory file.',
  properties: {
    snapshot_path: str('Path of the state file (replaced atomically if it exists).'),
    mem_file_path: str('Path of the memory file (replaced atomically if it exists).'),
    snapshot_type: oneOf(
      ['Full', 'Diff'],
      'Full (default), or Diff: only the pages changed since the last snapshot (needs track_dirty_pages); merge it onto its base with `typervisor snapshot rebase` before loading.',
    ),
  },
  required: ['snapshot_path', 'mem_file_path'],
};

export const MemBackend: Schema = {
  type: 'object',
  description: 'Where guest memory comes from on load.',
  properties: {
    backend_type: oneOf(
      ['File', 'Uffd'],
      "File (the memory file, mapped privately) or Uffd (a page-fault handler fills guest memory, Firecracker's handshake).",
    ),
    backend_path: str("The memory file (File) or the page-fault handler's socket (Uffd)."),
  },
  required: ['backend_type', 'backend_path'],
};

export const NetworkOverride: Schema = {
  type: 'object',
  description: 'A saved network interface attached to another TAP on load.',
  properties: {
    iface_id: str('The saved interface id.', 256),
    host_dev_name: str('The TAP to use instead of the saved one.', TAP_NAME_MAX),
  },
  required: ['iface_id', 'host_dev_name'],
};

export const SnapshotLoadParams: Schema = {
  type: 'object',
  description:
    'PUT /snapshot/load: restores a microVM from a state file and a memory file, in a process that has configured nothing else.',
  properties: {
    snapshot_path: str('Path of the state file.'),
    mem_backend: MemBackend,
    mem_file_path: str('Deprecated: use mem_backend {backend_type: "File", backend_path}.'),
    enable_diff_snapshots: bool('Deprecated: use track_dirty_pages.'),
    track_dirty_pages: bool('Track dirty pages from the start (for later Diff snapshots).'),
    resume_vm: bool('Resume the microVM once loaded (default: it stays Paused).'),
    network_overrides: {
      type: 'array',
      items: NetworkOverride,
      maxItems: MAX_VIRTIO_DEVICES,
      description: 'TAP devices to use instead of the saved ones.',
    },
    vsock_override: {
      type: 'object',
      description: 'A vsock socket path to use instead of the saved one.',
      properties: { uds_path: str('Host Unix socket path (at most 107 bytes).', UDS_PATH_MAX) },
      required: ['uds_path'],
    },
    clock_realtime: bool('Advance kvmclock by the wall-clock time the snapshot spent on disk.'),
    huge_pages: oneOf(
      ['None', 'Snapshot', 'Transparent', '2M'],
      'Huge pages for guest memory: "None" or "Snapshot" (what the snapshot used: none).',
    ),
  },
  required: ['snapshot_path'],
};

/**
 * Sections Firecracker's config file may carry for features Typervisor does not have. Their
 * empty forms, as Firecracker's own example files and GET /vm/config write them (null), are
 * accepted; anything else is refused by config-file.ts naming the feature.
 * `serial` is not in Firecracker's config file either (its VmmConfig skips it): ignored.
 */
export const UNSUPPORTED_CONFIG_SECTIONS: readonly string[] = [];

const bitmap = (bits: number): Schema =>
  str(
    `${bits}-bit bitmap, most significant bit first: "0b" (optional), then 0 (clear), 1 (set) or x (keep) per bit, "_" allowed between digits; fewer than ${bits} digits leave the high bits alone.`,
    256,
  );
const index32 = (what: string): Schema =>
  str(`${what}: hex "0x..", binary "0b.." or decimal, below 2^32.`, 64);

/**
 * PUT /cpu-config and the config file's "cpu-config" (an object, or the path of a JSON file):
 * Firecracker's custom CPU template. Checked by src/arch/x86_64/cpu-template.ts (not by this
 * schema, which documents it): unknown fields, bad bitmaps and register names are refused.
 */
export const CpuConfig: Schema = {
  type: 'object',
  description:
    'Custom CPU template (pre-boot), applied at InstanceStart; replaces a static cpu_template. cpuid_modifiers: [{leaf, subleaf, flags, modifiers: [{register: "eax".."edx", bitmap}]}]; msr_modifiers: [{addr, bitmap}]; leaf, subleaf and addr as "0x..", "0b.." or decimal strings; flags 0-7 (KVM_CPUID_FLAG_*). A bitmap is "0b" then one character per bit, most significant first: 0 clears, 1 sets, x keeps, "_" separates; fewer digits than the register (32 bits for CPUID, 64 for MSRs) keep the high bits. A leaf or MSR this host does not have fails InstanceStart.',
  properties: {
    kvm_capabilities: {
      type: 'array',
      maxItems: 64,
      items: str('"N" requires KVM capability N at InstanceStart; "!N" removes it.', 16),
      description: 'KVM capabilities to require.',
    },
    cpuid_modifiers: {
      type: 'array',
      maxItems: 256,
      description: "Changes to KVM's supported CPUID, before the topology is set per vCPU.",
      items: {
        type: 'object',
        description: 'One leaf/subleaf.',
        properties: {
          leaf: index32('CPUID leaf'),
          subleaf: index32('CPUID subleaf'),
          flags: int(0, 7, 'KVM_CPUID_FLAG_* for the entry (1: significant subleaf).'),
          modifiers: {
            type: 'array',
            maxItems: 16,
            description: 'Register changes.',
            items: {
              type: 'object',
              description: 'One register.',
              properties: {
                register: oneOf(['eax', 'ebx', 'ecx', 'edx'], 'The register.'),
                bitmap: bitmap(32),
              },
              required: ['register', 'bitmap'],
            },
          },
        },
        required: ['leaf', 'subleaf', 'flags', 'modifiers'],
      },
    },
    msr_modifiers: {
      type: 'array',
      maxItems: 256,
      description:
        'Changes to MSRs (read from vCPU 0 after its CPUID is set), written to every vCPU.',
      items: {
        type: 'object',
        description: 'One MSR.',
        properties: { addr: index32('MSR address'), bitmap: bitmap(64) },
        required: ['addr', 'bitmap'],
      },
    },
    reg_modifiers: {
      type: 'array',
      maxItems: 0,
      items: { type: 'object', properties: {}, description: 'aarch64 only.' },
      description: 'aarch64 only: accepted only empty.',
    },
    vcpu_features: {
      type: 'array',
      maxItems: 0,
      items: { type: 'object', properties: {}, description: 'aarch64 only.' },
      description: 'aarch64 only: accepted only empty.',
    },
  },
};

/** PUT /mmds/config (issue 16): MmdsConfig of the description. */
export const MmdsConfig: Schema = {
  type: 'object',
  description:
    'MMDS: the interfaces whose frames to ipv4_address (ARP and TCP) are answered by the metadata service instead of the TAP. Pre-boot only.',
  properties: {
    version: oneOf(
      ['V1', 'V2'],
      'V1 (a token is optional) or V2 (a session token is required). Default V1.',
    ),
    network_interfaces: {
      type: 'array',
      items: str('An iface_id configured before.', 64),
      maxItems: MAX_VIRTIO_DEVICES,
      description: 'The interfaces that answer MMDS requests (at least one).',
    },
    ipv4_address: str(
      'A link-local address, 169.254.1.0 to 169.254.254.255 (default 169.254.169.254).',
      15,
    ),
    imds_compat: bool('Always answer in the IMDS (text) format, whatever the Accept header says.'),
  },
  required: ['network_interfaces'],
};

/** Any JSON value at all: the section is checked by name in config-file.ts, not by shape. */
const anyObject: Schema = {
  type: 'object',
  description: 'Not supported by Typervisor: only null is accepted.',
  properties: {},
  values: { type: 'boolean' }, // never reached: config-file.ts takes these sections out first
};

/** --config-file and GET /vm/config (FullVmConfiguration). */
export const FullVmConfiguration: Schema = {
  type: 'object',
  description: 'The whole VM: the body of GET /vm/config and the content of --config-file.',
  properties: {
    'boot-source': BootSource,
    'machine-config': MachineConfiguration,
    drives: { type: 'array', items: Drive, maxItems: 64, description: 'Block devices.' },
    'network-interfaces': {
      type: 'array',
      items: NetworkInterface,
      maxItems: 64,
      description: 'Net devices.',
    },
    vsock: Vsock,
    entropy: EntropyDevice,
    balloon: Balloon,
    pmem: { type: 'array', items: Pmem, maxItems: 64, description: 'virtio-pmem devices.' },
    'memory-hotplug': MemoryHotplugConfig,
    logger: Logger,
    metrics: Metrics,
    'cpu-config': CpuConfig,
    'mmds-config': MmdsConfig,
    ...Object.fromEntries(UNSUPPORTED_CONFIG_SECTIONS.map((k) => [k, anyObject])),
    serial: anyObject,
  },
};

/** PUT /serial (helper P): where the serial console's output goes (pre-boot). */
export const SerialDevice: Schema = {
  type: 'object',
  description:
    "Serial console output to a file or named pipe (created 0600 if missing; not a symlink; appended to). Without serial_out_path: this process's stdout. rate_limiter: a token bucket of output bytes shared by all vCPUs; a byte the guest writes over the limit is dropped (the guest never waits for it) and counted in the metrics' uart.rate_limiter_dropped_bytes.",
  properties: {
    serial_out_path: str('File or named pipe for the serial output.'),
    rate_limiter: TokenBucket,
  },
};

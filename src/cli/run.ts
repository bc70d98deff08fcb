/**
 * `typervisor run`: boot a VM from command-line flags, console on this terminal.
 * Exit codes: 0 guest powered off or rebooted; 1 the guest failed (triple fault, KVM error);
 * 2 bad arguments or images; 3 the host cannot run it (no /dev/kvm, PVM-only host).
 */
import { parseArgs } from 'node:util';
import { existsSync } from 'node:fs';
import { ConfigError, HostError, TypervisorError } from '../util/errors.js';
import { imageFilePaths } from '../util/guest-images.js';
import { log, setLogLevel, type Level } from '../util/log.js';
import {
  buildVm,
  checkHostCanRun,
  configFromResources,
  loadSnapshot,
  SnapshotError,
  type BuiltVm,
  type LoadParams,
  DEFAULT_BOOT_ARGS,
  MAX_MEM_MIB,
  MIN_MEM_MIB,
  validateMachineConfig,
  validateResources,
  type MachineConfig,
  type VmResources,
  type VmSpec,
} from '../vmm/index.js';
import { MAX_VCPUS } from '../vmm/index.js';
import { Console } from './console.js';
import { parseDrives, privateRootfsCopy } from './drives.js';
import type { SeccompSettings } from '../sandbox/seccomp/install.js';
import { applySeccomp, seccompSettingsFromFlags } from '../sandbox/seccomp/options.js';
import { parseNet, parseVsock } from './net.js';
import { chooseVcpuThreads } from '../vmm/index.js';
import { processStartMs } from '../util/clock.js';

export const EXIT_OK = 0;
export const EXIT_GUEST_FAILED = 1;
export const EXIT_USAGE = 2;
export const EXIT_HOST = 3;

export const RUN_USAGE = `usage: typervisor run [options]
  --kernel PATH     kernel: bzImage, or ELF vmlinux with a PVH note (default: the project's guest)
  --initrd PATH     initramfs (default: the project's guest initramfs when --kernel is not given)
  --cmdline STR     kernel command line (default: "${DEFAULT_BOOT_ARGS}")
  --vcpus N         number of vCPUs, 1-64 (default 1)
  --memory MiB      guest memory in MiB (default 256)
  --huge-pages P    None (default) or 2M: guest RAM in 2 MiB hugetlbfs pages, all reserved at
                    start from the host's vm.nr_hugepages pool (machine-config huge_pages;
                    --memory must then be even)
  --drive SPEC      a virtio-blk disk: path=FILE[,ro][,root][,serial=ID][,blockdev][,sync|,async]
                    (repeatable; the root drive becomes /dev/vda and adds root=/dev/vda to the
                    command line; blockdev allows a host block device as FILE, refused otherwise;
                    served with io_uring by default, io_engine "Async", or with Sync where
                    io_uring is unavailable; sync asks for io_engine "Sync", async for "Async")
  --rootfs          boot the project's Debian root disk (a private copy of rootfs.ext4) as root
  --rng             a virtio-rng device (entropy from the host's CSPRNG)
  --net SPEC        a virtio-net device on a host TAP: tap=NAME[,mac=MAC] (repeatable; the TAP
                    is created if missing, which needs CAP_NET_ADMIN)
  --vsock SPEC      a virtio-vsock device: cid=N,uds=PATH (N >= 3; guest connections to port P
                    reach PATH_P; host programs dial PATH and send "CONNECT P\\n"), or
                    cid=N,backend=vhost: the host kernel's vhost-vsock serves it (needs
                    /dev/vhost-vsock: modprobe vhost_vsock); host programs connect over AF_VSOCK
                    to CID N, the guest reaches host listeners at CID 2; not with
                    --track-dirty-pages
  --track-dirty-pages  keep KVM's dirty log and the devices' writes, for Diff snapshots (also
                    with --restore)
  --boot-timer      print the time from process start to the guest's boot marker
  --allow-pvm       run even where this host's KVM cannot run stock kernels (PVM-only)
  --log-level L     error | warn | info | debug (default warn)
  --no-seccomp      run without the seccomp filters (on by default; docs/security.md)
  --seccomp-filter FILE  per-role allow-lists from this JSON instead of the defaults
  --vcpu-threads M  worker: a Node worker per vCPU; native: a native thread per vCPU, all served
                    by the main thread (TYPERVISOR_VCPU_HUB=worker: by one worker of their own);
                    hybrid: vCPU 0 on a worker, the others native; loop: vCPU 0 run by the
                    main thread while its event loop is idle, the others native; auto
                    (default): loop (docs/architecture.md)
Restoring a snapshot instead of booting (the VM's shape comes from the snapshot, so --kernel,
--initrd, --cmdline, --vcpus, --memory, --huge-pages, --drive, --rootfs, --rng, --net and --vsock
do not apply):
  --restore STATE   the state file (typervisor snapshot create, or PUT /snapshot/create)
  --mem-file MEM    its memory file (mapped privately; pages load on first touch)
  --mem-uffd SOCK   or: the socket of a page-fault handler serving the memory file (the Uffd
                    backend: start \`typervisor uffd-handler --socket SOCK --mem-file MEM\` first)
  --net-override ID=TAP  attach the saved interface ID to another TAP (repeatable)
  --vsock-uds PATH  use another socket path for the saved vsock device (unix backend only)
  --paused          leave the VM paused after loading it
  --clock-realtime  advance the guest clock by the time the snapshot spent on disk
Console: the guest's serial port is this terminal; press Ctrl-A then x to quit.`;

function intArg(
  name: string,
  v: string | undefined,
  dflt: number,
  min: number,
  max: number,
): number {
  if (v === undefined) return dflt;
  const n = /^\d+$/.test(v) ? Number(v) : NaN;
  if (!(n >= min && n <= max))
    throw new ConfigError(`--${name} must be a whole number from ${min} to ${max} (got "${v}")`);
  return n;
}

/** The machine-config field each machine flag of `run` sets. */
const FLAG_OF_FIELD: Record<string, string> = {
  vcpu_count: '--vcpus',
  mem_size_mib: '--memory',
  huge_pages: '--huge-pages',
};

/**
 * The flags' machine-config, checked by the config path's own validateMachineConfig (the rules
 * of PUT /machine-config and --config-file: huge_pages "None" or "2M", an even size with "2M"),
 * its message naming the flags instead of the fields.
 */
function machineFromFlags(m: MachineConfig): MachineConfig {
  try {
    return validateMachineConfig(m);
  } catch (e) {
    if (!(e instanceof ConfigError)) throw e;
    throw new ConfigError(
      e.message.replace(/\b(vcpu_count|mem_size_mib|huge_pages)\b/g, (f) => FLAG_OF_FIELD[f]!),
    );
  }
}

/** The project's default guest (built by `npm run guest`), or undefined when not built. */
async function defaultGuest(): Promise<{ kernel: string; initrd: string } | undefined> {
  try {
    const k = imageFilePaths('kernel').KERNEL!;
    const i = imageFilePaths('initramfs').INITRAMFS!;
    return existsSync(k) && existsSync(i) ? { kernel: k, initrd: i } : undefined;
  } catch {
    return undefined;
  }
}

/**
 * What the flags ask for: the VM as VmResources (the same structure the API and --config-file
 * fill, validated and built by the same code), and what only the CLI does.
 */
export interface RunArgs {
  res: VmResources;
  bootTimer: boolean;
  allowPvm: boolean;
  /** --rootfs: a private copy of the project's root disk becomes the root drive at run time. */
  rootfs: boolean;
}

/** Flags that shape a booted VM: a restored VM takes its shape from the snapshot. */
const VM_SHAPING_FLAGS = [
  'kernel',
  'initrd',
  'cmdline',
  'vcpus',
  'memory',
  'huge-pages',
  'drive',
  'rootfs',
  'rng',
  'net',
  'vsock',
] as const;
/** Flags that only mean something with --restore. */
const RESTORE_FLAGS = [
  'mem-file',
  'mem-uffd',
  'net-override',
  'vsock-uds',
  'paused',
  'clock-realtime',
] as const;

function parseRunFlags(argv: string[]) {
  try {
    return parseArgs({
      args: argv,
      strict: true,
      allowPositionals: false,
      options: {
        kernel: { type: 'string' },
        initrd: { type: 'string' },
        cmdline: { type: 'string' },
        vcpus: { type: 'string' },
        memory: { type: 'string' },
        'huge-pages': { type: 'string' },
        'boot-timer': { type: 'boolean' },
        'allow-pvm': { type: 'boolean' },
        'log-level': { type: 'string' },
        drive: { type: 'string', multiple: true },
        rng: { type: 'boolean' },
        rootfs: { type: 'boolean' },
        net: { type: 'string', multiple: true },
        vsock: { type: 'string', multiple: true },
        restore: { type: 'string' },
        'mem-file': { type: 'string' },
        'mem-uffd': { type: 'string' },
        'net-override': { type: 'string', multiple: true },
        'vsock-uds': { type: 'string' },
        paused: { type: 'boolean' },
        'track-dirty-pages': { type: 'boolean' },
        'clock-realtime': { type: 'boolean' },
        'no-seccomp': { type: 'boolean' },
        'seccomp-filter': { type: 'string' },
        'vcpu-threads': { type: 'string' },
      },
    }).values;
  } catch (e) {
    throw new ConfigError((e as Error).message.split('\n')[0]!);
  }
}
type RunFlags = ReturnType<typeof parseRunFlags>;

/**
 * --vcpu-threads worker|native|hybrid|loop|auto (vcpu-mode.ts), passed on as TYPERVISOR_VCPU_THREADS (read
 * when the VM starts; main.ts reads the flag too, for the prewarm).
 */
function applyVcpuThreads(v: RunFlags): void {
  const t = v['vcpu-threads'];
  if (t === undefined) return;
  try {
    chooseVcpuThreads(1, t);
  } catch (e) {
    throw new ConfigError((e as Error).message);
  }
  process.env.TYPERVISOR_VCPU_THREADS = t;
}

function applyLogLevel(v: RunFlags): void {
  if (v['log-level'] !== undefined) {
    if (!['error', 'warn', 'info', 'debug'].includes(v['log-level']))
      throw new ConfigError(`--log-level must be error, warn, info or debug`);
    setLogLevel(v['log-level'] as Level);
  }
}

/** `run --restore STATE --mem-file MEM ...`: what to load, as PUT /snapshot/load would. */
export function parseRestoreArgs(argv: string[]): LoadParams {
  const v = parseRunFlags(argv);
  applyLogLevel(v);
  applyVcpuThreads(v);
  if (v.restore === undefined) throw new ConfigError('--restore is required');
  const clash = VM_SHAPING_FLAGS.filter((f) => v[f] !== undefined);
  if (clash.length > 0)
    throw new ConfigError(
      `--restore cannot be used with ${clash.map((f) => `--${f}`).join(', ')}: the snapshot decides the VM's shape`,
    );
  if ((v['mem-file'] === undefined) === (v['mem-uffd'] === undefined))
    throw new ConfigError(
      v['mem-file'] === undefined
        ? '--restore needs --mem-file (or --mem-uffd)'
        : '--mem-file and --mem-uffd cannot be used together',
    );
  const networkOverrides = (v['net-override'] ?? []).map((o) => {
    const m = /^([^=]+)=(.+)$/.exec(o);
    if (!m) throw new ConfigError(`--net-override must be ID=TAP (got "${o}")`);
    return { ifaceId: m[1]!, hostDevName: m[2]! };
  });
  return {
    snapshotPath: v.restore,
    memBackend:
      v['mem-uffd'] !== undefined
        ? { type: 'Uffd', path: v['mem-uffd'] }
        : { type: 'File', path: v['mem-file']! },
    trackDirtyPages: v['track-dirty-pages'] ?? false,
    resumeVm: !(v.paused ?? false),
    clockRealtime: v['clock-realtime'] ?? false,
    networkOverrides,
    ...(v['vsock-uds'] !== undefined ? { vsockOverride: { udsPath: v['vsock-uds'] } } : {}),
  };
}

export async function parseRunArgs(argv: string[]): Promise<RunArgs> {
  const v = parseRunFlags(argv);
  applyLogLevel(v);
  applyVcpuThreads(v);
  if (v.restore !== undefined) throw new ConfigError('--restore: use restoreCommand');
  const stray = RESTORE_FLAGS.filter((f) => v[f] !== undefined);
  if (stray.length > 0) throw new ConfigError(`--${stray[0]} needs --restore`);
  let kernel = v.kernel;
  let initrd = v.initrd;
  if (kernel === undefined) {
    const g = await defaultGuest();
    if (!g)
      throw new ConfigError(
        'no --kernel given and the default guest is not built: run `npm run guest`',
      );
    kernel = g.kernel;
    initrd ??= g.initrd;
  }
  const res: VmResources = {
    machine: machineFromFlags({
      vcpu_count: intArg('vcpus', v.vcpus, 1, 1, MAX_VCPUS),
      mem_size_mib: intArg('memory', v.memory, 256, MIN_MEM_MIB, MAX_MEM_MIB),
      ...(v['track-dirty-pages'] ? { track_dirty_pages: true } : {}),
      // Carried as given: machineFromFlags decides what it may be.
      ...(v['huge-pages'] !== undefined
        ? { huge_pages: v['huge-pages'] as MachineConfig['huge_pages'] }
        : {}),
    }),
    boot: {
      kernel_image_path: kernel,
      initrd_path: initrd,
      boot_args: v.cmdline ?? DEFAULT_BOOT_ARGS,
    },
  };
  const drives = parseDrives(v.drive ?? []);
  if (v.rootfs && drives.some((d) => d.is_root_device))
    throw new ConfigError('--rootfs and a --drive with root cannot be used together');
  if (drives.length > 0) res.drives = drives;
  const nets = (v.net ?? []).map(parseNet);
  if (nets.length > 0)
    res.network_interfaces = nets.map((n, i) => ({
      iface_id: `net${i}`,
      host_dev_name: n.tap,
      ...(n.mac !== undefined ? { guest_mac: n.mac } : {}),
    }));
  if ((v.vsock ?? []).length > 1) throw new ConfigError('--vsock can be given once');
  const vsock = v.vsock?.[0] === undefined ? undefined : parseVsock(v.vsock[0]);
  if (vsock)
    res.vsock =
      'uds' in vsock
        ? { guest_cid: vsock.cid, uds_path: vsock.uds }
        : { guest_cid: vsock.cid, backend: vsock.backend };
  if (v.rng) res.entropy = {};
  return {
    res,
    bootTimer: v['boot-timer'] ?? false,
    allowPvm: v['allow-pvm'] ?? false,
    rootfs: v.rootfs ?? false,
  };
}

/** The project's Debian root disk, or a ConfigError saying how to build it. */
async function defaultRootfs(): Promise<string> {
  const p = imageFilePaths('rootfs').ROOTFS!;
  if (!existsSync(p))
    throw new ConfigError(
      '--rootfs: the Debian root disk is not built: run `npm run guest -- build rootfs`',
    );
  return p;
}

/** True when `typervisor run` is asked to restore a snapshot rather than boot. */
export function isRestore(argv: string[]): boolean {
  return argv.some((a) => a === '--restore' || a.startsWith('--restore='));
}

export async function runCommand(argv: string[]): Promise<number> {
  if (isRestore(argv)) return restoreCommand(argv);
  const { res, bootTimer, allowPvm, rootfs } = await parseRunArgs(argv);
  const seccomp = seccompFromFlags(parseRunFlags(argv));
  checkHostCanRun(res.boot.kernel_image_path, allowPvm);
  // Checked before the root disk is copied: a bad flag costs no copy.
  let spec = validateResources(res);
  let runRes = res;
  let cleanupRootfs = () => undefined as void;
  if (rootfs) {
    const copy = privateRootfsCopy(await defaultRootfs());
    cleanupRootfs = copy.cleanup;
    const root = {
      drive_id: 'rootfs',
      path_on_host: copy.path,
      is_root_device: true,
      is_read_only: false,
    };
    runRes = { ...res, drives: [root, ...(res.drives ?? [])] };
    spec = validateResources(runRes);
  }
  try {
    // The configuration as given (a snapshot of this VM saves it).
    const config = configFromResources(runRes);
    return await runVm(() => buildVm(spec, { config }), bootTimer, seccomp);
  } finally {
    cleanupRootfs();
  }
}

/**
 * `run --restore`: the same loadSnapshot() as PUT /snapshot/load, console on this terminal. A
 * snapshot that cannot be loaded is one line and exit 2.
 */
export async function restoreCommand(argv: string[]): Promise<number> {
  const params = parseRestoreArgs(argv);
  const v = parseRunFlags(argv);
  const seccomp = seccompFromFlags(v);
  return runVm(
    async () => {
      try {
        return await loadSnapshot(params, {});
      } catch (e) {
        if (e instanceof TypervisorError && !(e instanceof HostError)) {
          const reason = e instanceof SnapshotError ? e.reason : e.message;
          throw new ConfigError(`cannot load snapshot ${params.snapshotPath}: ${reason}`);
        }
        throw e;
      }
    },
    v['boot-timer'] ?? false,
    seccomp,
  );
}

/** --no-seccomp / --seccomp-filter, checked before anything is copied or built. */
function seccompFromFlags(v: RunFlags): SeccompSettings {
  try {
    return seccompSettingsFromFlags(v['no-seccomp'] ?? false, v['seccomp-filter']);
  } catch (e) {
    throw new ConfigError((e as Error).message);
  }
}

async function runVm(
  make: () => BuiltVm | Promise<BuiltVm>,
  bootTimer: boolean,
  seccomp: SeccompSettings,
): Promise<number> {
  // Before the VM exists: the process filter, and the settings its workers read (security.md).
  log('debug', applySeccomp(seccomp));
  // The handlers go in before the VM starts: its vCPUs run (and the guest can print) before
  // buildVm() returns, and a signal with no handler would kill the process outright.
  let stopRequested = false;
  let built: BuiltVm | undefined;
  const stopOnSignal = () => {
    stopRequested = true;
    built?.vmm.requestStop();
  };
  process.on('SIGTERM', stopOnSignal);
  process.on('SIGINT', stopOnSignal);
  process.on('SIGHUP', stopOnSignal);
  built = await make();
  const { vmm, devices } = built;
  if (stopRequested) vmm.requestStop();
  const console_ = new Console(devices, () => vmm.requestStop());
  console_.start();
  const ev = await vmm.exited;
  console_.stop();
  log(
    'debug',
    `serial ${JSON.stringify({ ...devices.serial.stats(), ...devices.console.stats() })}; unhandled ${JSON.stringify(devices.unhandled.stats())}; ` +
      `exits ${Array.from({ length: vmm.vcpuCount }, (_, i) => vmm.control.exits(i)).join('/')}`,
  );
  if (bootTimer) {
    const first = vmm.control.firstEntryMs;
    if (first > 0) {
      process.stderr.write(
        `typervisor: first guest entry at ${(first - processStartMs).toFixed(1)} ms after process start\n`,
      );
    }
    const ms = vmm.control.bootMarkerMs;
    process.stderr.write(
      ms > 0
        ? `typervisor: boot marker at ${(ms - processStartMs).toFixed(1)} ms after process start\n`
        : 'typervisor: the guest never wrote the boot marker\n',
    );
  }
  switch (ev.kind) {
    case 'poweroff':
    case 'reset':
      log('info', `guest ${ev.kind === 'reset' ? 'rebooted' : 'powered off'}`);
      return EXIT_OK;
    case 'stopped':
      return EXIT_OK;
    case 'fatal':
      process.stderr.write(`typervisor: ${ev.message}\n`);
      return EXIT_GUEST_FAILED;
  }
}

export function exitCodeFor(e: unknown): number {
  if (e instanceof HostError) return EXIT_HOST;
  if (e instanceof TypervisorError) return EXIT_USAGE;
  return EXIT_GUEST_FAILED;
}

/**
 * buildVm(): VmResources -> a running Vmm. The one path from a validated description to a VM,
 * shared by the CLI and the API.
 */
import type { BootTimerLine } from './boot-timer.js';
import { acpiBootHook } from '../arch/x86_64/acpi/index.js';
import { setupBoot, type BootSetup } from '../arch/x86_64/boot.js';
import { cpuidTables } from './cpuid-tables.js';
import {
  applyTemplateToCpuid,
  applyTemplateToMsrs,
  cpuidTemplateNotApplied,
  requiredKvmCapabilities,
  templateMsrAddrs,
  type CpuTemplate,
} from '../arch/x86_64/cpu-template.js';
import { resolveCpuTemplate } from '../arch/x86_64/cpu-template-static.js';
import { CMDLINE_MAX_SIZE, ramRegions } from '../arch/x86_64/layout.js';
import { Kvm, Vcpu, type Vm } from '../kvm/kvm.js';
import { native } from '../kvm/native.js';
import { decodeSregs, encodeSregs } from '../kvm/structs.js';
import type { TokenBucketConfig } from '../devices/virtio/rate-limiter.js';
import type { CpuidEntry, MsrEntry } from '../kvm/types.js';
import { Cmdline } from '../loader/cmdline.js';
import { readBootImage } from '../loader/image-file.js';
import { ConfigError, HostError, ImageError } from '../util/errors.js';
import { log } from '../util/log.js';
import {
  allocateGuestRam,
  createGuestRam,
  mapGuestRam,
  trackDeviceWrites,
  type GuestRamLayout,
  type MappedGuestRam,
} from './guest-ram.js';
import {
  attachLegacyDevices,
  closeLegacyDeviceState,
  createLegacyDeviceState,
  legacyOptions,
  type AttachedDevices,
  type LegacyDeviceState,
} from './legacy-devices.js';
import { configFromSpec, cpuTemplateMsrAddrs, type VmConfig, type VmSpec } from './resources.js';
import { attachDeviceMemory, deviceMemorySpace } from './device-memory.js';
import { attachRegisterPages } from './register-pages.js';
import { Vmm, type VcpuWorkerSource } from './vmm.js';
import type { VcpuThreads } from './vcpu-mode.js';
import type { GuestRamSource } from './ram-pool.js';
import type { PreparedVmSource } from './prepared-vm.js';
import { writeGenerationId } from './vmgenid.js';
import { startDeviceWorker, type DeviceWorkerHandle } from './device-worker-handle.js';
import {
  acpiVirtioDevices,
  addVirtioCmdline,
  closeVirtio,
  planVirtioDevices,
  registerVirtioWithKvm,
  transportSlots,
  type VirtioPlan,
} from './virtio-plan.js';

const KVM_CAP_TSC_DEADLINE_TIMER = 72;
/** KVM needs three pages for the TSS and one for the identity map, below 4 GiB, outside RAM. */
const TSS_ADDR = 0xfffb_d000;
const IDENTITY_MAP_ADDR = 0xfffb_c000;

/** KVM_MEM_LOG_DIRTY_PAGES: KVM keeps a dirty bitmap for the slot. */
const KVM_MEM_LOG_DIRTY_PAGES = 1;

export interface BuildOptions {
  /** Console output file descriptor (default: stdout). */
  consoleFd?: number;
  /** PUT /serial's rate_limiter: the console output's token bucket (bytes; over it, dropped). */
  serialRateLimiter?: TokenBucketConfig;
  /**
   * --boot-timer: the vCPU thread that takes the guest's boot marker logs this line at once
   * (boot-timer.ts; the Firecracker entry's BootTimer makes it).
   */
  bootTimer?: BootTimerLine;
  /**
   * The configuration the VM is built from, in Firecracker's shape: what a snapshot of it
   * records. Default: derived from the spec (configFromSpec), which has every field the
   * builder uses.
   */
  config?: VmConfig;
  /**
   * The library's warm pool (src/lib/): the vCPU workers come from here and go back after the VM
   * (vmm.ts VcpuWorkerSource). Default: the process's prewarm pool, one use per worker.
   */
  vcpuWorkers?: VcpuWorkerSource;
  /** How the vCPUs run (vcpu-mode.ts); default: TYPERVISOR_VCPU_THREADS, else by count. */
  vcpuThreads?: VcpuThreads;
  /** The vCPUs park as they start, before the guest's first instruction (resume() runs it). */
  paused?: boolean;
  /**
   * Closes the VM's last descriptors (its vCPUs, RAM memfd, VM and /dev/kvm) instead of the
   * main thread: closing a VM's fd takes the kernel ~10-15 ms, which the library's closer
   * thread (src/lib/) spends off the main thread. Called once, at teardown, after guest RAM is
   * unmapped. Default: closed on the main thread (or left to the process's exit, see
   * releaseVmsAtExit).
   */
  closeFds?: (fds: number[]) => void;
  /**
   * Guest RAM kept between VMs (ram-pool.ts): the build takes zeroed RAM of its size from here
   * if there is some, and the VM's RAM goes back here at its release instead of being unmapped.
   * Not with dirty page tracking (its bitmap is per VM).
   */
  guestRam?: GuestRamSource;
  /**
   * A VM made ahead (prepared-vm.ts: the VM, its RAM given to KVM, irqchip and PIT): taken when
   * its RAM has this VM's size and dirty pages are not tracked; else the build makes its own.
   */
  prepared?: PreparedVmSource;
}

/**
 * What a VM is made of, kept for snapshots: create reads the VM, the RAM, the legacy devices
 * and the configuration from here; load makes the same parts from a snapshot.
 */
export interface VmParts {
  kvm: Kvm;
  vm: Vm;
  layout: GuestRamLayout;
  /** The main thread's mapping of guest RAM. */
  ram: MappedGuestRam;
  legacy: LegacyDeviceState;
  plan: VirtioPlan;
  config: VmConfig;
  vcpuFds: number[];
  mmapSize: number;
  /** A restored VM's memory file (its RAM is a private mapping of it): never snapshot onto it. */
  backing?: { dev: number; ino: number };
  /** The RAM goes back to a pool at the VM's release instead of being unmapped and closed. */
  recycleRam?: () => void;
}

export interface BuiltVm {
  vmm: Vmm;
  /** Main-thread views of the legacy devices (console input, Ctrl-Alt-Del). */
  devices: AttachedDevices;
  /** How the guest was booted; absent for a VM restored from a snapshot. */
  boot?: BootSetup;
  deviceWorker?: DeviceWorkerHandle;
  parts: VmParts;
}

/**
 * What a build has created so far, undone in reverse if a later step fails: a failed build (a
 * bad kernel, a refused MSR, a bad snapshot) must leave no fd, mapping or thread behind (the API
 * may retry).
 */
export type UndoList = Array<() => void>;

/** Runs the undo steps in reverse, each best effort, and empties the list. */
export function runUndo(undo: UndoList): void {
  for (const f of undo.reverse()) {
    try {
      f();
    } catch {
      // best effort: report the original failure
    }
  }
  undo.length = 0;
}

let supportedCpuid: readonly CpuidEntry[] | undefined;

/**
 * KVM_GET_SUPPORTED_CPUID, asked once per process: it describes the host's CPU and KVM module,
 * not the VM, and took 0.4-0.6 ms of each warm build (docs/daemon.md). The entries are frozen:
 * every user copies before changing (filterCpuid and cpuidTables, the CPU templates).
 */
function hostCpuid(kvm: Kvm): readonly CpuidEntry[] {
  supportedCpuid ??= Object.freeze(kvm.supportedCpuid().map((e) => Object.freeze(e)));
  return supportedCpuid;
}

/** KVM's CPUID with the template applied, after checking the KVM capabilities it requires. */
function checkedTemplateCpuid(kvm: Kvm, host: readonly CpuidEntry[], t: CpuTemplate): CpuidEntry[] {
  for (const cap of requiredKvmCapabilities(t)) {
    if (kvm.checkExtension(cap) <= 0)
      throw new HostError(`the CPU template requires KVM capability ${cap}, which this host lacks`);
  }
  return applyTemplateToCpuid(host, t);
}

/** The template's MSR values for vCPU 0's current ones; the boot MSRs win (as Firecracker). */
function templatedMsrs(vcpu: Vcpu, t: CpuTemplate, boot: BootSetup['msrs']): MsrEntry[] {
  const addrs = templateMsrAddrs(t);
  const read = vcpu.readMsrs(addrs).msrs;
  const values = applyTemplateToMsrs(new Map(read.map((m) => [m.index, m.data])), t);
  return addrs
    .filter((a) => !boot.some((b) => b.index === a))
    .map((index) => ({ index, data: values.get(index)! }));
}

function setTemplateMsrs(vcpu: Vcpu, msrs: MsrEntry[]): void {
  if (msrs.length === 0) return;
  const { refused } = vcpu.writeMsrs(msrs);
  if (refused.length > 0)
    throw new HostError(
      `KVM refused the CPU template's value for MSR 0x${refused[0]!.toString(16)}`,
    );
}

/** Sets the boot MSRs: required ones must all be taken; optional ones are tried one by one. */
function setBootMsrs(vcpu: Vcpu, msrs: BootSetup['msrs'], warned: Set<string>): void {
  const required = msrs.filter((m) => m.required);
  const n = vcpu.setMsrs(required);
  if (n !== required.length) {
    throw new HostError(
      `KVM refused the boot MSR ${required[n]?.name ?? '?'} (0x${required[n]?.index.toString(16)})`,
    );
  }
  for (const m of msrs.filter((x) => !x.required)) {
    if (vcpu.setMsrs([m]) !== 1 && !warned.has(m.name)) {
      warned.add(m.name);
      log(
        'info',
        `this host's KVM refuses MSR ${m.name} (0x${m.index.toString(16)}); continuing without it`,
      );
    }
  }
}

/** The command line the guest gets: the user's, then root= (one rule), then the devices. */
export function composeCmdline(spec: VmSpec): Cmdline {
  const r = Cmdline.from(spec.bootArgs, CMDLINE_MAX_SIZE);
  if (!r.ok) throw r.error;
  const cmdline = r.value;
  if (spec.root) {
    const root = spec.root.partuuid
      ? cmdline.insert('root', `PARTUUID=${spec.root.partuuid}`)
      : cmdline.insert('root', spec.root.device ?? '/dev/vda');
    if (!root.ok) throw root.error;
    const mode = cmdline.insertStr(spec.root.readOnly ? 'ro' : 'rw');
    if (!mode.ok) throw mode.error;
  }
  return cmdline;
}

/** How long a VM's kernel objects wait for the process's exit (see releaseVmsAtExit). */
export const RELEASE_AT_EXIT_GRACE_MS = 2000;
let releaseAtExit = false;

/**
 * For a process that exits once its VM has ended (`typervisor run`, the API mode): the VM's
 * last teardown step (unmap its RAM, close its vCPU, VM and /dev/kvm descriptors) is left to
 * the process's exit, or done RELEASE_AT_EXIT_GRACE_MS later if the process lives on. The
 * devices' steps (device worker stopped, images closed) still come before `exited`.
 */
export function releaseVmsAtExit(on: boolean): void {
  releaseAtExit = on;
}

export function buildVm(spec: VmSpec, opts: BuildOptions = {}): BuiltVm {
  const undo: UndoList = [];
  try {
    return build(spec, opts, undo);
  } catch (e) {
    runUndo(undo);
    throw e;
  }
}

function closeFd(fd: number): void {
  native().close(fd);
}

/**
 * Step 1 of a build or a restore: /dev/kvm, the VM, and what every VM has before RAM (the TSS
 * and identity map addresses). The in-kernel irqchip and PIT come with the RAM (attachRam).
 */
export function createVmShell(
  undo: UndoList,
  trace?: (step: string) => void,
): { kvm: Kvm; vm: Vm } {
  const kvm = Kvm.open();
  undo.push(() => kvm.close());
  trace?.('/dev/kvm opened');
  const vm: Vm = kvm.createVm();
  undo.push(() => vm.close());
  trace?.('KVM_CREATE_VM');
  vm.setTssAddr(TSS_ADDR);
  vm.setIdentityMapAddr(IDENTITY_MAP_ADDR);
  return { kvm, vm };
}

/**
 * Step 2: gives KVM the guest RAM, one memory slot per region (slot i = region i), then creates
 * the in-kernel irqchip and PIT (before any vCPU, as KVM requires). In this order on purpose: the
 * memory slot ioctl took 7.3 ms on this host once the irqchip existed and 0.2 ms before it
 * (docs/architecture.md "Start-up").
 */
export function attachRam(
  vm: Vm,
  layout: GuestRamLayout,
  ram: MappedGuestRam,
  opts: { dirtyLog?: boolean; trace?: (step: string) => void } = {},
): void {
  const flags = opts.dirtyLog ? KVM_MEM_LOG_DIRTY_PAGES : 0;
  ram.buffers.forEach((b, i) => vm.setUserMemoryRegion(layout.regions[i]!.base, b, flags));
  opts.trace?.('memory slots');
  vm.createIrqchip();
  opts.trace?.('KVM_CREATE_IRQCHIP');
  vm.createPit2();
  opts.trace?.('KVM_CREATE_PIT2');
}

/** Creates vCPU `id` and its main-thread Vcpu (whose kvm_run mapping the caller releases). */
export function createVcpu(
  vm: Vm,
  id: number,
  mmapSize: number,
  vcpuFds: number[],
  undo: UndoList,
): Vcpu {
  const fd = vm.createVcpu(id);
  vcpuFds.push(fd);
  undo.push(() => closeFd(fd));
  const vcpu = new Vcpu(fd, mmapSize);
  undo.push(
    () => vcpu.run.buffer.byteLength > 0 && native().munmap(vcpu.run.buffer as ArrayBuffer),
  );
  return vcpu;
}

/** The vCPU workers map kvm_run themselves: the main thread drops its own mapping. */
export function releaseVcpuRun(vcpu: Vcpu): void {
  native().munmap(vcpu.run.buffer as ArrayBuffer);
}

function build(spec: VmSpec, opts: BuildOptions, undo: UndoList): BuiltVm {
  const memBytes = spec.memMib * 1024 * 1024;
  const vcpus = spec.vcpus;
  // Each opened once and checked on its descriptor; the bytes loaded are the bytes checked.
  const kernel = readBootImage('kernel_image_path', spec.kernelPath);
  const initrd = spec.initrdPath ? readBootImage('initrd_path', spec.initrdPath) : undefined;
  const cmdline = composeCmdline(spec);

  // Opens each device's host side (image, TAP, socket): that open is the check.
  const plan = planVirtioDevices(spec.devices, deviceMemorySpace(memBytes));
  undo.push(() => closeVirtio(plan));
  plan.warnings.forEach((w) => log('warn', w));

  // Dirty pages tracked (Diff snapshots): KVM's log per slot, and the device-dirty bitmap that
  // every thread maps with the RAM.
  const trackDirty = spec.trackDirtyPages === true;
  // Huge pages (hugetlbfs) RAM is made for this VM: the pools hold anonymous RAM.
  const hugetlb = spec.hugePages === '2M';
  const ownRam = trackDirty || hugetlb;
  const prepared = ownRam ? undefined : opts.prepared?.take(memBytes);
  let kvm: Kvm;
  let vm: Vm;
  let layout: GuestRamLayout;
  let ram: MappedGuestRam;
  let pool: GuestRamSource | undefined;
  if (prepared) {
    // Made ahead, RAM and irqchip included: the VM's own from here on.
    ({ kvm, vm, layout, ram } = prepared);
    undo.push(() => kvm.close());
    undo.push(() => vm.close());
    undo.push(() => ram.unmap());
  } else {
    ({ kvm, vm } = createVmShell(undo));
    pool = ownRam ? undefined : opts.guestRam;
    const kept = pool?.take(ramRegions(memBytes));
    if (kept) {
      ({ layout, ram } = kept);
      undo.push(() => pool!.give(kept));
    } else if (hugetlb) {
      // A hugetlbfs memfd that every thread maps (its pages reserved by the first mapping).
      const made = createGuestRam(ramRegions(memBytes), { hugetlb });
      undo.push(() => closeFd(made.memfd));
      if (trackDirty) trackDeviceWrites(made);
      const mapped = mapGuestRam(made);
      undo.push(() => mapped.unmap());
      layout = made;
      ram = mapped;
    } else {
      // Anonymous memory, THP-advised: the threads wrap the main thread's mapping.
      const made = allocateGuestRam(ramRegions(memBytes), { trackDirty });
      undo.push(() => made.ram.unmap());
      ({ layout, ram } = made);
    }
    attachRam(vm, layout, ram, { dirtyLog: trackDirty });
  }
  attachDeviceMemory(vm, plan);
  attachRegisterPages(vm, plan);

  // Kernels find virtio-mmio devices in the DSDT (LNRO0005); kernels built with
  // CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES and no ACPI take them from the command line.
  addVirtioCmdline(plan, cmdline);
  const booted = setupBoot(ram.memory, {
    kernel,
    initrd,
    cmdline: cmdline.toString(),
    vcpus,
    acpi: acpiBootHook({ vcpus, virtio: acpiVirtioDevices(plan) }),
  });
  if (!booted.ok) {
    const e = booted.error;
    throw e instanceof ImageError || e instanceof ConfigError ? e : new ImageError(e.message);
  }
  const boot = booted.value;
  // A new VM, a new generation id (ACPI VMGenID; a snapshot load writes another).
  writeGenerationId(ram.memory);

  // The CPU template (if any) changes KVM's supported CPUID before the per-vCPU normalization.
  const host = hostCpuid(kvm);
  const template = resolveCpuTemplate(spec.cpuTemplate, host);
  const supported = template ? checkedTemplateCpuid(kvm, host, template) : host;
  let templateMsrs: MsrEntry[] = [];
  const tscDeadline = kvm.checkExtension(KVM_CAP_TSC_DEADLINE_TIMER) > 0;
  const mmapSize = kvm.vcpuMmapSize();
  const vcpuFds: number[] = [];
  const warned = new Set<string>();
  // The application processors' reset state is the same for each: their boot sregs are made
  // once and reused while KVM's raw bytes match (a VM of 64 vCPUs decoded and encoded them 64
  // times, enough for V8 to optimize those functions at start-up: ~2.5 MiB of RSS, issue 18).
  let apReset: Uint8Array | undefined;
  let apBoot: Uint8Array | undefined;
  let tables: ReturnType<typeof cpuidTables> | undefined;
  let tablesKhz: number | undefined;
  for (let id = 0; id < vcpus; id++) {
    const vcpu = createVcpu(vm, id, mmapSize, vcpuFds, undo);
    let tscKhz: number | undefined;
    try {
      tscKhz = vcpu.tscKhz() || undefined;
    } catch {
      tscKhz = undefined; // no KVM_CAP_GET_TSC_KHZ: the guest calibrates instead
    }
    // Made once per VM (a vCPU whose TSC rate differs gets its own): cpuid.ts cpuidTables.
    if (!tables || tscKhz !== tablesKhz) {
      tables = cpuidTables(supported, {
        vcpuCount: vcpus,
        tscKhz,
        tscDeadline,
        smt: spec.smt === true,
      });
      tablesKhz = tscKhz;
    }
    vcpu.setCpuidBytes(tables.encoded(id));
    // Some hosts rewrite feature leaves on KVM_SET_CPUID2: say so rather than pretend.
    if (template && id === 0) {
      for (const w of cpuidTemplateNotApplied(tables.first, vcpu.getCpuid(), template))
        log('warn', `CPU template not fully applied: ${w}`);
    }
    // The template's MSRs: read once from vCPU 0 (its CPUID set), changed, written to every vCPU.
    if (template && id === 0) templateMsrs = templatedMsrs(vcpu, template, boot.msrs);
    setTemplateMsrs(vcpu, templateMsrs);
    setBootMsrs(vcpu, boot.msrs, warned);
    vcpu.setRegs(boot.regs);
    if (id === 0) vcpu.setSregs(boot.sregs(vcpu.getSregs()));
    else {
      const reset = vcpu.getSregsBytes();
      if (!apReset || Buffer.compare(reset, apReset) !== 0) {
        apReset = reset;
        apBoot = encodeSregs(boot.sregs(decodeSregs(reset)));
      }
      vcpu.setSregsBytes(apBoot!);
    }
    vcpu.setDefaultFpu();
    releaseVcpuRun(vcpu);
  }

  const built = finishVm(
    {
      kvm,
      vm,
      layout,
      ram,
      plan,
      config: opts.config ?? configFromSpec(spec),
      vcpuFds,
      mmapSize,
      ...(pool ? { recycleRam: () => pool!.give({ layout, ram }) } : {}),
    },
    opts,
    undo,
  );
  return { ...built, boot };
}

/**
 * The last step of a build or a restore: the legacy devices (unless the caller made and
 * restored them already), the virtio eventfds, the console flusher, the device worker and the
 * vCPU workers. With `paused` the vCPUs park as they start (a restored VM that is not to run
 * yet). From its return on, the VM owns every part: its teardown closes them (the caller must
 * not run the undo list any more, but stop the VM instead).
 */
export function finishVm(
  p: Omit<VmParts, 'legacy'> & { legacy?: LegacyDeviceState },
  opts: BuildOptions & { trace?: (step: string) => void },
  undo: UndoList,
): BuiltVm {
  const { kvm, vm, layout, ram, plan, vcpuFds, mmapSize } = p;
  let legacy = p.legacy;
  if (!legacy) {
    const made = createLegacyDeviceState(vm, opts.consoleFd ?? 1, legacyOptions(opts));
    undo.push(() => closeLegacyDeviceState(made));
    legacy = made;
  }
  if (legacy.console.warning) log('warn', legacy.console.warning);
  registerVirtioWithKvm(vm, plan);
  opts.trace?.('legacy devices and virtio eventfds');
  const vmm = new Vmm(mmapSize);
  // The main thread executes no guest port access; its UART writes out what a hold kept when
  // the hold timer or the teardown ends it (serial.ts startHoldTimer), so it has the console.
  const devices = attachLegacyDevices(legacy, {
    onPowerOff: () => undefined,
    onReset: () => undefined,
    onBootMarker: () => undefined,
    log: (m) => log('info', m),
  });
  // Writes out console output that waited for a slow reader while the guest is quiet.
  const stopConsoleFlusher = devices.console.startFlusher();
  undo.push(stopConsoleFlusher);
  // Ends the THRE holds a guest does not end itself (serial.ts: one edge per FIFO burst).
  const stopSerialHold = devices.serial.startHoldTimer();
  undo.push(stopSerialHold);
  const deviceWorker =
    plan.slots.length > 0
      ? startDeviceWorker(plan, layout, {
          log: (m, level) => log(level ?? 'info', m),
          onFatal: (m) => vmm.fail(m),
        })
      : undefined;
  opts.trace?.(deviceWorker ? 'console flusher, device worker started' : 'console flusher');
  const owned = legacy;
  const release = () => {
    const n = native();
    // Kept RAM: its memfd stays open (and mapped) for the next VM.
    const memfd = p.recycleRam ? -1 : layout.memfd;
    if (p.recycleRam) p.recycleRam();
    else ram.unmap();
    if (opts.closeFds) {
      opts.closeFds([...vcpuFds, memfd, vm.fd, kvm.fd].filter((fd) => fd >= 0));
      return;
    }
    for (const fd of [...vcpuFds, memfd, vm.fd, kvm.fd]) {
      if (fd < 0) continue; // a restored VM's RAM has no memfd
      try {
        n.close(fd);
      } catch {
        // already closed
      }
    }
  };
  vmm.onTeardown(async () => {
    stopSerialHold();
    stopConsoleFlusher();
    closeLegacyDeviceState(owned);
    // The device worker ends after its last request is done (every write made), then the
    // images are closed: what the guest wrote is in the files before `exited` resolves.
    await deviceWorker?.stop();
    closeVirtio(plan);
    if (releaseAtExit && !opts.closeFds) {
      // The process exits now: the kernel closes the VM there, ~10 ms sooner than the close of
      // the VM's fd here (measured; docs/architecture.md "Start-up"). Should it live on, the VM
      // is released a little later all the same.
      setTimeout(release, RELEASE_AT_EXIT_GRACE_MS).unref();
      return;
    }
    release();
  });
  vmm.start(
    vcpuFds,
    (id) => ({
      id,
      vcpuFd: vcpuFds[id]!,
      mmapSize,
      ram: layout,
      legacy: owned,
      virtio: { slots: transportSlots(plan), controlFd: plan.controlFd },
      extraMsrs: cpuTemplateMsrAddrs(p.config),
    }),
    {
      paused: opts.paused === true,
      ...(opts.vcpuWorkers ? { workers: opts.vcpuWorkers } : {}),
      ...(opts.vcpuThreads ? { vcpuThreads: opts.vcpuThreads } : {}),
    },
  );
  opts.trace?.('vCPU workers started');
  return { vmm, devices, deviceWorker, parts: { ...p, legacy: owned } };
}

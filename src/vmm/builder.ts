/**
 * buildVm(): VmResources -> a running Vmm. The one path from a validated description to a VM,
 * shared by the CLI and the API.
 */
import { readFileSync } from 'node:fs';
import { acpiBootHook } from '../arch/x86_64/acpi/index.js';
import { setupBoot, type BootSetup } from '../arch/x86_64/boot.js';
import { filterCpuid } from '../arch/x86_64/cpuid.js';
import { CMDLINE_MAX_SIZE, ramRegions } from '../arch/x86_64/layout.js';
import { Kvm, Vcpu, type Vm } from '../kvm/kvm.js';
import { native } from '../kvm/native.js';
import type { CpuidEntry } from '../kvm/types.js';
import { Cmdline } from '../loader/cmdline.js';
import { ConfigError, HostError, ImageError } from '../util/errors.js';
import { log } from '../util/log.js';
import { createGuestRam, mapGuestRam } from './guest-ram.js';
import {
  attachLegacyDevices,
  closeLegacyDeviceState,
  createLegacyDeviceState,
  type AttachedDevices,
} from './legacy-devices.js';
import type { VmSpec } from './resources.js';
import { Vmm } from './vmm.js';
import { startDeviceWorker, type DeviceWorkerHandle } from './device-worker-handle.js';
import {
  acpiVirtioDevices,
  addVirtioCmdline,
  closeVirtio,
  planVirtioDevices,
  registerVirtioWithKvm,
  transportSlots,
} from './virtio-plan.js';

const KVM_CAP_TSC_DEADLINE_TIMER = 72;
/** KVM needs three pages for the TSS and one for the identity map, below 4 GiB, outside RAM. */
const TSS_ADDR = 0xfffb_d000;
const IDENTITY_MAP_ADDR = 0xfffb_c000;

export interface BuildOptions {
  /** Console output file descriptor (default: stdout). */
  consoleFd?: number;
}

export interface BuiltVm {
  vmm: Vmm;
  /** Main-thread views of the legacy devices (console input, Ctrl-Alt-Del). */
  devices: AttachedDevices;
  boot: BootSetup;
  deviceWorker?: DeviceWorkerHandle;
}

function readImage(what: string, path: string): Uint8Array {
  try {
    return readFileSync(path);
  } catch (e) {
    throw new ConfigError(`cannot read ${what} ${path}: ${(e as Error).message}`);
  }
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
function composeCmdline(spec: VmSpec): Cmdline {
  const r = Cmdline.from(spec.bootArgs, CMDLINE_MAX_SIZE);
  if (!r.ok) throw r.error;
  const cmdline = r.value;
  if (spec.root) {
    const root = spec.root.partuuid
      ? cmdline.insert('root', `PARTUUID=${spec.root.partuuid}`)
      : cmdline.insert('root', '/dev/vda');
    if (!root.ok) throw root.error;
    const mode = cmdline.insertStr(spec.root.readOnly ? 'ro' : 'rw');
    if (!mode.ok) throw mode.error;
  }
  return cmdline;
}

export function buildVm(spec: VmSpec, opts: BuildOptions = {}): BuiltVm {
  // Everything created so far, undone in reverse if a later step fails: a failed build (a bad
  // kernel, a refused MSR) must leave no fd, mapping or thread behind (the API may retry).
  const undo: Array<() => void> = [];
  try {
    return build(spec, opts, undo);
  } catch (e) {
    for (const f of undo.reverse()) {
      try {
        f();
      } catch {
        // best effort: report the original failure
      }
    }
    throw e;
  }
}

function closeFd(fd: number): void {
  native().close(fd);
}

function build(spec: VmSpec, opts: BuildOptions, undo: Array<() => void>): BuiltVm {
  const memBytes = spec.memMib * 1024 * 1024;
  const vcpus = spec.vcpus;
  const kernel = readImage('kernel', spec.kernelPath);
  const initrd = spec.initrdPath ? readImage('initrd', spec.initrdPath) : undefined;
  const cmdline = composeCmdline(spec);

  // Opens each device's host side (image, TAP, socket): that open is the check.
  const plan = planVirtioDevices(spec.devices);
  undo.push(() => closeVirtio(plan));
  plan.warnings.forEach((w) => log('warn', w));

  const kvm = Kvm.open();
  undo.push(() => kvm.close());
  const vm: Vm = kvm.createVm();
  undo.push(() => vm.close());
  vm.setTssAddr(TSS_ADDR);
  vm.setIdentityMapAddr(IDENTITY_MAP_ADDR);
  vm.createIrqchip();
  vm.createPit2();

  const layout = createGuestRam(ramRegions(memBytes));
  undo.push(() => closeFd(layout.memfd));
  const ram = mapGuestRam(layout);
  undo.push(() => ram.unmap());
  ram.buffers.forEach((b, i) => vm.setUserMemoryRegion(layout.regions[i]!.base, b));

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

  const supported: CpuidEntry[] = kvm.supportedCpuid();
  const tscDeadline = kvm.checkExtension(KVM_CAP_TSC_DEADLINE_TIMER) > 0;
  const mmapSize = kvm.vcpuMmapSize();
  const vcpuFds: number[] = [];
  const warned = new Set<string>();
  for (let id = 0; id < vcpus; id++) {
    const fd = vm.createVcpu(id);
    vcpuFds.push(fd);
    undo.push(() => closeFd(fd));
    const vcpu = new Vcpu(fd, mmapSize);
    undo.push(
      () => vcpu.run.buffer.byteLength > 0 && native().munmap(vcpu.run.buffer as ArrayBuffer),
    );
    let tscKhz: number | undefined;
    try {
      tscKhz = vcpu.tscKhz() || undefined;
    } catch {
      tscKhz = undefined; // no KVM_CAP_GET_TSC_KHZ: the guest calibrates instead
    }
    vcpu.setCpuid(filterCpuid(supported, { vcpuId: id, vcpuCount: vcpus, tscKhz, tscDeadline }));
    setBootMsrs(vcpu, boot.msrs, warned);
    vcpu.setRegs(boot.regs);
    vcpu.setSregs(boot.sregs(vcpu.getSregs()));
    vcpu.setDefaultFpu();
    native().munmap(vcpu.run.buffer as ArrayBuffer); // the worker maps kvm_run itself
  }

  const legacy = createLegacyDeviceState(vm, opts.consoleFd ?? 1);
  undo.push(() => closeLegacyDeviceState(legacy));
  if (legacy.console.warning) log('warn', legacy.console.warning);
  registerVirtioWithKvm(vm, plan);
  const vmm = new Vmm(mmapSize);
  const devices = attachLegacyDevices(legacy, {
    output: () => undefined, // the main thread never executes guest port writes
    onPowerOff: () => undefined,
    onReset: () => undefined,
    onBootMarker: () => undefined,
    log: (m) => log('info', m),
  });
  // Writes out console output that waited for a slow reader while the guest is quiet.
  const stopConsoleFlusher = devices.console.startFlusher();
  undo.push(stopConsoleFlusher);
  const deviceWorker =
    plan.slots.length > 0
      ? startDeviceWorker(plan, layout, { log: (m) => log('info', m), onFatal: (m) => vmm.fail(m) })
      : undefined;
  vmm.onTeardown(async () => {
    stopConsoleFlusher();
    closeLegacyDeviceState(legacy);
    await deviceWorker?.stop();
    closeVirtio(plan);
    const n = native();
    ram.unmap();
    for (const fd of [...vcpuFds, layout.memfd, vm.fd, kvm.fd]) {
      try {
        n.close(fd);
      } catch {
        // already closed
      }
    }
  });
  vmm.start(vcpuFds, (id) => ({
    id,
    vcpuFd: vcpuFds[id]!,
    mmapSize,
    ram: layout,
    legacy,
    virtio: { slots: transportSlots(plan), controlFd: plan.controlFd },
  }));
  return { vmm, devices, boot, deviceWorker };
}

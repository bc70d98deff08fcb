/**
 * The virtio-mmio devices of a VM, planned on the main thread (docs/architecture.md):
 *
 *   const plan = planVirtioDevices(configs)  opens each device's host side through its registry
 *                                            descriptor, lays out slots (addr, GSI), creates the
 *                                            shared register files and eventfds (structured-clone
 *                                            data, handed to the vCPU and device workers)
 *   acpiVirtioDevices(plan), addVirtioCmdline(plan, cmdline)   how the guest finds them
 *   registerVirtioWithKvm(vm, plan)          irqfds and QueueNotify ioeventfds
 *   transportSlots(plan)                     what each vCPU worker needs (virtio-transport.ts)
 *   startDeviceWorker(plan, ram)             the data plane (device-worker-handle.ts)
 *   closeVirtio(plan)                        teardown, after the device worker has ended
 */
import {
  VIRTIO_GSI_FIRST,
  VIRTIO_GSI_LAST,
  VIRTIO_MMIO_BASE,
  VIRTIO_MMIO_SIZE,
} from '../arch/x86_64/layout.js';
import type { DeviceMemoryRegion, OpenedDevice } from '../devices/virtio/descriptor.js';
import { INT_USED_BUFFER, VIRTIO_F_VERSION_1, bit } from '../devices/virtio/constants.js';
import { VirtioMmioState } from '../devices/virtio/mmio-state.js';
import { REG } from '../devices/virtio/mmio.js';
import {
  deviceType,
  type VirtioConfig,
  type VirtioHost,
  type VirtioKind,
} from '../devices/virtio/registry.js';
import type { Vm } from '../kvm/kvm.js';
import { EFD_NONBLOCK, native } from '../kvm/native.js';
import type { Cmdline } from '../loader/cmdline.js';
import { ConfigError } from '../util/errors.js';
import type { TransportSlot } from './virtio-transport.js';

export type { VirtioConfig, VirtioKind } from '../devices/virtio/registry.js';

/** Virtio-mmio slots the x86 layout has room for: one GSI each (5..23). */
export const MAX_VIRTIO_DEVICES = VIRTIO_GSI_LAST - VIRTIO_GSI_FIRST + 1;

interface SlotCommon {
  /** The device's name in its kind (drive_id, iface_id...): metrics and saved state. */
  id: string;
  /** For log lines. */
  name: string;
  /** Guest-physical base of the 4 KiB register window. */
  addr: number;
  gsi: number;
  /** The register file (mmio-state.ts), shared by the vCPU workers and the device worker. */
  state: SharedArrayBuffer;
  irqFd: number;
  /**
   * The VM's fd, once registerVirtioWithKvm gave KVM the device: the device worker raises the
   * GSI with KVM_IRQ_LINE (device-loop.ts deviceEnvironment), not through the irqfd.
   */
  vmFd?: number;
  /** One eventfd per queue, signalled by KVM on QueueNotify = queue index. */
  queueFds: number[];
  /**
   * Signalled by KVM when the guest writes InterruptACK = 1 (the used-buffer bit, what Linux's
   * handler writes after nearly every interrupt), so that write does not exit; the device worker
   * applies it before it next sets InterruptStatus (VirtioMmioState.setAckSource). Unset when
   * TYPERVISOR_MMIO_ACK_EVENTFD=0: every acknowledgement exits.
   */
  ackFd?: number;
  /** The device's guest-physical memory (its open()'s `memory`), in order. */
  memory?: DeviceMemoryRegion[];
  /** Those regions as KVM memory slots, once attachDeviceMemory made them (device-memory.ts). */
  kvmSlots?: KvmMemorySlot[];
}

/**
 * One KVM memory slot of device memory, as the device worker needs it to take the slot out of
 * the guest-physical map (size 0) and put it back the same (virtio-mem).
 */
export interface KvmMemorySlot {
  vmFd: number;
  slot: number;
  guestAddr: number;
  size: number;
  /** The mapping's host address (the main thread's MAP_SHARED mapping, process-wide). */
  hostAddr: bigint;
  flags: number;
  /** KVM had the slot when the device worker started (not for a region that `startsOut`). */
  present: boolean;
}

/** One planned device: a discriminated union over the registry's kinds. */
export type VirtioSlot = {
  [K in VirtioKind]: SlotCommon & { kind: K; host: VirtioHost<K> };
}[VirtioKind];

export interface VirtioPlan {
  slots: VirtioSlot[];
  /** Wakes the device worker (lifecycle changes, mailbox requests, stop). */
  controlFd: number;
  warnings: string[];
  /** Main-thread closers of what the descriptors opened (image fds, TAPs, sockets). */
  closers: Array<() => void>;
  /** Guest-physical memory of the devices (pmem files, the virtio-mem region): device-memory.ts. */
  memory: DeviceMemoryRegion[];
}

/** Where device memory may go: [base, base + size) of guest-physical space (layout.ts). */
export interface DeviceMemorySpace {
  base: number;
  size: number;
}

/** Main thread: opens every device's host side, in slot order. Throws ConfigError. */
export function planVirtioDevices(
  configs: readonly VirtioConfig[],
  space?: DeviceMemorySpace,
): VirtioPlan {
  if (configs.length > MAX_VIRTIO_DEVICES)
    throw new ConfigError(
      `at most ${MAX_VIRTIO_DEVICES} virtio devices (one GSI each), ${configs.length} asked`,
    );
  const n = native();
  const claims = new Map<string, string>();
  const ctx = {
    sys: n,
    claim(resource: string, owner: string) {
      const prev = claims.get(resource);
      if (prev === undefined) claims.set(resource, owner);
      return prev;
    },
    ...(space ? { allocateGuestMemory: deviceMemoryAllocator(space) } : {}),
  };
  const plan: VirtioPlan = { slots: [], controlFd: -1, warnings: [], closers: [], memory: [] };
  const fds: number[] = [];
  const eventfd = () => {
    const fd = n.eventfd(0, EFD_NONBLOCK);
    fds.push(fd);
    return fd;
  };
  try {
    configs.forEach((c, i) => {
      const opened: OpenedDevice<unknown> = deviceType(c.kind).open(c as never, ctx);
      plan.closers.push(() => opened.close());
      plan.warnings.push(...opened.warnings);
      plan.memory.push(...(opened.memory ?? []));
      const id = opened.identity;
      plan.slots.push({
        kind: c.kind,
        id: c.id,
        name: opened.name,
        addr: VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_SIZE,
        gsi: VIRTIO_GSI_FIRST + i,
        state: VirtioMmioState.createState(id, bit(VIRTIO_F_VERSION_1)),
        irqFd: eventfd(),
        queueFds: id.queueSizes.map(() => eventfd()),
        host: opened.host,
        ...(opened.memory?.length ? { memory: opened.memory } : {}),
      } as VirtioSlot);
    });
    plan.controlFd = eventfd();
    return plan;
  } catch (e) {
    closeVirtio(plan);
    for (const fd of fds) closeQuietly(fd);
    throw e;
  }
}

/** Hands out device memory in open() order: the same devices get the same addresses. */
function deviceMemoryAllocator(space: DeviceMemorySpace): (size: number, align: number) => number {
  let next = space.base;
  return (size, align) => {
    const base = Math.ceil(next / align) * align;
    if (!(size > 0) || base + size > space.base + space.size)
      throw new ConfigError(
        `device memory: ${size} bytes do not fit in the ${space.size / 2 ** 30} GiB of guest-physical space planned for devices`,
      );
    next = base + size;
    return base;
  };
}

/** For acpiBootHook({ virtio }). */
export function acpiVirtioDevices(plan: VirtioPlan): Array<{ addr: number; gsi: number }> {
  return plan.slots.map((s) => ({ addr: s.addr, gsi: s.gsi }));
}

/**
 * The cmdline form `virtio_mmio.device=4K@0xADDR:GSI`, for kernels built with
 * CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES (others find the devices in the DSDT).
 */
export function addVirtioCmdline(plan: VirtioPlan, cmdline: Cmdline): void {
  for (const s of plan.slots) {
    const r = cmdline.insert('virtio_mmio.device', `4K@0x${s.addr.toString(16)}:${s.gsi}`);
    if (!r.ok) throw r.error;
  }
}

/**
 * Main thread: interrupts through irqfds (and KVM_IRQ_LINE from the device worker: `vmFd`), queue
 * kicks through ioeventfds (4-byte, datamatch).
 */
export function registerVirtioWithKvm(vm: Vm, plan: VirtioPlan): void {
  for (const s of plan.slots) {
    vm.registerIrqfd(s.irqFd, s.gsi);
    s.vmFd = vm.fd;
    s.queueFds.forEach((fd, q) =>
      vm.registerIoeventfd(fd, s.addr + REG.QUEUE_NOTIFY, 4, { datamatch: BigInt(q) }),
    );
    if (process.env.TYPERVISOR_MMIO_ACK_EVENTFD !== '0') {
      const fd = native().eventfd(0, EFD_NONBLOCK);
      s.ackFd = fd;
      vm.registerIoeventfd(fd, s.addr + REG.INTERRUPT_ACK, 4, {
        datamatch: BigInt(INT_USED_BUFFER),
      });
    }
  }
}

/** The part of the plan a vCPU worker needs: register windows, register files, eventfds. */
export function transportSlots(plan: VirtioPlan): TransportSlot[] {
  return plan.slots.map((s) => ({ addr: s.addr, state: s.state, queueFds: s.queueFds }));
}

function closeQuietly(fd: number): void {
  try {
    native().close(fd);
  } catch {
    // already closed
  }
}

/** Closes the host sides and the eventfds (after the VM and the device worker are gone). */
export function closeVirtio(plan: VirtioPlan): void {
  for (const close of plan.closers.splice(0)) {
    try {
      close();
    } catch {
      // best effort
    }
  }
  for (const fd of [
    plan.controlFd,
    ...plan.slots.flatMap((s) => [s.irqFd, ...s.queueFds, s.ackFd ?? -1]),
  ])
    if (fd >= 0) closeQuietly(fd);
  plan.slots = [];
  plan.memory = [];
  plan.controlFd = -1;
}

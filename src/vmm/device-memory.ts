/**
 * Device memory in the guest-physical address space (virtio-pmem files, the virtio-mem region):
 * the plan's regions (virtio-plan.ts, from each descriptor's open()) mapped MAP_SHARED on the
 * main thread and handed to KVM as memory slots after the RAM's, KVM_MEM_READONLY for read-only
 * ones. A guest write to a read-only slot exits as an MMIO write that no device claims (dropped
 * and counted, as Firecracker does on x86). The mappings are dropped with the plan's closers
 * (closeVirtio), after the vCPUs and the device worker have ended.
 *
 * virtio-mem's regions start out of the guest (`startsOut`: a slot number is reserved, no slot
 * made); the device worker adds a slot when a block in it is plugged and removes it when its
 * last block is unplugged (kvmSlotControl), the same mapping at the same address each time. The
 * mapping itself stays until teardown.
 *
 * The device worker reaches the same mappings (a guest's virtio buffers may be in device
 * memory): deviceMemoryViews gives mapGuestRam each slot's guest-physical range and host address
 * to wrap, read-only where KVM's slot is, gated where the device says (virtio-mem).
 */
import { DEVICE_MEMORY_MAX, deviceMemoryBase } from '../arch/x86_64/layout.js';
import { KVM_SET_USER_MEMORY_REGION } from '../kvm/constants.js';
import type { Vm } from '../kvm/kvm.js';
import { MAP_NORESERVE, MAP_SHARED, PROT_READ, PROT_WRITE, native } from '../kvm/native.js';
import { encodeMemoryRegion } from '../kvm/structs.js';
import type { MemorySlots } from '../devices/virtio/descriptor.js';
import type { DeviceMemoryView } from './guest-ram.js';
import type { DeviceMemorySpace, KvmMemorySlot, VirtioPlan, VirtioSlot } from './virtio-plan.js';

/** KVM_MEM_READONLY (KVM_CAP_READONLY_MEM): guest writes to the slot exit as MMIO. */
export const KVM_MEM_READONLY = 2;

/** The guest-physical room for device memory of a VM with memBytes of RAM. */
export function deviceMemorySpace(memBytes: number): DeviceMemorySpace {
  return { base: deviceMemoryBase(memBytes), size: DEVICE_MEMORY_MAX };
}

/**
 * Maps the plan's device memory and gives it to KVM, device by device in plan order; each
 * slot's `kvmSlots` says what was made (for the device worker). Returns the slots made.
 */
export function attachDeviceMemory(vm: Vm, plan: VirtioPlan): number[] {
  const n = native();
  const slots: number[] = [];
  for (const s of plan.slots) {
    if (!s.memory) continue;
    const made: KvmMemorySlot[] = [];
    for (const r of s.memory) {
      const prot = r.readOnly ? PROT_READ : PROT_READ | PROT_WRITE;
      const buf = n.mmap(r.size, prot, MAP_SHARED | MAP_NORESERVE, r.fd, r.offset);
      plan.closers.push(() => n.munmap(buf));
      const flags = r.readOnly ? KVM_MEM_READONLY : 0;
      // A region that starts out gets its number now and its slot from the device, later.
      const slot = r.startsOut ? vm.reserveSlot() : vm.setUserMemoryRegion(r.guestAddr, buf, flags);
      slots.push(slot);
      made.push({
        vmFd: vm.fd,
        slot,
        guestAddr: r.guestAddr,
        size: r.size,
        hostAddr: n.bufferAddress(buf),
        flags,
        present: r.startsOut !== true,
      });
    }
    s.kvmSlots = made;
  }
  return slots;
}

/**
 * Device worker: a device's KVM slots, which it puts into the guest-physical map and takes out
 * (BackendEnv.memorySlots), starting as attachDeviceMemory left them. setPresent throws on a
 * host failure (the slot is then as it was).
 */
export function kvmSlotControl(slots: readonly KvmMemorySlot[]): MemorySlots {
  const n = native();
  const present = slots.map((s) => s.present);
  const at = (index: number) => {
    const s = slots[index];
    if (s === undefined) throw new RangeError(`no memory slot ${index} (${slots.length})`);
    return s;
  };
  return {
    count: slots.length,
    isPresent: (index) => (at(index), present[index]!),
    setPresent(index, want) {
      const s = at(index);
      // Size 0 deletes the slot (Documentation/virt/kvm/api.rst, KVM_SET_USER_MEMORY_REGION).
      n.ioctl(
        s.vmFd,
        KVM_SET_USER_MEMORY_REGION,
        encodeMemoryRegion(s.slot, s.flags, s.guestAddr, want ? s.size : 0, s.hostAddr),
      );
      present[index] = want;
    },
  };
}

/**
 * Device worker: the device memory of `slots` (every KvmMemorySlot attachDeviceMemory made,
 * present in KVM or not) as views for mapGuestRam. `gate(slot)`: what device access to that
 * device's memory is allowed now (virtio-mem: plugged blocks), if it restricts it.
 */
export function deviceMemoryViews(
  slots: readonly VirtioSlot[],
  gate: (slot: VirtioSlot) => ((addr: number, len: number) => boolean) | undefined,
): DeviceMemoryView[] {
  const out: DeviceMemoryView[] = [];
  for (const s of slots) {
    const allows = s.kvmSlots?.length ? gate(s) : undefined;
    for (const k of s.kvmSlots ?? [])
      out.push({
        guestAddr: k.guestAddr,
        size: k.size,
        hostAddr: k.hostAddr,
        readOnly: (k.flags & KVM_MEM_READONLY) !== 0,
        ...(allows ? { allows } : {}),
      });
  }
  return out;
}

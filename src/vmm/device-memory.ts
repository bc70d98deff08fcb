/**
 * Device memory in the guest-physical address space (virtio-pmem files, the virtio-mem region):
 * the plan's regions (virtio-plan.ts, from each descriptor's open()) mapped MAP_SHARED on the
 * main thread and handed to KVM as memory slots after the RAM's, KVM_MEM_READONLY for read-only
 * ones. A guest write to a read-only slot exits as an MMIO write that no device claims (dropped
 * and counted, as Firecracker does on x86). The mappings are dropped with the plan's closers
 * (closeVirtio), after the vCPUs and the device worker have ended.
 */
import { DEVICE_MEMORY_MAX, deviceMemoryBase } from '../arch/x86_64/layout.js';
import type { Vm } from '../kvm/kvm.js';
import { MAP_NORESERVE, MAP_SHARED, PROT_READ, PROT_WRITE, native } from '../kvm/native.js';
import type { DeviceMemorySpace, VirtioPlan } from './virtio-plan.js';

/** KVM_MEM_READONLY (KVM_CAP_READONLY_MEM): guest writes to the slot exit as MMIO. */
export const KVM_MEM_READONLY = 2;

/** The guest-physical room for device memory of a VM with memBytes of RAM. */
export function deviceMemorySpace(memBytes: number): DeviceMemorySpace {
  return { base: deviceMemoryBase(memBytes), size: DEVICE_MEMORY_MAX };
}

/** Maps the plan's device memory and gives it to KVM; returns the slots made, in plan order. */
export function attachDeviceMemory(vm: Vm, plan: VirtioPlan): number[] {
  const n = native();
  const slots: number[] = [];
  for (const r of plan.memory) {
    const prot = r.readOnly ? PROT_READ : PROT_READ | PROT_WRITE;
    const buf = n.mmap(r.size, prot, MAP_SHARED | MAP_NORESERVE, r.fd, r.offset);
    plan.closers.push(() => n.munmap(buf));
    slots.push(vm.setUserMemoryRegion(r.guestAddr, buf, r.readOnly ? KVM_MEM_READONLY : 0));
  }
  return slots;
}

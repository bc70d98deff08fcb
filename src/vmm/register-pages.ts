/**
 * Register pages (mmio-state.ts, "The register page"): one 4 KiB page per virtio-mmio device,
 * mapped by the main thread and given to KVM as a read-only memory slot at the device's MMIO
 * window. The driver's register reads (InterruptStatus in every interrupt handler, the queue and
 * feature registers at probe, the config space) become loads; its writes still exit, as MMIO
 * writes to a read-only slot, and reach the transport as before.
 *
 * Off when KVM lacks KVM_CAP_READONLY_MEM, or with TYPERVISOR_MMIO_REGISTER_PAGES=0 (every read
 * exits, as in Firecracker and QEMU's virtio-mmio; for comparisons). The pages are unmapped with
 * the plan's closers, after the vCPUs and the device worker are gone; the register file forgets
 * the page's address first, so a state opened later on the main thread (memory-hotplug.ts) has
 * no page to write.
 */
import { KVM_CAP_READONLY_MEM } from '../kvm/constants.js';
import type { Vm } from '../kvm/kvm.js';
import { MAP_ANONYMOUS, MAP_PRIVATE, PROT_READ, PROT_WRITE, native } from '../kvm/native.js';
import {
  REGISTER_PAGE_BYTES,
  VirtioMmioState,
  setRegisterPageMapper,
} from '../devices/virtio/mmio-state.js';
import { KVM_MEM_READONLY } from './device-memory.js';
import type { VirtioPlan } from './virtio-plan.js';

/** This thread opens register pages through the shim (each thread that opens a state). */
export function useRegisterPages(): void {
  setRegisterPageMapper((addr, length) => native().viewAddress(addr, length));
}

/** Whether this VM gets register pages (KVM's capability; the environment's switch). */
export function registerPagesWanted(vm: Vm, env: NodeJS.ProcessEnv = process.env): boolean {
  if (env.TYPERVISOR_MMIO_REGISTER_PAGES === '0') return false;
  return vm.kvm.checkExtension(KVM_CAP_READONLY_MEM) > 0;
}

/**
 * Maps a register page for every device of the plan and gives it to KVM read-only at the
 * device's window. Returns how many were made (0 when not wanted).
 */
export function attachRegisterPages(vm: Vm, plan: VirtioPlan): number {
  if (plan.slots.length === 0 || !registerPagesWanted(vm)) return 0;
  useRegisterPages();
  const n = native();
  for (const s of plan.slots) {
    const buf = n.mmap(
      REGISTER_PAGE_BYTES,
      PROT_READ | PROT_WRITE,
      MAP_PRIVATE | MAP_ANONYMOUS,
      -1,
      0,
    );
    const state = new VirtioMmioState(s.state);
    plan.closers.push(() => {
      state.detachPage();
      n.munmap(buf);
    });
    state.attachPage(buf, n.bufferAddress(buf));
    vm.setUserMemoryRegion(s.addr, buf, KVM_MEM_READONLY);
  }
  return plan.slots.length;
}

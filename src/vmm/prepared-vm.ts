/**
 * A VM prepared before it is asked for (`--prepare-mem MIB`, what the daemon's process mode
 * starts its pooled VMM processes with; docs/daemon.md): /dev/kvm opened, the VM created, its
 * guest RAM made, mapped and given to KVM, the in-kernel irqchip and PIT created, and the low
 * pages the boot loader writes already faulted in. These are kernel work (KVM_CREATE_VM,
 * KVM_CREATE_IRQCHIP, KVM_CREATE_PIT2, the memory slot, first-touch page faults): 1-3 ms of
 * each build on this host, none of which depends on the configuration except the RAM's size.
 * A build whose RAM has that size takes it (builder.ts); one of another size, or with dirty
 * page tracking (its memory slot needs the flag from the start), builds as before and the
 * prepared VM is left to the process's exit (closing a VM's descriptor costs the kernel
 * ~10-15 ms, which would land on that build; an API-mode process ends with its VM).
 *
 * One VM per process: what it holds is the VM's from creation on (nothing of a guest is in
 * it before the build: its RAM is fresh, zero, from a new memfd).
 */
import { ramRegions } from '../arch/x86_64/layout.js';
import type { Kvm, Vm } from '../kvm/kvm.js';
import { attachRam, createVmShell, runUndo, type UndoList } from './builder.js';
import { allocateGuestRam, type GuestRamLayout, type MappedGuestRam } from './guest-ram.js';

/**
 * Guest-physical bytes faulted in ahead: the boot loader's tables (zero page, command line,
 * page tables, GDT, MP and ACPI tables) lie below 1 MiB, a kernel from 1 MiB on; 2 MiB covers
 * them and a small kernel's first pages.
 */
export const PREFAULT_BYTES = 2 * 1024 * 1024;
const PAGE = 4096;

export interface PreparedVm {
  kvm: Kvm;
  vm: Vm;
  layout: GuestRamLayout;
  ram: MappedGuestRam;
}

/** Where a build takes a prepared VM from (BuildOptions.prepared). */
export interface PreparedVmSource {
  /** The prepared VM if its RAM is `memBytes` (then it is the caller's), else undefined. */
  take(memBytes: number): PreparedVm | undefined;
}

/** Makes a VM with `memMib` MiB of RAM, up to (not including) its vCPUs. Throws on failure. */
export function prepareVm(memMib: number): PreparedVm {
  const undo: UndoList = [];
  try {
    const { kvm, vm } = createVmShell(undo);
    const { layout, ram } = allocateGuestRam(ramRegions(memMib * 1024 * 1024));
    undo.push(() => ram.unmap());
    attachRam(vm, layout, ram);
    // First touch: one write per page (zero over zero: the guest sees nothing of it).
    const low = new Uint8Array(
      ram.buffers[0]!,
      0,
      Math.min(PREFAULT_BYTES, ram.buffers[0]!.byteLength),
    );
    for (let i = 0; i < low.length; i += PAGE) low[i] = 0;
    return { kvm, vm, layout, ram };
  } catch (e) {
    runUndo(undo);
    throw e;
  }
}

/** One prepared VM, taken once by a build of its size. */
export class OnePreparedVm implements PreparedVmSource {
  private vm: PreparedVm | undefined;

  constructor(
    vm: PreparedVm,
    private readonly memBytes: number,
  ) {
    this.vm = vm;
  }

  take(memBytes: number): PreparedVm | undefined {
    if (memBytes !== this.memBytes) return undefined;
    const vm = this.vm;
    this.vm = undefined;
    return vm;
  }

  /** Whether it is still there (not taken). */
  get available(): boolean {
    return this.vm !== undefined;
  }
}

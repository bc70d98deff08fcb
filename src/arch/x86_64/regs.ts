/**
 * Initial vCPU registers for the two entry modes. Sregs builders take what KVM_GET_SREGS returned
 * and change only what the boot protocol fixes, so everything else keeps KVM's reset values.
 *
 *  - 64-bit Linux boot protocol (boot.rst "64-bit BOOT PROTOCOL"): long mode with paging on an
 *    identity map, flat __BOOT_CS/__BOOT_DS, RSI -> boot_params, interrupts off.
 *  - PVH (xen docs/misc/pvh.pandoc): 32-bit protected mode, paging off, CR0 = PE|ET,
 *    flat 4 GiB CS/DS/ES/SS, TR a 32-bit TSS, EBX -> hvm_start_info, EFLAGS bit 1 only.
 */
import { type Regs, type Sregs, zeroRegs } from '../../kvm/types.js';
import type { BootGdt } from './gdt.js';
import { BOOT_STACK_POINTER, PML4_ADDR, PVH_START_INFO_ADDR, ZERO_PAGE_ADDR } from './layout.js';

export const CR0_PE = 1n;
export const CR0_ET = 1n << 4n;
export const CR0_NW = 1n << 29n;
export const CR0_CD = 1n << 30n;
export const CR0_PG = 1n << 31n;
export const CR4_PAE = 1n << 5n;
export const EFER_LME = 1n << 8n;
export const EFER_LMA = 1n << 10n;
/** RFLAGS with only the always-one bit 1: interrupts disabled. */
export const RFLAGS_BOOT = 2n;

export function longModeRegs(entry: number): Regs {
  return {
    ...zeroRegs(),
    rip: BigInt(entry),
    rsp: BigInt(BOOT_STACK_POINTER),
    rbp: BigInt(BOOT_STACK_POINTER),
    rsi: BigInt(ZERO_PAGE_ADDR),
    rflags: RFLAGS_BOOT,
  };
}

export function pvhRegs(entry: number): Regs {
  return {
    ...zeroRegs(),
    rip: BigInt(entry),
    rbx: BigInt(PVH_START_INFO_ADDR),
    // The PVH ABI leaves the stack undefined; a valid one costs nothing and helps tiny guests.
    rsp: BigInt(BOOT_STACK_POINTER),
    rflags: RFLAGS_BOOT,
  };
}

function withSegments(base: Sregs, g: BootGdt): Sregs {
  return {
    ...base,
    cs: { ...g.code },
    ds: { ...g.data },
    es: { ...g.data },
    fs: { ...g.data },
    gs: { ...g.data },
    ss: { ...g.data },
    tr: { ...g.tss },
    gdt: { ...g.gdt },
    idt: { ...g.idt },
  };
}

/** Long mode on the identity map at PML4_ADDR. g must be bootGdt('long64'). */
export function longModeSregs(base: Sregs, g: BootGdt, cr3: number = PML4_ADDR): Sregs {
  const s = withSegments(base, g);
  // KVM resets CR0 to CD|NW|ET; clear the cache-disable bits (the kernel rewrites CR0 anyway).
  s.cr0 = (base.cr0 & ~(CR0_CD | CR0_NW)) | CR0_PE | CR0_PG | CR0_ET;
  s.cr3 = BigInt(cr3);
  s.cr4 = base.cr4 | CR4_PAE;
  s.efer = base.efer | EFER_LME | EFER_LMA;
  return s;
}

/** 32-bit protected mode, paging off. g must be bootGdt('pvh32'). */
export function pvhSregs(base: Sregs, g: BootGdt): Sregs {
  const s = withSegments(base, g);
  s.cr0 = CR0_PE | CR0_ET;
  s.cr3 = 0n;
  s.cr4 = 0n;
  s.efer = 0n;
  return s;
}

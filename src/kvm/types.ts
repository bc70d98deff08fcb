/**
 * Plain data shapes of the KVM structures the arch code fills in. The KVM layer (src/kvm/) lays
 * them out into the kernel's binary structs; builders elsewhere never see byte offsets.
 * All 64-bit register values are bigint.
 */

/** struct kvm_regs */
export interface Regs {
  rax: bigint;
  rbx: bigint;
  rcx: bigint;
  rdx: bigint;
  rsi: bigint;
  rdi: bigint;
  rsp: bigint;
  rbp: bigint;
  r8: bigint;
  r9: bigint;
  r10: bigint;
  r11: bigint;
  r12: bigint;
  r13: bigint;
  r14: bigint;
  r15: bigint;
  rip: bigint;
  rflags: bigint;
}

/** struct kvm_segment */
export interface Segment {
  base: bigint;
  limit: number; // u32
  selector: number; // u16
  type: number; // u8
  present: number;
  dpl: number;
  db: number;
  s: number;
  l: number;
  g: number;
  avl: number;
  unusable: number;
}

/** struct kvm_dtable */
export interface DTable {
  base: bigint;
  limit: number; // u16
}

/** struct kvm_sregs (interrupt_bitmap left zero) */
export interface Sregs {
  cs: Segment;
  ds: Segment;
  es: Segment;
  fs: Segment;
  gs: Segment;
  ss: Segment;
  tr: Segment;
  ldt: Segment;
  gdt: DTable;
  idt: DTable;
  cr0: bigint;
  cr2: bigint;
  cr3: bigint;
  cr4: bigint;
  cr8: bigint;
  efer: bigint;
  apicBase: bigint;
}

/** struct kvm_cpuid_entry2 */
export interface CpuidEntry {
  function: number;
  index: number;
  flags: number;
  eax: number;
  ebx: number;
  ecx: number;
  edx: number;
}

/** KVM_CPUID_FLAG_SIGNIFCANT_INDEX */
export const CPUID_FLAG_SIGNIFICANT_INDEX = 1;

/** struct kvm_msr_entry */
export interface MsrEntry {
  index: number;
  data: bigint;
}

export function zeroRegs(): Regs {
  return {
    rax: 0n,
    rbx: 0n,
    rcx: 0n,
    rdx: 0n,
    rsi: 0n,
    rdi: 0n,
    rsp: 0n,
    rbp: 0n,
    r8: 0n,
    r9: 0n,
    r10: 0n,
    r11: 0n,
    r12: 0n,
    r13: 0n,
    r14: 0n,
    r15: 0n,
    rip: 0n,
    rflags: 2n,
  };
}

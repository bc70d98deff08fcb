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

/** struct kvm_fpu: the legacy x87/SSE state (the XSAVE area holds a superset of it). */
export interface Fpu {
  /** st0..st7 (mm0..mm7), 16 bytes each (80-bit values, padded). */
  fpr: Uint8Array;
  fcw: number; // u16
  fsw: number; // u16
  /** Abridged tag word, FXSAVE format. */
  ftwx: number; // u8
  lastOpcode: number; // u16
  lastIp: bigint;
  lastDp: bigint;
  /** xmm0..xmm15, 16 bytes each. */
  xmm: Uint8Array;
  /**
   * u32. KVM_GET_FPU/KVM_SET_FPU neither read nor write it (arch/x86/kvm/x86.c copies only the
   * x87 fields and XMM; GET returns 0): MXCSR is saved and restored through the XSAVE area.
   */
  mxcsr: number;
}

/** One entry of struct kvm_xcrs (index 0 is XCR0, the XSAVE feature mask). */
export interface Xcr {
  xcr: number;
  value: bigint;
}

/** struct kvm_debugregs (flags must be 0 on set). */
export interface DebugRegs {
  /** DR0..DR3. */
  db: [bigint, bigint, bigint, bigint];
  dr6: bigint;
  dr7: bigint;
  flags: bigint;
}

/** struct kvm_clock_data: kvmclock, in ns. */
export interface ClockData {
  clock: bigint;
  /** KVM_CLOCK_TSC_STABLE | KVM_CLOCK_REALTIME | KVM_CLOCK_HOST_TSC, as KVM reported. */
  flags: number;
  /** CLOCK_REALTIME in ns when `clock` was read (valid with KVM_CLOCK_REALTIME). */
  realtime: bigint;
  /** The host TSC when `clock` was read (valid with KVM_CLOCK_HOST_TSC). */
  hostTsc: bigint;
}

/** Result of reading or writing a list of MSRs past the ones KVM refuses. */
export interface MsrBatchResult {
  msrs: MsrEntry[];
  /** Indices KVM refused, in list order. */
  refused: number[];
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

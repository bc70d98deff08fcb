/**
 * MSR values a vCPU starts with (as Firecracker's boot MSRs). Each is marked required or
 * optional: some hosts refuse MSRs (PVM refuses IA32_ARCH_CAPABILITIES, which is therefore not
 * here at all), and KVM_SET_MSRS stops at the first one it refuses. The VMM sets the required ones
 * in one call and must fail if any is refused; it sets each optional one on its own and logs once
 * when it is refused.
 */
import type { MsrEntry } from '../../kvm/types.js';

export const MSR = {
  IA32_TSC: 0x10,
  IA32_SYSENTER_CS: 0x174,
  IA32_SYSENTER_ESP: 0x175,
  IA32_SYSENTER_EIP: 0x176,
  IA32_MISC_ENABLE: 0x1a0,
  MTRR_DEF_TYPE: 0x2ff,
  STAR: 0xc000_0081,
  LSTAR: 0xc000_0082,
  CSTAR: 0xc000_0083,
  SYSCALL_MASK: 0xc000_0084,
  KERNEL_GS_BASE: 0xc000_0102,
} as const;

/** IA32_MISC_ENABLE bit 0: fast string operations (rep movs/stos) enabled. */
export const MISC_ENABLE_FAST_STRING = 1n;
/** IA32_MTRR_DEF_TYPE: E (bit 11, MTRRs enabled) with default type 6 (write-back). */
export const MTRR_DEF_TYPE_WB_ENABLED = 0x806n;

export interface BootMsr extends MsrEntry {
  name: string;
  /** false: the VMM may continue (with a warning) when the host refuses this MSR. */
  required: boolean;
}

export function bootMsrs(): BootMsr[] {
  const m = (name: keyof typeof MSR, data: bigint, required: boolean): BootMsr => ({
    name,
    index: MSR[name],
    data,
    required,
  });
  return [
    // Syscall entry points: zero until the kernel installs its own.
    m('IA32_SYSENTER_CS', 0n, true),
    m('IA32_SYSENTER_ESP', 0n, true),
    m('IA32_SYSENTER_EIP', 0n, true),
    m('STAR', 0n, true),
    m('LSTAR', 0n, true),
    m('CSTAR', 0n, true),
    m('SYSCALL_MASK', 0n, true),
    m('KERNEL_GS_BASE', 0n, true),
    // TSC 0 on every vCPU: KVM treats equal writes close together as a sync request, so the
    // guest sees synchronized TSCs across vCPUs.
    m('IA32_TSC', 0n, false),
    m('IA32_MISC_ENABLE', MISC_ENABLE_FAST_STRING, false),
    // Without MTRRs enabled the guest maps all memory uncached (a big slowdown on real hardware).
    m('MTRR_DEF_TYPE', MTRR_DEF_TYPE_WB_ENABLED, false),
  ];
}

/**
 * What a snapshot saves of each vCPU and of the VM's in-kernel devices (irqchip, PIT, kvmclock),
 * as named, versioned persist layouts, with the functions that read it from KVM and put it back.
 *
 * Threads: saveVcpu/restoreVcpu issue vCPU ioctls, so they run in the thread that owns the vCPU
 * (its worker), while that vCPU is parked outside KVM_RUN. saveVm/restoreVm run with every vCPU
 * parked (KVM_GET_VCPU_EVENTS and the irqchip state are only coherent when nothing runs).
 *
 * Blobs KVM defines and nobody here needs to look inside (LAPIC page, XSAVE area, vCPU events,
 * irqchip and PIT state, sregs with its interrupt bitmap) are kept as the exact struct bytes: that
 * is lossless, and the struct sizes are part of KVM's ABI. Decoded where a field matters.
 */
import * as C from '../kvm/constants.js';
import type { Kvm, Vcpu, Vm } from '../kvm/kvm.js';
import { isSyscallError } from '../kvm/native.js';
import * as S from '../kvm/structs.js';
import type { ClockData, MsrEntry } from '../kvm/types.js';
import { HostError } from '../util/errors.js';
import {
  array,
  bytes,
  optional,
  PersistError,
  struct,
  u16,
  u32,
  u64n,
  u8,
  versioned,
  type Codec,
  type Infer,
} from '../util/persist.js';

const MSR_IA32_TSC = 0x10;
const MSR_IA32_TSC_DEADLINE = 0x6e0;
/** IA32_MCG_CTL: in KVM's list on some kernels, but Linux never exports it (Firecracker skips it). */
const MSR_IA32_MCG_CTL = 0x17b;
/** Restored after every other MSR: the deadline is a TSC value, so IA32_TSC must be set first. */
const DEFERRED_MSRS = [MSR_IA32_TSC_DEADLINE];

/** Bounds for hostile input: AMX-sized XSAVE areas are ~11 KiB; KVM's MSR list is ~100. */
const XSAVE_MAX = 64 * 1024;
const MSRS_MAX = 4096;
const CPUID_MAX = 4096;

/** A byte string that must be exactly one `size`-byte KVM struct. */
function exactBytes(what: string, size: number): Codec<Uint8Array> {
  const b = bytes(size);
  const check = (v: Uint8Array, path: string) => {
    if (v.length !== size)
      throw new PersistError(`${path}: ${what} has ${v.length} bytes, must be ${size}`);
  };
  return {
    kind: `${what}[${size}]`,
    write(w, v, path) {
      if (v instanceof Uint8Array) check(v, path);
      b.write(w, v, path);
    },
    read(r, path) {
      const v = b.read(r, path);
      check(v, path);
      return v;
    },
  };
}

const RegsLayout = struct({
  rax: u64n,
  rbx: u64n,
  rcx: u64n,
  rdx: u64n,
  rsi: u64n,
  rdi: u64n,
  rsp: u64n,
  rbp: u64n,
  r8: u64n,
  r9: u64n,
  r10: u64n,
  r11: u64n,
  r12: u64n,
  r13: u64n,
  r14: u64n,
  r15: u64n,
  rip: u64n,
  rflags: u64n,
});

const FpuLayout = struct({
  fpr: exactBytes('fpu.fpr', 128),
  fcw: u16,
  fsw: u16,
  ftwx: u8,
  lastOpcode: u16,
  lastIp: u64n,
  lastDp: u64n,
  xmm: exactBytes('fpu.xmm', 256),
  mxcsr: u32,
});

const CpuidEntryLayout = struct({
  function: u32,
  index: u32,
  flags: u32,
  eax: u32,
  ebx: u32,
  ecx: u32,
  edx: u32,
});

export const VcpuStateV1 = versioned(
  'kvm-vcpu',
  1,
  struct({
    /** The CPUID table: XCR0 and many MSRs are only valid within what it advertises. */
    cpuid: array(CpuidEntryLayout, CPUID_MAX),
    /** KVM_MP_STATE_*. */
    mpState: u32,
    regs: RegsLayout,
    /** struct kvm_sregs, interrupt_bitmap included. */
    sregs: exactBytes('kvm_sregs', S.SREGS_SIZE),
    fpu: FpuLayout,
    /** struct kvm_xsave (4096 bytes, or KVM_CAP_XSAVE2's size); absent without KVM_CAP_XSAVE. */
    xsave: optional(bytes(XSAVE_MAX)),
    /** Absent without KVM_CAP_XCRS (a host CPU without XSAVE). */
    xcrs: optional(array(struct({ xcr: u32, value: u64n }), S.MAX_XCRS)),
    debugRegs: struct({ dr0: u64n, dr1: u64n, dr2: u64n, dr3: u64n, dr6: u64n, dr7: u64n }),
    /** struct kvm_lapic_state. */
    lapic: exactBytes('kvm_lapic_state', S.LAPIC_SIZE),
    /** Guest TSC frequency; absent when KVM_GET_TSC_KHZ is not available. */
    tscKhz: optional(u32),
    /** In restore order (IA32_TSC_DEADLINE last). */
    msrs: array(struct({ index: u32, data: u64n }), MSRS_MAX),
    /** struct kvm_vcpu_events. */
    events: exactBytes('kvm_vcpu_events', S.VCPU_EVENTS_SIZE),
  }),
);
export type VcpuStateData = Infer<typeof VcpuStateV1.codec>;

export const VmStateV1 = versioned(
  'kvm-vm',
  1,
  struct({
    /** struct kvm_irqchip for chips 0 (PIC master), 1 (PIC slave), 2 (IOAPIC). */
    picMaster: exactBytes('kvm_irqchip', S.IRQCHIP_SIZE),
    picSlave: exactBytes('kvm_irqchip', S.IRQCHIP_SIZE),
    ioapic: exactBytes('kvm_irqchip', S.IRQCHIP_SIZE),
    /** struct kvm_pit_state2. */
    pit: exactBytes('kvm_pit_state2', S.PIT_STATE2_SIZE),
    clock: struct({ clock: u64n, flags: u32, realtime: u64n, hostTsc: u64n }),
  }),
);
export type VmStateData = Infer<typeof VmStateV1.codec>;

/** What a vCPU's owner needs from /dev/kvm to save it: the MSR list and the XSAVE size. */
export interface VcpuSaveConfig {
  msrIndices: number[];
  xsaveSize: number;
}

/** The MSRs worth saving: KVM's save/restore list (KVM_GET_MSR_INDEX_LIST), less MCG_CTL. */
export function saveableMsrIndices(kvm: Kvm): number[] {
  return kvm.msrIndexList().filter((i) => i !== MSR_IA32_MCG_CTL);
}

export function vcpuSaveConfig(kvm: Kvm, extraMsrs: readonly number[] = []): VcpuSaveConfig {
  // extraMsrs: the CPU template's MSRs (KVM's list may lack them; their values must survive).
  const msrIndices = [...new Set([...saveableMsrIndices(kvm), ...extraMsrs])];
  return { msrIndices, xsaveSize: kvm.xsaveSize() };
}

/** Puts the deferred MSRs (IA32_TSC_DEADLINE) after all others, keeping the rest in order. */
function restoreOrder(msrs: MsrEntry[]): MsrEntry[] {
  const deferred = (m: MsrEntry) => DEFERRED_MSRS.includes(m.index);
  return [...msrs.filter((m) => !deferred(m)), ...msrs.filter(deferred)];
}

/**
 * A saved IA32_TSC_DEADLINE of 0 becomes the saved IA32_TSC (as Firecracker's
 * fix_zero_tsc_deadline_msr does): a guest whose deadline timer was armed and had fired, or was
 * caught between KVM clearing the deadline and the guest writing the next one, would otherwise
 * wait forever after a restore for an interrupt nothing will raise. A deadline of "now" fires
 * at once after the restore; a guest that had not armed it takes one spurious timer interrupt,
 * which Linux tolerates. When the LAPIC timer is not in TSC-deadline mode KVM ignores the write.
 */
export function fixZeroTscDeadline(msrs: MsrEntry[]): MsrEntry[] {
  const tsc = msrs.find((m) => m.index === MSR_IA32_TSC);
  if (!tsc) return msrs;
  return msrs.map((m) =>
    m.index === MSR_IA32_TSC_DEADLINE && m.data === 0n ? { index: m.index, data: tsc.data } : m,
  );
}

/** A read whose ioctl a host may lack (the layout field is optional): undefined when refused. */
function optionalIoctl<T>(read: () => T): T | undefined {
  try {
    return read();
  } catch (e) {
    if (isSyscallError(e)) return undefined;
    throw e;
  }
}

/**
 * Reads a parked vCPU's whole state. MSRs KVM refuses to read are left out (see readMsrs).
 *
 * Save order (as Firecracker's save_state documents it): KVM_GET_MP_STATE first, because it
 * processes pending INIT/SIPI events (kvm_apic_accept_events), changing vCPU and LAPIC state
 * that the later reads must see; KVM_GET_LAPIC and the MSR reads may also fold pending state in;
 * KVM_GET_VCPU_EVENTS last, so that it sees the final pending exception/interrupt/NMI.
 */
export function saveVcpu(
  vcpu: Vcpu,
  msrIndices: number[],
  opts: { xsaveSize?: number } = {},
): VcpuStateData {
  const mpState = vcpu.getMpState();
  const regs = vcpu.getRegs();
  const sregs = vcpu.getSregsBytes();
  const fpu = vcpu.getFpu();
  const xsave = optionalIoctl(() => vcpu.getXsave(opts.xsaveSize));
  const xcrs = optionalIoctl(() => vcpu.getXcrs());
  const d = vcpu.getDebugRegs();
  const lapic = vcpu.getLapic();
  const tscKhz = optionalIoctl(() => vcpu.tscKhz() || undefined);
  const cpuid = vcpu.getCpuid();
  const msrs = fixZeroTscDeadline(restoreOrder(vcpu.readMsrs(msrIndices).msrs));
  const events = vcpu.getVcpuEvents();
  return {
    cpuid,
    mpState,
    regs,
    sregs,
    fpu,
    xsave,
    xcrs,
    debugRegs: { dr0: d.db[0], dr1: d.db[1], dr2: d.db[2], dr3: d.db[3], dr6: d.dr6, dr7: d.dr7 },
    lapic,
    tscKhz,
    msrs,
    events,
  };
}

/**
 * Puts a saved state into a vCPU that has not run since (or is parked). Returns the MSRs KVM
 * refused to write (the rest were written): a caller restoring a snapshot decides whether a
 * refused MSR is fatal for it. Throws when anything else is refused.
 *
 * Restore order, and why:
 *  1. CPUID: KVM checks XCR0 (KVM_SET_XCRS), the XSAVE components and many MSRs against what
 *     the vCPU's CPUID advertises, so it comes before all of them.
 *  2. sregs before regs: sregs sets the mode (CR0/CR4/EFER, CS), and APIC_BASE, which the LAPIC
 *     restore needs; how a host applies RFLAGS can depend on the mode (PVM virtualizes IF for the
 *     guest kernel's privilege level), so the mode is in place before regs. KVM_SET_REGS also
 *     drops any pending exception, which step 9 restores.
 *  3. FPU, then XSAVE: the XSAVE area holds the FPU/SSE state too and is the more complete one,
 *     so it is written last and wins.
 *  4. XCRs after XSAVE (QEMU's and Firecracker's order; KVM checks an XSAVE area against the
 *     features it supports, not against the vCPU's current XCR0, so either order is accepted).
 *  5. Debug registers (independent of the rest).
 *  6. LAPIC after sregs (APIC_BASE decides xAPIC/x2APIC mode, which KVM_SET_LAPIC reads) and
 *     before the MSRs: IA32_TSC_DEADLINE only takes a value while the LAPIC timer is in
 *     TSC-deadline mode.
 *  7. TSC frequency before the MSRs: writing IA32_TSC computes the TSC offset at the guest's
 *     frequency, so the frequency must already be the saved one.
 *  8. MSRs, IA32_TSC_DEADLINE last (it is a TSC value: IA32_TSC first).
 *  9. MP state, then vCPU events last (QEMU and Firecracker also put events last): the ioctls
 *     above (SET_REGS, SET_SREGS, SET_LAPIC) drop or recompute pending events, so the saved
 *     pending exception/interrupt/NMI goes in after them; and once events have restored SMM or
 *     a pending SMI, KVM_SET_MP_STATE would refuse INIT_RECEIVED/SIPI_RECEIVED.
 */
export function restoreVcpu(
  vcpu: Vcpu,
  state: VcpuStateData,
  opts: { xsaveSize?: number } = {},
): { refusedMsrs: number[] } {
  vcpu.setCpuid(state.cpuid);
  vcpu.setSregsBytes(state.sregs);
  vcpu.setRegs(state.regs);
  vcpu.setFpu(state.fpu);
  if (state.xsave) vcpu.setXsave(state.xsave, opts.xsaveSize);
  if (state.xcrs) vcpu.setXcrs(state.xcrs);
  const d = state.debugRegs;
  vcpu.setDebugRegs({ db: [d.dr0, d.dr1, d.dr2, d.dr3], dr6: d.dr6, dr7: d.dr7, flags: 0n });
  vcpu.setLapic(state.lapic);
  if (state.tscKhz !== undefined) restoreTscKhz(vcpu, state.tscKhz);
  const { refused } = vcpu.writeMsrs(restoreOrder(state.msrs));
  vcpu.setMpState(state.mpState);
  vcpu.setVcpuEvents(state.events);
  return { refusedMsrs: refused };
}

/**
 * Sets the saved TSC frequency unless the vCPU already runs at it. Without TSC scaling
 * (KVM_CAP_TSC_CONTROL) KVM takes only the host's own frequency (within 250 ppm) or a higher one.
 */
function restoreTscKhz(vcpu: Vcpu, khz: number): void {
  let now: number | undefined;
  try {
    now = vcpu.tscKhz();
  } catch {
    now = undefined;
  }
  if (now === khz) return;
  try {
    vcpu.setTscKhz(khz);
  } catch (e) {
    throw new HostError(
      `KVM refused the saved TSC frequency ${khz} kHz (this vCPU runs at ${now ?? '?'} kHz; ` +
        `a host without TSC scaling cannot slow the TSC down): ${(e as Error).message}`,
    );
  }
}

/** Reads the in-kernel irqchip (PIC master, PIC slave, IOAPIC), the PIT and kvmclock. */
export function saveVm(vm: Vm): VmStateData {
  return {
    picMaster: vm.getIrqchip(C.KVM_IRQCHIP_PIC_MASTER),
    picSlave: vm.getIrqchip(C.KVM_IRQCHIP_PIC_SLAVE),
    ioapic: vm.getIrqchip(C.KVM_IRQCHIP_IOAPIC),
    pit: vm.getPit2(),
    // Read last: the guest sees the time between this read and the restore's set as a pause.
    clock: withRealtime(vm.getClock()),
  };
}

/**
 * KVM stamps the clock with CLOCK_REALTIME (flag KVM_CLOCK_REALTIME) only when the host runs
 * kvmclock off a stable TSC (its "master clock"); nested and PVM hosts often do not. Then the
 * stamp is taken here, right after the read (within microseconds of it), so that a restore with
 * `realtime` can still advance the clock; the flags stay as KVM gave them.
 */
function withRealtime(c: ClockData): ClockData {
  if ((c.flags & C.KVM_CLOCK_REALTIME) !== 0 && c.realtime !== 0n) return c;
  const nowNs = BigInt(Math.round((performance.timeOrigin + performance.now()) * 1e6));
  return { ...c, realtime: nowNs };
}

/**
 * Restores the VM-wide state into a VM made like the saved one (irqchip and PIT created).
 * Order: the interrupt controllers first, so the PIT, which may raise IRQ0 as soon as its
 * counters are loaded, delivers into restored controllers; kvmclock last, closest to resuming.
 * By default the clock is set to the saved value as is (flags 0), so the guest does not see the
 * time the snapshot spent on disk (Firecracker's default). With `realtime` (Firecracker's
 * `clock_realtime`), KVM_CLOCK_REALTIME is passed with the saved CLOCK_REALTIME stamp (KVM's,
 * or saveVm's own, see withRealtime) and KVM advances kvmclock by the wall-clock time elapsed
 * since the save; that needs a kernel that supports the flag (5.16+, else it refuses).
 */
export function restoreVm(vm: Vm, state: VmStateData, opts: { realtime?: boolean } = {}): void {
  if (opts.realtime && state.clock.realtime === 0n)
    throw new HostError(
      'cannot advance kvmclock by the time since the snapshot (clock_realtime): the saved clock has no CLOCK_REALTIME stamp',
    );
  const chips: Array<[number, Uint8Array]> = [
    [C.KVM_IRQCHIP_PIC_MASTER, state.picMaster],
    [C.KVM_IRQCHIP_PIC_SLAVE, state.picSlave],
    [C.KVM_IRQCHIP_IOAPIC, state.ioapic],
  ];
  for (const [id, chip] of chips) {
    if (S.irqchipId(chip) !== id)
      throw new PersistError(`irqchip state for chip ${id} names chip ${S.irqchipId(chip)}`);
    vm.setIrqchip(chip);
  }
  vm.setPit2(state.pit);
  vm.setClock({ ...state.clock, flags: opts.realtime ? C.KVM_CLOCK_REALTIME : 0 });
}

/** The MSR a saved state holds for `index`, if any (for tools and tests). */
export function savedMsr(state: VcpuStateData, index: number): bigint | undefined {
  return state.msrs.find((m) => m.index === index)?.data;
}

export { MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE };

/**
 * Typed wrappers over the KVM API: the system (/dev/kvm), a VM and a vCPU.
 * File descriptors are process-wide, so a Vcpu can be rebuilt from its fd in the worker thread
 * that runs it (each thread maps kvm_run itself).
 */
import { HostError } from '../util/errors.js';
import * as C from './constants.js';
import { MAP_SHARED, O_RDWR, PROT_READ, PROT_WRITE, isSyscallError, native } from './native.js';
import * as S from './structs.js';
import type {
  ClockData,
  CpuidEntry,
  DebugRegs,
  Fpu,
  MsrBatchResult,
  MsrEntry,
  Regs,
  Sregs,
  Xcr,
} from './types.js';

/** MSRs per KVM_GET/SET_MSRS call: below KVM's limit of 256 entries (MAX_IO_MSRS). */
const MSR_BATCH = 128;

/** A copy of `b` in a buffer of its own, exactly `size` bytes (what a SET ioctl reads). */
function exact(what: string, b: Uint8Array, size: number): Uint8Array {
  S.checkSize(what, b, size);
  return b.slice();
}

/**
 * The size of struct kvm_xsave that KVM_GET_XSAVE2/KVM_SET_XSAVE use: KVM_CAP_XSAVE2's answer
 * (it grows past 4096 only when this process enabled a dynamic feature such as AMX with
 * arch_prctl), or 4096 on a kernel without the capability. Process-wide: /dev/kvm and a VM fd
 * give the same answer.
 */
function xsaveSizeFrom(checkExtension: (cap: number) => number): number {
  const n = checkExtension(C.KVM_CAP_XSAVE2);
  return n > S.XSAVE_SIZE ? n : S.XSAVE_SIZE;
}

/** Capabilities without which we refuse to start, with why we need each. */
export const REQUIRED_CAPS: Array<[number, string]> = [
  [C.KVM_CAP_IRQCHIP, 'in-kernel irqchip (KVM_CAP_IRQCHIP)'],
  [C.KVM_CAP_HLT, 'HLT handling (KVM_CAP_HLT)'],
  [C.KVM_CAP_USER_MEMORY, 'user memory regions (KVM_CAP_USER_MEMORY)'],
  [C.KVM_CAP_SET_TSS_ADDR, 'TSS address (KVM_CAP_SET_TSS_ADDR)'],
  [C.KVM_CAP_EXT_CPUID, 'extended CPUID (KVM_CAP_EXT_CPUID)'],
  [C.KVM_CAP_IRQFD, 'interrupts through eventfds (KVM_CAP_IRQFD)'],
  [C.KVM_CAP_IOEVENTFD, 'doorbells through eventfds (KVM_CAP_IOEVENTFD)'],
  [C.KVM_CAP_PIT2, 'in-kernel PIT (KVM_CAP_PIT2)'],
  [C.KVM_CAP_IMMEDIATE_EXIT, 'immediate exit for vCPU kicks (KVM_CAP_IMMEDIATE_EXIT)'],
];

export class Kvm {
  private constructor(readonly fd: number) {}

  /** Opens /dev/kvm and checks the API version and every capability we rely on. */
  static open(path = '/dev/kvm'): Kvm {
    const n = native();
    let fd: number;
    try {
      fd = n.open(path, O_RDWR, 0);
    } catch (e) {
      const code = isSyscallError(e) ? e.code : String(e);
      const why =
        code === 'ENOENT'
          ? 'does not exist (is the kvm module loaded? is this a VM without nested virtualization?)'
          : code === 'EACCES' || code === 'EPERM'
            ? 'is not accessible (run as root or join the kvm group)'
            : `cannot be opened (${code})`;
      throw new HostError(`${path} ${why}`);
    }
    const kvm = new Kvm(fd);
    const version = n.ioctl(fd, C.KVM_GET_API_VERSION, 0);
    if (version !== C.KVM_API_VERSION) {
      n.close(fd);
      throw new HostError(
        `KVM API version ${version} is not supported (need ${C.KVM_API_VERSION})`,
      );
    }
    for (const [cap, what] of REQUIRED_CAPS) {
      if (kvm.checkExtension(cap) <= 0) {
        n.close(fd);
        throw new HostError(`this host's KVM lacks ${what}`);
      }
    }
    return kvm;
  }

  checkExtension(cap: number): number {
    return native().ioctl(this.fd, C.KVM_CHECK_EXTENSION, cap);
  }

  vcpuMmapSize(): number {
    return native().ioctl(this.fd, C.KVM_GET_VCPU_MMAP_SIZE, 0);
  }

  supportedCpuid(): CpuidEntry[] {
    for (let cap = 128; cap <= 4096; cap *= 2) {
      const b = S.allocCpuid2(cap);
      try {
        native().ioctl(this.fd, C.KVM_GET_SUPPORTED_CPUID, b);
        return S.decodeCpuid2(b);
      } catch (e) {
        if (!isSyscallError(e, 'E2BIG')) throw e;
      }
    }
    throw new HostError('KVM_GET_SUPPORTED_CPUID: too many entries');
  }

  /** MSR indices KVM saves/restores and accepts. */
  msrIndexList(): number[] {
    const b = new Uint8Array(4 + 4 * 1024);
    new DataView(b.buffer).setUint32(0, 1024, true);
    native().ioctl(this.fd, C.KVM_GET_MSR_INDEX_LIST, b);
    const v = new DataView(b.buffer);
    const n = v.getUint32(0, true);
    return Array.from({ length: n }, (_, i) => v.getUint32(4 + 4 * i, true));
  }

  /** See xsaveSizeFrom(). */
  xsaveSize(): number {
    return xsaveSizeFrom((cap) => this.checkExtension(cap));
  }

  createVm(): Vm {
    const fd = native().ioctl(this.fd, C.KVM_CREATE_VM, 0);
    return new Vm(this, fd);
  }

  close(): void {
    native().close(this.fd);
  }
}

export class Vm {
  private nextSlot = 0;
  /** Each slot's size in bytes (to check dirty-log bitmaps). */
  private readonly slotSizes = new Map<number, number>();
  constructor(
    readonly kvm: Kvm,
    readonly fd: number,
  ) {}

  /** Maps [guestPhys, +size) to the buffer's memory. The buffer must stay mapped while the VM lives. */
  setUserMemoryRegion(guestPhys: number, memory: ArrayBuffer | Uint8Array, flags = 0): number {
    const slot = this.nextSlot++;
    const addr = native().bufferAddress(memory);
    native().ioctl(
      this.fd,
      C.KVM_SET_USER_MEMORY_REGION,
      S.encodeMemoryRegion(slot, flags, guestPhys, memory.byteLength, addr),
    );
    this.slotSizes.set(slot, memory.byteLength);
    return slot;
  }

  /**
   * A slot number for memory its owner gives KVM later, itself (virtio-mem's slots, added when a
   * block in them is plugged: vmm/device-memory.ts). No KVM call.
   */
  reserveSlot(): number {
    return this.nextSlot++;
  }

  /**
   * KVM_GET_DIRTY_LOG: copies the slot's dirty-page bitmap (one bit per 4 KiB page, little-endian
   * bit order, the slot created with KVM_MEM_LOG_DIRTY_PAGES) into `bitmap` and clears KVM's.
   * `bitmap` must hold at least ceil(pages / 64) * 8 bytes (KVM writes whole u64 words).
   */
  getDirtyLog(slot: number, bitmap: Uint8Array): void {
    const size = this.slotSizes.get(slot);
    if (size === undefined) throw new Error(`dirty log: no memory slot ${slot}`);
    const need = Math.ceil(size / 4096 / 64) * 8;
    if (bitmap.byteLength < need)
      throw new Error(
        `dirty log of slot ${slot}: a bitmap of ${bitmap.byteLength} bytes, ${need} needed`,
      );
    const n = native();
    const b = new Uint8Array(16);
    const v = new DataView(b.buffer);
    v.setUint32(0, slot, true);
    v.setBigUint64(8, n.bufferAddress(bitmap), true);
    n.ioctl(this.fd, C.KVM_GET_DIRTY_LOG, b);
  }

  setTssAddr(addr: number): void {
    native().ioctl(this.fd, C.KVM_SET_TSS_ADDR, addr);
  }

  setIdentityMapAddr(addr: number): void {
    const b = new Uint8Array(8);
    new DataView(b.buffer).setBigUint64(0, BigInt(addr), true);
    native().ioctl(this.fd, C.KVM_SET_IDENTITY_MAP_ADDR, b);
  }

  createIrqchip(): void {
    native().ioctl(this.fd, C.KVM_CREATE_IRQCHIP, 0);
  }

  createPit2(): void {
    const b = new Uint8Array(64);
    new DataView(b.buffer).setUint32(0, C.KVM_PIT_SPEAKER_DUMMY, true);
    native().ioctl(this.fd, C.KVM_CREATE_PIT2, b);
  }

  irqLine(irq: number, level: boolean): void {
    native().ioctl(this.fd, C.KVM_IRQ_LINE, S.encodeIrqLevel(irq, level ? 1 : 0));
  }

  /** Writes to eventfd `fd` raise GSI `gsi` (edge). */
  registerIrqfd(fd: number, gsi: number): void {
    native().ioctl(this.fd, C.KVM_IRQFD, S.encodeIrqfd(fd, gsi, 0));
  }

  /** Guest writes of `datamatch` (len bytes) to `addr` signal eventfd `fd` without an exit. */
  registerIoeventfd(
    fd: number,
    addr: number,
    len: number,
    opts: { pio?: boolean; datamatch?: bigint } = {},
  ): void {
    let flags = opts.pio ? C.KVM_IOEVENTFD_FLAG_PIO : 0;
    if (opts.datamatch !== undefined) flags |= C.KVM_IOEVENTFD_FLAG_DATAMATCH;
    native().ioctl(
      this.fd,
      C.KVM_IOEVENTFD,
      S.encodeIoeventfd(addr, len, fd, flags, opts.datamatch ?? 0n),
    );
  }

  createVcpu(id: number): number {
    return native().ioctl(this.fd, C.KVM_CREATE_VCPU, id);
  }

  /** KVM_CHECK_EXTENSION on the VM fd (some answers are per VM). */
  checkExtension(cap: number): number {
    return native().ioctl(this.fd, C.KVM_CHECK_EXTENSION, cap);
  }

  /** See xsaveSizeFrom(). */
  xsaveSize(): number {
    return xsaveSizeFrom((cap) => this.checkExtension(cap));
  }

  /** struct kvm_irqchip (520 bytes) of chip 0 (PIC master), 1 (PIC slave) or 2 (IOAPIC). */
  getIrqchip(chipId: number): Uint8Array {
    const b = S.allocIrqchip(chipId);
    native().ioctl(this.fd, C.KVM_GET_IRQCHIP, b);
    return b;
  }
  /** Restores a chip; which one is named by the struct's own chip_id. */
  setIrqchip(chip: Uint8Array): void {
    native().ioctl(this.fd, C.KVM_SET_IRQCHIP, exact('kvm_irqchip', chip, S.IRQCHIP_SIZE));
  }

  /** struct kvm_pit_state2 (112 bytes). */
  getPit2(): Uint8Array {
    const b = new Uint8Array(S.PIT_STATE2_SIZE);
    native().ioctl(this.fd, C.KVM_GET_PIT2, b);
    return b;
  }
  setPit2(pit: Uint8Array): void {
    native().ioctl(this.fd, C.KVM_SET_PIT2, exact('kvm_pit_state2', pit, S.PIT_STATE2_SIZE));
  }

  /** kvmclock as the guest sees it now (ns), with the flags saying which extra fields are valid. */
  getClock(): ClockData {
    const b = new Uint8Array(S.CLOCK_DATA_SIZE);
    native().ioctl(this.fd, C.KVM_GET_CLOCK, b);
    return S.decodeClockData(b);
  }
  /**
   * Sets kvmclock to `c.clock` now. Only KVM_CLOCK_REALTIME is meaningful in `c.flags` (KVM then
   * adds the CLOCK_REALTIME time elapsed since `c.realtime`); pass 0 to set the value as is.
   */
  setClock(c: ClockData): void {
    native().ioctl(this.fd, C.KVM_SET_CLOCK, S.encodeClockData(c));
  }

  close(): void {
    native().close(this.fd);
  }
}

/** One vCPU, usable from the thread that runs it. */
export class Vcpu {
  readonly run: DataView;
  private readonly runBuffer: ArrayBuffer;

  constructor(
    readonly fd: number,
    mmapSize: number,
  ) {
    this.runBuffer = native().mmap(mmapSize, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    this.run = new DataView(this.runBuffer);
  }

  getRegs(): Regs {
    const b = new Uint8Array(S.REGS_SIZE);
    native().ioctl(this.fd, C.KVM_GET_REGS, b);
    return S.decodeRegs(b);
  }
  setRegs(r: Regs): void {
    native().ioctl(this.fd, C.KVM_SET_REGS, S.encodeRegs(r));
  }
  getSregs(): Sregs {
    const b = new Uint8Array(S.SREGS_SIZE);
    native().ioctl(this.fd, C.KVM_GET_SREGS, b);
    return S.decodeSregs(b);
  }
  setSregs(s: Sregs): void {
    native().ioctl(this.fd, C.KVM_SET_SREGS, S.encodeSregs(s));
  }
  /**
   * struct kvm_sregs as raw bytes, interrupt_bitmap included (decodeSregs drops it): the
   * lossless form for snapshots, where a pending external interrupt must survive.
   */
  getSregsBytes(): Uint8Array {
    const b = new Uint8Array(S.SREGS_SIZE);
    native().ioctl(this.fd, C.KVM_GET_SREGS, b);
    return b;
  }
  setSregsBytes(b: Uint8Array): void {
    native().ioctl(this.fd, C.KVM_SET_SREGS, exact('kvm_sregs', b, S.SREGS_SIZE));
  }
  getFpu(): Fpu {
    const b = new Uint8Array(S.FPU_SIZE);
    native().ioctl(this.fd, C.KVM_GET_FPU, b);
    return S.decodeFpu(b);
  }
  setFpu(f: Fpu): void {
    native().ioctl(this.fd, C.KVM_SET_FPU, S.encodeFpu(f));
  }
  /**
   * struct kvm_xsave. `size` is the VM's xsaveSize(): above 4096 only KVM_GET_XSAVE2 may be used
   * (KVM_GET_XSAVE would truncate the dynamic components), at 4096 the original ioctl works on
   * every kernel.
   */
  getXsave(size: number = S.XSAVE_SIZE): Uint8Array {
    const b = new Uint8Array(Math.max(size, S.XSAVE_SIZE));
    native().ioctl(this.fd, b.length > S.XSAVE_SIZE ? C.KVM_GET_XSAVE2 : C.KVM_GET_XSAVE, b);
    return b;
  }
  /**
   * KVM_SET_XSAVE reads exactly `size` bytes (the VM's xsaveSize(), whatever the request number
   * says), so a shorter blob (saved where the size was 4096) is zero-padded (a zero XSTATE_BV bit
   * means "component in its initial state"); a longer one holds state this VM cannot take.
   */
  setXsave(xsave: Uint8Array, size: number = S.XSAVE_SIZE): void {
    const n = Math.max(size, S.XSAVE_SIZE);
    if (xsave.length > n)
      throw new HostError(
        `the saved XSAVE area has ${xsave.length} bytes; this VM takes ${n} (KVM_CAP_XSAVE2)`,
      );
    const b = new Uint8Array(n);
    b.set(xsave);
    native().ioctl(this.fd, C.KVM_SET_XSAVE, b);
  }
  getXcrs(): Xcr[] {
    const b = new Uint8Array(S.XCRS_SIZE);
    native().ioctl(this.fd, C.KVM_GET_XCRS, b);
    return S.decodeXcrs(b);
  }
  /** KVM checks each value as XSETBV would (XCR0 within what the vCPU's CPUID allows). */
  setXcrs(xcrs: Xcr[]): void {
    native().ioctl(this.fd, C.KVM_SET_XCRS, S.encodeXcrs(xcrs));
  }
  getDebugRegs(): DebugRegs {
    const b = new Uint8Array(S.DEBUGREGS_SIZE);
    native().ioctl(this.fd, C.KVM_GET_DEBUGREGS, b);
    return S.decodeDebugRegs(b);
  }
  /** KVM refuses non-zero flags and DR6/DR7 values with bits set above bit 31. */
  setDebugRegs(d: DebugRegs): void {
    native().ioctl(this.fd, C.KVM_SET_DEBUGREGS, S.encodeDebugRegs(d));
  }
  /** struct kvm_lapic_state: the first 1 KiB of the in-kernel LAPIC's register page. */
  getLapic(): Uint8Array {
    const b = new Uint8Array(S.LAPIC_SIZE);
    native().ioctl(this.fd, C.KVM_GET_LAPIC, b);
    return b;
  }
  setLapic(lapic: Uint8Array): void {
    native().ioctl(this.fd, C.KVM_SET_LAPIC, exact('kvm_lapic_state', lapic, S.LAPIC_SIZE));
  }
  /** KVM_MP_STATE_* (runnable, halted, waiting for INIT/SIPI...). */
  getMpState(): number {
    const b = new Uint8Array(S.MP_STATE_SIZE);
    native().ioctl(this.fd, C.KVM_GET_MP_STATE, b);
    return new DataView(b.buffer).getUint32(0, true);
  }
  setMpState(state: number): void {
    const b = new Uint8Array(S.MP_STATE_SIZE);
    new DataView(b.buffer).setUint32(0, state >>> 0, true);
    native().ioctl(this.fd, C.KVM_SET_MP_STATE, b);
  }
  /** struct kvm_vcpu_events (64 bytes): pending/injected exception, interrupt, NMI, SMI. */
  getVcpuEvents(): Uint8Array {
    const b = new Uint8Array(S.VCPU_EVENTS_SIZE);
    native().ioctl(this.fd, C.KVM_GET_VCPU_EVENTS, b);
    return b;
  }
  /** KVM applies the optional parts the struct's flags name (as KVM_GET_VCPU_EVENTS set them). */
  setVcpuEvents(events: Uint8Array): void {
    native().ioctl(
      this.fd,
      C.KVM_SET_VCPU_EVENTS,
      exact('kvm_vcpu_events', events, S.VCPU_EVENTS_SIZE),
    );
  }
  /** The CPUID table set on this vCPU (KVM_GET_CPUID2). */
  getCpuid(): CpuidEntry[] {
    for (let cap = 128; cap <= 4096; cap *= 2) {
      const b = S.allocCpuid2(cap);
      try {
        native().ioctl(this.fd, C.KVM_GET_CPUID2, b);
        return S.decodeCpuid2(b);
      } catch (e) {
        if (!isSyscallError(e, 'E2BIG')) throw e;
      }
    }
    throw new HostError('KVM_GET_CPUID2: too many entries');
  }
  /**
   * x87 control word 0x37f, as after a CPU reset (Linux expects it). The MXCSR 0x1f80 written
   * here is ignored by KVM_SET_FPU (see Fpu.mxcsr); a new vCPU's MXCSR already is 0x1f80.
   */
  setDefaultFpu(): void {
    const b = new Uint8Array(S.FPU_SIZE);
    const v = new DataView(b.buffer);
    v.setUint16(128, 0x37f, true);
    v.setUint32(408, 0x1f80, true);
    native().ioctl(this.fd, C.KVM_SET_FPU, b);
  }
  setCpuid(entries: CpuidEntry[]): void {
    native().ioctl(this.fd, C.KVM_SET_CPUID2, S.encodeCpuid2(entries));
  }
  /** KVM_SET_CPUID2 with the struct already encoded (cpuid.ts cpuidTables). */
  setCpuidBytes(b: Uint8Array): void {
    const v = new DataView(b.buffer, b.byteOffset, b.byteLength);
    if (b.byteLength < 8 || b.byteLength !== 8 + v.getUint32(0, true) * S.CPUID_ENTRY_SIZE)
      throw new Error(`KVM_SET_CPUID2: ${b.byteLength} bytes is not a kvm_cpuid2 struct`);
    native().ioctl(this.fd, C.KVM_SET_CPUID2, b);
  }
  /** Sets the MSRs; returns how many KVM accepted (it stops at the first it refuses). */
  setMsrs(entries: MsrEntry[]): number {
    return native().ioctl(this.fd, C.KVM_SET_MSRS, S.encodeMsrs(entries));
  }
  getMsrs(indices: number[]): MsrEntry[] {
    const b = S.encodeMsrs(indices.map((index) => ({ index, data: 0n })));
    const n = native().ioctl(this.fd, C.KVM_GET_MSRS, b);
    return S.decodeMsrs(b).slice(0, n);
  }
  /**
   * Reads every MSR of `indices` that KVM will give, in batches. KVM_GET_MSRS stops at the first
   * MSR it refuses and returns how many it read, so the read resumes just past each refusal
   * (an MSR in KVM_GET_MSR_INDEX_LIST can still be refused, e.g. when the vCPU's CPUID lacks
   * the feature, or by a host such as PVM).
   */
  readMsrs(indices: number[]): MsrBatchResult {
    const msrs: MsrEntry[] = [];
    const refused: number[] = [];
    for (let at = 0; at < indices.length;) {
      const batch = indices.slice(at, at + MSR_BATCH);
      const got = this.getMsrs(batch);
      msrs.push(...got);
      at += got.length;
      if (got.length < batch.length) refused.push(indices[at++]!);
    }
    return { msrs, refused };
  }
  /** Writes every entry KVM accepts, in batches, resuming past each refusal; reports both. */
  writeMsrs(entries: MsrEntry[]): MsrBatchResult {
    const msrs: MsrEntry[] = [];
    const refused: number[] = [];
    for (let at = 0; at < entries.length;) {
      const batch = entries.slice(at, at + MSR_BATCH);
      const n = this.setMsrs(batch);
      msrs.push(...batch.slice(0, n));
      at += n;
      if (n < batch.length) refused.push(entries[at++]!.index);
    }
    return { msrs, refused };
  }
  tscKhz(): number {
    return native().ioctl(this.fd, C.KVM_GET_TSC_KHZ, 0);
  }
  /**
   * Sets the guest TSC frequency. Without KVM_CAP_TSC_CONTROL (TSC scaling) KVM accepts only
   * the host's own frequency (within 250 ppm) or a higher one it then catches up to.
   */
  setTscKhz(khz: number): void {
    native().ioctl(this.fd, C.KVM_SET_TSC_KHZ, khz);
  }

  /**
   * KVM_KVMCLOCK_CTRL: tells the guest (through its kvmclock page) that it was paused, so its
   * soft-lockup watchdog does not fire on resume. Returns false when KVM refuses with EINVAL
   * (the guest has not enabled kvmclock on this vCPU) and also, on a host without the
   * capability, with ENOTTY; other errors throw.
   */
  kvmclockCtrl(): boolean {
    try {
      native().ioctl(this.fd, C.KVM_KVMCLOCK_CTRL, 0);
      return true;
    } catch (e) {
      if (isSyscallError(e, 'EINVAL') || isSyscallError(e, 'ENOTTY')) return false;
      throw e;
    }
  }

  /** Enters the guest. Returns false when interrupted (EINTR: a kick), true on a normal exit. */
  runOnce(): boolean {
    try {
      native().ioctl(this.fd, C.KVM_RUN, 0);
      return true;
    } catch (e) {
      if (isSyscallError(e, 'EINTR') || isSyscallError(e, 'EAGAIN')) return false;
      throw e;
    }
  }

  get exitReason(): number {
    return this.run.getUint32(S.RUN.exitReason, true);
  }
  set immediateExit(v: boolean) {
    this.run.setUint8(S.RUN.immediateExit, v ? 1 : 0);
  }

  close(): void {
    native().munmap(this.runBuffer);
    native().close(this.fd);
  }
}

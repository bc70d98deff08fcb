/**
 * Binary layouts of KVM's structs (linux/kvm.h, x86_64), encoded and decoded with DataView.
 * Offsets were checked against the kernel headers with offsetof().
 */
import type {
  ClockData,
  CpuidEntry,
  DebugRegs,
  DTable,
  Fpu,
  MsrEntry,
  Regs,
  Segment,
  Sregs,
  Xcr,
} from './types.js';

/** struct kvm_regs, in its field order. */
export const REG_ORDER = [
  'rax',
  'rbx',
  'rcx',
  'rdx',
  'rsi',
  'rdi',
  'rsp',
  'rbp',
  'r8',
  'r9',
  'r10',
  'r11',
  'r12',
  'r13',
  'r14',
  'r15',
  'rip',
  'rflags',
] as const;
export const REGS_SIZE = 144;
export const SREGS_SIZE = 312;
export const FPU_SIZE = 416;
export const LAPIC_SIZE = 1024;
/** struct kvm_xsave; KVM_GET_XSAVE2 may use more (KVM_CAP_XSAVE2), never less. */
export const XSAVE_SIZE = 4096;
export const XCRS_SIZE = 392;
export const MAX_XCRS = 16;
export const DEBUGREGS_SIZE = 128;
export const VCPU_EVENTS_SIZE = 64;
export const MP_STATE_SIZE = 4;
export const IRQCHIP_SIZE = 520;
export const PIT_STATE2_SIZE = 112;
export const CLOCK_DATA_SIZE = 48;

/** A view over a struct's bytes, wherever they sit in their buffer. */
function view(b: Uint8Array): DataView {
  return new DataView(b.buffer, b.byteOffset, b.byteLength);
}

/** Throws unless `b` is exactly one `size`-byte struct (a programmer error, not a guest one). */
export function checkSize(what: string, b: Uint8Array, size: number): void {
  if (b.byteLength !== size)
    throw new RangeError(`${what}: ${b.byteLength} bytes where the struct has ${size}`);
}

export function encodeRegs(r: Regs): Uint8Array {
  const b = new Uint8Array(REGS_SIZE);
  const v = new DataView(b.buffer);
  REG_ORDER.forEach((k, i) => v.setBigUint64(i * 8, BigInt.asUintN(64, r[k]), true));
  return b;
}

export function decodeRegs(b: Uint8Array): Regs {
  const v = new DataView(b.buffer, b.byteOffset, b.byteLength);
  const r = {} as Record<(typeof REG_ORDER)[number], bigint>;
  REG_ORDER.forEach((k, i) => (r[k] = v.getBigUint64(i * 8, true)));
  return r;
}

const SEG_SIZE = 24;
function encodeSegment(v: DataView, off: number, s: Segment): void {
  v.setBigUint64(off, BigInt.asUintN(64, s.base), true);
  v.setUint32(off + 8, s.limit >>> 0, true);
  v.setUint16(off + 12, s.selector, true);
  const bytes = [s.type, s.present, s.dpl, s.db, s.s, s.l, s.g, s.avl, s.unusable];
  bytes.forEach((x, i) => v.setUint8(off + 14 + i, x));
}
function decodeSegment(v: DataView, off: number): Segment {
  const u8 = (i: number) => v.getUint8(off + 14 + i);
  return {
    base: v.getBigUint64(off, true),
    limit: v.getUint32(off + 8, true),
    selector: v.getUint16(off + 12, true),
    type: u8(0),
    present: u8(1),
    dpl: u8(2),
    db: u8(3),
    s: u8(4),
    l: u8(5),
    g: u8(6),
    avl: u8(7),
    unusable: u8(8),
  };
}
function encodeDTable(v: DataView, off: number, d: DTable): void {
  v.setBigUint64(off, BigInt.asUintN(64, d.base), true);
  v.setUint16(off + 8, d.limit, true);
}
function decodeDTable(v: DataView, off: number): DTable {
  return { base: v.getBigUint64(off, true), limit: v.getUint16(off + 8, true) };
}

const SEGS = ['cs', 'ds', 'es', 'fs', 'gs', 'ss', 'tr', 'ldt'] as const;
const CRS = ['cr0', 'cr2', 'cr3', 'cr4', 'cr8', 'efer', 'apicBase'] as const;

/** Encodes sregs; the interrupt bitmap (last 32 bytes) is zero: no pending interrupt. */
export function encodeSregs(s: Sregs): Uint8Array {
  const b = new Uint8Array(SREGS_SIZE);
  const v = new DataView(b.buffer);
  SEGS.forEach((k, i) => encodeSegment(v, i * SEG_SIZE, s[k]));
  encodeDTable(v, 192, s.gdt);
  encodeDTable(v, 208, s.idt);
  CRS.forEach((k, i) => v.setBigUint64(224 + i * 8, BigInt.asUintN(64, s[k]), true));
  return b;
}

export function decodeSregs(b: Uint8Array): Sregs {
  const v = new DataView(b.buffer, b.byteOffset, b.byteLength);
  const s = {} as Record<string, unknown>;
  SEGS.forEach((k, i) => (s[k] = decodeSegment(v, i * SEG_SIZE)));
  s.gdt = decodeDTable(v, 192);
  s.idt = decodeDTable(v, 208);
  CRS.forEach((k, i) => (s[k] = v.getBigUint64(224 + i * 8, true)));
  return s as unknown as Sregs;
}

/** struct kvm_cpuid_entry2: function, index, flags, eax, ebx, ecx, edx, padding[3]. */
export const CPUID_ENTRY_SIZE = 40;
/** struct kvm_cpuid2 with room for `capacity` entries (nent = capacity, for GET_SUPPORTED). */
export function allocCpuid2(capacity: number): Uint8Array {
  const b = new Uint8Array(8 + capacity * CPUID_ENTRY_SIZE);
  new DataView(b.buffer).setUint32(0, capacity, true);
  return b;
}
export function decodeCpuid2(b: Uint8Array): CpuidEntry[] {
  const v = new DataView(b.buffer, b.byteOffset, b.byteLength);
  const n = v.getUint32(0, true);
  const out: CpuidEntry[] = [];
  for (let i = 0; i < n; i++) {
    const o = 8 + i * CPUID_ENTRY_SIZE;
    out.push({
      function: v.getUint32(o, true),
      index: v.getUint32(o + 4, true),
      flags: v.getUint32(o + 8, true),
      eax: v.getUint32(o + 12, true),
      ebx: v.getUint32(o + 16, true),
      ecx: v.getUint32(o + 20, true),
      edx: v.getUint32(o + 24, true),
    });
  }
  return out;
}
export function encodeCpuid2(entries: CpuidEntry[]): Uint8Array {
  const b = allocCpuid2(entries.length);
  const v = new DataView(b.buffer);
  entries.forEach((e, i) => {
    const o = 8 + i * CPUID_ENTRY_SIZE;
    v.setUint32(o, e.function >>> 0, true);
    v.setUint32(o + 4, e.index >>> 0, true);
    v.setUint32(o + 8, e.flags >>> 0, true);
    v.setUint32(o + 12, e.eax >>> 0, true);
    v.setUint32(o + 16, e.ebx >>> 0, true);
    v.setUint32(o + 20, e.ecx >>> 0, true);
    v.setUint32(o + 24, e.edx >>> 0, true);
  });
  return b;
}

/** struct kvm_fpu (offsets from the kernel header: fcw 128, last_ip 136, xmm 152, mxcsr 408). */
export function encodeFpu(f: Fpu): Uint8Array {
  if (f.fpr.length !== 128 || f.xmm.length !== 256)
    throw new RangeError('fpu: fpr must be 128 bytes and xmm 256 bytes');
  const b = new Uint8Array(FPU_SIZE);
  const v = view(b);
  b.set(f.fpr, 0);
  v.setUint16(128, f.fcw, true);
  v.setUint16(130, f.fsw, true);
  v.setUint8(132, f.ftwx);
  v.setUint16(134, f.lastOpcode, true);
  v.setBigUint64(136, BigInt.asUintN(64, f.lastIp), true);
  v.setBigUint64(144, BigInt.asUintN(64, f.lastDp), true);
  b.set(f.xmm, 152);
  v.setUint32(408, f.mxcsr >>> 0, true);
  return b;
}
export function decodeFpu(b: Uint8Array): Fpu {
  checkSize('kvm_fpu', b, FPU_SIZE);
  const v = view(b);
  return {
    fpr: b.slice(0, 128),
    fcw: v.getUint16(128, true),
    fsw: v.getUint16(130, true),
    ftwx: v.getUint8(132),
    lastOpcode: v.getUint16(134, true),
    lastIp: v.getBigUint64(136, true),
    lastDp: v.getBigUint64(144, true),
    xmm: b.slice(152, 408),
    mxcsr: v.getUint32(408, true),
  };
}

/** struct kvm_xcrs: nr_xcrs, flags (0), then 16-byte {xcr, reserved, value} entries. */
export function encodeXcrs(xcrs: Xcr[]): Uint8Array {
  if (xcrs.length > MAX_XCRS) throw new RangeError(`kvm_xcrs: ${xcrs.length} > ${MAX_XCRS}`);
  const b = new Uint8Array(XCRS_SIZE);
  const v = view(b);
  v.setUint32(0, xcrs.length, true);
  xcrs.forEach((x, i) => {
    v.setUint32(8 + i * 16, x.xcr >>> 0, true);
    v.setBigUint64(16 + i * 16, BigInt.asUintN(64, x.value), true);
  });
  return b;
}
export function decodeXcrs(b: Uint8Array): Xcr[] {
  checkSize('kvm_xcrs', b, XCRS_SIZE);
  const v = view(b);
  const n = Math.min(v.getUint32(0, true), MAX_XCRS);
  return Array.from({ length: n }, (_, i) => ({
    xcr: v.getUint32(8 + i * 16, true),
    value: v.getBigUint64(16 + i * 16, true),
  }));
}

/** struct kvm_debugregs: db[4], dr6, dr7, flags, reserved[9]. */
export function encodeDebugRegs(d: DebugRegs): Uint8Array {
  const b = new Uint8Array(DEBUGREGS_SIZE);
  const v = view(b);
  const all = [...d.db, d.dr6, d.dr7, d.flags];
  all.forEach((x, i) => v.setBigUint64(i * 8, BigInt.asUintN(64, x), true));
  return b;
}
export function decodeDebugRegs(b: Uint8Array): DebugRegs {
  checkSize('kvm_debugregs', b, DEBUGREGS_SIZE);
  const v = view(b);
  const q = (i: number) => v.getBigUint64(i * 8, true);
  return { db: [q(0), q(1), q(2), q(3)], dr6: q(4), dr7: q(5), flags: q(6) };
}

/** struct kvm_clock_data: clock u64, flags u32, pad, realtime u64, host_tsc u64, pad[4]. */
export function encodeClockData(c: ClockData): Uint8Array {
  const b = new Uint8Array(CLOCK_DATA_SIZE);
  const v = view(b);
  v.setBigUint64(0, BigInt.asUintN(64, c.clock), true);
  v.setUint32(8, c.flags >>> 0, true);
  v.setBigUint64(16, BigInt.asUintN(64, c.realtime), true);
  v.setBigUint64(24, BigInt.asUintN(64, c.hostTsc), true);
  return b;
}
export function decodeClockData(b: Uint8Array): ClockData {
  checkSize('kvm_clock_data', b, CLOCK_DATA_SIZE);
  const v = view(b);
  return {
    clock: v.getBigUint64(0, true),
    flags: v.getUint32(8, true),
    realtime: v.getBigUint64(16, true),
    hostTsc: v.getBigUint64(24, true),
  };
}

/** struct kvm_irqchip: chip_id u32, pad u32, then 512 bytes of PIC or IOAPIC state. */
export function irqchipId(b: Uint8Array): number {
  checkSize('kvm_irqchip', b, IRQCHIP_SIZE);
  return view(b).getUint32(0, true);
}
/** An empty struct kvm_irqchip naming `chipId` (what KVM_GET_IRQCHIP fills in). */
export function allocIrqchip(chipId: number): Uint8Array {
  const b = new Uint8Array(IRQCHIP_SIZE);
  view(b).setUint32(0, chipId, true);
  return b;
}
/** Offsets into struct kvm_irqchip's chip union (+8) of the fields tests and tools look at. */
export const IRQCHIP = {
  data: 8,
  picLastIrr: 8 + 0,
  picIrr: 8 + 1,
  picImr: 8 + 2,
  picIsr: 8 + 3,
  picIrqBase: 8 + 5,
  picElcr: 8 + 14,
  ioapicBase: 8 + 0,
  ioapicId: 8 + 12,
  /** redirtbl[i] is the u64 at ioapicRedirTbl + 8 * i (24 pins). */
  ioapicRedirTbl: 8 + 24,
} as const;

/** struct kvm_pit_state2: 3 channels of 24 bytes, flags at 72. */
export const PIT = {
  channelSize: 24,
  count: 0,
  latchedCount: 4,
  mode: 13,
  gate: 15,
  /** s64 count_load_time: a host time KVM rewrites on every KVM_SET_PIT2. */
  countLoadTime: 16,
  flags: 72,
} as const;

/** struct kvm_vcpu_events offsets (exception, interrupt, nmi, sipi_vector, flags, smi, ...). */
export const VCPU_EVENTS = {
  exceptionInjected: 0,
  exceptionNr: 1,
  interruptInjected: 8,
  interruptNr: 9,
  interruptShadow: 11,
  nmiInjected: 12,
  nmiPending: 13,
  nmiMasked: 14,
  sipiVector: 16,
  flags: 20,
  smiSmm: 24,
  tripleFaultPending: 28,
} as const;
/** KVM_VCPUEVENT_VALID_* flags of struct kvm_vcpu_events. */
export const VCPUEVENT_VALID_NMI_PENDING = 1;
export const VCPUEVENT_VALID_SIPI_VECTOR = 2;
export const VCPUEVENT_VALID_SHADOW = 4;

/** LAPIC register offsets inside struct kvm_lapic_state (the 4 KiB page's first 1 KiB). */
export const LAPIC = {
  id: 0x20,
  version: 0x30,
  tpr: 0x80,
  ppr: 0xa0,
  svr: 0xf0,
  lvtTimer: 0x320,
} as const;
export function lapicReg(lapic: Uint8Array, offset: number): number {
  return view(lapic).getUint32(offset, true);
}
export function setLapicReg(lapic: Uint8Array, offset: number, value: number): void {
  view(lapic).setUint32(offset, value >>> 0, true);
}

/** struct kvm_msrs with entries. */
export function encodeMsrs(entries: MsrEntry[]): Uint8Array {
  const b = new Uint8Array(8 + entries.length * 16);
  const v = new DataView(b.buffer);
  v.setUint32(0, entries.length, true);
  entries.forEach((e, i) => {
    v.setUint32(8 + i * 16, e.index >>> 0, true);
    v.setBigUint64(16 + i * 16, BigInt.asUintN(64, e.data), true);
  });
  return b;
}
export function decodeMsrs(b: Uint8Array): MsrEntry[] {
  const v = new DataView(b.buffer, b.byteOffset, b.byteLength);
  const n = v.getUint32(0, true);
  const out: MsrEntry[] = [];
  for (let i = 0; i < n; i++)
    out.push({ index: v.getUint32(8 + i * 16, true), data: v.getBigUint64(16 + i * 16, true) });
  return out;
}

export function encodeMemoryRegion(
  slot: number,
  flags: number,
  guestPhys: number,
  size: number,
  userAddr: bigint,
): Uint8Array {
  const b = new Uint8Array(32);
  const v = new DataView(b.buffer);
  v.setUint32(0, slot, true);
  v.setUint32(4, flags, true);
  v.setBigUint64(8, BigInt(guestPhys), true);
  v.setBigUint64(16, BigInt(size), true);
  v.setBigUint64(24, userAddr, true);
  return b;
}

export function encodeIrqfd(fd: number, gsi: number, flags: number): Uint8Array {
  const b = new Uint8Array(32);
  const v = new DataView(b.buffer);
  v.setUint32(0, fd, true);
  v.setUint32(4, gsi, true);
  v.setUint32(8, flags, true);
  return b;
}

export function encodeIoeventfd(
  addr: number,
  len: number,
  fd: number,
  flags: number,
  datamatch: bigint,
): Uint8Array {
  const b = new Uint8Array(64);
  const v = new DataView(b.buffer);
  v.setBigUint64(0, datamatch, true);
  v.setBigUint64(8, BigInt(addr), true);
  v.setUint32(16, len, true);
  v.setInt32(20, fd, true);
  v.setUint32(24, flags, true);
  return b;
}

export function encodeIrqLevel(irq: number, level: number): Uint8Array {
  const b = new Uint8Array(8);
  const v = new DataView(b.buffer);
  v.setUint32(0, irq, true);
  v.setUint32(4, level, true);
  return b;
}

/** Offsets into struct kvm_run (the vCPU's shared page). */
export const RUN = {
  immediateExit: 1,
  exitReason: 8,
  ioDirection: 32,
  ioSize: 33,
  ioPort: 34,
  ioCount: 36,
  ioDataOffset: 40,
  mmioPhysAddr: 32,
  mmioData: 40,
  mmioLen: 48,
  mmioIsWrite: 52,
  failEntryReason: 32,
  internalSuberror: 32,
  internalNdata: 36,
  internalData: 40,
  systemEventType: 32,
  systemEventNdata: 36,
  systemEventData: 40,
} as const;

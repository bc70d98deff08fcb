/**
 * Binary layouts of KVM's structs (linux/kvm.h, x86_64), encoded and decoded with DataView.
 * Offsets were checked against the kernel headers with offsetof().
 */
import type { CpuidEntry, DTable, MsrEntry, Regs, Segment, Sregs } from './types.js';

const REG_ORDER = [
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

const CPUID_ENTRY_SIZE = 40;
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

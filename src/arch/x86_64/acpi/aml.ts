/**
 * A small AML (ACPI Machine Language) writer: just what our DSDT needs. Every function returns
 * the encoded bytes of one term, so a table is built by nesting calls, the way ASL reads:
 *
 *   device('COM1', name('_HID', eisaId('PNP0501')), name('_UID', integer(0)), ...)
 *
 * Encodings follow ACPI 6.5 §20.2 (AML grammar) and §6.4 (resource descriptors). Invalid
 * arguments are programmer bugs here (the VMM, not the guest or the user, chooses every name and
 * number), so they throw.
 */

export type Aml = Uint8Array;

// Opcodes (ACPI 6.5 §20.2.5).
const ZERO_OP = 0x00;
const ONE_OP = 0x01;
const ONES_OP = 0xff;
const NAME_OP = 0x08;
const BYTE_PREFIX = 0x0a;
const WORD_PREFIX = 0x0b;
const DWORD_PREFIX = 0x0c;
const STRING_PREFIX = 0x0d;
const QWORD_PREFIX = 0x0e;
const SCOPE_OP = 0x10;
const BUFFER_OP = 0x11;
const PACKAGE_OP = 0x12;
const METHOD_OP = 0x14;
const RETURN_OP = 0xa4;
const IF_OP = 0xa0;
const NOTIFY_OP = 0x86;
const LEQUAL_OP = 0x93;
const ARG0_OP = 0x68; // Arg0..Arg6: 0x68..0x6E
const EXT_OP_PREFIX = 0x5b;
const DEVICE_OP = 0x82; // after EXT_OP_PREFIX
// Name prefixes (§20.2.2).
const ROOT_CHAR = 0x5c; // '\'
const PARENT_PREFIX = 0x5e; // '^'
const DUAL_NAME_PREFIX = 0x2e;
const MULTI_NAME_PREFIX = 0x2f;
const NULL_NAME = 0x00;

export const ZERO: Aml = Uint8Array.of(ZERO_OP);
export const ONE: Aml = Uint8Array.of(ONE_OP);
/** All bits set (0xFFFFFFFFFFFFFFFF in a revision-2 table). */
export const ONES: Aml = Uint8Array.of(ONES_OP);

export function concat(parts: readonly Uint8Array[]): Uint8Array {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let off = 0;
  for (const p of parts) {
    out.set(p, off);
    off += p.length;
  }
  return out;
}

/**
 * Encode a PkgLength whose value is `total` (which counts the PkgLength bytes themselves, §20.2.4).
 * One byte holds up to 63; otherwise the lead byte carries the count of following bytes (bits
 * 7:6) and the low nibble (bits 3:0), and each following byte 8 more bits: 2^12, 2^20, 2^28.
 */
export function encodePkgLength(total: number): Uint8Array {
  if (!Number.isInteger(total) || total < 0 || total >= 1 << 28) {
    throw new RangeError(`PkgLength ${total} out of range`);
  }
  if (total < 64) return Uint8Array.of(total);
  const follow = total < 1 << 12 ? 1 : total < 1 << 20 ? 2 : 3;
  const out = new Uint8Array(1 + follow);
  out[0] = (follow << 6) | (total & 0x0f);
  for (let i = 1; i <= follow; i++) out[i] = (total >>> (4 + 8 * (i - 1))) & 0xff;
  return out;
}

/** PkgLength followed by `payload`, choosing the shortest form that can count itself. */
export function withPkgLength(payload: Uint8Array): Uint8Array {
  const n = payload.length;
  const lenBytes = n + 1 < 64 ? 1 : n + 2 < 1 << 12 ? 2 : n + 3 < 1 << 20 ? 3 : 4;
  return concat([encodePkgLength(n + lenBytes), payload]);
}

/** One 4-character NameSeg; shorter names are padded with '_' as ASL does ("PS2" -> "PS2_"). */
export function nameSeg(seg: string): Uint8Array {
  if (!/^[A-Z_][A-Z0-9_]{0,3}$/.test(seg)) throw new Error(`invalid AML NameSeg '${seg}'`);
  const padded = seg.padEnd(4, '_');
  return Uint8Array.from(padded, (c) => c.charCodeAt(0));
}

/** A NameString: "\\_SB_", "_SB_.COM1", "^PARN", "\\" (the root), "_S5_". */
export function namePath(path: string): Uint8Array {
  const prefix: number[] = [];
  let rest = path;
  if (rest.startsWith('\\')) {
    prefix.push(ROOT_CHAR);
    rest = rest.slice(1);
  } else {
    while (rest.startsWith('^')) {
      prefix.push(PARENT_PREFIX);
      rest = rest.slice(1);
    }
  }
  const segs = rest === '' ? [] : rest.split('.').map(nameSeg);
  let head: number[];
  if (segs.length === 0) head = [NULL_NAME];
  else if (segs.length === 1) head = [];
  else if (segs.length === 2) head = [DUAL_NAME_PREFIX];
  else if (segs.length <= 255) head = [MULTI_NAME_PREFIX, segs.length];
  else throw new Error(`AML name path too long: ${path}`);
  return concat([Uint8Array.from(prefix), Uint8Array.from(head), ...segs]);
}

function le(value: bigint, bytes: number): number[] {
  const out: number[] = [];
  for (let i = 0; i < bytes; i++) out.push(Number((value >> BigInt(8 * i)) & 0xffn));
  return out;
}

/** An Integer in its shortest form: Zero, One, Byte, Word, DWord or QWord constant. */
export function integer(value: number | bigint): Aml {
  const v = BigInt(value);
  if (v < 0n || v > 0xffff_ffff_ffff_ffffn)
    throw new RangeError(`AML integer ${value} out of range`);
  if (v === 0n) return ZERO;
  if (v === 1n) return ONE;
  if (v <= 0xffn) return Uint8Array.of(BYTE_PREFIX, Number(v));
  if (v <= 0xffffn) return Uint8Array.of(WORD_PREFIX, ...le(v, 2));
  if (v <= 0xffff_ffffn) return Uint8Array.of(DWORD_PREFIX, ...le(v, 4));
  return Uint8Array.of(QWORD_PREFIX, ...le(v, 8));
}

/** A DWordConst whatever the value (EISA ids are always written this way). */
export function dword(value: number): Aml {
  if (!Number.isInteger(value) || value < 0 || value > 0xffff_ffff) {
    throw new RangeError(`AML dword ${value} out of range`);
  }
  return Uint8Array.of(DWORD_PREFIX, ...le(BigInt(value), 4));
}

/** A String constant: ASCII 0x01-0x7F, NUL-terminated. */
export function string(s: string): Aml {
  if (!/^[\x01-\x7f]*$/.test(s)) throw new Error(`AML string must be ASCII: ${s}`);
  return concat([Uint8Array.of(STRING_PREFIX), Uint8Array.from(s, (c) => c.charCodeAt(0)), ZERO]);
}

/**
 * The 32-bit compressed EISA id of "PNP0501": three letters of 5 bits each (A=1) then four hex
 * digits, stored so that the bytes in memory read 'PNP' packed, then 0x05, 0x01 (§19.6.35).
 */
export function eisaIdValue(id: string): number {
  if (!/^[A-Z]{3}[0-9A-F]{4}$/.test(id)) throw new Error(`invalid EISA id '${id}'`);
  const c = (i: number) => id.charCodeAt(i) - 0x40;
  const b0 = (c(0) << 2) | (c(1) >> 3);
  const b1 = ((c(1) & 7) << 5) | c(2);
  const b2 = parseInt(id.slice(3, 5), 16);
  const b3 = parseInt(id.slice(5, 7), 16);
  return (b0 | (b1 << 8) | (b2 << 16) | (b3 << 24)) >>> 0;
}

/** EISAID("PNP0501") as ASL writes it: a DWordConst. */
export function eisaId(id: string): Aml {
  return dword(eisaIdValue(id));
}

/** Name(name, value). */
export function name(n: string, value: Aml): Aml {
  return concat([Uint8Array.of(NAME_OP), namePath(n), value]);
}

/** Scope(path) { terms }. */
export function scope(path: string, ...terms: Aml[]): Aml {
  return concat([Uint8Array.of(SCOPE_OP), withPkgLength(concat([namePath(path), ...terms]))]);
}

/** Device(path) { terms }. */
export function device(path: string, ...terms: Aml[]): Aml {
  return concat([
    Uint8Array.of(EXT_OP_PREFIX, DEVICE_OP),
    withPkgLength(concat([namePath(path), ...terms])),
  ]);
}

/** Method(name, argCount, Serialized|NotSerialized) { terms }; sync level 0. */
export function method(n: string, argCount: number, serialized: boolean, ...terms: Aml[]): Aml {
  if (!Number.isInteger(argCount) || argCount < 0 || argCount > 7) {
    throw new RangeError(`AML method arg count ${argCount} out of range`);
  }
  const flags = argCount | (serialized ? 0x08 : 0);
  return concat([
    Uint8Array.of(METHOD_OP),
    withPkgLength(concat([namePath(n), Uint8Array.of(flags), ...terms])),
  ]);
}

/** Return(value). */
export function returnOp(value: Aml): Aml {
  return concat([Uint8Array.of(RETURN_OP), value]);
}

/** ArgN, a method's Nth argument (0-6). */
export function arg(n: number): Aml {
  if (!Number.isInteger(n) || n < 0 || n > 6) throw new RangeError(`AML Arg${n} out of range`);
  return Uint8Array.of(ARG0_OP + n);
}

/** LEqual(a, b): 1 if the two integers are equal (§19.6.76). */
export function lEqual(a: Aml, b: Aml): Aml {
  return concat([Uint8Array.of(LEQUAL_OP), a, b]);
}

/** If(predicate) { terms } (§19.6.60), without an Else. */
export function ifOp(predicate: Aml, ...terms: Aml[]): Aml {
  return concat([Uint8Array.of(IF_OP), withPkgLength(concat([predicate, ...terms]))]);
}

/** Notify(object, value) (§19.6.94): `object` a name path such as "\\_SB_.VGEN". */
export function notify(object: string, value: Aml): Aml {
  return concat([Uint8Array.of(NOTIFY_OP), namePath(object), value]);
}

/** Package() { elements } (at most 255 elements: the short PackageOp form). */
export function pkg(...elements: Aml[]): Aml {
  if (elements.length > 255) throw new RangeError('AML package has more than 255 elements');
  return concat([
    Uint8Array.of(PACKAGE_OP),
    withPkgLength(concat([Uint8Array.of(elements.length), ...elements])),
  ]);
}

/** Buffer() { bytes }, its size given as an Integer. */
export function buffer(bytes: Uint8Array): Aml {
  return concat([Uint8Array.of(BUFFER_OP), withPkgLength(concat([integer(bytes.length), bytes]))]);
}

// ---- Resource descriptors (ACPI 6.5 §6.4) ----

/** Memory32Fixed(ReadWrite|ReadOnly, base, length): large item 0x86, 9 data bytes. */
export function memory32Fixed(readWrite: boolean, base: number, length: number): Uint8Array {
  if (!isU32(base) || !isU32(length) || base + length > 0x1_0000_0000) {
    throw new RangeError(
      `Memory32Fixed 0x${base.toString(16)}+0x${length.toString(16)} out of range`,
    );
  }
  const out = new Uint8Array(12);
  const v = new DataView(out.buffer);
  v.setUint8(0, 0x86);
  v.setUint16(1, 9, true);
  v.setUint8(3, readWrite ? 1 : 0);
  v.setUint32(4, base, true);
  v.setUint32(8, length, true);
  return out;
}

/** IO(Decode16, min, max, alignment, length): small item type 8, 7 data bytes. */
export function io(min: number, max: number, alignment: number, length: number): Uint8Array {
  if (!isU16(min) || !isU16(max) || !isU8(alignment) || !isU8(length)) {
    throw new RangeError('IO descriptor field out of range');
  }
  return Uint8Array.of(0x47, 0x01, min & 0xff, min >> 8, max & 0xff, max >> 8, alignment, length);
}

/** IRQNoFlags() { irq }: small item type 4, 2 data bytes (edge, active high, exclusive). */
export function irqNoFlags(irq: number): Uint8Array {
  if (!Number.isInteger(irq) || irq < 0 || irq > 15)
    throw new RangeError(`ISA IRQ ${irq} out of range`);
  const mask = 1 << irq;
  return Uint8Array.of(0x22, mask & 0xff, mask >> 8);
}

export interface InterruptFlags {
  consumer: boolean; // ResourceConsumer (true) or ResourceProducer
  edge: boolean; // Edge (true) or Level
  activeLow: boolean; // ActiveLow (true) or ActiveHigh
  shared: boolean; // Shared (true) or Exclusive
}

/** Interrupt(consumer, trigger, polarity, sharing) { gsi }: Extended Interrupt, large item 0x89. */
export function interrupt(flags: InterruptFlags, gsi: number): Uint8Array {
  if (!isU32(gsi)) throw new RangeError(`GSI ${gsi} out of range`);
  const out = new Uint8Array(9);
  const v = new DataView(out.buffer);
  v.setUint8(0, 0x89);
  v.setUint16(1, 6, true);
  v.setUint8(
    3,
    (flags.consumer ? 1 : 0) |
      (flags.edge ? 2 : 0) |
      (flags.activeLow ? 4 : 0) |
      (flags.shared ? 8 : 0),
  );
  v.setUint8(4, 1); // interrupt table length
  v.setUint32(5, gsi, true);
  return out;
}

/**
 * ResourceTemplate() { descriptors }: a Buffer ending with the End Tag (small item 0xF, §6.4.2.9),
 * whose checksum byte makes the sum of all the template's bytes zero.
 */
export function resourceTemplate(...descriptors: Uint8Array[]): Aml {
  const body = concat([...descriptors, Uint8Array.of(0x79, 0)]);
  body[body.length - 1] = checksumByte(body);
  return buffer(body);
}

/** The byte that makes the sum of `bytes` (with that byte taken as 0) zero modulo 256. */
export function checksumByte(bytes: Uint8Array): number {
  let sum = 0;
  for (const b of bytes) sum = (sum + b) & 0xff;
  return (0x100 - sum) & 0xff;
}

function isU8(n: number): boolean {
  return Number.isInteger(n) && n >= 0 && n <= 0xff;
}
function isU16(n: number): boolean {
  return Number.isInteger(n) && n >= 0 && n <= 0xffff;
}
function isU32(n: number): boolean {
  return Number.isInteger(n) && n >= 0 && n <= 0xffff_ffff;
}

/**
 * Named, typed, versioned state layouts, serialisable to bytes and back (snapshots, device
 * save/restore). A layout is built from small codecs:
 *
 *   const QueueState = struct({ size: u16, ready: bool, desc: u64n, nextAvail: u16 });
 *   const TransportStateV1 = versioned('virtio-mmio-transport', 1, struct({ ... }));
 *   const bytes = TransportStateV1.encode(value);   // Uint8Array
 *   const back = TransportStateV1.decode(bytes);    // Result: ok | error naming the field
 *
 * The byte form is little-endian, fields in declaration order, no padding. A versioned record
 * starts with its name and version, so a blob of one kind (or of a version this build does not
 * read) is refused with a message naming both, never misread. Decoding treats the bytes as
 * hostile (a snapshot file is input): every length is bounded by the codec and checked against
 * what is left, and trailing bytes are an error.
 */
import { err, ok, type Result } from './result.js';

export class PersistError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'PersistError';
  }
}

/** A writer that grows as needed. */
export class ByteWriter {
  private buf = new Uint8Array(256);
  private view = new DataView(this.buf.buffer);
  private len = 0;

  private room(n: number): void {
    if (this.len + n <= this.buf.length) return;
    let size = this.buf.length * 2;
    while (size < this.len + n) size *= 2;
    const next = new Uint8Array(size);
    next.set(this.buf.subarray(0, this.len));
    this.buf = next;
    this.view = new DataView(next.buffer);
  }
  u8(v: number): void {
    this.room(1);
    this.view.setUint8(this.len, v);
    this.len += 1;
  }
  u16(v: number): void {
    this.room(2);
    this.view.setUint16(this.len, v, true);
    this.len += 2;
  }
  u32(v: number): void {
    this.room(4);
    this.view.setUint32(this.len, v, true);
    this.len += 4;
  }
  i32(v: number): void {
    this.room(4);
    this.view.setInt32(this.len, v, true);
    this.len += 4;
  }
  u64(v: bigint): void {
    this.room(8);
    this.view.setBigUint64(this.len, v, true);
    this.len += 8;
  }
  f64(v: number): void {
    this.room(8);
    this.view.setFloat64(this.len, v, true);
    this.len += 8;
  }
  bytes(b: Uint8Array): void {
    this.room(b.length);
    this.buf.set(b, this.len);
    this.len += b.length;
  }
  finish(): Uint8Array {
    return this.buf.slice(0, this.len);
  }
}

/** A bounds-checked reader; every overrun is a PersistError naming the field path. */
export class ByteReader {
  private readonly view: DataView;
  pos = 0;
  constructor(readonly bytes: Uint8Array) {
    this.view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  }
  get left(): number {
    return this.bytes.length - this.pos;
  }
  need(n: number, path: string): void {
    if (n > this.left)
      throw new PersistError(`${path}: needs ${n} bytes, only ${this.left} left (truncated)`);
  }
  u8(path: string): number {
    this.need(1, path);
    return this.view.getUint8(this.pos++);
  }
  u16(path: string): number {
    this.need(2, path);
    const v = this.view.getUint16(this.pos, true);
    this.pos += 2;
    return v;
  }
  u32(path: string): number {
    this.need(4, path);
    const v = this.view.getUint32(this.pos, true);
    this.pos += 4;
    return v;
  }
  i32(path: string): number {
    this.need(4, path);
    const v = this.view.getInt32(this.pos, true);
    this.pos += 4;
    return v;
  }
  u64(path: string): bigint {
    this.need(8, path);
    const v = this.view.getBigUint64(this.pos, true);
    this.pos += 8;
    return v;
  }
  f64(path: string): number {
    this.need(8, path);
    const v = this.view.getFloat64(this.pos, true);
    this.pos += 8;
    return v;
  }
  take(n: number, path: string): Uint8Array {
    this.need(n, path);
    const b = this.bytes.slice(this.pos, this.pos + n);
    this.pos += n;
    return b;
  }
}

export interface Codec<T> {
  /** A short description for messages ("u16", "bytes(<=4096)"). */
  readonly kind: string;
  write(w: ByteWriter, v: T, path: string): void;
  read(r: ByteReader, path: string): T;
}

export type Infer<C> = C extends Codec<infer T> ? T : never;

function intCodec(kind: string, bits: 8 | 16 | 32, signed = false): Codec<number> {
  const min = signed ? -(2 ** (bits - 1)) : 0;
  const max = signed ? 2 ** (bits - 1) - 1 : 2 ** bits - 1;
  return {
    kind,
    write(w, v, path) {
      if (!Number.isInteger(v) || v < min || v > max)
        throw new PersistError(`${path}: ${String(v)} is not a ${kind}`);
      if (bits === 8) w.u8(v);
      else if (bits === 16) w.u16(v);
      else if (signed) w.i32(v);
      else w.u32(v);
    },
    read(r, path) {
      if (bits === 8) return r.u8(path);
      if (bits === 16) return r.u16(path);
      return signed ? r.i32(path) : r.u32(path);
    },
  };
}

export const u8 = intCodec('u8', 8);
export const u16 = intCodec('u16', 16);
export const u32 = intCodec('u32', 32);
export const i32 = intCodec('i32', 32, true);

/** A 64-bit unsigned value as a bigint (registers, MSRs, guest addresses). */
export const u64n: Codec<bigint> = {
  kind: 'u64',
  write(w, v, path) {
    if (typeof v !== 'bigint' || v < 0n || v > 0xffff_ffff_ffff_ffffn)
      throw new PersistError(`${path}: ${String(v)} is not a u64`);
    w.u64(v);
  },
  read: (r, path) => r.u64(path),
};

/** A non-negative safe integer stored in 64 bits (byte counts, guest addresses < 2^53). */
export const u53: Codec<number> = {
  kind: 'u53',
  write(w, v, path) {
    if (!Number.isSafeInteger(v) || v < 0)
      throw new PersistError(`${path}: ${String(v)} is not a non-negative safe integer`);
    w.u64(BigInt(v));
  },
  read(r, path) {
    const v = r.u64(path);
    if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new PersistError(`${path}: ${v} is too large`);
    return Number(v);
  },
};

export const f64: Codec<number> = {
  kind: 'f64',
  write: (w, v) => w.f64(v),
  read: (r, path) => r.f64(path),
};

export const bool: Codec<boolean> = {
  kind: 'bool',
  write: (w, v) => w.u8(v ? 1 : 0),
  read(r, path) {
    const v = r.u8(path);
    if (v > 1) throw new PersistError(`${path}: ${v} is not a bool`);
    return v === 1;
  },
};

/** A length-prefixed (u32) byte string of at most `max` bytes. */
export function bytes(max: number): Codec<Uint8Array> {
  return {
    kind: `bytes(<=${max})`,
    write(w, v, path) {
      if (!(v instanceof Uint8Array)) throw new PersistError(`${path}: not bytes`);
      if (v.length > max) throw new PersistError(`${path}: ${v.length} bytes, at most ${max}`);
      w.u32(v.length);
      w.bytes(v);
    },
    read(r, path) {
      const n = r.u32(path);
      if (n > max) throw new PersistError(`${path}: ${n} bytes, at most ${max}`);
      return r.take(n, path);
    },
  };
}

/** A UTF-8 string of at most `max` bytes. */
export function string(max: number): Codec<string> {
  const b = bytes(max);
  return {
    kind: `string(<=${max})`,
    write(w, v, path) {
      if (typeof v !== 'string') throw new PersistError(`${path}: not a string`);
      b.write(w, new TextEncoder().encode(v), path);
    },
    read(r, path) {
      try {
        return new TextDecoder('utf-8', { fatal: true }).decode(b.read(r, path));
      } catch (e) {
        if (e instanceof PersistError) throw e;
        throw new PersistError(`${path}: not UTF-8`);
      }
    },
  };
}

/** A u32-counted array of at most `max` items. */
export function array<T>(item: Codec<T>, max: number): Codec<T[]> {
  return {
    kind: `array(${item.kind}, <=${max})`,
    write(w, v, path) {
      if (!Array.isArray(v)) throw new PersistError(`${path}: not an array`);
      if (v.length > max) throw new PersistError(`${path}: ${v.length} items, at most ${max}`);
      w.u32(v.length);
      v.forEach((x, i) => item.write(w, x, `${path}[${i}]`));
    },
    read(r, path) {
      const n = r.u32(path);
      if (n > max) throw new PersistError(`${path}: ${n} items, at most ${max}`);
      const out: T[] = [];
      for (let i = 0; i < n; i++) out.push(item.read(r, `${path}[${i}]`));
      return out;
    },
  };
}

/** An optional value: a presence byte, then the value. */
export function optional<T>(item: Codec<T>): Codec<T | undefined> {
  return {
    kind: `optional(${item.kind})`,
    write(w, v, path) {
      w.u8(v === undefined ? 0 : 1);
      if (v !== undefined) item.write(w, v, path);
    },
    read(r, path) {
      const p = bool.read(r, path);
      return p ? item.read(r, path) : undefined;
    },
  };
}

/** One of a fixed set of string values, stored as its index. */
export function oneOf<const T extends readonly string[]>(values: T): Codec<T[number]> {
  return {
    kind: `oneOf(${values.join('|')})`,
    write(w, v, path) {
      const i = values.indexOf(v);
      if (i < 0)
        throw new PersistError(`${path}: "${String(v)}" is not one of ${values.join(', ')}`);
      w.u8(i);
    },
    read(r, path) {
      const i = r.u8(path);
      const v = values[i];
      if (v === undefined)
        throw new PersistError(`${path}: tag ${i} is not one of ${values.join(', ')}`);
      return v;
    },
  };
}

type Fields = Record<string, Codec<unknown>>;
export type StructOf<F extends Fields> = { [K in keyof F]: Infer<F[K]> };

/** Named fields, written in declaration order. */
export function struct<F extends Fields>(fields: F): Codec<StructOf<F>> & { fields: F } {
  const names = Object.keys(fields);
  return {
    kind: `struct{${names.join(',')}}`,
    fields,
    write(w, v, path) {
      if (typeof v !== 'object' || v === null) throw new PersistError(`${path}: not an object`);
      for (const k of names) fields[k]!.write(w, (v as Record<string, unknown>)[k], `${path}.${k}`);
    },
    read(r, path) {
      const out: Record<string, unknown> = {};
      for (const k of names) out[k] = fields[k]!.read(r, `${path}.${k}`);
      return out as StructOf<F>;
    },
  };
}

/** A tagged union: `{ kind: 'a', ...A } | { kind: 'b', ...B }`. */
export function union<V extends Record<string, Fields>>(
  variants: V,
): Codec<{ [K in keyof V]: { kind: K } & StructOf<V[K]> }[keyof V]> {
  const tags = Object.keys(variants);
  const codecs = Object.fromEntries(tags.map((t) => [t, struct(variants[t]!)]));
  return {
    kind: `union(${tags.join('|')})`,
    write(w, v, path) {
      const tag = (v as { kind?: unknown }).kind;
      const i = tags.indexOf(tag as string);
      if (i < 0) throw new PersistError(`${path}: unknown kind "${String(tag)}"`);
      w.u8(i);
      codecs[tags[i]!]!.write(w, v, `${path}<${tags[i]}>`);
    },
    read(r, path) {
      const i = r.u8(path);
      const tag = tags[i];
      if (tag === undefined) throw new PersistError(`${path}: unknown variant ${i}`);
      return { kind: tag, ...codecs[tag]!.read(r, `${path}<${tag}>`) } as never;
    },
  };
}

const MAGIC = 0x5456_5354; // "TSVT" little-endian: Typervisor saved state

/** A top-level record: magic, name, version, payload length, payload. */
export interface Versioned<T> {
  readonly name: string;
  readonly version: number;
  readonly codec: Codec<T>;
  encode(v: T): Uint8Array;
  decode(b: Uint8Array): Result<T, PersistError>;
  /** decode(), throwing the PersistError (for callers that treat a bad blob as fatal). */
  decodeOrThrow(b: Uint8Array): T;
  /** As a field of a larger record (nested blobs keep their own name and version). */
  readonly asField: Codec<T>;
}

const NAME_MAX = 64;
const nameCodec = string(NAME_MAX);

export function versioned<T>(name: string, version: number, codec: Codec<T>): Versioned<T> {
  const writeInto = (w: ByteWriter, v: T, path: string) => {
    w.u32(MAGIC);
    nameCodec.write(w, name, `${path}.name`);
    w.u16(version);
    const inner = new ByteWriter();
    codec.write(inner, v, path);
    const payload = inner.finish();
    w.u32(payload.length);
    w.bytes(payload);
  };
  const readFrom = (r: ByteReader, path: string): T => {
    if (r.u32(`${path}.magic`) !== MAGIC)
      throw new PersistError(`${path}: not a Typervisor saved-state record`);
    const got = nameCodec.read(r, `${path}.name`);
    if (got !== name)
      throw new PersistError(`${path}: a "${got}" record where "${name}" was expected`);
    const ver = r.u16(`${path}.version`);
    if (ver !== version)
      throw new PersistError(
        `${path}: ${name} version ${ver}; this build reads version ${version}`,
      );
    const len = r.u32(`${path}.length`);
    const sub = new ByteReader(r.take(len, path));
    const v = codec.read(sub, path);
    if (sub.left !== 0) throw new PersistError(`${path}: ${sub.left} bytes left over`);
    return v;
  };
  const self: Versioned<T> = {
    name,
    version,
    codec,
    encode(v) {
      const w = new ByteWriter();
      writeInto(w, v, name);
      return w.finish();
    },
    decode(b) {
      try {
        return ok(self.decodeOrThrow(b));
      } catch (e) {
        if (e instanceof PersistError) return err(e);
        throw e;
      }
    },
    decodeOrThrow(b) {
      const r = new ByteReader(b);
      const v = readFrom(r, name);
      if (r.left !== 0) throw new PersistError(`${name}: ${r.left} trailing bytes`);
      return v;
    },
    asField: { kind: `${name}@${version}`, write: writeInto, read: readFrom },
  };
  return self;
}

/**
 * Names for the Int32 slots of a SharedArrayBuffer register file: `slots(['lock', 'status'])`
 * -> `{ lock: 0, status: 1 }`. Replaces hand-numbered positional constants: a slot is added by
 * name and the numbering cannot collide.
 */
export function slots<const N extends readonly string[]>(
  names: N,
  first = 0,
): { readonly [K in N[number]]: number } & { readonly $count: number } {
  const out: Record<string, number> = {};
  names.forEach((n, i) => {
    if (n in out) throw new Error(`slot ${n} named twice`);
    out[n] = first + i;
  });
  out.$count = first + names.length;
  return out as never;
}

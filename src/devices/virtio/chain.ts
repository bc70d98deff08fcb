/**
 * Descriptor chains of a split virtqueue (virtio 1.2 §2.7.5, §2.7.5.3 indirect descriptors),
 * read with every check the guest could defeat:
 * - every descriptor index < the size of the table it indexes (queue size, or indirect entries);
 * - a chain visits at most `size` direct descriptors and at most the indirect table's entries,
 *   so a `next` loop ends in an error, never a hang;
 * - every [addr, addr+len) lies inside one guest RAM region (no overflow: addresses >= 2^53 and
 *   ranges that leave a region are refused);
 * - device-writable descriptors come after all device-readable ones (§2.7.4.2);
 * - an indirect descriptor is allowed only when VIRTIO_F_RING_INDIRECT_DESC was negotiated, has
 *   no NEXT flag, a table length that is a non-zero multiple of 16 and at most
 *   MAX_INDIRECT_ENTRIES entries, and is never inside an indirect table (no nesting);
 * - the chain's total length is at most `maxBytes` (used.len is a u32).
 * Zero-length descriptors are legal and contribute nothing.
 *
 * The result holds zero-copy views into guest memory (RAM, or device memory on the device
 * worker): reads and writes of them are the guest's memory. A device-writable buffer must be
 * writable (not read-only device memory); the views of the others are only ever read.
 */
import type { Access, GuestMemory } from '../../memory/guest-memory.js';
import { type Result, err, ok } from '../../util/result.js';

/** Why a buffer cannot be used (addresses >= 2^53 are -1 here): for the chain error. */
function refusal(mem: GuestMemory, addr: number, len: number, access: Access): string {
  return (addr < 0 ? undefined : mem.refusal(addr, len, access)) ?? 'outside guest RAM';
}

export const VIRTQ_DESC_F_NEXT = 1;
export const VIRTQ_DESC_F_WRITE = 2;
export const VIRTQ_DESC_F_INDIRECT = 4;
export const DESCRIPTOR_SIZE = 16;
/** Indirect tables hold at most this many descriptors (Linux uses at most seg_max + 2). */
export const MAX_INDIRECT_ENTRIES = 1024;
/** used.len is a u32: no chain may be longer than that. */
export const MAX_CHAIN_BYTES = 0xffff_ffff;

export interface DescriptorChain {
  /** Head index: what goes back into the used ring. */
  readonly head: number;
  /** Device-readable buffers, in order. */
  readonly readable: Uint8Array[];
  /** Device-writable buffers, in order (after all readable ones). */
  readonly writable: Uint8Array[];
  readonly readableLength: number;
  readonly writableLength: number;
}

export type ChainErrorKind =
  | 'index-out-of-range'
  | 'too-long'
  | 'bad-address'
  | 'too-large'
  | 'order'
  | 'indirect-not-negotiated'
  | 'indirect-nested'
  | 'indirect-with-next'
  | 'indirect-bad-length';

export interface ChainError {
  kind: ChainErrorKind;
  message: string;
}

export interface ChainOptions {
  /** VIRTIO_F_RING_INDIRECT_DESC was negotiated. */
  indirect: boolean;
  maxBytes?: number;
}

const fail = (kind: ChainErrorKind, message: string): Result<never, ChainError> =>
  err({ kind, message });

/**
 * Reads the chain starting at `head` (< size, checked by the caller) from the descriptor table
 * `table` (a view of `size` * 16 bytes of guest RAM).
 */
export function readChain(
  mem: GuestMemory,
  table: DataView,
  size: number,
  head: number,
  opts: ChainOptions,
): Result<DescriptorChain, ChainError> {
  const maxBytes = opts.maxBytes ?? MAX_CHAIN_BYTES;
  const readable: Uint8Array[] = [];
  const writable: Uint8Array[] = [];
  let readableLength = 0;
  let writableLength = 0;
  let seenWritable = false;
  let t = table;
  let tSize = size;
  let indirect = false;
  let visited = 0;
  let idx = head;
  for (;;) {
    if (idx >= tSize)
      return fail('index-out-of-range', `descriptor index ${idx} >= table size ${tSize}`);
    if (++visited > tSize)
      return fail('too-long', `chain longer than its table (${tSize}): a loop?`);
    const off = idx * DESCRIPTOR_SIZE;
    const lo = t.getUint32(off, true);
    const hi = t.getUint32(off + 4, true);
    const len = t.getUint32(off + 8, true);
    const flags = t.getUint16(off + 12, true);
    const next = t.getUint16(off + 14, true);
    // Addresses >= 2^53 are not guest RAM and not exact in a JS number.
    const addr = hi >= 0x20_0000 ? -1 : hi * 0x1_0000_0000 + lo;

    if (flags & VIRTQ_DESC_F_INDIRECT) {
      if (!opts.indirect)
        return fail(
          'indirect-not-negotiated',
          'indirect descriptor without VIRTIO_F_RING_INDIRECT_DESC',
        );
      if (indirect) return fail('indirect-nested', 'indirect descriptor inside an indirect table');
      if (flags & VIRTQ_DESC_F_NEXT)
        return fail('indirect-with-next', 'indirect descriptor with NEXT');
      const entries = len / DESCRIPTOR_SIZE;
      if (len === 0 || len % DESCRIPTOR_SIZE !== 0 || entries > MAX_INDIRECT_ENTRIES) {
        return fail('indirect-bad-length', `indirect table length ${len}`);
      }
      const v = addr < 0 ? undefined : mem.tryView(addr, len, 'read');
      if (!v)
        return fail(
          'bad-address',
          `indirect table [0x${addr.toString(16)}, +${len}) ${refusal(mem, addr, len, 'read')}`,
        );
      t = new DataView(v.buffer, v.byteOffset, v.byteLength);
      tSize = entries;
      indirect = true;
      visited = 0;
      idx = 0;
      continue;
    }

    if (len > 0) {
      // What the device may do with it: write a device-writable one, only read the others.
      const access = flags & VIRTQ_DESC_F_WRITE ? 'write' : 'read';
      const v = addr < 0 ? undefined : mem.tryView(addr, len, access);
      if (!v)
        return fail(
          'bad-address',
          `buffer [0x${addr.toString(16)}, +${len}) ${refusal(mem, addr, len, access)}`,
        );
      if (readableLength + writableLength + len > maxBytes) {
        return fail('too-large', `chain longer than ${maxBytes} bytes`);
      }
      if (flags & VIRTQ_DESC_F_WRITE) {
        writable.push(v);
        writableLength += len;
      } else {
        readable.push(v);
        readableLength += len;
      }
    }
    if (flags & VIRTQ_DESC_F_WRITE) seenWritable = true;
    else if (seenWritable)
      return fail('order', 'device-readable descriptor after a device-writable one');

    if (!(flags & VIRTQ_DESC_F_NEXT)) break;
    idx = next;
  }
  return ok({ head, readable, writable, readableLength, writableLength });
}

/** Copies up to dst.length bytes from the start of `segments`; returns how many. */
export function gather(segments: readonly Uint8Array[], dst: Uint8Array): number {
  let n = 0;
  for (const s of segments) {
    if (n >= dst.length) break;
    const take = Math.min(s.length, dst.length - n);
    dst.set(s.subarray(0, take), n);
    n += take;
  }
  return n;
}

/** Copies `src` into the start of `segments`; returns how many bytes fit. */
export function scatter(segments: readonly Uint8Array[], src: Uint8Array): number {
  let n = 0;
  for (const s of segments) {
    if (n >= src.length) break;
    const take = Math.min(s.length, src.length - n);
    s.set(src.subarray(n, n + take));
    n += take;
  }
  return n;
}

/**
 * The views covering bytes [start, start+len) of the concatenation of `segments` (zero-copy).
 * Returns fewer bytes when the segments are shorter.
 */
export function sliceSegments(
  segments: readonly Uint8Array[],
  start: number,
  len: number,
): Uint8Array[] {
  const out: Uint8Array[] = [];
  let pos = 0;
  const end = start + len;
  for (const s of segments) {
    const sEnd = pos + s.length;
    if (sEnd > start && pos < end) {
      const a = Math.max(start, pos) - pos;
      const b = Math.min(end, sEnd) - pos;
      if (b > a) out.push(s.subarray(a, b));
    }
    pos = sEnd;
    if (pos >= end) break;
  }
  return out;
}

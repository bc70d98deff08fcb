/**
 * The device-dirty bitmap: guest RAM pages the VMM itself wrote (virtio buffers a device filled,
 * used-ring entries). KVM's dirty log (KVM_GET_DIRTY_LOG) sees only the vCPUs' writes; a Diff
 * snapshot needs both, so the device worker marks its own writes here and the main thread ORs
 * this bitmap into KVM's at snapshot time.
 *
 * Layout, per region in region order: one bit per 4 KiB page, page p of the region at byte
 * p >> 3, bit p & 7 (KVM's bitmap layout on a little-endian host), each region's part rounded up
 * to whole u64 words as KVM's is (so a region's part can be ORed into KVM's byte for byte).
 * The bytes live in a SharedArrayBuffer carried with the guest RAM layout to every thread.
 *
 * Threads: only the device worker sets bits; the main thread reads and clears them only while
 * the device worker is paused (a snapshot create pauses it first, and the mailbox round trip
 * orders the two). So plain byte stores suffice: no Atomics on the hot path.
 */
export const DIRTY_PAGE_SIZE = 4096;
const PAGE_SHIFT = 12;

/** Bytes of one region's part of a dirty bitmap: whole u64 words, as KVM's. */
export function dirtyBitmapBytes(regionSize: number): number {
  return Math.ceil(regionSize / DIRTY_PAGE_SIZE / 64) * 8;
}

interface Part {
  base: number;
  size: number;
  /** This region's bits. */
  bits: Uint8Array;
  /** The host buffer a thread's views of this region come from (for markView), if known. */
  buffer?: ArrayBufferLike;
  /** Where the region starts inside that buffer. */
  bufferOffset: number;
}

export class DirtyPages {
  private readonly parts: Part[];
  /** Every mark() and markView() that set at least one bit, for tests and metrics. */
  marks = 0;

  /**
   * Over `shared` (from DirtyPages.allocate with the same regions). `views`: this thread's
   * region bytes, in region order, so markView() can tell a region from a buffer.
   */
  constructor(
    readonly shared: SharedArrayBuffer,
    regions: ReadonlyArray<{ base: number; size: number }>,
    views?: ReadonlyArray<Uint8Array>,
  ) {
    let off = 0;
    this.parts = regions.map((r, i) => {
      const n = dirtyBitmapBytes(r.size);
      if (off + n > shared.byteLength) throw new Error('dirty bitmap: buffer too small');
      const bits = new Uint8Array(shared, off, n);
      off += n;
      const v = views?.[i];
      return {
        base: r.base,
        size: r.size,
        bits,
        ...(v ? { buffer: v.buffer } : {}),
        bufferOffset: v?.byteOffset ?? 0,
      };
    });
  }

  /** A zeroed shared bitmap for these regions. */
  static allocate(regions: ReadonlyArray<{ size: number }>): SharedArrayBuffer {
    return new SharedArrayBuffer(regions.reduce((s, r) => s + dirtyBitmapBytes(r.size), 0));
  }

  /** Region i's bits (KVM's layout): read, OR into, or clear. */
  region(i: number): Uint8Array {
    const p = this.parts[i];
    if (!p) throw new Error(`dirty bitmap: no region ${i}`);
    return p.bits;
  }

  get regionCount(): number {
    return this.parts.length;
  }

  /** Marks the pages of guest range [addr, addr+len); ignores what lies outside every region. */
  mark(addr: number, len: number): void {
    if (len <= 0) return;
    for (const p of this.parts) {
      if (addr >= p.base && addr < p.base + p.size) {
        const end = Math.min(addr + len, p.base + p.size);
        this.setPages(p, addr - p.base, end - p.base);
        return;
      }
    }
  }

  /**
   * Marks the pages under `view`, a view of guest RAM on this thread (a writable descriptor
   * segment, a used ring): its region is found by its buffer, its offset is the page. A view of
   * some other buffer is ignored.
   */
  markView(view: Uint8Array | DataView): void {
    this.markAt(view.buffer, view.byteOffset, view.byteLength);
  }

  /** markView() without a view: `len` bytes at `byteOffset` of `buffer` (no allocation). */
  markAt(buffer: ArrayBufferLike, byteOffset: number, len: number): void {
    if (len <= 0) return;
    for (const p of this.parts) {
      if (p.buffer !== buffer) continue;
      const start = byteOffset - p.bufferOffset;
      if (start < 0 || start >= p.size) continue;
      this.setPages(p, start, Math.min(start + len, p.size));
      return;
    }
  }

  private setPages(p: Part, from: number, to: number): void {
    const last = (to - 1) >>> PAGE_SHIFT;
    const bits = p.bits;
    for (let pg = from >>> PAGE_SHIFT; pg <= last; pg++)
      bits[pg >>> 3] = (bits[pg >>> 3] ?? 0) | (1 << (pg & 7));
    this.marks++;
  }

  /** Clears every bit (after a snapshot has taken them). */
  clear(): void {
    for (const p of this.parts) p.bits.fill(0);
  }

  /** ORs `bits` (a region's bitmap in KVM's layout) into region i. */
  orInto(i: number, bits: Uint8Array): void {
    const dst = this.region(i);
    const n = Math.min(dst.length, bits.length);
    for (let k = 0; k < n; k++) dst[k] = (dst[k] ?? 0) | (bits[k] ?? 0);
  }
}

/** The number of set bits in a bitmap. */
export function countDirty(bits: Uint8Array): number {
  let n = 0;
  for (let k = 0; k < bits.length; k++) {
    let b = bits[k]!;
    while (b) {
      b &= b - 1;
      n++;
    }
  }
  return n;
}

/** Is page p set in `bits`? */
export function isDirty(bits: Uint8Array, p: number): boolean {
  return ((bits[p >>> 3] ?? 0) & (1 << (p & 7))) !== 0;
}

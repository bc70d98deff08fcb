import { GuestMemoryError } from '../util/errors.js';
import type { DirtyPages } from './dirty-pages.js';

/** One contiguous range of guest RAM, backed by a host buffer (an mmap in production). */
export interface GuestRegion {
  readonly base: number; // guest-physical start
  readonly size: number; // bytes
  readonly bytes: Uint8Array; // host view, length === size
}

/**
 * Guest RAM as a sorted list of non-overlapping regions (x86 leaves the 32-bit MMIO hole, and V8
 * caps one buffer's length). Every access is bounds-checked; an access that is not entirely
 * inside ONE region fails (regions are never treated as adjacent, even when they are).
 *
 * Each thread builds its own GuestMemory over its own view of the same mapping.
 */
export class GuestMemory {
  readonly regions: readonly GuestRegion[];
  private readonly views: DataView[];
  /**
   * Where the VMM's own writes to guest RAM are marked, when dirty pages are tracked (Diff
   * snapshots): the virtqueues mark the buffers they hand out and the used ring (queue.ts).
   */
  deviceWrites: DirtyPages | undefined;

  constructor(regions: GuestRegion[]) {
    const sorted = [...regions].sort((a, b) => a.base - b.base);
    for (let i = 0; i < sorted.length; i++) {
      const r = sorted[i]!;
      if (r.bytes.length !== r.size || r.size <= 0) throw new Error('bad guest region');
      const prev = sorted[i - 1];
      if (prev && prev.base + prev.size > r.base) throw new Error('overlapping guest regions');
    }
    this.regions = sorted;
    this.views = sorted.map((r) => new DataView(r.bytes.buffer, r.bytes.byteOffset, r.size));
  }

  /** Guest RAM for tests and tools: plain buffers, one per range. */
  static anonymous(ranges: Array<{ base: number; size: number }>): GuestMemory {
    return new GuestMemory(
      ranges.map((r) => ({ base: r.base, size: r.size, bytes: new Uint8Array(r.size) })),
    );
  }

  /** Total RAM in bytes. */
  get totalSize(): number {
    return this.regions.reduce((s, r) => s + r.size, 0);
  }

  /** Index of the region holding [addr, addr+len), or -1. len may be 0 (then addr must be inside). */
  private find(addr: number, len: number): number {
    if (!Number.isSafeInteger(addr) || !Number.isSafeInteger(len) || addr < 0 || len < 0) return -1;
    const rs = this.regions;
    for (let i = 0; i < rs.length; i++) {
      const r = rs[i]!;
      if (addr >= r.base && addr < r.base + r.size) {
        return addr + len <= r.base + r.size ? i : -1;
      }
    }
    return -1;
  }

  /** True when [addr, addr+len) lies inside one region. */
  isValidRange(addr: number, len: number): boolean {
    return this.find(addr, len) >= 0;
  }

  private locate(addr: number, len: number): { view: DataView; off: number; idx: number } {
    const idx = this.find(addr, len);
    if (idx < 0) {
      throw new GuestMemoryError(
        `guest access [0x${addr.toString(16)}, +${len}) is outside guest RAM`,
      );
    }
    return { view: this.views[idx]!, off: addr - this.regions[idx]!.base, idx };
  }

  /**
   * A zero-copy view of [addr, addr+len): reads and writes go straight to guest RAM. Throws
   * GuestMemoryError when out of range. Callers that handle guest-controlled addresses should
   * check with isValidRange first, or use tryView.
   */
  view(addr: number, len: number): Uint8Array {
    const { idx, off } = this.locate(addr, len);
    const r = this.regions[idx]!;
    return r.bytes.subarray(off, off + len);
  }

  /** Like view(), but undefined instead of an exception. */
  tryView(addr: number, len: number): Uint8Array | undefined {
    const idx = this.find(addr, len);
    if (idx < 0) return undefined;
    const r = this.regions[idx]!;
    const off = addr - r.base;
    return r.bytes.subarray(off, off + len);
  }

  read(addr: number, dst: Uint8Array): void {
    dst.set(this.view(addr, dst.length));
  }
  write(addr: number, src: Uint8Array): void {
    this.view(addr, src.length).set(src);
  }
  fill(addr: number, len: number, value = 0): void {
    this.view(addr, len).fill(value);
  }

  readU8(addr: number): number {
    const { view, off } = this.locate(addr, 1);
    return view.getUint8(off);
  }
  readU16(addr: number): number {
    const { view, off } = this.locate(addr, 2);
    return view.getUint16(off, true);
  }
  readU32(addr: number): number {
    const { view, off } = this.locate(addr, 4);
    return view.getUint32(off, true);
  }
  readU64(addr: number): bigint {
    const { view, off } = this.locate(addr, 8);
    return view.getBigUint64(off, true);
  }
  writeU8(addr: number, v: number): void {
    const { view, off } = this.locate(addr, 1);
    view.setUint8(off, v);
  }
  writeU16(addr: number, v: number): void {
    const { view, off } = this.locate(addr, 2);
    view.setUint16(off, v, true);
  }
  writeU32(addr: number, v: number): void {
    const { view, off } = this.locate(addr, 4);
    view.setUint32(off, v, true);
  }
  writeU64(addr: number, v: bigint | number): void {
    const { view, off } = this.locate(addr, 8);
    view.setBigUint64(off, BigInt(v), true);
  }
}

import { GuestMemoryError } from '../util/errors.js';
import type { DirtyPages } from './dirty-pages.js';

/** One contiguous range of guest memory, backed by a host buffer (an mmap in production). */
export interface GuestRegion {
  readonly base: number; // guest-physical start
  readonly size: number; // bytes
  readonly bytes: Uint8Array; // host view, length === size
  /**
   * Device memory only: the VMM may read it but never write it (a read-only pmem file, a
   * KVM_MEM_READONLY slot whose host mapping is PROT_READ: a write would fault the process).
   */
  readonly readOnly?: boolean;
  /**
   * Device memory only: whether the VMM may touch guest-physical [addr, addr+len) of this region
   * now (virtio-mem: only plugged blocks). Asked on every lookup that lands in the region.
   */
  readonly allows?: (addr: number, len: number) => boolean;
}

/** What an access does to guest memory: read-only device memory refuses 'write'. */
export type Access = 'read' | 'write';

/** Why an access is refused (GuestMemory.refusal). */
const OUTSIDE = 'outside guest RAM and device memory';
const READ_ONLY = 'in read-only device memory';
const NOT_ALLOWED = 'in device memory the guest does not have now (unplugged)';

/**
 * Guest memory as a sorted list of non-overlapping regions: guest RAM (x86 leaves the 32-bit MMIO
 * hole, and V8 caps one buffer's length) and, on the device worker, device memory (pmem files,
 * the virtio-mem region: `deviceRegions`). Every access is bounds-checked; an access that is not
 * entirely inside ONE region fails (regions are never treated as adjacent, even when they are).
 * Device memory may refuse writes (`readOnly`) or some ranges (`allows`); RAM refuses nothing
 * inside it. Accessors that may be written through (view, tryView, isValidRange) check for a
 * 'write' unless told 'read'.
 *
 * Each thread builds its own GuestMemory over its own view of the same mapping.
 */
export class GuestMemory {
  /** Guest RAM (what boot, the balloon and snapshots see), sorted. */
  readonly regions: readonly GuestRegion[];
  /** Device memory, sorted (none unless given). */
  readonly deviceRegions: readonly GuestRegion[];
  /** Both, sorted: what lookups search. */
  private readonly all: readonly GuestRegion[];
  private readonly views: DataView[];
  /**
   * Where the VMM's own writes to guest RAM are marked, when dirty pages are tracked (Diff
   * snapshots): the virtqueues mark the buffers they hand out and the used ring (queue.ts).
   * Writes into device memory are not marked (nothing there is saved from a page bitmap).
   */
  deviceWrites: DirtyPages | undefined;

  constructor(regions: GuestRegion[], device: GuestRegion[] = []) {
    const byBase = (a: GuestRegion, b: GuestRegion) => a.base - b.base;
    for (const r of regions)
      if (r.readOnly || r.allows) throw new Error('guest RAM cannot be read-only or gated');
    const sorted = [...regions, ...device].sort(byBase);
    for (let i = 0; i < sorted.length; i++) {
      const r = sorted[i]!;
      if (r.bytes.length !== r.size || r.size <= 0) throw new Error('bad guest region');
      const prev = sorted[i - 1];
      if (prev && prev.base + prev.size > r.base) throw new Error('overlapping guest regions');
    }
    this.regions = [...regions].sort(byBase);
    this.deviceRegions = [...device].sort(byBase);
    this.all = sorted;
    this.views = sorted.map((r) => new DataView(r.bytes.buffer, r.bytes.byteOffset, r.size));
  }

  /** Guest RAM for tests and tools: plain buffers, one per range. */
  static anonymous(ranges: Array<{ base: number; size: number }>): GuestMemory {
    return new GuestMemory(
      ranges.map((r) => ({ base: r.base, size: r.size, bytes: new Uint8Array(r.size) })),
    );
  }

  /** Index in `all` of the region holding [addr, addr+len), or -1. len may be 0 (then addr must be inside). */
  private region(addr: number, len: number): number {
    if (!Number.isSafeInteger(addr) || !Number.isSafeInteger(len) || addr < 0 || len < 0) return -1;
    // Binary search: the last region starting at or below addr.
    const rs = this.all;
    let lo = 0;
    let hi = rs.length - 1;
    while (lo <= hi) {
      const mid = (lo + hi) >>> 1;
      if (rs[mid]!.base <= addr) lo = mid + 1;
      else hi = mid - 1;
    }
    const r = rs[hi];
    if (r === undefined || addr >= r.base + r.size) return -1;
    return addr + len <= r.base + r.size ? hi : -1;
  }

  /** The region index for an access, or why not. */
  private check(addr: number, len: number, access: Access): number | string {
    const i = this.region(addr, len);
    if (i < 0) return OUTSIDE;
    const r = this.all[i]!;
    if (access === 'write' && r.readOnly) return READ_ONLY;
    if (r.allows && !r.allows(addr, len)) return NOT_ALLOWED;
    return i;
  }

  private find(addr: number, len: number, access: Access): number {
    const i = this.check(addr, len, access);
    return typeof i === 'number' ? i : -1;
  }

  /** Total RAM in bytes (device memory not counted). */
  get totalSize(): number {
    return this.regions.reduce((s, r) => s + r.size, 0);
  }

  /** True when [addr, addr+len) lies inside one region and `access` (default 'write') is allowed there. */
  isValidRange(addr: number, len: number, access: Access = 'write'): boolean {
    return this.find(addr, len, access) >= 0;
  }

  /** Why `access` to [addr, addr+len) is refused ("outside ...", "in read-only ..."), or undefined. */
  refusal(addr: number, len: number, access: Access = 'write'): string | undefined {
    const i = this.check(addr, len, access);
    return typeof i === 'number' ? undefined : i;
  }

  private locate(
    addr: number,
    len: number,
    access: Access,
  ): { view: DataView; off: number; idx: number } {
    const idx = this.check(addr, len, access);
    if (typeof idx !== 'number') {
      throw new GuestMemoryError(`guest access [0x${addr.toString(16)}, +${len}) is ${idx}`);
    }
    return { view: this.views[idx]!, off: addr - this.all[idx]!.base, idx };
  }

  /**
   * A zero-copy view of [addr, addr+len): reads and writes go straight to guest memory. Throws
   * GuestMemoryError when out of range or refused for `access` (default 'write': a view only
   * read from may say 'read', and then must never be written). Callers that handle
   * guest-controlled addresses should check with isValidRange first, or use tryView.
   */
  view(addr: number, len: number, access: Access = 'write'): Uint8Array {
    const { idx, off } = this.locate(addr, len, access);
    const r = this.all[idx]!;
    return r.bytes.subarray(off, off + len);
  }

  /** Like view(), but undefined instead of an exception. */
  tryView(addr: number, len: number, access: Access = 'write'): Uint8Array | undefined {
    const idx = this.find(addr, len, access);
    if (idx < 0) return undefined;
    const r = this.all[idx]!;
    const off = addr - r.base;
    return r.bytes.subarray(off, off + len);
  }

  read(addr: number, dst: Uint8Array): void {
    dst.set(this.view(addr, dst.length, 'read'));
  }
  write(addr: number, src: Uint8Array): void {
    this.view(addr, src.length).set(src);
  }
  fill(addr: number, len: number, value = 0): void {
    this.view(addr, len).fill(value);
  }

  readU8(addr: number): number {
    const { view, off } = this.locate(addr, 1, 'read');
    return view.getUint8(off);
  }
  readU16(addr: number): number {
    const { view, off } = this.locate(addr, 2, 'read');
    return view.getUint16(off, true);
  }
  readU32(addr: number): number {
    const { view, off } = this.locate(addr, 4, 'read');
    return view.getUint32(off, true);
  }
  readU64(addr: number): bigint {
    const { view, off } = this.locate(addr, 8, 'read');
    return view.getBigUint64(off, true);
  }
  writeU8(addr: number, v: number): void {
    const { view, off } = this.locate(addr, 1, 'write');
    view.setUint8(off, v);
  }
  writeU16(addr: number, v: number): void {
    const { view, off } = this.locate(addr, 2, 'write');
    view.setUint16(off, v, true);
  }
  writeU32(addr: number, v: number): void {
    const { view, off } = this.locate(addr, 4, 'write');
    view.setUint32(off, v, true);
  }
  writeU64(addr: number, v: bigint | number): void {
    const { view, off } = this.locate(addr, 8, 'write');
    view.setBigUint64(off, BigInt(v), true);
  }
}

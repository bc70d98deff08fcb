/**
 * The guest driver's side of virtio, for tests: lays out split virtqueues in a GuestMemory,
 * makes chains available, reads the used ring back, and drives an MmioTransport through the
 * Linux virtio_mmio probe sequence (drivers/virtio/virtio_mmio.c: vm_probe, vm_finalize_features,
 * vm_setup_vq). It writes exactly what a driver would, or deliberately broken rings for the
 * malformed-input tests.
 */
import type { GuestMemory } from '../../../memory/guest-memory.js';
import type { BusDevice } from '../../bus.js';
import { VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE } from '../chain.js';
import {
  STATUS_ACKNOWLEDGE,
  STATUS_DRIVER,
  STATUS_DRIVER_OK,
  STATUS_FEATURES_OK,
} from '../constants.js';
import { REG } from '../mmio.js';

/** A bump allocator over a guest RAM range. */
export class GuestAllocator {
  private next: number;
  constructor(
    base: number,
    private readonly end: number,
  ) {
    this.next = base;
  }
  alloc(len: number, align = 16): number {
    const a = Math.ceil(this.next / align) * align;
    if (a + len > this.end) throw new Error('mock guest allocator exhausted');
    this.next = a + len;
    return a;
  }
}

export interface Buffer {
  addr: number;
  len: number;
  /** Device-writable. */
  write?: boolean;
}

export interface RawDescriptor {
  addr: number | bigint;
  len: number;
  flags: number;
  next: number;
}

export class MockQueue {
  readonly desc: number;
  readonly avail: number;
  readonly used: number;
  private nextFreeDesc = 0;
  private availIdx = 0;
  private lastUsed = 0;
  /** avail.idx at the driver's last kick decision (kickNeeded()). */
  private kickedAt = 0;
  /** Interrupts enabled (callbacks on): takeUsed() moves used_event along, as Linux does. */
  private callbacks = true;

  constructor(
    readonly mem: GuestMemory,
    readonly alloc: GuestAllocator,
    readonly size: number,
  ) {
    this.desc = alloc.alloc(16 * size, 16);
    this.avail = alloc.alloc(6 + 2 * size, 2);
    this.used = alloc.alloc(6 + 8 * size, 4);
    mem.fill(this.desc, 16 * size);
    mem.fill(this.avail, 6 + 2 * size);
    mem.fill(this.used, 6 + 8 * size);
  }

  writeDescriptor(table: number, i: number, d: RawDescriptor): void {
    const a = table + 16 * i;
    this.mem.writeU64(a, BigInt(d.addr));
    this.mem.writeU32(a + 8, d.len >>> 0);
    this.mem.writeU16(a + 12, d.flags);
    this.mem.writeU16(a + 14, d.next);
  }

  /** Puts `head` in the next avail slot and bumps avail.idx. */
  publish(head: number): void {
    this.mem.writeU16(this.avail + 4 + 2 * (this.availIdx % this.size), head);
    this.availIdx = (this.availIdx + 1) & 0xffff;
    this.mem.writeU16(this.avail + 2, this.availIdx);
  }

  setAvailIdx(v: number): void {
    this.availIdx = v & 0xffff;
    this.mem.writeU16(this.avail + 2, this.availIdx);
  }

  setAvailFlags(flags: number): void {
    this.mem.writeU16(this.avail, flags);
    this.callbacks = (flags & 1) === 0;
  }

  /** used_event (EVENT_IDX): interrupt when used.idx passes it (§2.7.10). */
  setUsedEvent(v: number): void {
    this.mem.writeU16(this.avail + 4 + 2 * this.size, v & 0xffff);
  }

  usedEvent(): number {
    return this.mem.readU16(this.avail + 4 + 2 * this.size);
  }

  /** avail_event, as the device last wrote it (EVENT_IDX). */
  availEvent(): number {
    return this.mem.readU16(this.used + 4 + 8 * this.size);
  }

  usedFlags(): number {
    return this.mem.readU16(this.used);
  }

  /**
   * Linux's virtqueue_kick_prepare: would the driver kick for the buffers it made available since
   * its last kick decision? With EVENT_IDX: vring_need_event(avail_event, new, old); without:
   * unless the device set VIRTQ_USED_F_NO_NOTIFY. Moves the decision point.
   */
  kickNeeded(eventIdx: boolean): boolean {
    const old = this.kickedAt;
    const now = this.availIdx;
    this.kickedAt = now;
    if (eventIdx) {
      const ev = this.availEvent();
      return ((now - ev - 1) & 0xffff) < ((now - old) & 0xffff);
    }
    return (this.usedFlags() & 1) === 0;
  }

  /** Both indices start at `idx` (a queue restored mid-life, for wraparound tests). */
  startAt(idx: number): void {
    this.availIdx = idx & 0xffff;
    this.kickedAt = this.availIdx;
    this.lastUsed = idx & 0xffff;
    this.mem.writeU16(this.avail + 2, this.availIdx);
    this.mem.writeU16(this.used + 2, this.lastUsed);
    this.setUsedEvent(idx);
  }

  /** Writes a well-formed chain of direct descriptors and makes it available; returns the head. */
  addChain(buffers: Buffer[]): number {
    const head = this.nextFreeDesc;
    buffers.forEach((b, i) => {
      const idx = (head + i) % this.size;
      const last = i === buffers.length - 1;
      this.writeDescriptor(this.desc, idx, {
        addr: b.addr,
        len: b.len,
        flags: (b.write ? VIRTQ_DESC_F_WRITE : 0) | (last ? 0 : VIRTQ_DESC_F_NEXT),
        next: last ? 0 : (idx + 1) % this.size,
      });
    });
    this.nextFreeDesc = (head + buffers.length) % this.size;
    this.publish(head);
    return head;
  }

  /** Writes the buffers as an indirect table at `tableAddr` and makes one descriptor available. */
  addIndirectChain(buffers: Buffer[], tableAddr: number): number {
    buffers.forEach((b, i) => {
      const last = i === buffers.length - 1;
      this.writeDescriptor(tableAddr, i, {
        addr: b.addr,
        len: b.len,
        flags: (b.write ? VIRTQ_DESC_F_WRITE : 0) | (last ? 0 : VIRTQ_DESC_F_NEXT),
        next: last ? 0 : i + 1,
      });
    });
    const head = this.nextFreeDesc;
    this.writeDescriptor(this.desc, head, {
      addr: tableAddr,
      len: 16 * buffers.length,
      flags: VIRTQ_DESC_F_INDIRECT,
      next: 0,
    });
    this.nextFreeDesc = (head + 1) % this.size;
    this.publish(head);
    return head;
  }

  usedIdx(): number {
    return this.mem.readU16(this.used + 2);
  }

  /** Used elements added since the last call. */
  takeUsed(): Array<{ id: number; len: number }> {
    const out: Array<{ id: number; len: number }> = [];
    const idx = this.usedIdx();
    while (this.lastUsed !== idx) {
      const a = this.used + 4 + 8 * (this.lastUsed % this.size);
      out.push({ id: this.mem.readU32(a), len: this.mem.readU32(a + 4) });
      this.lastUsed = (this.lastUsed + 1) & 0xffff;
    }
    // Linux's virtqueue_get_buf: with callbacks on, the next interrupt is wanted as soon as the
    // device uses one more (used_event = last_used_idx; ignored without EVENT_IDX).
    if (this.callbacks) this.setUsedEvent(this.lastUsed);
    return out;
  }
}

/** Register access helpers over a transport (4-byte accesses, as Linux's readl/writel). */
export class MmioDriver {
  constructor(readonly dev: BusDevice) {}

  read(off: number): number {
    const d = new Uint8Array(4);
    this.dev.read(off, d);
    return new DataView(d.buffer).getUint32(0, true);
  }
  write(off: number, v: number): void {
    const d = new Uint8Array(4);
    new DataView(d.buffer).setUint32(0, v >>> 0, true);
    this.dev.write(off, d);
  }
  status(): number {
    return this.read(REG.STATUS);
  }
  addStatus(bits: number): void {
    this.write(REG.STATUS, this.status() | bits);
  }

  deviceFeatures(): bigint {
    this.write(REG.DEVICE_FEATURES_SEL, 1);
    const hi = this.read(REG.DEVICE_FEATURES);
    this.write(REG.DEVICE_FEATURES_SEL, 0);
    const lo = this.read(REG.DEVICE_FEATURES);
    return (BigInt(hi) << 32n) | BigInt(lo);
  }

  /** vm_probe + virtio_dev_probe up to FEATURES_OK. Returns whether FEATURES_OK stuck. */
  negotiate(accept: (offered: bigint) => bigint): boolean {
    this.write(REG.STATUS, 0);
    this.addStatus(STATUS_ACKNOWLEDGE);
    this.addStatus(STATUS_DRIVER);
    const f = accept(this.deviceFeatures());
    this.write(REG.DRIVER_FEATURES_SEL, 1);
    this.write(REG.DRIVER_FEATURES, Number(f >> 32n) >>> 0);
    this.write(REG.DRIVER_FEATURES_SEL, 0);
    this.write(REG.DRIVER_FEATURES, Number(f & 0xffff_ffffn) >>> 0);
    this.addStatus(STATUS_FEATURES_OK);
    return (this.status() & STATUS_FEATURES_OK) !== 0;
  }

  /** vm_setup_vq for queue `index`. */
  setupQueue(index: number, q: MockQueue): void {
    this.write(REG.QUEUE_SEL, index);
    if (this.read(REG.QUEUE_READY) !== 0) throw new Error('queue already set up');
    const max = this.read(REG.QUEUE_NUM_MAX);
    if (max === 0 || q.size > max) throw new Error(`queue ${index}: max ${max}`);
    this.write(REG.QUEUE_NUM, q.size);
    const w64 = (lo: number, hi: number, v: number) => {
      this.write(lo, v % 0x1_0000_0000);
      this.write(hi, Math.floor(v / 0x1_0000_0000));
    };
    w64(REG.QUEUE_DESC_LOW, REG.QUEUE_DESC_HIGH, q.desc);
    w64(REG.QUEUE_DRIVER_LOW, REG.QUEUE_DRIVER_HIGH, q.avail);
    w64(REG.QUEUE_DEVICE_LOW, REG.QUEUE_DEVICE_HIGH, q.used);
    this.write(REG.QUEUE_READY, 1);
  }

  driverOk(): void {
    this.addStatus(STATUS_DRIVER_OK);
  }

  /** The driver's interrupt handler (vm_interrupt): read and acknowledge. */
  takeInterrupt(): number {
    const s = this.read(REG.INTERRUPT_STATUS);
    this.write(REG.INTERRUPT_ACK, s);
    return s;
  }
}

/**
 * The device side of a split virtqueue (virtio 1.2 §2.7).
 *
 * Ring checks: the descriptor table (16 * size, 16-aligned), the available ring (6 + 2 * size,
 * 2-aligned) and the used ring (6 + 8 * size, 4-aligned) must each lie inside one guest RAM
 * region (checked once, at activation: guest RAM never moves). Per pop: avail.idx may run at
 * most `size` ahead of the entries we consumed, and every head index must be < size; either
 * failure means the driver broke the queue, so the queue stops ("broken") and the device is
 * marked DEVICE_NEEDS_RESET by its owner.
 *
 * Notification suppression (§2.7.7, §2.7.10; issue 17). Both directions:
 * - Kicks (driver -> device). A device that drains a queue calls suppressKicks() first. Without
 *   VIRTIO_F_EVENT_IDX that sets VIRTQ_USED_F_NO_NOTIFY in used.flags; with it nothing is
 *   written: the driver kicks only when its avail.idx crosses avail_event (§2.7.10), and we
 *   move avail_event only when we run dry, so while we drain it stays behind the driver.
 *   Re-enabling is part of pop(): a pop that finds the ring empty writes avail_event =
 *   the next entry we will consume (EVENT_IDX) or clears NO_NOTIFY, then a full fence, then
 *   reads avail.idx again: a buffer the driver added between our last read and the re-enable
 *   is seen by us now, or the driver sees the re-enable and kicks (the driver does the mirror
 *   image: store avail.idx, mb, load avail_event/flags). Either way nothing is lost. So a
 *   device that pops until empty, or that stops early and schedules its own next turn, never
 *   loses a wake-up; a device that stops early and waits for a kick would hang (with or
 *   without suppression, EVENT_IDX just makes it certain). A device that never calls
 *   suppressKicks() gets exactly the same re-enable at its empty pops, which is all the
 *   EVENT_IDX contract needs from it.
 * - Interrupts (device -> driver). pushUsed() writes the used element; used.idx is stored at
 *   once unless a batch is open (beginBatch()): then once, by publishUsed() or needsInterrupt().
 *   needsInterrupt() publishes, fences, and decides: with EVENT_IDX by used_event and the used.idx
 *   at our last decision (vring_need_event: wrap-safe u16 arithmetic, §2.7.10), otherwise by
 *   VIRTQ_AVAIL_F_NO_INTERRUPT. The "last decision" index is not saved: a restored queue (or a
 *   queue with more than 65535 entries used since) always interrupts once, which is safe.
 *
 * Memory ordering (the driver runs on other CPUs): guest RAM is an mmap, not a
 * SharedArrayBuffer, so JS gives us no ordering guarantee of its own; we rely on x86 TSO plus
 * V8 keeping typed-array/DataView accesses in program order (they are effectful operations on
 * its effect chain and are not reordered with one another):
 * - loads are not reordered with loads: reading avail.idx before the ring entry and the
 *   descriptors sees them at least as new as the idx (the driver's wmb orders its side);
 * - stores are not reordered with stores: the used element is visible before used.idx;
 * - the one reordering TSO allows is a later load passing an earlier store. It matters at two
 *   points, each with a full fence between the store and the load:
 *   (1) interrupt decision: store used.idx, fence, load avail.flags / used_event (or we and the
 *       driver could both miss each other's update: lost interrupt);
 *   (2) kick re-enable: store avail_event / clear NO_NOTIFY, fence, load avail.idx (or we could
 *       miss a buffer and the driver the re-enable: lost kick, a hung queue).
 *   `fence()` is an Atomics RMW on a SharedArrayBuffer, which V8 emits as a LOCK-prefixed
 *   instruction: a full barrier on x86.
 *
 * Dirty pages (Diff snapshots): KVM's dirty log does not see the VMM's own writes to guest RAM.
 * When the memory has a device-write bitmap (GuestMemory.deviceWrites), pop() marks the pages of
 * each writable buffer it hands to a backend and remembers them until the chain is used;
 * pushUsed() marks them again (a backend may fill a held buffer after a snapshot cleared the
 * bitmap) with the used-ring page; markForSnapshot() marks every ring and every held buffer.
 * One bit set per page touched, nothing when dirty pages are not tracked.
 */
import type { DirtyPages } from '../../memory/dirty-pages.js';
import type { Access, GuestMemory } from '../../memory/guest-memory.js';
import { type Result, err, ok } from '../../util/result.js';
import { type ChainError, type DescriptorChain, DESCRIPTOR_SIZE, readChain } from './chain.js';

export const VIRTQ_AVAIL_F_NO_INTERRUPT = 1;
export const VIRTQ_USED_F_NO_NOTIFY = 1;

/**
 * vring_need_event (§2.7.10): with EVENT_IDX, is a notification due when the index moved from
 * `oldIdx` to `newIdx` and the other side asked for one at `eventIdx`? True when `eventIdx` lies
 * in [oldIdx, newIdx) modulo 2^16. Used for interrupts (used_event) and by test drivers for
 * kicks (avail_event).
 */
export function needEvent(eventIdx: number, newIdx: number, oldIdx: number): boolean {
  return ((newIdx - eventIdx - 1) & 0xffff) < ((newIdx - oldIdx) & 0xffff);
}

export interface QueueAddresses {
  size: number;
  desc: number;
  driver: number; // available ring
  device: number; // used ring
}

export interface QueueOptions {
  /** VIRTIO_F_RING_INDIRECT_DESC was negotiated. */
  indirect: boolean;
  /** QueueNumMax: sizes above it are refused. */
  maxSize: number;
  /** VIRTIO_F_RING_EVENT_IDX was negotiated (default false). */
  eventIdx?: boolean;
}

/** What one queue did about notifications (per queue; VirtioDevice sums them in metrics). */
export interface QueueNotifyCounters {
  /** Interrupts we decided to raise (needsInterrupt() true). */
  interrupts: number;
  /** Interrupts the driver did not want (NO_INTERRUPT or used_event). */
  interruptsSuppressed: number;
  /** used.idx stores (one per batch when batched). */
  usedPublishes: number;
  /** Kicks re-enabled at an empty pop (avail_event written / NO_NOTIFY cleared). */
  kickReenables: number;
  /** Re-enables that found buffers added meanwhile (the race, closed). */
  reenableRaces: number;
}

/**
 * Where the device is in a ring: what lets a restored device continue it. Both are free-running
 * u16 counters (§2.7.6, §2.7.8). Chains between nextUsed and nextAvail were taken from the
 * available ring and not yet returned (a backend holds them). With VIRTIO_F_EVENT_IDX the last
 * signalled used index is not kept: a restored queue interrupts at its first decision (safe),
 * and avail_event / used.flags live in guest RAM (the first empty pop rewrites them).
 */
export interface QueuePosition {
  /** The next available-ring entry to consume. */
  nextAvail: number;
  /** The next used-ring entry to fill; equals the used.idx we last published. */
  nextUsed: number;
}

export type PopResult =
  | { kind: 'empty' }
  | { kind: 'chain'; chain: DescriptorChain }
  /** A malformed chain: complete it with used.len 0 (it was consumed from the avail ring). */
  | { kind: 'bad-chain'; head: number; error: ChainError }
  /** The driver broke the queue: stop using it, mark the device DEVICE_NEEDS_RESET. */
  | { kind: 'broken'; message: string };

const fenceCell = new Int32Array(new SharedArrayBuffer(4));
/** A full memory barrier (see the file comment). */
export function fence(): void {
  Atomics.add(fenceCell, 0, 1);
}

function ringView(
  mem: GuestMemory,
  addr: number,
  len: number,
  align: number,
  what: string,
  access: Access,
): Result<DataView, string> {
  if (addr < 0 || addr % align !== 0)
    return err(`${what} at 0x${addr.toString(16)} is not ${align}-byte aligned`);
  const v = mem.tryView(addr, len, access);
  if (!v)
    return err(
      `${what} [0x${addr.toString(16)}, +${len}) is ${mem.refusal(addr, len, access) ?? 'unusable'}`,
    );
  return ok(new DataView(v.buffer, v.byteOffset, v.byteLength));
}

export class Virtqueue {
  /** Next avail ring entry to consume (free-running u16). */
  private lastAvail = 0;
  /** Next used ring entry to fill (free-running u16); mirrors used.idx. */
  private usedIdx = 0;
  private brokenReason: string | undefined;
  /** The head of the chain the last pop() returned (a host copy: unpop() checks this). */
  private lastPopped: number | undefined;
  /** Where device writes are marked (dirty pages tracked), captured at creation. */
  private readonly dirty: DirtyPages | undefined;
  /** With `dirty`: the writable buffers of each chain taken and not yet used, by head. */
  private readonly held: Array<Uint8Array[] | undefined> = [];
  /** VIRTIO_F_RING_EVENT_IDX negotiated. */
  private readonly eventIdx: boolean;
  /** used.idx as last stored in guest RAM (usedIdx runs ahead of it inside a batch). */
  private publishedUsed = 0;
  /** A batch is open: pushUsed() does not store used.idx. */
  private batching = false;
  /** The used.idx at the last interrupt decision (EVENT_IDX), or undefined: decide "yes". */
  private signalledUsed: number | undefined;
  /** Used entries published since the last decision (past 0xffff the u16 test is blind). */
  private sinceSignal = 0;
  /** Kicks are suppressed (NO_NOTIFY set, or with EVENT_IDX: avail_event left behind). */
  private suppressed = false;
  /** What we last wrote to avail_event (undefined: unknown, e.g. restored), EVENT_IDX only. */
  private availEventWritten: number | undefined;
  /** NO_NOTIFY may be set in used.flags (it is guest RAM: a restored queue reads it). */
  private noNotifySet: boolean;
  /**
   * Tests only: runs at an empty pop just before kicks are re-enabled, to play the driver
   * adding a buffer inside the race window (after our look at avail.idx, before the re-enable).
   */
  beforeReenableForTest: (() => void) | undefined;
  readonly notifyCounters: QueueNotifyCounters = {
    interrupts: 0,
    interruptsSuppressed: 0,
    usedPublishes: 0,
    kickReenables: 0,
    reenableRaces: 0,
  };

  private constructor(
    private readonly mem: GuestMemory,
    /** The driver's setup (guest-physical ring addresses): for an offloaded queue (QueueIo.ring). */
    readonly addresses: QueueAddresses,
    readonly size: number,
    private readonly desc: DataView,
    private readonly avail: DataView,
    private readonly used: DataView,
    private readonly indirect: boolean,
    eventIdx: boolean,
  ) {
    // Both indices start at 0 after a reset (§2.7.6, §2.7.8); whatever the ring holds is ignored.
    this.dirty = mem.deviceWrites;
    this.eventIdx = eventIdx;
    // Without EVENT_IDX a saved queue may have been suppressing kicks when it was saved: the
    // flag is in guest RAM, and the first empty pop clears it.
    this.noNotifySet = !eventIdx && (used.getUint16(0, true) & VIRTQ_USED_F_NO_NOTIFY) !== 0;
  }

  /**
   * Validates the driver's queue setup against guest RAM; the queue, or why not. `position`
   * (a restored queue) starts it where a saved one stopped instead of at 0 (a fresh activation).
   */
  static create(
    mem: GuestMemory,
    a: QueueAddresses,
    opts: QueueOptions,
    position?: QueuePosition,
  ): Result<Virtqueue, string> {
    const { size } = a;
    if (size <= 0 || size > opts.maxSize || (size & (size - 1)) !== 0)
      return err(`bad queue size ${size}`);
    if (position) {
      const { nextAvail, nextUsed } = position;
      const u16 = (v: number) => Number.isInteger(v) && v >= 0 && v <= 0xffff;
      if (!u16(nextAvail) || !u16(nextUsed))
        return err(`position ${nextAvail}/${nextUsed} is not a pair of u16 indices`);
      // Every chain taken and not yet returned came from a ring of `size` entries.
      if (((nextAvail - nextUsed) & 0xffff) > size)
        return err(
          `position: ${(nextAvail - nextUsed) & 0xffff} chains in flight on a queue of ${size}`,
        );
    }
    const d = ringView(mem, a.desc, DESCRIPTOR_SIZE * size, 16, 'descriptor table', 'read');
    if (!d.ok) return d;
    const av = ringView(mem, a.driver, 6 + 2 * size, 2, 'available ring', 'read');
    if (!av.ok) return av;
    const u = ringView(mem, a.device, 6 + 8 * size, 4, 'used ring', 'write');
    if (!u.ok) return u;
    const q = new Virtqueue(
      mem,
      { ...a },
      size,
      d.value,
      av.value,
      u.value,
      opts.indirect,
      opts.eventIdx ?? false,
    );
    if (position) {
      q.lastAvail = position.nextAvail;
      q.usedIdx = position.nextUsed;
      q.publishedUsed = position.nextUsed;
    }
    return ok(q);
  }

  /** Where the device is in the ring (save this with the device; see QueuePosition). */
  position(): QueuePosition {
    return { nextAvail: this.lastAvail, nextUsed: this.usedIdx };
  }

  /**
   * Another party served the ring (vhost) and stopped at available entry `nextAvail`: take
   * that position, with used.idx as guest RAM holds it (that party published it), so that a
   * save records where the ring stands. Nothing is held: every entry it took it used.
   */
  adopt(nextAvail: number): void {
    this.lastAvail = nextAvail & 0xffff;
    this.usedIdx = this.used.getUint16(2, true);
    this.publishedUsed = this.usedIdx;
    this.lastPopped = undefined;
    this.availEventWritten = undefined;
  }

  get broken(): string | undefined {
    return this.brokenReason;
  }

  /** Are chains available that pop() has not taken (or is the queue broken)? */
  hasAvailable(): boolean {
    if (this.brokenReason !== undefined) return true;
    return this.avail.getUint16(2, true) !== this.lastAvail;
  }

  /**
   * Kicks are not wanted until the next empty pop (the caller drains the queue, or schedules
   * its own next turn; see the file comment). Idempotent.
   */
  suppressKicks(): void {
    if (this.suppressed) return;
    this.suppressed = true;
    if (!this.eventIdx && !this.noNotifySet) {
      this.used.setUint16(0, this.used.getUint16(0, true) | VIRTQ_USED_F_NO_NOTIFY, true);
      this.noNotifySet = true;
    }
  }

  /**
   * The ring is empty as far as we know: make the driver kick for its next buffer, then look
   * again (barrier point 2 of the file comment). Returns avail.idx as read after the fence.
   */
  private reenableKicks(availIdx: number): number {
    this.beforeReenableForTest?.();
    let wrote = false;
    if (this.eventIdx) {
      if (this.availEventWritten !== this.lastAvail) {
        this.used.setUint16(4 + 8 * this.size, this.lastAvail, true);
        this.availEventWritten = this.lastAvail;
        wrote = true;
        // avail_event is device-written guest RAM (Diff snapshots).
        if (this.dirty)
          this.dirty.markAt(this.used.buffer, this.used.byteOffset + 4 + 8 * this.size, 2);
      }
    } else if (this.noNotifySet) {
      this.used.setUint16(0, this.used.getUint16(0, true) & ~VIRTQ_USED_F_NO_NOTIFY, true);
      this.noNotifySet = false;
      wrote = true;
      if (this.dirty) this.dirty.markAt(this.used.buffer, this.used.byteOffset, 2);
    }
    const wasSuppressed = this.suppressed;
    this.suppressed = false;
    if (!wrote) return availIdx;
    this.notifyCounters.kickReenables++;
    fence();
    const again = this.avail.getUint16(2, true);
    if (again !== availIdx) {
      this.notifyCounters.reenableRaces++;
      // More work after all: the caller goes on draining, still without kicks.
      if (wasSuppressed) this.suppressKicks();
    }
    return again;
  }

  /**
   * A turn that stops before it saw the ring empty (its budget) and finds nothing more: kicks
   * on again, as at an empty pop, race-free. True when buffers are available after all (kicks
   * then stay as they were: the caller must take another turn of its own).
   */
  enableKicks(): boolean {
    if (this.brokenReason !== undefined) return true;
    const availIdx = this.avail.getUint16(2, true);
    if (availIdx !== this.lastAvail) return true;
    return this.reenableKicks(availIdx) !== this.lastAvail;
  }

  /** Kicks are suppressed now (for tests and metrics). */
  get kicksSuppressed(): boolean {
    return this.suppressed;
  }

  /**
   * The next available chain, if any. Never throws for anything the guest wrote.
   * `reenableKicks` false: an empty ring is reported without re-enabling kicks (the driver
   * still need not kick), for a device that looks again itself before its turn ends; that
   * device must end the turn with a pop that re-enables (or take its own next turn), or a
   * buffer added later would never be kicked.
   */
  pop(reenableKicks = true): PopResult {
    if (this.brokenReason !== undefined) return { kind: 'broken', message: this.brokenReason };
    let availIdx = this.avail.getUint16(2, true);
    if (availIdx === this.lastAvail && reenableKicks) availIdx = this.reenableKicks(availIdx);
    const pending = (availIdx - this.lastAvail) & 0xffff;
    if (pending === 0) return { kind: 'empty' };
    if (pending > this.size) {
      return this.break(
        `avail.idx ${availIdx} is ${pending} entries ahead of ${this.lastAvail} (queue size ${this.size})`,
      );
    }
    const head = this.avail.getUint16(4 + 2 * (this.lastAvail % this.size), true);
    if (head >= this.size) return this.break(`avail ring entry ${head} >= queue size ${this.size}`);
    this.lastAvail = (this.lastAvail + 1) & 0xffff;
    const r = readChain(this.mem, this.desc, this.size, head, { indirect: this.indirect });
    this.lastPopped = r.ok ? head : undefined;
    if (r.ok && this.dirty) {
      // The buffers the backend may now write: marked now, and again when the chain is used.
      const w = r.value.writable;
      for (const v of w) this.dirty.markView(v);
      this.held[head] = w.length > 0 ? w : undefined;
    }
    return r.ok ? { kind: 'chain', chain: r.value } : { kind: 'bad-chain', head, error: r.error };
  }

  /**
   * Gives back the chain pop() returned last, unused: the next pop() returns it again (the
   * driver does not touch an available chain until it is used, §2.7.13). False, and nothing
   * changed, when `head` is not the chain the last pop() returned. Checked against our own
   * record, not the ring: a driver that rewrites the ring entry meanwhile cannot make a held
   * chain impossible to give back (the next pop() reads whatever the ring then says).
   */
  unpop(head: number): boolean {
    if (this.brokenReason !== undefined || this.lastPopped !== head) return false;
    this.lastAvail = (this.lastAvail - 1) & 0xffff;
    this.lastPopped = undefined;
    this.held[head] = undefined;
    return true;
  }

  /** Returns chain `head` to the driver with `len` bytes written (§2.7.8). */
  pushUsed(head: number, len: number): void {
    const slot = 4 + 8 * (this.usedIdx % this.size);
    this.used.setUint32(slot, head, true);
    this.used.setUint32(slot + 4, len >>> 0, true);
    this.usedIdx = (this.usedIdx + 1) & 0xffff;
    // The element is stored before the index (TSO keeps stores in order).
    if (!this.batching) this.storeUsedIdx();
    if (this.dirty) {
      const w = this.held[head];
      if (w) {
        for (const v of w) this.dirty.markView(v);
        this.held[head] = undefined;
      }
      // used.idx and the element just written (the ring's first bytes up to it: 1-3 pages).
      this.dirty.markAt(this.used.buffer, this.used.byteOffset, slot + 8);
    }
  }

  /**
   * For a snapshot: marks the descriptor table, both rings and every buffer held by a backend
   * (Firecracker marks a queue's rings the same way). No-op without dirty page tracking.
   */
  markForSnapshot(): void {
    if (!this.dirty) return;
    for (const ring of [this.desc, this.avail, this.used]) this.dirty.markView(ring);
    for (const w of this.held) if (w) for (const v of w) this.dirty.markView(v);
  }

  private storeUsedIdx(): void {
    if (this.publishedUsed === this.usedIdx) return;
    this.sinceSignal += (this.usedIdx - this.publishedUsed) & 0xffff;
    this.used.setUint16(2, this.usedIdx, true);
    this.publishedUsed = this.usedIdx;
    this.notifyCounters.usedPublishes++;
  }

  /**
   * From now until publishUsed() / needsInterrupt(), pushUsed() writes used elements only: the
   * driver sees them all at once, with one used.idx store. Idempotent.
   */
  beginBatch(): void {
    this.batching = true;
  }

  /** Stores used.idx if entries were used since it was last stored; ends a batch. */
  publishUsed(): void {
    this.batching = false;
    this.storeUsedIdx();
  }

  /** Used entries written and not yet published (inside a batch). */
  get unpublished(): number {
    return (this.usedIdx - this.publishedUsed) & 0xffff;
  }

  /**
   * After used entries were pushed: publishes used.idx (ends a batch), then decides whether the
   * driver wants an interrupt (barrier point 1 of the file comment). With EVENT_IDX the answer
   * also moves the "last signalled" index, so call it once per batch and raise what it says.
   */
  needsInterrupt(): boolean {
    this.publishUsed();
    fence();
    let want: boolean;
    if (this.eventIdx) {
      const usedEvent = this.avail.getUint16(4 + 2 * this.size, true);
      const old = this.signalledUsed;
      const blind = this.sinceSignal > 0xffff;
      this.signalledUsed = this.usedIdx;
      this.sinceSignal = 0;
      want = old === undefined || blind || needEvent(usedEvent, this.usedIdx, old);
    } else {
      want = (this.avail.getUint16(0, true) & VIRTQ_AVAIL_F_NO_INTERRUPT) === 0;
    }
    if (want) this.notifyCounters.interrupts++;
    else this.notifyCounters.interruptsSuppressed++;
    return want;
  }

  private break(message: string): PopResult {
    this.brokenReason = message;
    return { kind: 'broken', message };
  }
}

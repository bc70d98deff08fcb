/**
 * virtio-blk's Async engine (Firecracker's `io_engine: "Async"`, issue 17 part B): requests are
 * carried out by io_uring (io-uring.ts) instead of synchronously on the device worker.
 *
 * The engine serves the request queue itself (VirtioBackend.selfServed, QueueIo): a kick pops
 * the chains the driver made available, prepares one SQE per request (IORING_OP_READV/WRITEV
 * whose iovecs point straight into guest RAM, IORING_OP_FSYNC with IOSQE_IO_DRAIN for a flush,
 * so it starts only once every earlier request has completed) and submits them all with one
 * io_uring_enter; a read of BLK_ASYNC_PUNT_READ_BYTES or more is handed to io-wq at once
 * (IOSQE_ASYNC). Kicks stay off meanwhile: a turn that took chains looks at the queue again
 * after submitting them and takes what the driver queued in the meantime (as a Sync turn picks
 * up chains queued while it serves), and only a look that finds nothing turns kicks back on.
 * Otherwise (measured in the lab, fio 4 KiB random reads) a turn took ~3 requests against
 * Sync's ~7, and each turn costs a wake-up of the device worker and a guest interrupt. A turn
 * that handed a read to io-wq does not look again (see pump()). Requests that completed inside
 * that io_uring_enter (what the page cache served) are reaped at once, in the same turn; later
 * completions signal the ring's eventfd, watched on the device worker's loop. Each is written
 * into its status byte and put on the used ring, and the interrupt is raised once per batch
 * (QueueIo.notify).
 *
 * Bounds: at most `slots` requests are in flight (the ring size), and at most
 * BLK_ASYNC_BYTES_IN_FLIGHT bytes of reads and writes (a request larger than that goes in alone).
 * A guest that posts more waits on its queue (counted: io_engine_throttled_events) until
 * completions free room; no memory grows with what the guest posts, and drain() (a stop, a
 * pause for a snapshot, a reset) waits for at most that many bytes of I/O, not for 128 requests
 * of up to 32 MiB each. A kick serves at most QUEUE_BUDGET_CHAINS chains per turn, the
 * rest on the loop's next turn. Requests that do no file I/O (GET_ID, unsupported types, a
 * malformed or oversized request, a write to a read-only disk) are answered at once, as by the
 * Sync engine. The drive's rate limiter charges each request before it is submitted; one that
 * does not fit stays on the queue and the engine sleeps on a timer.
 *
 * A short read or write goes on from where it stopped (a file system may return less than asked:
 * 9p, FUSE, NFS; Sync's loop does the same); one that moves nothing (the image shrank, the disk
 * is full) is VIRTIO_BLK_S_IOERR, as for Sync. drain() waits for every request in flight: before a snapshot is saved, before the
 * image is swapped, when the driver resets the device.
 */
import { QUEUE_BUDGET_CHAINS } from '../constants.js';
import type { DescriptorChain } from '../chain.js';
import type { QueueIo } from '../device.js';
import type { Buf, EventOps } from '../descriptor.js';
import {
  IORING_FSYNC_DATASYNC,
  IORING_OP_FSYNC,
  IORING_OP_READV,
  IORING_OP_WRITEV,
  IOSQE_ASYNC,
  IOSQE_IO_DRAIN,
  HostAddresses,
  setU64,
  type IoUring,
  type UringAllow,
} from './io-uring.js';
import { VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, type ParsedRequest } from './request.js';

/** What the engine's ring may do (io-uring.ts UringAllow): the three opcodes and two flags it uses. */
export const BLK_URING_ALLOW: UringAllow = {
  ops: [IORING_OP_READV, IORING_OP_WRITEV, IORING_OP_FSYNC],
  flags: IOSQE_IO_DRAIN | IOSQE_ASYNC,
};
/** Requests in flight at most (the ring's SQ size; the CQ is twice that, so it cannot overflow). */
export const BLK_ASYNC_SLOTS = 128;
/**
 * Bytes of reads and writes in flight at most. Without it a guest could keep 128 requests of
 * BLK_MAX_REQUEST_BYTES (~32 MiB) each in flight, 4 GiB, all of which drain() waits for: the
 * kick-storm guest (hostile-storm, 256 reads of 16 MiB kept queued) made a SIGTERM take over 5 s
 * in the lab (its first teardown step timed out at 3 s with the device worker still draining).
 * 32 MiB is far above what a Linux guest's usual depth moves at once (fio's 1 MiB reads at depth
 * 4: 4 MiB) and drains in ~0.1 s at the lab's ~250 MB/s.
 */
export const BLK_ASYNC_BYTES_IN_FLIGHT = 32 * 1024 * 1024;
/**
 * Reads of at least this many bytes go straight to the kernel's io-wq workers (IOSQE_ASYNC)
 * instead of being tried inline in io_uring_enter, when another request is in flight. A read the
 * page cache can serve is otherwise copied inline, on the device worker, one request after
 * another; punted, a queue's big reads are copied by several workers at once, as QEMU's thread
 * pool does. Measured in the lab (fio, 1 MiB sequential reads, iodepth 4, 6 rounds): +4-40%
 * (+25-31% in the 3 quietest), and a small read stays inline, where it is cheapest. A lone big
 * read (nothing else in flight: queue depth 1) has nothing to overlap with, and the hand-off to
 * a worker only adds a thread switch: it stays inline (this host, the micro guest's polled
 * 64 KiB reads: 1104 MB/s punted against 1156 inline, 3 runs each). Writes are not punted: io-wq
 * runs the buffered writes to one file one at a time anyway (the lab measured no gain).
 */
export const BLK_ASYNC_PUNT_READ_BYTES = 64 * 1024;
/** Is this request handed to io-wq at once (IOSQE_ASYNC), with `inFlight` others in flight? */
const punts = (kind: Slot['kind'], length: number, inFlight: number) =>
  kind === 'read' && length >= BLK_ASYNC_PUNT_READ_BYTES && inFlight > 0;
const IOVEC_SIZE = 16;

/** What the engine needs of its BlockDevice. */
export interface AsyncBlockHost {
  readonly name: string;
  readonly readOnly: boolean;
  /** The image's fd now (PATCH /drives may change it: only after drain()). */
  fd(): number;
  /** Data segments of one request at most (seg_max). */
  readonly maxSegments: number;
  parse(chain: DescriptorChain): ParsedRequest;
  /** Serves a request that does no file I/O; returns used.len. */
  serveInline(p: ParsedRequest): number;
  /** The rate limiter's answer for a well-formed request: 0 go (charged), else ms to wait. */
  charge(p: ParsedRequest): number;
  /** A throttled request's wake-up. */
  throttleWoke(): void;
  completed(kind: 'read' | 'write' | 'flush', bytes: number): void;
  failed(kind: string, message: string): void;
}

interface Slot {
  head: number;
  kind: 'read' | 'write' | 'flush';
  length: number;
  /** Bytes done so far (a short read or write is resubmitted for the rest). */
  done: number;
  /** The request's file offset (read and write). */
  offset: number;
  status: Uint8Array;
  /** The guest buffers the iovecs point into (kept referenced until the I/O completes). */
  data: Uint8Array[];
  /** Handed to io-wq (IOSQE_ASYNC), decided when it started; a short transfer's rest too. */
  punt: boolean;
}

export interface AsyncCounters {
  /**
   * A request waited on its queue because every slot was in flight, or because it would have
   * taken the bytes in flight over BLK_ASYNC_BYTES_IN_FLIGHT.
   */
  ringFull: number;
  inFlight: number;
  /** Bytes of the reads and writes in flight. */
  bytesInFlight: number;
  inFlightHighWater: number;
  /** io_uring_enter calls that submitted (one per kick or completion batch). */
  submits: number;
  /** Requests submitted. */
  submitted: number;
  /** Short reads or writes resubmitted for their rest. */
  shortResubmits: number;
  /**
   * Further rounds of a turn that took chains: after submitting what it took, the turn looked
   * at the queue again (kicks still off) and found more the driver had queued meanwhile.
   */
  rounds: number;
}

const EAGAIN_ERRNO = 11;

const ERRNO: Record<number, string> = {
  1: 'EPERM',
  5: 'EIO',
  9: 'EBADF',
  11: 'EAGAIN',
  14: 'EFAULT',
  22: 'EINVAL',
  27: 'EFBIG',
  28: 'ENOSPC',
  30: 'EROFS',
  122: 'EDQUOT',
};

export class AsyncBlockEngine {
  readonly counters: AsyncCounters = {
    ringFull: 0,
    inFlight: 0,
    bytesInFlight: 0,
    inFlightHighWater: 0,
    submits: 0,
    submitted: 0,
    shortResubmits: 0,
    rounds: 0,
  };
  private readonly slots: Array<Slot | undefined>;
  private readonly freeSlots: number[] = [];
  /** One iovec array per slot (maxSegments entries each), at a fixed host address. */
  private readonly iov: DataView;
  private readonly iovAddr: number;
  private readonly addresses: HostAddresses;
  private io: QueueIo | undefined;
  private readonly tag: number;
  /** The rate limiter's sleep, or the next turn after the budget, or a submit retry. */
  private timer: (() => void) | undefined;
  private sleeping = false;

  constructor(
    private readonly host: AsyncBlockHost,
    readonly ring: IoUring,
    private readonly loop: EventOps,
    bufferAddress: (b: Buf) => bigint,
    slots = BLK_ASYNC_SLOTS,
    private readonly maxBytesInFlight = BLK_ASYNC_BYTES_IN_FLIGHT,
  ) {
    const n = Math.min(slots, ring.sq.entries);
    this.slots = new Array<Slot | undefined>(n).fill(undefined);
    for (let i = n - 1; i >= 0; i--) this.freeSlots.push(i);
    const iovBuf = new ArrayBuffer(n * host.maxSegments * IOVEC_SIZE);
    this.iov = new DataView(iovBuf);
    this.iovAddr = Number(bufferAddress(iovBuf));
    this.addresses = new HostAddresses(bufferAddress);
    this.tag = loop.add(ring.eventFd, { process: () => this.onCompletions() });
  }

  get inFlight(): number {
    return this.counters.inFlight;
  }

  activate(io: QueueIo): void {
    this.io = io;
  }

  /** The driver reset the device: in-flight requests finish (their results are dropped). */
  deactivate(): void {
    this.io = undefined;
    this.cancelTimer();
    this.drain();
  }

  /** The queue was kicked. */
  kick(): void {
    this.pump();
  }

  /** The rate limiter changed: a sleep on the old limits ends now. */
  wake(): void {
    if (!this.sleeping) return;
    this.cancelTimer();
    this.timer = this.loop.setTimer(0, () => {
      this.timer = undefined;
      this.pump();
    });
  }

  /**
   * Waits until no request is in flight, completing each onto the used ring (when active).
   * Blocks the device worker (the vCPUs are paused, or the device is being reset).
   */
  drain(): void {
    if (this.counters.inFlight === 0) return;
    while (this.counters.inFlight > 0) {
      try {
        this.ring.enter(1);
      } catch (e) {
        if ((e as { code?: string }).code !== 'EINTR') throw e;
      }
      this.reap();
    }
    this.io?.notify(0);
  }

  /** Closes the ring (the device worker is ending). */
  close(): void {
    this.cancelTimer();
    if (this.counters.inFlight > 0) this.drain();
    this.loop.remove(this.tag);
    this.ring.close();
  }

  private cancelTimer(): void {
    this.timer?.();
    this.timer = undefined;
    this.sleeping = false;
  }

  /**
   * Takes chains off the queue into the ring until it is empty, the ring full or the budget
   * used, and submits them. What the page cache could serve completes inside io_uring_enter:
   * it is answered in this same turn (one interrupt with the rest), not on the eventfd's wake-up
   * a loop round later, and the slots it frees take the chains still waiting.
   */
  private pump(): void {
    const io = this.io;
    if (!io || this.timer) return;
    let taken = 0;
    // A read handed to io-wq was taken: see below.
    let punted = false;
    for (let round = 0; ; round++) {
      let waiting = false; // a chain waits on the queue for a free slot
      let took = 0; // chains taken in this round
      let done = false; // the ring was found empty with kicks re-enabled: the turn ends
      for (;;) {
        if (this.freeSlots.length === 0 || this.ring.sq.free === 0) {
          const c = io.pop(0);
          waiting = c !== undefined && io.unpop(0, c.head);
          break;
        }
        if (taken >= QUEUE_BUDGET_CHAINS) {
          const c = io.pop(0);
          if (c && io.unpop(0, c.head)) this.later(0, false);
          break;
        }
        // The ring looks empty: after a round that took chains, kicks stay off, and the next
        // round looks again once they are submitted (the driver goes on queueing while we do
        // the I/O, as it does during a Sync turn); only a round that finds nothing turns them
        // back on, with the race-free look of a re-enabling pop. Not once a read went to io-wq:
        // that I/O is not done while we submit, and the lab measured 1 MiB sequential reads
        // 0.95x QEMU's with the second look against 1.02x without (5 rounds each), so the turn
        // ends as before, kicks on at the first empty pop.
        let chain = io.pop(0, false);
        if (!chain) {
          if (took > 0 && !punted) break;
          chain = io.pop(0);
          if (!chain) {
            done = true;
            break;
          }
        }
        const p = this.host.parse(chain);
        // Over the bytes in flight: it waits on the queue, uncharged, for completions (a request
        // larger than the bound goes in once nothing else is in flight).
        const q = p.ok ? p.request : undefined;
        const bytes =
          q?.type === 'read' || (q?.type === 'write' && !this.host.readOnly) ? q.length : 0;
        const inFlightBytes = this.counters.bytesInFlight;
        if (
          bytes > 0 &&
          inFlightBytes > 0 &&
          inFlightBytes + bytes > this.maxBytesInFlight &&
          io.unpop(0, chain.head)
        ) {
          waiting = true;
          break;
        }
        taken++;
        if (++took === 1 && round > 0) this.counters.rounds++;
        // Charged as the Sync engine's admit() does: every well-formed request, before any I/O.
        const wait = p.ok ? this.host.charge(p) : 0;
        if (wait > 0 && io.unpop(0, chain.head)) {
          this.later(wait, true);
          break;
        }
        const r = p.ok ? p.request : undefined;
        const fileIo =
          r !== undefined &&
          (r.type === 'read' ||
            ((r.type === 'write' || r.type === 'flush') && !this.host.readOnly));
        if (fileIo) {
          if (this.start(chain.head, p as ParsedRequest & { ok: true })) punted = true;
        } else io.pushUsed(0, chain.head, this.host.serveInline(p));
      }
      this.submit();
      if (this.ring.cq.ready > 0) {
        // The eventfd is reset before the reap: a completion posted after it still wakes the
        // loop, and one posted before it is reaped here.
        this.ring.clearEvent();
        this.reapAll();
        // A short transfer's rest went back on the SQ.
        if (this.ring.sq.unsubmitted > 0) this.submit();
        if (waiting && this.freeSlots.length > 0 && this.ring.sq.free > 0 && !this.timer) continue;
      }
      if (waiting) this.counters.ringFull++;
      // A round that took chains and stopped at an empty ring looks again (kicks still off).
      // It stopped on the ring being full (waiting), the budget or the rate limiter (a timer):
      // completions or the timer take the queue up again.
      if (done || waiting || this.timer || took === 0) break;
    }
    io.notify(0);
  }

  private later(ms: number, throttled: boolean): void {
    this.sleeping = throttled;
    this.timer = this.loop.setTimer(ms, () => {
      this.timer = undefined;
      if (this.sleeping) {
        this.sleeping = false;
        this.host.throttleWoke();
      }
      this.pump();
    });
  }

  /** Starts a file request in a free slot; true when it was handed to io-wq. */
  private start(head: number, p: ParsedRequest & { ok: true }): boolean {
    const r = p.request;
    const index = this.freeSlots.pop()!;
    const fd = this.host.fd();
    let pushed: boolean;
    if (r.type === 'read' || r.type === 'write') {
      const slot: Slot = {
        head,
        kind: r.type,
        length: r.length,
        done: 0,
        offset: r.offset,
        status: p.status,
        data: r.data,
        punt: punts(r.type, r.length, this.counters.inFlight),
      };
      this.slots[index] = slot;
      pushed = this.pushRw(index, slot);
    } else {
      this.slots[index] = {
        head,
        kind: 'flush',
        length: 0,
        done: 0,
        offset: 0,
        status: p.status,
        data: [],
        punt: false,
      };
      pushed = this.ring.sq.push({
        opcode: IORING_OP_FSYNC,
        flags: IOSQE_IO_DRAIN,
        fd,
        opFlags: IORING_FSYNC_DATASYNC,
        userData: index,
      });
    }
    // pump() checked sq.free; the SQ is consumed whole by every io_uring_enter.
    if (!pushed) throw new Error('io_uring SQ full with a free request slot');
    const c = this.counters;
    c.inFlight++;
    c.bytesInFlight += this.slots[index]!.length;
    c.submitted++;
    if (c.inFlight > c.inFlightHighWater) c.inFlightHighWater = c.inFlight;
    return this.slots[index]!.punt;
  }

  /** The SQE for what is left of a read or write (all of it the first time). */
  private pushRw(index: number, slot: Slot): boolean {
    const at = index * this.host.maxSegments * IOVEC_SIZE;
    let skip = slot.done;
    let n = 0;
    for (const seg of slot.data) {
      if (skip >= seg.length) {
        skip -= seg.length;
        continue;
      }
      const o = at + n * IOVEC_SIZE;
      setU64(this.iov, o, this.addresses.of(seg) + skip);
      setU64(this.iov, o + 8, seg.length - skip);
      skip = 0;
      n++;
    }
    return this.ring.sq.push({
      opcode: slot.kind === 'read' ? IORING_OP_READV : IORING_OP_WRITEV,
      flags: slot.punt ? IOSQE_ASYNC : 0,
      fd: this.host.fd(),
      offset: slot.offset + slot.done,
      addr: this.iovAddr + at,
      len: n,
      userData: index,
    });
  }

  private submit(): void {
    if (this.ring.sq.unsubmitted === 0) return;
    try {
      this.ring.enter();
      this.counters.submits++;
    } catch (e) {
      const code = (e as { code?: string }).code;
      // Transient (no memory for the requests now, or completions must be reaped first): the
      // SQEs stay published; the next completion or this retry submits them.
      if (code !== 'EAGAIN' && code !== 'EBUSY' && code !== 'EINTR') throw e;
      this.host.failed(
        'submit',
        `${this.host.name}: io_uring_enter: ${code}; retrying (logged once)`,
      );
      if (!this.timer) this.later(1, false);
    }
  }

  private onCompletions(): void {
    this.ring.clearEvent();
    this.reap();
    // The completions freed slots: requests waiting on the queue go in now (and what a
    // completion's retry left unsubmitted).
    if (this.io) this.pump();
    else this.submit();
  }

  private reap(): void {
    this.reapAll();
    this.io?.notify(0);
  }

  /** Every completion ready (and any the kernel held back on overflow) onto the used ring. */
  private reapAll(): void {
    do {
      this.ring.cq.reap((userData, res) => this.complete(userData, res));
      if (this.ring.cqOverflowed) this.ring.enter();
    } while (this.ring.cq.ready > 0);
  }

  private complete(index: number, res: number): void {
    const slot = this.slots[index];
    if (!slot) {
      this.host.failed(
        'cqe',
        `${this.host.name}: io_uring completion for unknown slot ${index} (logged once)`,
      );
      return;
    }
    if (slot.kind !== 'flush' && res > 0 && slot.done + res < slot.length) {
      // Short: the rest goes in as a request of its own in the same slot. The SQ holds a slot's
      // SQE at most once and every io_uring_enter consumes it whole, so there is room.
      slot.done += res;
      this.counters.shortResubmits++;
      if (this.pushRw(index, slot)) return;
      res = -EAGAIN_ERRNO;
    }
    this.slots[index] = undefined;
    this.freeSlots.push(index);
    this.counters.inFlight--;
    this.counters.bytesInFlight -= slot.length;
    let code = VIRTIO_BLK_S_OK;
    let len = 0;
    if (res < 0) {
      code = VIRTIO_BLK_S_IOERR;
      this.host.failed(
        'io',
        `${this.host.name}: host I/O error (logged once): ${slot.kind}: ${ERRNO[-res] ?? `errno ${-res}`}`,
      );
    } else if (slot.kind !== 'flush' && slot.done + res !== slot.length) {
      code = VIRTIO_BLK_S_IOERR;
      this.host.failed(
        'io',
        `${this.host.name}: host I/O error (logged once): short ${slot.kind}: ${slot.done + res} of ${slot.length} bytes (the image shrank or the disk is full?)`,
      );
    } else {
      this.host.completed(slot.kind, slot.length);
      if (slot.kind === 'read') len = slot.length;
    }
    slot.status[0] = code;
    this.io?.pushUsed(0, slot.head, len + 1);
  }
}

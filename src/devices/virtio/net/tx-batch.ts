/**
 * Batched TAP writes for virtio-net TX (issue 17): the frames of one turn of the TX queue go to
 * the TAP with one io_uring_enter instead of one writev each. A TAP takes one frame per write
 * and has no sendmmsg; io_uring's IORING_OP_WRITEV is the kernel's way to hand it several in one
 * system call (the native shim has io_uring_setup/enter/register, block/io-uring.ts drives the
 * rings in TypeScript).
 *
 * Synchronous per turn: add() writes one SQE per frame (its iovecs: our header copy, then the
 * guest's buffers, zero-copy) and flush() submits them all and waits for every completion before
 * it returns. VirtioDevice calls NetDevice.endTurn() -> flush() before it publishes the turn's
 * used entries, so the driver never sees a chain as used while the kernel may still read it,
 * and nothing is in flight between turns (snapshots, resets and the rate limiter see the same
 * device as with writev).
 *
 * Order and errors as writev's: SQEs without IOSQE_IO_LINK are issued in ring order by
 * io_uring_enter itself; a TAP write never sleeps (the fd is O_NONBLOCK, which io_uring
 * honours: a full TAP queue completes with -EAGAIN, the frame is dropped and counted, as writev's
 * -1 is), so each frame is written inline, in order, during the one system call.
 *
 * Bounds: at most TX_BATCH_FRAMES frames per flush (the ring's SQ size) and TX_BATCH_IOVECS
 * buffers per frame (a Linux TSO frame is at most 1 + MAX_SKB_FRAGS (17) + 1 buffers); a frame
 * with more is refused by add() and written on its own by the caller, after a flush (order).
 */
import type { Buf } from '../descriptor.js';
import {
  HostAddresses,
  IORING_OP_WRITEV,
  setU64,
  type IoUring,
  type UringAllow,
} from '../block/io-uring.js';
import { NET_HDR_SIZE } from './header.js';

/** What a TX batch's ring may do (io-uring.ts UringAllow): WRITEV, no SQE flag. */
export const TX_URING_ALLOW: UringAllow = { ops: [IORING_OP_WRITEV], flags: 0 };
/** Frames per io_uring_enter at most (QUEUE_BUDGET_CHAINS: a whole turn of the TX queue). */
export const TX_BATCH_FRAMES = 64;
/** Buffers of one frame in a batch at most (the header copy included). */
export const TX_BATCH_IOVECS = 32;
const IOVEC_SIZE = 16;
const EAGAIN = 11;

/** What NetDevice needs of a batch (a fake in tests; UringTxBatch on a TAP). */
export interface TxBatch {
  /**
   * Queues one frame: `iov[0]` is the 12-byte header (copied here, so the caller may reuse it at
   * once), `iov[1..]` the frame's `frameLen` bytes (referenced until flush() returns). False
   * when the batch is full or the frame has too many buffers: nothing was queued.
   */
  add(iov: readonly Uint8Array[], frameLen: number): boolean;
  /**
   * Writes every queued frame and waits for them; `done(frameLen, res)` per frame, in order
   * (res: bytes written, or -errno). Throws (the frames not reported are lost) on a failure of
   * the batch itself; the device then breaks, as on a failed TAP write.
   */
  flush(done: (frameLen: number, res: number) => void): void;
  /** Frames queued and not flushed. */
  readonly pending: number;
  /** False once closed (or after a failed flush): add() refuses every frame. */
  readonly open: boolean;
  close(): void;
}

/** Counters of a UringTxBatch (metrics: tx_batches, tx_batch_frames_max). */
export interface TxBatchCounters {
  /** io_uring_enter calls that wrote frames (one per flush). */
  batches: number;
  /** Frames written through batches. */
  frames: number;
  /** The most frames of one flush. */
  maxFrames: number;
}

export class UringTxBatch implements TxBatch {
  readonly counters: TxBatchCounters = { batches: 0, frames: 0, maxFrames: 0 };
  private readonly hdrs: Uint8Array;
  private readonly hdrsAddr: number;
  private readonly iov: DataView;
  private readonly iovAddr: number;
  private readonly lens = new Int32Array(TX_BATCH_FRAMES);
  private readonly results = new Int32Array(TX_BATCH_FRAMES);
  private readonly seen = new Uint8Array(TX_BATCH_FRAMES);
  private readonly addresses: HostAddresses;
  private n = 0;
  private closed = false;

  constructor(
    private readonly ring: IoUring,
    private readonly fd: number,
    bufferAddress: (b: Buf) => bigint,
  ) {
    if (ring.sq.entries < TX_BATCH_FRAMES || ring.cq.entries < TX_BATCH_FRAMES)
      throw new RangeError(`a TX batch needs an io_uring of ${TX_BATCH_FRAMES} entries`);
    const hdrs = new ArrayBuffer(TX_BATCH_FRAMES * NET_HDR_SIZE);
    this.hdrs = new Uint8Array(hdrs);
    this.hdrsAddr = Number(bufferAddress(hdrs));
    const iov = new ArrayBuffer(TX_BATCH_FRAMES * TX_BATCH_IOVECS * IOVEC_SIZE);
    this.iov = new DataView(iov);
    this.iovAddr = Number(bufferAddress(iov));
    this.addresses = new HostAddresses(bufferAddress);
  }

  get pending(): number {
    return this.n;
  }

  /** False once closed (by close(), or by a failed flush): add() refuses every frame. */
  get open(): boolean {
    return !this.closed;
  }

  add(iov: readonly Uint8Array[], frameLen: number): boolean {
    if (this.closed || this.n >= TX_BATCH_FRAMES || iov.length > TX_BATCH_IOVECS) return false;
    if (iov.length === 0 || iov[0]!.length !== NET_HDR_SIZE)
      throw new RangeError('a TX batch frame starts with its 12-byte header');
    const slot = this.n;
    this.hdrs.set(iov[0]!, slot * NET_HDR_SIZE);
    const at = slot * TX_BATCH_IOVECS * IOVEC_SIZE;
    setU64(this.iov, at, this.hdrsAddr + slot * NET_HDR_SIZE);
    setU64(this.iov, at + 8, NET_HDR_SIZE);
    let k = 1;
    for (let i = 1; i < iov.length; i++) {
      const b = iov[i]!;
      if (b.length === 0) continue;
      setU64(this.iov, at + k * IOVEC_SIZE, this.addresses.of(b));
      setU64(this.iov, at + k * IOVEC_SIZE + 8, b.length);
      k++;
    }
    // offset -1: the file position, which a TAP ignores (a memfd in tests appends).
    if (
      !this.ring.sq.push({
        opcode: IORING_OP_WRITEV,
        fd: this.fd,
        offset: -1,
        addr: this.iovAddr + at,
        len: k,
        userData: slot,
      })
    )
      throw new Error('io_uring SQ full inside a TX batch');
    this.lens[slot] = frameLen;
    this.n++;
    return true;
  }

  flush(done: (frameLen: number, res: number) => void): void {
    const want = this.n;
    if (want === 0) return;
    this.n = 0;
    let got = 0;
    const { results, seen } = this;
    seen.fill(0, 0, want);
    while (got < want) {
      try {
        this.ring.enter(want - got);
      } catch (e) {
        // A signal: the SQEs not consumed are still published; go on. Anything else: the ring
        // is closed (the kernel drops what it holds: no stale SQE is ever submitted later) and
        // the caller writes with writev from now on.
        if ((e as { code?: string }).code !== 'EINTR') {
          this.close();
          throw e;
        }
      }
      this.ring.cq.reap((slot, res) => {
        if (slot < want && seen[slot] === 0) {
          seen[slot] = 1;
          results[slot] = res;
          got++;
        }
      });
    }
    const c = this.counters;
    c.batches++;
    c.frames += want;
    if (want > c.maxFrames) c.maxFrames = want;
    for (let i = 0; i < want; i++) done(this.lens[i]!, results[i]!);
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.n = 0;
    this.ring.close();
  }
}

/** -EAGAIN: the TAP's queue is full (the frame is dropped, as writev's -1). */
export const isTapFull = (res: number): boolean => res === -EAGAIN;

/**
 * virtio-net (device ID 1, virtio 1.2 §5.1) over a host TAP opened with IFF_VNET_HDR and a
 * vnet header size of 12, so every frame crosses between guest RAM and the TAP with its
 * virtio_net_hdr_v1 in front, zero-copy (readv/writev straight on the descriptor views).
 *
 * Queues: 0 = receiveq (host -> guest), 1 = transmitq. No control queue, no multiqueue.
 *
 * RX is driven by the TAP, not by kicks (selfServed): when the TAP is readable we take the
 * next RX chain and readv the frame into it. Back-pressure: when the guest has no RX buffer,
 * we stop watching the TAP for EPOLLIN (frames wait in the TAP's queue, in the kernel) until
 * the RX queue is kicked. A chain taken when the TAP had nothing after all is held for the next
 * frame, never lost. A frame longer than the guest's buffer (only with buffers smaller than the
 * negotiated features allow) lands partly in a spill buffer; it is returned with used.len 0 and
 * counted in rxTooLarge.
 *
 * Offloads: when the TAP accepts TUNSETOFFLOAD, we offer CSUM/HOST_TSO4/HOST_TSO6 (the guest
 * may hand us partial checksums and TSO frames: the TAP takes them as they are) and
 * GUEST_CSUM/GUEST_TSO4/GUEST_TSO6 (the TAP may hand us such frames); at activation the TAP's
 * offloads are set to exactly what the guest accepted for RX. UFO/USO and ECN are not offered.
 * VIRTIO_NET_F_MRG_RXBUF is not offered: with GUEST_TSO and no MRG_RXBUF, Linux posts 64 KiB
 * "big packet" chains, so every frame fits one chain and num_buffers is always 1.
 *
 * Against a hostile driver (issue 12):
 * - TX: the 12-byte header is copied out of guest memory once; that copy is what is checked
 *   and what the TAP is given (then the rest of the chain), so a second vCPU rewriting the
 *   header after the check cannot change what is sent.
 * - The TAP takes at most TAP_MAX_IOVECS buffers per readv/writev (the native shim's limit):
 *   an RX chain with more writable buffers than that (with the spill buffer) is returned with
 *   used.len 0 and counted (rx_chain_too_long), never held; a TX chain with more readable
 *   buffers is copied into one host buffer first.
 * - A TAP read that fails for any reason but "nothing waits" is a host failure: the chain is
 *   returned with used.len 0 and the exception breaks the device (DEVICE_NEEDS_RESET), which
 *   stops watching the TAP: no wake-up repeats without progress.
 * - RX serves at most NET_RX_BUDGET_FRAMES frames per wake-up (<= 4 MiB), then waits for the
 *   next round of the loop (the TAP, still readable, wakes it again: level-triggered epoll).
 *
 * Notifications (issue 17): TX is drained by VirtioDevice (kicks suppressed while it drains,
 * one interrupt per turn). RX publishes the frames of one wake-up together with at most one
 * interrupt, and suppresses RX kicks while it has buffers: the driver kicks RX only after we
 * ran out (the empty pop re-enables them), which is the one kick RX needs (back-pressure).
 *
 * Early TX completion (issue 17, off by default: TYPERVISOR_NET_TX_EARLY=1): handle() copies
 * each frame (our checked header copy, then the frame) out of guest memory, VirtioDevice
 * publishes the turn's used entries and sends its interrupt, and afterTurn() writes the copies
 * to the TAP, in order, before the loop goes on: the host's work inside the TAP write (bridge, TCP receive) overlaps the guest's next
 * frames instead of delaying its completions, and the guest's buffers are not read after their
 * chains went back. At most TX_EARLY_FRAMES copies wait (8 x 64 KiB, kept); a longer turn writes
 * each full group first. Measured in the lab beside the build without it (docs/bench.md): ping
 * 7.0 against 9.6 ms, guest -> host the same (233 against 238 Mbit/s), 3 rounds; not yet shown
 * to pay for its copy, hence off. Off: zero-copy as below.
 *
 * Batching (issue 17): the frames of one TX turn are written to the TAP with one io_uring_enter
 * (tx-batch.ts; TapIo.txBatch), at the end of the turn (endTurn; with early completion, at the
 * end of afterTurn): nothing is in flight between turns. Without io_uring, one writev per
 * frame. Per frame, TX and RX build no arrays (one reused array per direction, emptied after each
 * TAP call) and the TX header is parsed into one reused object.
 * RX stays one readv per frame: batching reads of a TAP (io_uring READV per posted chain) would
 * need completions that may come later (a TAP read waits for a frame), i.e. chains held across
 * turns, an eventfd on the loop and a drain before snapshots, as virtio-blk's Async engine has;
 * not done (see docs/bench.md, network).
 *
 * Rate limiting (issue 16, Firecracker's rx_rate_limiter / tx_rate_limiter): a frame takes 1
 * ops token and its Ethernet bytes (without the virtio-net header). TX: a frame that does not
 * fit stays on the TX queue, which sleeps until it does (VirtioDevice, admit()). RX: the frame
 * is read into the guest's chain first (its size is known only then); if it does not fit, the
 * chain is held with the frame in it and not returned (Firecracker's deferred frame), the TAP
 * is not watched, and a timer of the worker's loop delivers it when the tokens are there. A
 * snapshot taken meanwhile gives that chain back empty: the frame is dropped (counted).
 */
import {
  bool,
  bytes as bytesCodec,
  PersistError,
  struct,
  versioned,
} from '../../../util/persist.js';
import { RateLimiter, type RateLimiterConfig, monotonicMs } from '../rate-limiter.js';
import type { DescriptorChain } from '../chain.js';
import { gather, scatter } from '../chain.js';
import { QUEUE_SIZE_MAX, VIRTIO_F_RING_INDIRECT_DESC, bit } from '../constants.js';
import type { QueueIo, VirtioBackend } from '../device.js';
import type { VirtioDeviceIdentity } from '../mmio-state.js';
import { isTapFull, type TxBatch } from './tx-batch.js';
import {
  MAX_FRAME_WITH_HDR,
  NET_HDR_SIZE,
  readNetHeader,
  txHeaderError,
  type NetHeader,
  type TxOffloads,
} from './header.js';

export const DEVICE_ID_NET = 1;
export const RX_QUEUE = 0;
export const TX_QUEUE = 1;

export const VIRTIO_NET_F_CSUM = 0;
export const VIRTIO_NET_F_GUEST_CSUM = 1;
export const VIRTIO_NET_F_MAC = 5;
export const VIRTIO_NET_F_GUEST_TSO4 = 7;
export const VIRTIO_NET_F_GUEST_TSO6 = 8;
export const VIRTIO_NET_F_HOST_TSO4 = 11;
export const VIRTIO_NET_F_HOST_TSO6 = 12;
export const VIRTIO_NET_F_MRG_RXBUF = 15;

// TUN offload flags (linux/if_tun.h), decided here, applied by the host side.
export const TUN_F_CSUM = 0x01;
export const TUN_F_TSO4 = 0x02;
export const TUN_F_TSO6 = 0x04;

/**
 * Frames per RX wake-up before yielding to other devices (level-triggered epoll comes back);
 * with frames of at most MAX_FRAME_WITH_HDR bytes, at most 4 MiB per wake-up.
 */
export const NET_RX_BUDGET_FRAMES = 64;

/** Buffers per readv/writev at most (native/typervisor.c, rw_vec: "too many iovecs"). */
export const TAP_MAX_IOVECS = 1024;

/** The host side of the TAP (the device worker's fd; tests inject a fake). */
export interface TapIo {
  /**
   * Reads one frame (with its vnet header) into at most TAP_MAX_IOVECS buffers: bytes, or -1
   * when none waits. Throws on errors.
   */
  readv(buffers: Uint8Array[]): number;
  /**
   * Writes one frame (with its vnet header) from at most TAP_MAX_IOVECS buffers: bytes, or -1
   * when it would block. Throws on errors.
   */
  writev(buffers: Uint8Array[]): number;
  /** TUNSETOFFLOAD. Throws when the TAP refuses. */
  setOffload(flags: number): void;
  /** Watch (or stop watching) the TAP for readable frames. */
  setReadInterest(on: boolean): void;
  /**
   * Batched TX writes (tx-batch.ts: io_uring), when available: the frames of a TX turn are
   * queued and written together at its end (endTurn). Absent: one writev per frame.
   */
  readonly txBatch?: TxBatch;
}

/**
 * Something that answers some of the guest's TX frames itself instead of the TAP (the MMDS
 * responder, src/mmds/responder.ts): it sees each TX frame's first INTERCEPT_PEEK bytes, takes
 * the frames it wants (a host copy), and queues its answers, which RX serves ahead of the TAP.
 */
export interface FrameInterceptor {
  wants(head: Uint8Array): boolean;
  /** `csumPartial`: the guest left the L4 checksum to the device (VIRTIO_NET_HDR_F_NEEDS_CSUM). */
  handleFrame(frame: Uint8Array, csumPartial: boolean): void;
  takeReply(): Uint8Array | undefined;
  readonly queued: number;
}

/** Bytes of a TX frame an interceptor's wants() sees: Ethernet + an ARP packet. */
export const INTERCEPT_PEEK = 42;

/** virtio-net's own saved state (see NetDevice.save). */
export const NetStateV1 = versioned('virtio-net', 1, struct({ heldRx: bool }));
/** Version 2 adds the rate limiters' buckets (version 1 still loads: no limiter state). */
export const NetStateV2 = versioned(
  'virtio-net',
  2,
  struct({ heldRx: bool, rxLimiter: bytesCodec(4096), txLimiter: bytesCodec(4096) }),
);

/** Rate limiting of a NetDevice (all optional: no limits). */
export interface NetLimitOptions {
  rx?: RateLimiterConfig;
  tx?: RateLimiterConfig;
  /** The worker loop's timer (RX sleeps on it while throttled). */
  setTimer?: (ms: number, fn: () => void) => () => void;
  /** The limiters' clock in ms (default: monoMs, util/clock.ts). */
  now?: () => number;
  /**
   * Early TX completion (issue 17; default off, TYPERVISOR_NET_TX_EARLY=1 turns it on): a
   * turn's frames are copied out of guest memory, their chains go back to the guest with the
   * turn's interrupt, and then the copies go to the TAP. Off: each frame goes to the TAP
   * straight from guest memory (zero-copy) before its chain goes back.
   */
  txEarly?: boolean;
}

export interface NetCounters {
  rxFrames: number;
  rxBytes: number;
  txFrames: number;
  txBytes: number;
  /** Frames larger than the guest's RX buffer (dropped, counted). */
  rxTooLarge: number;
  /** TX chains refused: bad header, too short, too long, writable-only. */
  txBad: number;
  /** TX frames the TAP refused or could not take. */
  txErrors: number;
  /** Times RX stopped watching the TAP because the guest had no buffer. */
  rxBackPressure: number;
  /** RX chains with more buffers than the TAP takes in one read: returned unused. */
  rxChainTooLong: number;
  /** TX chains with more buffers than the TAP takes in one write: copied, then sent. */
  txCoalesced: number;
  /** RX wake-ups that stopped at NET_RX_BUDGET_FRAMES with frames maybe waiting. */
  rxBudgetYields: number;
  /** Frames the RX / TX rate limiter held back (rx/tx_rate_limiter_throttled). */
  rxThrottled: number;
  txThrottled: number;
  /** Throttled RX / TX resumed after their sleep (rx_event_rate_limiter_count, tx_...). */
  rxThrottleEvents: number;
  txThrottleEvents: number;
  /** RX frames held by the limiter and dropped by a snapshot (rate_limiter_dropped_bytes is bytes). */
  rxThrottledDropped: number;
  /** RX served at the end of a TX turn that wrote frames (rxAfterTx). */
  rxAfterTx: number;
}

export function parseMac(s: string): Uint8Array {
  const parts = s.split(':');
  if (parts.length !== 6 || parts.some((p) => !/^[0-9a-fA-F]{2}$/.test(p)))
    throw new Error(`bad MAC address ${s}`);
  return Uint8Array.from(parts.map((p) => parseInt(p, 16)));
}

/** Features and config space; `offloads`: the TAP accepted TUNSETOFFLOAD. */
export function netIdentity(mac: Uint8Array | undefined, offloads: boolean): VirtioDeviceIdentity {
  const config = new Uint8Array(12); // mac[6], status u16, max_virtqueue_pairs u16, mtu u16
  let features = bit(VIRTIO_F_RING_INDIRECT_DESC);
  if (mac) {
    config.set(mac, 0);
    features |= bit(VIRTIO_NET_F_MAC);
  }
  if (offloads) {
    for (const f of [
      VIRTIO_NET_F_CSUM,
      VIRTIO_NET_F_GUEST_CSUM,
      VIRTIO_NET_F_GUEST_TSO4,
      VIRTIO_NET_F_GUEST_TSO6,
      VIRTIO_NET_F_HOST_TSO4,
      VIRTIO_NET_F_HOST_TSO6,
    ])
      features |= bit(f);
  }
  return {
    deviceId: DEVICE_ID_NET,
    features,
    queueSizes: [QUEUE_SIZE_MAX, QUEUE_SIZE_MAX],
    config,
  };
}

/** The TAP offload flags matching what the driver accepted for RX. */
export function tunOffloadFor(features: bigint): number {
  const has = (f: number) => (features & bit(f)) !== 0n;
  if (!has(VIRTIO_NET_F_GUEST_CSUM)) return 0;
  let flags = TUN_F_CSUM;
  if (has(VIRTIO_NET_F_GUEST_TSO4)) flags |= TUN_F_TSO4;
  if (has(VIRTIO_NET_F_GUEST_TSO6)) flags |= TUN_F_TSO6;
  return flags;
}

export class NetDevice implements VirtioBackend {
  readonly selfServed = [RX_QUEUE] as const;
  readonly counters: NetCounters = {
    rxFrames: 0,
    rxBytes: 0,
    txFrames: 0,
    txBytes: 0,
    rxTooLarge: 0,
    txBad: 0,
    txErrors: 0,
    rxBackPressure: 0,
    rxChainTooLong: 0,
    txCoalesced: 0,
    rxBudgetYields: 0,
    rxThrottled: 0,
    txThrottled: 0,
    rxThrottleEvents: 0,
    txThrottleEvents: 0,
    rxThrottledDropped: 0,
    rxAfterTx: 0,
  };
  readonly rxLimiter: RateLimiter;
  readonly txLimiter: RateLimiter;
  /** An RX frame read into its chain that the limiter held back: delivered when it fits. */
  private deferred: { chain: DescriptorChain; n: number } | undefined;
  /** Cancels RX's throttle timer while it sleeps. */
  private rxSleep: (() => void) | undefined;
  private txWaiting = false;
  /** Frames went to the TAP since RX last looked at it after TX (rxAfterTx). */
  private txSinceRx = false;
  /** Frames the last RX wake-up that delivered any delivered (processRx's early publish). */
  private rxLastBatch = 0;
  private io: QueueIo | undefined;
  private tx: TxOffloads = { csum: false, tso4: false, tso6: false };
  /** An RX chain taken from the guest when the TAP turned out empty: used for the next frame. */
  private held: DescriptorChain | undefined;
  private readonly spill = new Uint8Array(MAX_FRAME_WITH_HDR);
  private readonly hdr = new Uint8Array(NET_HDR_SIZE);
  /** The TX header as checked and sent: a host copy, out of the guest's reach. */
  private readonly txHdr = new Uint8Array(NET_HDR_SIZE);
  /** A TX frame body with too many buffers for one writev, copied here. */
  private readonly txBody = new Uint8Array(MAX_FRAME_WITH_HDR - NET_HDR_SIZE);
  /**
   * Early TX completion (NetLimitOptions.txEarly): the frames of a turn copied out of guest
   * memory (header and body, contiguous), written to the TAP after the turn's chains went back
   * to the guest (afterTurn): the TAP's write (the host's bridge and TCP receive run inside
   * it) no longer delays the guest's TX completions, which hold back a TCP stream (TCP small
   * queues keep ~2 TSO frames below TCP). At most TX_EARLY_FRAMES wait at a time: a longer
   * turn writes each group of them as it fills. Buffers are kept for the next turn.
   */
  private readonly txEarly: boolean;
  private readonly txCopies: Uint8Array[] = objectArray();
  private readonly txPending: Array<{ buf: Uint8Array; len: number }> = [];
  private readonly txEarlyIov: Uint8Array[] = objectArray();
  private watching = false;
  private readonly peek = new Uint8Array(INTERCEPT_PEEK);
  /** The TX header's fields, parsed from txHdr (one object, refilled per frame). */
  private readonly txHdrFields: NetHeader = readNetHeader(this.txHdr);
  /** The buffers of the frame being sent / read (reused: no per-frame arrays). */
  private readonly txIov: Uint8Array[] = objectArray();
  private readonly rxIov: Uint8Array[] = objectArray();

  constructor(
    readonly name: string,
    private readonly tap: TapIo,
    private readonly log: (m: string) => void,
    private readonly limits: NetLimitOptions = {},
    /** MMDS on this interface (its answers reach the guest through RX). */
    readonly interceptor?: FrameInterceptor,
    /** Runs `fn` on a later round of the loop (RX at its budget with answers still queued). */
    private readonly defer?: (fn: () => void) => void,
  ) {
    const now = limits.now ?? monotonicMs;
    this.txEarly = limits.txEarly ?? process.env.TYPERVISOR_NET_TX_EARLY === '1';
    this.rxLimiter = new RateLimiter(limits.rx, now);
    this.txLimiter = new RateLimiter(limits.tx, now);
    if (this.rxLimiter.active && !limits.setTimer)
      throw new Error(`${name}: an RX rate limiter needs the loop's timer`);
  }

  /**
   * PATCH /network-interfaces: new limiters (undefined: unchanged), from the next frame on.
   * A sleeping RX tries again under the new limits at the loop's next round. Throws RangeError
   * (changing nothing).
   */
  updateRateLimiters(rx: RateLimiterConfig | undefined, tx: RateLimiterConfig | undefined): void {
    if (rx && !this.limits.setTimer && new RateLimiter(rx, () => 0).active)
      throw new RangeError(`${this.name}: an RX rate limiter needs the loop's timer`);
    if (rx) this.rxLimiter.update(rx);
    if (tx) this.txLimiter.update(tx);
    this.txWaiting = false;
    if (rx && this.rxSleep) {
      // Woken on the loop's next round (not now: the worker may be paused, and then its loop,
      // with this timer, waits for the resume).
      this.rxSleep();
      this.rxSleep = this.limits.setTimer!(0, () => {
        this.rxSleep = undefined;
        this.processRx();
      });
    }
  }

  /** TX frames take their tokens before handle() (the RX queue is self-served). */
  admit(queue: number, chain: DescriptorChain): number {
    if (queue !== TX_QUEUE || !this.txLimiter.active) return 0;
    if (this.txWaiting) {
      this.txWaiting = false;
      this.counters.txThrottleEvents++;
    }
    const a = this.txLimiter.consume(Math.max(0, chain.readableLength - NET_HDR_SIZE), 1);
    if (a.go) return 0;
    this.txWaiting = true;
    this.counters.txThrottled++;
    return a.ms;
  }
  activate(features: bigint, io: QueueIo, _restored?: boolean): void {
    this.io = io;
    this.held = undefined;
    this.stopRxSleep();
    const has = (f: number) => (features & bit(f)) !== 0n;
    this.tx = {
      csum: has(VIRTIO_NET_F_CSUM),
      tso4: has(VIRTIO_NET_F_CSUM) && has(VIRTIO_NET_F_HOST_TSO4),
      tso6: has(VIRTIO_NET_F_CSUM) && has(VIRTIO_NET_F_HOST_TSO6),
    };
    try {
      this.tap.setOffload(tunOffloadFor(features));
    } catch (e) {
      // Only reachable when the guest acked TSO without GUEST_CSUM (a driver bug): no offloads.
      this.log(`${this.name}: TUNSETOFFLOAD refused (${(e as Error).message}); RX offloads off`);
      this.tap.setOffload(0);
    }
    this.setWatching(true);
  }

  /**
   * Saved state (called paused, on the worker's thread). virtio-net keeps nothing the
   * transport and queues do not: a held RX chain is given back to the RX queue (the next RX
   * takes it again), the offloads follow from the negotiated features, the TAP is the host's.
   */
  save(): Uint8Array {
    this.writePending(); // nothing is queued between turns; kept for safety
    if (this.held && this.io?.unpop(RX_QUEUE, this.held.head)) this.held = undefined;
    // A frame the RX limiter held: its chain goes back empty, the frame is dropped.
    if (this.deferred && this.io?.unpop(RX_QUEUE, this.deferred.chain.head)) {
      this.counters.rxThrottledDropped++;
      this.deferred = undefined;
      this.stopRxSleep();
    }
    return NetStateV2.encode({
      heldRx: this.held !== undefined || this.deferred !== undefined,
      rxLimiter: this.rxLimiter.save(),
      txLimiter: this.txLimiter.save(),
    });
  }

  restore(bytes: Uint8Array): void {
    const v2 = NetStateV2.decode(bytes);
    let heldRx: boolean;
    if (v2.ok) heldRx = v2.value.heldRx;
    else {
      const v1 = NetStateV1.decode(bytes);
      if (!v1.ok) throw v2.error;
      heldRx = v1.value.heldRx;
    }
    // A held chain that could not be given back (never the case today) cannot be re-read.
    if (heldRx) throw new PersistError('virtio-net: saved with an RX chain it could not release');
    if (v2.ok) {
      // Both checked before either changes.
      const rx = new RateLimiter(undefined, () => 0);
      rx.restore(v2.value.rxLimiter);
      new RateLimiter(undefined, () => 0).restore(v2.value.txLimiter);
      if (rx.active && !this.limits.setTimer)
        throw new PersistError(`${this.name}: an RX rate limiter needs the loop's timer`);
      this.rxLimiter.restore(v2.value.rxLimiter);
      this.txLimiter.restore(v2.value.txLimiter);
    }
  }

  deactivate(): void {
    this.writePending(); // frames admitted before the reset still go out, as with writev
    this.io = undefined;
    this.held = undefined;
    this.deferred = undefined;
    this.stopRxSleep();
    this.setWatching(false);
  }

  private stopRxSleep(): void {
    this.rxSleep?.();
    this.rxSleep = undefined;
  }

  /** RX waits `ms` for its limiter: the TAP is not watched, a timer takes RX up again. */
  private throttleRx(ms: number): void {
    this.counters.rxThrottled++;
    this.setWatching(false);
    this.stopRxSleep();
    this.rxSleep = this.limits.setTimer!(ms, () => {
      this.rxSleep = undefined;
      this.counters.rxThrottleEvents++;
      this.processRx();
    });
  }

  /** Marks num_buffers and returns the RX chain holding an `n`-byte frame to the guest. */
  private deliver(io: QueueIo, chain: DescriptorChain, n: number): void {
    io.pushUsed(RX_QUEUE, chain.head, n);
    this.counters.rxFrames++;
    this.counters.rxBytes += n - NET_HDR_SIZE;
  }

  /**
   * TX chains (the generic drain calls this for queue 1). Per frame: one writev of our header
   * copy and the guest's buffers after the header, through an array reused from frame to frame
   * (no per-frame arrays but the subarray of a buffer the header ends inside).
   */
  handle(queue: number, chain: DescriptorChain): number {
    if (queue !== TX_QUEUE) return 0;
    const len = chain.readableLength;
    if (chain.writableLength > 0) return this.txBad('device-writable buffers on the TX queue');
    if (len < NET_HDR_SIZE) return this.txBad(`chain of ${len} bytes has no virtio-net header`);
    if (len > MAX_FRAME_WITH_HDR)
      return this.txBad(`frame of ${len} bytes is over the ${MAX_FRAME_WITH_HDR}-byte limit`);
    // Copied once: the copy is checked and the copy is sent (checked is used).
    gather(chain.readable, this.txHdr);
    const h = readNetHeader(this.txHdr, this.txHdrFields);
    const why = txHeaderError(h, len - NET_HDR_SIZE, this.tx);
    if (why !== undefined) return this.txBad(why);
    const iov = this.txIov;
    iov.length = 0;
    iov.push(this.txHdr);
    let skip = NET_HDR_SIZE;
    for (const s of chain.readable) {
      if (skip >= s.length) skip -= s.length;
      else {
        iov.push(skip > 0 ? s.subarray(skip) : s);
        skip = 0;
      }
    }
    if (this.interceptor && this.intercept(iov, len - NET_HDR_SIZE, h)) return 0;
    if (iov.length > TAP_MAX_IOVECS) {
      const flat = this.txBody.subarray(0, len - NET_HDR_SIZE);
      gatherFrom(iov, 1, flat);
      iov.length = 1;
      iov.push(flat);
      this.counters.txCoalesced++;
    }
    const frameLen = len - NET_HDR_SIZE;
    if (this.txEarly) {
      // A turn longer than the copies: the earlier ones go first (frames keep their order).
      if (this.txPending.length >= TX_EARLY_FRAMES) this.writePending();
      const buf = this.txCopies.pop() ?? new Uint8Array(MAX_FRAME_WITH_HDR);
      buf.set(this.txHdr, 0);
      gatherFrom(iov, 1, buf.subarray(NET_HDR_SIZE, len));
      iov.length = 0;
      this.txPending.push({ buf, len });
      return 0;
    }
    return this.writeFrame(iov, frameLen);
  }

  /** Writes the copies of the turn's frames (after their chains went back); never throws. */
  afterTurn(queue: number): void {
    if (queue !== TX_QUEUE || this.txPending.length === 0) return;
    this.writePending();
  }

  private writePending(): void {
    // Not txIov: handle() may be holding the frame it is copying there.
    const iov = this.txEarlyIov;
    for (const p of this.txPending.splice(0)) {
      iov.length = 0;
      iov.push(p.buf.subarray(0, p.len));
      this.writeFrame(iov, p.len - NET_HDR_SIZE);
      this.txCopies.push(p.buf);
    }
    this.flushTx();
    this.rxAfterTx();
  }

  /** One frame to the TAP (or its batch): `iov` is our header copy, then the frame. */
  private writeFrame(iov: Uint8Array[], frameLen: number): number {
    try {
      const batch = this.tap.txBatch;
      if (batch?.open) {
        if (batch.add(iov, frameLen)) return 0;
        // Full, or a frame of more buffers than a batch takes: the batch goes first (order).
        if (batch.pending > 0) {
          this.flushTx();
          if (batch.add(iov, frameLen)) return 0;
        }
      }
      const n = this.tap.writev(iov);
      if (n < 0) {
        this.counters.txErrors++; // the TAP's queue is full (tun's sndbuf): dropped, counted
        return 0;
      }
      this.counters.txFrames++;
      this.counters.txBytes += frameLen;
      this.txSinceRx = true;
    } catch (e) {
      this.counters.txErrors++;
      this.logOnce('tx-error', `${this.name}: TAP write failed: ${(e as Error).message}`);
    } finally {
      // No reference to guest RAM outlives the frame (a batch keeps its own iovecs).
      iov.length = 0;
    }
    return 0;
  }

  /**
   * The end of a TX turn (VirtioDevice, before the turn's used entries are published): the
   * batched frames are written now, so no chain is returned while the kernel may still read it.
   */
  endTurn(queue: number): void {
    if (queue !== TX_QUEUE) return;
    this.flushTx();
    this.rxAfterTx();
  }

  /**
   * Issue 17 (ping): what this turn's frames brought back already goes in with the turn. The
   * host's own stack answers a frame (an echo reply, an ARP reply, an ACK) inside our write, so
   * the answer is on the TAP before the TAP's readiness could wake us: RX serves it now, and its
   * interrupt comes right before TX's (endTurn runs before the turn's interrupt), which then
   * shares it while the driver has not acknowledged it (one loop round,
   * VirtioDevice.interruptIfWanted). In a bulk transfer the guest's ACKs (or its data's ACKs)
   * thus go in under the TX turn's interrupt. TX's interrupt first (before this read, as QEMU
   * does) was tried twice on 2026-12-07 and dropped: a ping no faster (5 of 10 lab rounds
   * either way), and twice the interrupts per MB guest -> host (7.8-11.2 against 3.0-4.3;
   * bench/results/2026-12-07-lab-irq-order-bulk.md). Only after frames went out, and only while
   * RX waits on the TAP (buffers posted, not throttled): otherwise one read that finds nothing.
   */
  private rxAfterTx(): void {
    if (!this.txSinceRx) return;
    this.txSinceRx = false;
    if (this.watching) {
      this.counters.rxAfterTx++;
      this.processRx();
    }
  }

  /** Writes the TX batch, counting each frame as a writev would be; never throws. */
  private flushTx(): void {
    const batch = this.tap.txBatch;
    if (!batch || batch.pending === 0) return;
    const lost = batch.pending;
    try {
      batch.flush(this.txDone);
    } catch (e) {
      // The batch itself failed (io_uring_enter): its frames are lost, counted; the batch is
      // closed and TX goes on with one writev per frame.
      this.counters.txErrors += lost;
      this.logOnce(
        'tx-batch',
        `${this.name}: batched TAP write failed (${(e as Error).message}): ${lost} frames dropped; one writev per frame from now on`,
      );
    }
  }

  private readonly txDone = (frameLen: number, res: number): void => {
    if (res >= 0) {
      this.counters.txFrames++;
      this.counters.txBytes += frameLen;
      this.txSinceRx = true;
      return;
    }
    this.counters.txErrors++;
    if (!isTapFull(res)) this.logOnce('tx-error', `${this.name}: TAP write failed: errno ${-res}`);
  };

  private txBad(why: string): number {
    this.counters.txBad++;
    this.io?.guestError('net-tx', `${this.name}: TX frame dropped: ${why}`);
    return 0;
  }

  /**
   * MMDS: a frame the interceptor wants is copied out (the copy is what it parses: the guest
   * cannot change it meanwhile) and never reaches the TAP; its answers are served at once.
   * `iov`: our header copy, then the frame's `len` bytes.
   */
  private intercept(iov: Uint8Array[], len: number, h: NetHeader): boolean {
    const ic = this.interceptor!;
    const head = this.peek.subarray(0, Math.min(len, INTERCEPT_PEEK));
    gatherFrom(iov, 1, head);
    if (!ic.wants(head)) return false;
    const frame = new Uint8Array(len);
    gatherFrom(iov, 1, frame);
    // A GSO frame is never an MMDS request (they are small): dropped by the responder's checks.
    ic.handleFrame(h.gsoType === 0 ? frame : frame.subarray(0, 0), (h.flags & 1) !== 0);
    if (ic.queued > 0) this.processRx();
    return true;
  }

  /** The interceptor queued answers outside a TX frame (its timers): serve them. */
  serveReplies(): void {
    this.processRx();
  }

  /** The RX queue was kicked: the guest added buffers. */
  kick(queue: number): void {
    if (queue === RX_QUEUE) this.processRx();
  }

  /** The TAP is readable. */
  onTapReadable(): void {
    this.processRx();
  }

  private processRx(): void {
    const io = this.io;
    if (!io) return;
    // Throttled: the timer takes RX up again (a kick meanwhile only added buffers).
    if (this.rxSleep) return;
    // Issue 17: the frames of this wake-up are published together (one used.idx store, at most
    // one interrupt: the notify() below, reached on every path), and the driver need not kick
    // RX while we hold buffers: a pop that finds the ring empty re-enables its kicks race-free.
    io.beginBatch(RX_QUEUE);
    io.suppressKicks(RX_QUEUE);
    let i = 0;
    let throttled = false;
    // Issue 17 (ping): after a wake-up that brought at most one frame, the first frame of this
    // one is published, and its interrupt raised, before the next read (which, for a lone frame
    // such as a ping's reply, only finds the TAP empty); the frames after it go out together at
    // the end. After a burst, all of a wake-up's frames go out together (a stream's interrupts
    // per MB stay as they were).
    let early = this.rxLastBatch <= 1;
    let delivered = 0;
    for (; i < NET_RX_BUDGET_FRAMES; i++) {
      if (this.deferred) {
        const { chain, n } = this.deferred;
        const a = this.rxLimiter.consume(n - NET_HDR_SIZE, 1);
        if (!a.go) {
          this.throttleRx(a.ms);
          throttled = true;
          break;
        }
        this.deferred = undefined;
        this.deliver(io, chain, n);
        continue;
      }
      const chain = this.held ?? io.pop(RX_QUEUE);
      this.held = undefined;
      if (!chain) {
        if (this.watching) this.counters.rxBackPressure++;
        this.setWatching(false); // until the guest adds buffers (its kick)
        break;
      }
      if (chain.writableLength < NET_HDR_SIZE) {
        io.guestError('net-rx', `${this.name}: RX chain of ${chain.writableLength} bytes`);
        io.pushUsed(RX_QUEUE, chain.head, 0);
        continue;
      }
      if (chain.writable.length + 1 > TAP_MAX_IOVECS) {
        // Held, it could never be filled (and the TAP would stay readable): give it back.
        this.counters.rxChainTooLong++;
        io.guestError(
          'net-rx-iov',
          `${this.name}: RX chain of ${chain.writable.length} buffers (the TAP takes ${TAP_MAX_IOVECS - 1} and the spill buffer)`,
        );
        io.pushUsed(RX_QUEUE, chain.head, 0);
        continue;
      }
      if (this.interceptor && this.interceptor.queued > 0) {
        this.rxReply(io, chain, this.interceptor.takeReply()!);
        continue;
      }
      let n: number;
      const iov = this.rxIov;
      for (const w of chain.writable) iov.push(w);
      iov.push(this.spill);
      try {
        n = this.tap.readv(iov);
      } catch (e) {
        // Not "nothing waits": the TAP failed. The chain goes back unused and the device breaks
        // (the caller's guard), which stops watching the TAP.
        io.pushUsed(RX_QUEUE, chain.head, 0);
        io.notify(RX_QUEUE);
        throw e;
      } finally {
        iov.length = 0; // no reference to guest RAM outlives the read
      }
      if (n < 0) {
        this.held = chain;
        this.setWatching(true);
        break;
      }
      if (n > chain.writableLength || n < NET_HDR_SIZE) {
        this.counters.rxTooLarge++;
        this.logOnce(
          'rx-too-large',
          `${this.name}: a ${n}-byte frame did not fit a ${chain.writableLength}-byte RX buffer: dropped (counted)`,
        );
        io.pushUsed(RX_QUEUE, chain.head, 0);
        continue;
      }
      // num_buffers (the TAP leaves the last 2 bytes of the 12-byte header untouched).
      const first = chain.writable[0]!;
      if (first.length >= NET_HDR_SIZE) {
        first[10] = 1;
        first[11] = 0;
      } else {
        gather(chain.writable, this.hdr);
        this.hdr[10] = 1;
        this.hdr[11] = 0;
        scatter(chain.writable, this.hdr);
      }
      if (this.rxLimiter.active) {
        const a = this.rxLimiter.consume(n - NET_HDR_SIZE, 1);
        if (!a.go) {
          this.deferred = { chain, n };
          this.throttleRx(a.ms);
          throttled = true;
          break;
        }
      }
      this.deliver(io, chain, n);
      delivered++;
      if (early) {
        early = false;
        io.notify(RX_QUEUE);
        io.beginBatch(RX_QUEUE);
      }
    }
    if (delivered > 0) this.rxLastBatch = delivered;
    if (i === NET_RX_BUDGET_FRAMES && !throttled) {
      // Budget used, buffers maybe left: the TAP, if still readable, wakes us next round.
      this.counters.rxBudgetYields++;
      this.setWatching(true);
      // The TAP wakes RX again when readable; queued MMDS answers need a wake-up of their own.
      if (this.interceptor && this.interceptor.queued > 0) this.defer?.(() => this.processRx());
    }
    io.notify(RX_QUEUE);
  }

  /** An interceptor's frame into an RX chain: a zero virtio-net header (num_buffers 1), then it. */
  private rxReply(io: QueueIo, chain: DescriptorChain, frame: Uint8Array): void {
    const n = NET_HDR_SIZE + frame.length;
    if (n > chain.writableLength) {
      this.counters.rxTooLarge++;
      io.pushUsed(RX_QUEUE, chain.head, 0);
      return;
    }
    const out = new Uint8Array(n);
    out[10] = 1;
    out.set(frame, NET_HDR_SIZE);
    scatter(chain.writable, out);
    io.pushUsed(RX_QUEUE, chain.head, n);
    this.counters.rxFrames++;
    this.counters.rxBytes += frame.length;
  }

  private setWatching(on: boolean): void {
    if (this.watching === on) return;
    this.watching = on;
    this.tap.setReadInterest(on);
  }

  private readonly logged = new Set<string>();
  private logOnce(kind: string, m: string): void {
    if (this.logged.has(kind)) return;
    this.logged.add(kind);
    this.log(`${m} (logged once)`);
  }
}

/**
 * An empty array whose elements are objects from the start. V8 keeps an array's elements' kind
 * in its map, and a fresh `[]` changes kind at its first push: code compiled for the reused
 * arrays of another NetDevice (the virtio-net warm-up's, vmm/net-warmup.ts) would not take this
 * device's until then, and V8 would throw that code away at the guest's first frame.
 */
function objectArray(): Uint8Array[] {
  const a = [new Uint8Array(0)];
  a.length = 0;
  return a;
}

/** Frames copied per TX turn for early completion (afterTurn); 8 x 64 KiB kept at most. */
const TX_EARLY_FRAMES = 8;

/** Copies up to dst.length bytes from the start of segments[from..]; returns how many. */
function gatherFrom(segments: readonly Uint8Array[], from: number, dst: Uint8Array): number {
  let n = 0;
  for (let i = from; i < segments.length && n < dst.length; i++) {
    const s = segments[i]!;
    const take = Math.min(s.length, dst.length - n);
    dst.set(take === s.length ? s : s.subarray(0, take), n);
    n += take;
  }
  return n;
}

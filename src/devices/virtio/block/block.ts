/**
 * virtio-blk (device ID 2, virtio 1.2 §5.2) over a raw image file, served in the device worker
 * with synchronous I/O straight between the file and guest RAM (zero-copy: the data views ARE
 * guest memory). Host I/O errors become VIRTIO_BLK_S_IOERR; nothing the guest or the host
 * file does throws out of handle().
 *
 * Limits (a request is served synchronously on the device worker, so its size is bounded): we
 * offer VIRTIO_BLK_F_SEG_MAX with seg_max = BLK_SEG_MAX data segments (the queue size minus the
 * header and status descriptors, as QEMU and Cloud Hypervisor do, so a driver without indirect
 * descriptors can always fit a request in the ring) and VIRTIO_BLK_F_SIZE_MAX with size_max =
 * BLK_SIZE_MAX bytes per segment. Linux takes them as its queue's max_segments and
 * max_segment_size (drivers/block/virtio_blk.c, virtblk_probe) and never builds a bigger
 * request, whatever max_sectors_kb says. We enforce them: a request with more data segments,
 * a segment over size_max (when the driver accepted SIZE_MAX), or more than
 * BLK_MAX_REQUEST_BYTES (= seg_max * size_max, whatever was negotiated) of data is answered
 * VIRTIO_BLK_S_IOERR without any I/O and counted (oversized_reqs_count). So a chain whose
 * descriptors all alias one buffer asks for at most 31.75 MiB of host I/O, not gigabytes.
 *
 * Rate limiting (issue 16, Firecracker's drive rate_limiter): each well-formed request takes 1
 * ops token, and a read or write its data bytes, from the drive's RateLimiter before it is
 * served (admit()); one that does not fit stays on the queue, which sleeps until it does
 * (VirtioDevice). A malformed request is not charged (it does no I/O). The limiter's state is
 * the block backend's saved state.
 *
 * Engines (Firecracker's io_engine): "Sync" serves each request in handle() on the device
 * worker; "Async" (async-engine.ts; a drive's default since issue 17) hands reads, writes and
 * flushes to io_uring and serves the queue itself (selfServed), completing requests as the
 * kernel finishes them. Without a ring (`uring` unset) a device is Sync.
 */
import { fdatasyncSync, readSync, writeSync } from 'node:fs';
import { struct, versioned, bytes as bytesCodec } from '../../../util/persist.js';
import { type DescriptorChain, scatter } from '../chain.js';
import { QUEUE_SIZE_MAX, VIRTIO_F_RING_INDIRECT_DESC, DEVICE_ID_BLOCK, bit } from '../constants.js';
import type { QueueIo, VirtioBackend } from '../device.js';
import type { Buf, EventOps } from '../descriptor.js';
import { AsyncBlockEngine } from './async-engine.js';
import type { IoUring } from './io-uring.js';
import type { VirtioDeviceIdentity } from '../mmio-state.js';
import { RateLimiter, type RateLimiterConfig, monotonicMs } from '../rate-limiter.js';
import {
  BLK_ID_BYTES,
  VIRTIO_BLK_S_IOERR,
  VIRTIO_BLK_S_OK,
  VIRTIO_BLK_S_UNSUPP,
  parseBlockRequest,
  type RequestLimits,
} from './request.js';

export const VIRTIO_BLK_F_SIZE_MAX = 1;
export const VIRTIO_BLK_F_SEG_MAX = 2;
export const VIRTIO_BLK_F_RO = 5;
export const VIRTIO_BLK_F_FLUSH = 9;
/** Data segments per request we announce (seg_max): the queue size minus header and status. */
export const BLK_SEG_MAX = QUEUE_SIZE_MAX - 2;
/** Bytes per data segment we announce (size_max); Linux's max_segment_size (>= a page). */
export const BLK_SIZE_MAX = 128 * 1024;
/** Data bytes of one request at most: what seg_max and size_max allow (31.75 MiB). */
export const BLK_MAX_REQUEST_BYTES = BLK_SEG_MAX * BLK_SIZE_MAX;
/**
 * Sync flushes (an fdatasync each, on the device worker's thread) one turn of the queue serves
 * at most; then it yields to the loop like a turn that used its chain or byte budget, so that a
 * driver queueing flushes cannot hold the thread from the other devices for 64 of them. Async
 * flushes are io_uring operations and do not hold the thread.
 */
export const BLK_FLUSHES_PER_TURN = 4;
const CONFIG_SIZE = 64; // struct virtio_blk_config and then some: unused fields read as 0

/** The host side of the disk; the default is a file descriptor (tests inject failures). */
export interface BlockFile {
  /** Reads exactly buf.length bytes at pos, or throws. */
  read(buf: Uint8Array, pos: number): void;
  write(buf: Uint8Array, pos: number): void;
  flush(): void;
  /** The file descriptor, when the file is one (the Async engine needs it). */
  readonly fd?: number;
  /**
   * Reads exactly the buffers' total length at pos into them, in order, or throws: a request's
   * segments in one preadv(2) where the host has it (a 1 MiB request can be 256 segments).
   */
  readv?(bufs: readonly Uint8Array[], pos: number): void;
  writev?(bufs: readonly Uint8Array[], pos: number): void;
}

/** iovecs per preadv/pwritev call (the shim's limit, Linux's IOV_MAX). */
const IOV_MAX = 1024;

/**
 * One whole vectored transfer: repeats `op` after a short one, from where it stopped, until
 * every byte of `bufs` moved. `op` moving nothing (or failing) throws.
 */
export function transferAll(
  op: (bufs: Uint8Array[], pos: number) => number,
  bufs: readonly Uint8Array[],
  pos: number,
  what: 'read' | 'write',
): void {
  let i = 0; // the first buffer not done
  let skip = 0; // bytes of bufs[i] already done
  for (;;) {
    while (i < bufs.length && skip === bufs[i]!.length) {
      i++;
      skip = 0;
    }
    if (i === bufs.length) return;
    let batch: Uint8Array[];
    // The usual case, a whole request in one call, passes the caller's list (op only reads it).
    if (i === 0 && skip === 0 && bufs.length <= IOV_MAX) batch = bufs as Uint8Array[];
    else {
      batch = [];
      for (let j = i; j < bufs.length && batch.length < IOV_MAX; j++)
        batch.push(j === i && skip > 0 ? bufs[j]!.subarray(skip) : bufs[j]!);
    }
    let n = op(batch, pos);
    if (!(n > 0))
      throw new Error(
        `short ${what} at ${pos} (${what === 'read' ? 'the image shrank?' : 'no space?'})`,
      );
    pos += n;
    while (n > 0) {
      const left = bufs[i]!.length - skip;
      if (n >= left) {
        n -= left;
        i++;
        skip = 0;
      } else {
        skip += n;
        n = 0;
      }
    }
  }
}

/** What fdBlockFile needs for vectored I/O (the native shim; absent: one syscall per segment). */
export interface VectoredIo {
  preadv?(fd: number, buffers: Uint8Array[], offset: number): number;
  pwritev?(fd: number, buffers: Uint8Array[], offset: number): number;
}

export function fdBlockFile(fd: number, sys?: VectoredIo): BlockFile {
  const preadv = sys?.preadv?.bind(sys);
  const pwritev = sys?.pwritev?.bind(sys);
  return {
    fd,
    ...(preadv
      ? { readv: (bufs, pos) => transferAll((b, p) => preadv(fd, b, p), bufs, pos, 'read') }
      : {}),
    ...(pwritev
      ? { writev: (bufs, pos) => transferAll((b, p) => pwritev(fd, b, p), bufs, pos, 'write') }
      : {}),
    read(buf, pos) {
      for (let done = 0; done < buf.length;) {
        const n = readSync(fd, buf, done, buf.length - done, pos + done);
        if (n === 0) throw new Error(`short read at ${pos + done} (the image shrank?)`);
        done += n;
      }
    },
    write(buf, pos) {
      for (let done = 0; done < buf.length;) {
        done += writeSync(fd, buf, done, buf.length - done, pos + done);
      }
    },
    flush: () => fdatasyncSync(fd),
  };
}

export interface BlockDeviceOptions {
  name: string;
  file: BlockFile;
  /** Disk size in 512-byte sectors. */
  capacity: number;
  readOnly: boolean;
  /** GET_ID answer, at most 20 bytes (NUL-padded). */
  serial: Uint8Array;
  log(message: string): void;
  /** Firecracker's drive rate_limiter (default: none). */
  rateLimiter?: RateLimiterConfig;
  /** The limiter's clock in ms (default: monoMs, util/clock.ts; tests pass a fake one). */
  now?: () => number;
  /** The Async engine: an open ring, the worker's loop, and host addresses of guest RAM. */
  uring?: {
    ring: IoUring;
    loop: EventOps;
    bufferAddress: (b: Buf) => bigint;
    /** Bytes in flight at most (default BLK_ASYNC_BYTES_IN_FLIGHT; tests pass less). */
    maxBytesInFlight?: number;
  };
}

/** virtio-blk's own saved state: its rate limiter's buckets. */
export const BlockStateV1 = versioned('virtio-blk', 1, struct({ limiter: bytesCodec(4096) }));

export interface BlockCounters {
  reads: number;
  writes: number;
  flushes: number;
  bytesRead: number;
  bytesWritten: number;
  ioErrors: number; // host failures
  badRequests: number; // guest mistakes
  unsupported: number;
  /** Requests over seg_max, size_max or BLK_MAX_REQUEST_BYTES (also in badRequests). */
  oversized: number;
  /** Backing images swapped in by PATCH /drives (Firecracker's update_count). */
  updates: number;
  /** Requests the rate limiter held back (Firecracker's rate_limiter_throttled_events). */
  throttled: number;
  /** Throttled requests asked again after their sleep (Firecracker's rate_limiter_event_count). */
  throttleEvents: number;
}

/** The engine that serves a drive (Firecracker's io_engine). */
export type BlockIoEngine = 'Sync' | 'Async';

/** The capacity field of struct virtio_blk_config (offset BLK_CONFIG_CAPACITY, 8 bytes LE). */
export function blockCapacityField(capacity: number): Uint8Array {
  const b = new Uint8Array(8);
  new DataView(b.buffer).setBigUint64(0, BigInt(capacity), true);
  return b;
}
export const BLK_CONFIG_CAPACITY = 0;

/** What the transport offers for a disk (device ID, features, config space). */
export function blockIdentity(capacity: number, readOnly: boolean): VirtioDeviceIdentity {
  const config = new Uint8Array(CONFIG_SIZE);
  const v = new DataView(config.buffer);
  v.setBigUint64(0, BigInt(capacity), true); // capacity, in 512-byte sectors
  v.setUint32(8, BLK_SIZE_MAX, true); // size_max
  v.setUint32(12, BLK_SEG_MAX, true); // seg_max
  let features =
    bit(VIRTIO_BLK_F_SIZE_MAX) |
    bit(VIRTIO_BLK_F_SEG_MAX) |
    bit(VIRTIO_BLK_F_FLUSH) |
    bit(VIRTIO_F_RING_INDIRECT_DESC);
  if (readOnly) features |= bit(VIRTIO_BLK_F_RO);
  return { deviceId: DEVICE_ID_BLOCK, features, queueSizes: [QUEUE_SIZE_MAX], config };
}

/** The request limits for a driver that accepted `features`. */
export function blockLimits(features: bigint): RequestLimits {
  return {
    maxSegments: BLK_SEG_MAX,
    maxSegmentBytes: features & bit(VIRTIO_BLK_F_SIZE_MAX) ? BLK_SIZE_MAX : undefined,
    maxBytes: BLK_MAX_REQUEST_BYTES,
  };
}

export class BlockDevice implements VirtioBackend {
  readonly name: string;
  readonly counters: BlockCounters = {
    reads: 0,
    writes: 0,
    flushes: 0,
    bytesRead: 0,
    bytesWritten: 0,
    ioErrors: 0,
    badRequests: 0,
    unsupported: 0,
    oversized: 0,
    updates: 0,
    throttled: 0,
    throttleEvents: 0,
  };
  readonly limiter: RateLimiter;
  /** The last request parsed by admit(), for handle() to serve without parsing again. */
  private admitted:
    { chain: DescriptorChain; parsed: ReturnType<typeof parseBlockRequest> } | undefined;
  /** The last admit() said wait: the next one is the wake-up. */
  private waiting = false;
  /** Sync flushes since the turn budget last said yield (turnSpent). */
  private flushesInTurn = 0;
  private readonly logged = new Set<string>();
  private limits: RequestLimits = blockLimits(0n);
  private file: BlockFile;
  private capacity: number;
  /** The Async engine (undefined: Sync). */
  readonly engine: AsyncBlockEngine | undefined;
  /** With the Async engine the request queue is served by the engine, not handle(). */
  readonly selfServed?: readonly number[];

  constructor(private readonly o: BlockDeviceOptions) {
    if (o.serial.length > BLK_ID_BYTES) throw new Error('block serial longer than 20 bytes');
    this.name = o.name;
    this.file = o.file;
    this.capacity = o.capacity;
    this.limiter = new RateLimiter(o.rateLimiter, o.now ?? monotonicMs);
    if (o.uring) {
      if (o.file.fd === undefined) throw new Error('the Async engine needs a file descriptor');
      this.engine = new AsyncBlockEngine(
        {
          name: o.name,
          readOnly: o.readOnly,
          fd: () => this.file.fd!,
          maxSegments: BLK_SEG_MAX,
          parse: (chain) => parseBlockRequest(chain, this.capacity, this.limits),
          serveInline: (p) => this.serve(p),
          charge: (p) => this.charge(p),
          throttleWoke: () => void this.counters.throttleEvents++,
          completed: (kind, bytes) => {
            if (kind === 'read') {
              this.counters.reads++;
              this.counters.bytesRead += bytes;
            } else if (kind === 'write') {
              this.counters.writes++;
              this.counters.bytesWritten += bytes;
            } else this.counters.flushes++;
          },
          failed: (kind, message) => {
            if (kind === 'io') this.counters.ioErrors++;
            this.logOnce(kind, message);
          },
        },
        o.uring.ring,
        o.uring.loop,
        o.uring.bufferAddress,
        undefined,
        o.uring.maxBytesInFlight,
      );
      this.selfServed = [0];
    }
  }

  /** The engine serving this drive. */
  get ioEngine(): BlockIoEngine {
    return this.engine ? 'Async' : 'Sync';
  }

  /** Sync: the turn yields after BLK_FLUSHES_PER_TURN flushes. */
  turnSpent(_queue: number): boolean {
    if (this.flushesInTurn < BLK_FLUSHES_PER_TURN) return false;
    this.flushesInTurn = 0;
    return true;
  }

  /** Async: the queue was kicked (VirtioDevice calls this for selfServed queues). */
  kick(_queue: number): void {
    this.engine?.kick();
  }

  deactivate(): void {
    this.engine?.deactivate();
  }

  /** The device worker is ending: the ring is closed. */
  close(): void {
    this.engine?.close();
  }

  /** PATCH /drives rate_limiter: the new limits apply from the next request (throws RangeError). */
  updateRateLimiter(config: RateLimiterConfig): void {
    this.limiter.update(config);
    this.waiting = false;
    this.engine?.wake();
  }

  /** The rate limiter's answer for a parsed request: 0 go (charged), else ms to wait. */
  private charge(p: ReturnType<typeof parseBlockRequest>): number {
    if (!this.limiter.active || !p.ok) return 0;
    const r = p.request;
    const data = r.type === 'read' || r.type === 'write' ? r.length : 0;
    const a = this.limiter.consume(data, 1);
    if (a.go) return 0;
    this.counters.throttled++;
    return a.ms;
  }

  admit(_queue: number, chain: DescriptorChain): number {
    this.admitted = undefined;
    if (!this.limiter.active) return 0;
    if (this.waiting) {
      this.waiting = false;
      this.counters.throttleEvents++;
    }
    const parsed = parseBlockRequest(chain, this.capacity, this.limits);
    this.admitted = { chain, parsed };
    if (!parsed.ok) return 0; // refused without I/O: nothing to charge
    const r = parsed.request;
    const data = r.type === 'read' || r.type === 'write' ? r.length : 0;
    const a = this.limiter.consume(data, 1);
    if (a.go) return 0;
    this.admitted = undefined;
    this.waiting = true;
    this.counters.throttled++;
    return a.ms;
  }

  save(): Uint8Array {
    // Requests in flight complete onto the used ring first: a snapshot holds none.
    this.engine?.drain();
    return BlockStateV1.encode({ limiter: this.limiter.save() });
  }

  restore(bytes: Uint8Array): void {
    const s = BlockStateV1.decodeOrThrow(bytes);
    this.limiter.restore(s.limiter);
  }

  /** The disk size now, in 512-byte sectors. */
  get sectors(): number {
    return this.capacity;
  }

  /**
   * PATCH /drives after boot (helper P): from the next request on, the disk is `file` with
   * `capacity` sectors. Sync: requests are served synchronously on this thread, so none is in
   * flight; Async: the ones in flight (on the old file) complete first.
   * Returns the new config-space capacity field (offset 0) for the transport's config change.
   */
  swapImage(file: BlockFile, capacity: number): Uint8Array {
    if (!Number.isSafeInteger(capacity) || capacity < 1)
      throw new Error(`bad disk capacity ${capacity} sectors`);
    if (this.engine && file.fd === undefined)
      throw new Error('the Async engine needs a file descriptor');
    this.engine?.drain();
    this.file = file;
    this.capacity = capacity;
    this.counters.updates++;
    return blockCapacityField(capacity);
  }

  activate(features: bigint, io: QueueIo): void {
    this.limits = blockLimits(features);
    this.engine?.activate(io);
  }

  handle(_queue: number, chain: DescriptorChain): number {
    const a = this.admitted;
    this.admitted = undefined;
    const p = a?.chain === chain ? a.parsed : parseBlockRequest(chain, this.capacity, this.limits);
    return this.serve(p);
  }

  /**
   * A request's data segments to or from the image at `offset`: one vectored call where the
   * file has it and there are several segments, else one call per segment.
   */
  private move(kind: 'read' | 'write', data: readonly Uint8Array[], offset: number): void {
    const f = this.file;
    const vectored = kind === 'read' ? f.readv : f.writev;
    if (vectored && data.length > 1) return vectored.call(f, data, offset);
    let pos = offset;
    for (const seg of data) {
      if (kind === 'read') f.read(seg, pos);
      else f.write(seg, pos);
      pos += seg.length;
    }
  }

  /** Carries out a parsed request synchronously; returns used.len. */
  private serve(p: ReturnType<typeof parseBlockRequest>): number {
    if (!p.ok) {
      this.counters.badRequests++;
      if (p.oversized) this.counters.oversized++;
      this.logOnce('bad', `${this.name}: bad request (logged once): ${p.reason}`);
      if (!p.status) return 0;
      p.status[0] = p.code;
      return 1;
    }
    const r = p.request;
    let code = VIRTIO_BLK_S_OK;
    let written = 0; // data bytes written into the chain (reads, GET_ID)
    try {
      switch (r.type) {
        case 'read': {
          this.move('read', r.data, r.offset);
          written = r.length;
          this.counters.reads++;
          this.counters.bytesRead += r.length;
          break;
        }
        case 'write': {
          if (this.o.readOnly) {
            code = VIRTIO_BLK_S_IOERR;
            this.logOnce('ro', `${this.name}: write to a read-only disk refused (logged once)`);
            break;
          }
          this.move('write', r.data, r.offset);
          this.counters.writes++;
          this.counters.bytesWritten += r.length;
          break;
        }
        case 'flush':
          if (!this.o.readOnly) {
            this.flushesInTurn++;
            this.file.flush();
          }
          this.counters.flushes++;
          break;
        case 'get-id': {
          const id = new Uint8Array(BLK_ID_BYTES);
          id.set(this.o.serial);
          written = scatter(r.data, id);
          break;
        }
        case 'unsupported':
          this.counters.unsupported++;
          code = VIRTIO_BLK_S_UNSUPP;
          break;
      }
    } catch (e) {
      this.counters.ioErrors++;
      this.logOnce('io', `${this.name}: host I/O error (logged once): ${(e as Error).message}`);
      code = VIRTIO_BLK_S_IOERR;
      // `written` stays 0 for a failed read: used.len then covers the status byte only.
    }
    p.status[0] = code;
    return written + 1;
  }

  private logOnce(kind: string, message: string): void {
    if (this.logged.has(kind)) return;
    this.logged.add(kind);
    this.o.log(message);
  }
}

/**
 * virtio-pmem (device ID 27, virtio 1.2 §5.19): a host file mapped into guest-physical memory
 * above RAM (the VMM gives KVM the mapping as its own memory slot; read-only files get a
 * KVM_MEM_READONLY slot). The guest reads and writes it with loads and stores; the device itself
 * only answers flush requests on its one queue, by fsync of the file, so that the guest's
 * writes through the mapping reach the disk.
 *
 * Config space: le64 start (guest-physical address of the region), le64 size.
 * Request: le32 type (VIRTIO_PMEM_REQ_TYPE_FLUSH = 0). Response: le32 ret (0 ok, 1 error).
 * A request that is not a flush, or has no room for the response, is a guest error: answered
 * with ret 1 when there is room, else used.len 0.
 *
 * Rate limiting (Firecracker's pmem rate_limiter, PUT and PATCH /pmem/{id}): what it limits is
 * the flushes. Each request takes 1 ops token and the file's size in bandwidth tokens (a flush
 * may write back the whole file), before the request is even looked at, as Firecracker charges a
 * malformed one too. One that does not fit stays on the queue, which sleeps on one timer until
 * it fits (no polling); kicks meanwhile serve nothing. The limiter's state is the device's saved
 * state.
 */
import { bytes as bytesCodec, struct, versioned } from '../../../util/persist.js';
import type { DescriptorChain } from '../chain.js';
import { DEVICE_ID_PMEM, QUEUE_SIZE_MAX, VIRTIO_F_RING_INDIRECT_DESC, bit } from '../constants.js';
import type { VirtioBackend } from '../device.js';
import type { VirtioDeviceIdentity } from '../mmio-state.js';
import { RateLimiter, type RateLimiterConfig, monotonicMs } from '../rate-limiter.js';

export const VIRTIO_PMEM_REQ_TYPE_FLUSH = 0;
export const PMEM_CONFIG_SIZE = 16;
/** The guest-physical alignment of a pmem region and of its size (the kernel maps 2 MiB pages). */
export const PMEM_ALIGN = 2 * 1024 * 1024;

export function pmemIdentity(start: number, size: number): VirtioDeviceIdentity {
  const config = new Uint8Array(PMEM_CONFIG_SIZE);
  const v = new DataView(config.buffer);
  v.setBigUint64(0, BigInt(start), true);
  v.setBigUint64(8, BigInt(size), true);
  return {
    deviceId: DEVICE_ID_PMEM,
    features: bit(VIRTIO_F_RING_INDIRECT_DESC),
    queueSizes: [QUEUE_SIZE_MAX],
    config,
  };
}

/** virtio-pmem's own saved state: its rate limiter's buckets. */
export const PmemStateV1 = versioned('virtio-pmem', 1, struct({ limiter: bytesCodec(4096) }));

export interface PmemCounters {
  flushes: number;
  flushFails: number;
  badRequests: number;
  /** Requests the rate limiter held back (rate_limiter_throttled_events). */
  throttled: number;
  /** Throttled requests asked again after their sleep (rate_limiter_event_count). */
  throttleEvents: number;
}

export interface PmemOptions {
  /** Bandwidth tokens a flush takes: the backing file's size. */
  fileSize?: number;
  rateLimiter?: RateLimiterConfig;
  now?: () => number;
}

export class PmemDevice implements VirtioBackend {
  readonly counters: PmemCounters = {
    flushes: 0,
    flushFails: 0,
    badRequests: 0,
    throttled: 0,
    throttleEvents: 0,
  };
  readonly limiter: RateLimiter;
  private readonly fileSize: number;
  private waiting = false;

  /** `flush` makes the file durable (fsync of its fd); it throws on a host I/O error. */
  constructor(
    readonly name: string,
    private readonly flush: () => void,
    private readonly log: (m: string) => void = () => undefined,
    opts: PmemOptions = {},
  ) {
    this.fileSize = opts.fileSize ?? 0;
    this.limiter = new RateLimiter(opts.rateLimiter, opts.now ?? monotonicMs);
  }

  /** PATCH /pmem/{id}: the merged rate limiter, from the next request on (throws RangeError). */
  updateRateLimiter(config: RateLimiterConfig): void {
    this.limiter.update(config);
    this.waiting = false;
  }

  admit(_queue: number, _chain: DescriptorChain): number {
    if (!this.limiter.active) return 0;
    if (this.waiting) {
      this.waiting = false;
      this.counters.throttleEvents++;
    }
    const a = this.limiter.consume(this.fileSize, 1);
    if (a.go) return 0;
    this.waiting = true;
    this.counters.throttled++;
    return a.ms;
  }

  save(): Uint8Array {
    return PmemStateV1.encode({ limiter: this.limiter.save() });
  }

  /** A snapshot made before pmem had saved state has none: the configured limiter stays. */
  restore(bytes: Uint8Array): void {
    const s = PmemStateV1.decodeOrThrow(bytes);
    this.limiter.restore(s.limiter);
  }

  handle(_queue: number, chain: DescriptorChain): number {
    const status = chain.writable[0];
    if (status === undefined || status.length < 4) {
      this.counters.badRequests++;
      return 0;
    }
    const answer = (ret: number) => {
      new DataView(status.buffer, status.byteOffset, 4).setUint32(0, ret, true);
      return 4;
    };
    const type = readU32(chain.readable);
    if (type !== VIRTIO_PMEM_REQ_TYPE_FLUSH) {
      this.counters.badRequests++;
      return answer(1);
    }
    try {
      this.flush();
    } catch (e) {
      this.counters.flushFails++;
      if (this.counters.flushFails === 1)
        this.log(`${this.name}: flush failed (logged once): ${(e as Error).message}`);
      return answer(1);
    }
    this.counters.flushes++;
    return answer(0);
  }
}

/** The first 4 bytes of the readable buffers as a le32, or undefined when there are fewer. */
function readU32(bufs: readonly Uint8Array[]): number | undefined {
  const b = new Uint8Array(4);
  let n = 0;
  for (const seg of bufs) {
    const take = Math.min(seg.length, 4 - n);
    b.set(seg.subarray(0, take), n);
    n += take;
    if (n === 4) return new DataView(b.buffer).getUint32(0, true);
  }
  return undefined;
}

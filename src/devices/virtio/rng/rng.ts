/**
 * virtio-rng / entropy device (device ID 4, virtio 1.2 §5.4): one queue; every device-writable
 * buffer of a request is filled from the host CSPRNG. No device-specific features or config.
 * At most MAX_BYTES_PER_REQUEST bytes per request (the spec lets the device fill less), so a
 * guest cannot make one request take long.
 *
 * Rate limiting (Firecracker's entropy rate_limiter): a request takes 1 ops token and the bytes
 * it will be given; one that does not fit stays on the queue, which sleeps until it does. The
 * limiter's state is the device's saved state.
 */
import { randomFillSync } from 'node:crypto';
import { bytes as bytesCodec, struct, versioned } from '../../../util/persist.js';
import type { DescriptorChain } from '../chain.js';
import { DEVICE_ID_RNG, QUEUE_SIZE_MAX, VIRTIO_F_RING_INDIRECT_DESC, bit } from '../constants.js';
import type { VirtioBackend } from '../device.js';
import type { VirtioDeviceIdentity } from '../mmio-state.js';
import { RateLimiter, type RateLimiterConfig, monotonicMs } from '../rate-limiter.js';

export const MAX_BYTES_PER_REQUEST = 64 * 1024;

/** virtio-rng's own saved state: its rate limiter's buckets. */
export const RngStateV1 = versioned('virtio-rng', 1, struct({ limiter: bytesCodec(4096) }));

export function rngIdentity(): VirtioDeviceIdentity {
  return {
    deviceId: DEVICE_ID_RNG,
    features: bit(VIRTIO_F_RING_INDIRECT_DESC),
    queueSizes: [QUEUE_SIZE_MAX],
    config: new Uint8Array(0),
  };
}

/** The bytes a request will be given. */
function grant(chain: DescriptorChain): number {
  return Math.min(chain.writableLength, MAX_BYTES_PER_REQUEST);
}

export class RngDevice implements VirtioBackend {
  readonly name = 'virtio-rng';
  bytes = 0;
  /** Requests the rate limiter held back (entropy_rate_limiter_throttled). */
  throttled = 0;
  /** Throttled requests asked again after their sleep (rate_limiter_event_count). */
  throttleEvents = 0;
  readonly limiter: RateLimiter;
  private waiting = false;

  constructor(opts: { rateLimiter?: RateLimiterConfig; now?: () => number } = {}) {
    this.limiter = new RateLimiter(opts.rateLimiter, opts.now ?? monotonicMs);
  }

  /** PUT /entropy's rate_limiter, changed: from the next request on (throws RangeError). */
  updateRateLimiter(config: RateLimiterConfig): void {
    this.limiter.update(config);
    this.waiting = false;
  }

  admit(_queue: number, chain: DescriptorChain): number {
    if (!this.limiter.active) return 0;
    if (this.waiting) {
      this.waiting = false;
      this.throttleEvents++;
    }
    const a = this.limiter.consume(grant(chain), 1);
    if (a.go) return 0;
    this.waiting = true;
    this.throttled++;
    return a.ms;
  }

  handle(_queue: number, chain: DescriptorChain): number {
    let n = 0;
    for (const seg of chain.writable) {
      const take = Math.min(seg.length, MAX_BYTES_PER_REQUEST - n);
      if (take <= 0) break;
      randomFillSync(seg, 0, take);
      n += take;
    }
    this.bytes += n;
    return n;
  }

  save(): Uint8Array {
    return RngStateV1.encode({ limiter: this.limiter.save() });
  }

  restore(bytes: Uint8Array): void {
    const s = RngStateV1.decodeOrThrow(bytes);
    this.limiter.restore(s.limiter);
  }
}

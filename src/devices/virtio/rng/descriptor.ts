/** virtio-rng in the device registry: no host side beyond the process's CSPRNG. */
import type { DeviceType } from '../descriptor.js';
import type { RateLimiterConfig } from '../rate-limiter.js';
import { RngDevice, rngIdentity } from './rng.js';

export interface RngConfig {
  kind: 'rng';
  id: string;
  /** Firecracker's entropy rate_limiter (enforced; default: none). */
  rateLimiter?: RateLimiterConfig;
}

export interface RngHost {
  rateLimiter?: RateLimiterConfig;
}

export const rngDevice: DeviceType<RngConfig, RngHost> = {
  kind: 'rng',
  metricsGroup: 'entropy',
  open: (config) => ({
    name: `virtio-rng ${config.id}`,
    identity: rngIdentity(),
    host: config.rateLimiter ? { rateLimiter: config.rateLimiter } : {},
    warnings: [],
    close: () => undefined,
  }),
  create(host) {
    const rng = new RngDevice(host.rateLimiter ? { rateLimiter: host.rateLimiter } : {});
    // Firecracker's EntropyDeviceMetrics names.
    return {
      backend: rng,
      metrics: () => ({
        entropy_bytes: rng.bytes,
        entropy_rate_limiter_throttled: rng.throttled,
        rate_limiter_event_count: rng.throttleEvents,
      }),
    };
  },
};

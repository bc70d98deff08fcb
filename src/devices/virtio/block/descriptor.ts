/** virtio-blk in the device registry: a raw image opened on the main thread, served in the worker. */
import { closeSync } from 'node:fs';
import type { DeviceType } from '../descriptor.js';
import { BlockDevice, blockIdentity, fdBlockFile } from './block.js';
import { openBlockImage, type BlockConfig, type BlockHost } from './config.js';

export type { BlockConfig } from './config.js';

export const blockDevice: DeviceType<BlockConfig, BlockHost> = {
  kind: 'block',
  metricsGroup: 'block',
  open(config, ctx) {
    const { warnings, ...opened } = openBlockImage(config, ctx);
    const host: BlockHost = {
      ...opened,
      ...(config.rateLimiter ? { rateLimiter: config.rateLimiter } : {}),
    };
    return {
      name: `virtio-blk ${config.id} (${host.path}${host.readOnly ? ', read-only' : ''})`,
      identity: blockIdentity(host.capacity, host.readOnly),
      host,
      warnings,
      close: () => closeSync(host.fd),
    };
  },
  create(host, env) {
    const dev = new BlockDevice({
      name: env.name,
      file: fdBlockFile(host.fd),
      capacity: host.capacity,
      readOnly: host.readOnly,
      serial: host.serial,
      log: (m) => env.log(m),
      ...(host.rateLimiter ? { rateLimiter: host.rateLimiter } : {}),
    });
    return {
      backend: dev,
      // Firecracker's BlockDeviceMetrics names.
      metrics: () => ({
        read_count: dev.counters.reads,
        write_count: dev.counters.writes,
        flush_count: dev.counters.flushes,
        read_bytes: dev.counters.bytesRead,
        write_bytes: dev.counters.bytesWritten,
        io_engine_throttled_events: 0,
        invalid_reqs_count: dev.counters.badRequests + dev.counters.unsupported,
        execute_fails: dev.counters.ioErrors,
        // Ours: requests over seg_max / size_max / the request byte cap (in invalid_reqs_count).
        oversized_reqs_count: dev.counters.oversized,
        // PATCH /drives image swaps (Firecracker's BlockDeviceMetrics update_count).
        update_count: dev.counters.updates,
        // Requests the drive's rate limiter held back, and their wake-ups.
        rate_limiter_throttled_events: dev.counters.throttled,
        rate_limiter_event_count: dev.counters.throttleEvents,
      }),
    };
  },
};

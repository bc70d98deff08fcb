/** virtio-blk in the device registry: a raw image opened on the main thread, served in the worker. */
import { closeSync } from 'node:fs';
import type { DeviceType } from '../descriptor.js';
import { BlockDevice, blockIdentity, fdBlockFile } from './block.js';
import { BLK_ASYNC_SLOTS, BLK_URING_ALLOW } from './async-engine.js';
import { IoUring } from './io-uring.js';
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
      ioEngine: config.ioEngine,
      ...(config.ioEngineDefaulted === true ? { ioEngineDefaulted: true } : {}),
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
    let ring: IoUring | undefined;
    if (host.ioEngine === 'Async') {
      try {
        ring = IoUring.open(env.sys, BLK_ASYNC_SLOTS, BLK_URING_ALLOW);
      } catch (e) {
        // Old kernel (ENOSYS), seccomp or io_uring_disabled (EPERM), missing features. A drive
        // that asked for Async is told at the default log level (warn); one that got it by
        // default, at info.
        const asked = host.ioEngineDefaulted !== true;
        env.log(
          `${env.name}: io_uring unavailable (${(e as Error).message}); serving it with io_engine "Sync"` +
            (asked
              ? ' instead of the "Async" it asked for'
              : ' (the default engine is "Async"; set io_engine "Sync" to silence this)'),
          ...(asked ? (['warn'] as const) : []),
        );
      }
    }
    const dev = new BlockDevice({
      name: env.name,
      file: fdBlockFile(host.fd, env.sys),
      capacity: host.capacity,
      readOnly: host.readOnly,
      serial: host.serial,
      log: (m) => env.log(m),
      ...(host.rateLimiter ? { rateLimiter: host.rateLimiter } : {}),
      ...(ring ? { uring: { ring, loop: env.loop, bufferAddress: env.sys.bufferAddress } } : {}),
    });
    const a = dev.engine?.counters;
    return {
      backend: dev,
      // Firecracker's BlockDeviceMetrics names.
      metrics: () => ({
        read_count: dev.counters.reads,
        write_count: dev.counters.writes,
        flush_count: dev.counters.flushes,
        read_bytes: dev.counters.bytesRead,
        write_bytes: dev.counters.bytesWritten,
        // Async: a request waited on its queue because every io_uring slot was in flight.
        io_engine_throttled_events: a?.ringFull ?? 0,
        invalid_reqs_count: dev.counters.badRequests + dev.counters.unsupported,
        execute_fails: dev.counters.ioErrors,
        // Ours: requests over seg_max / size_max / the request byte cap (in invalid_reqs_count).
        oversized_reqs_count: dev.counters.oversized,
        // PATCH /drives image swaps (Firecracker's BlockDeviceMetrics update_count).
        update_count: dev.counters.updates,
        // Requests the drive's rate limiter held back, and their wake-ups.
        rate_limiter_throttled_events: dev.counters.throttled,
        rate_limiter_event_count: dev.counters.throttleEvents,
        // Ours (Async engine): requests in flight at most so far, io_uring_enter submissions,
        // later rounds of a kick's turn that found chains queued while it submitted.
        ...(a
          ? {
              io_uring_inflight_max: a.inFlightHighWater,
              io_uring_submits: a.submits,
              io_uring_short_resubmits: a.shortResubmits,
              io_uring_turn_rounds: a.rounds,
            }
          : {}),
      }),
      close: () => dev.close(),
    };
  },
};

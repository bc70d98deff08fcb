/**
 * virtio-pmem in the device registry. open() opens the backing file (read-only or read-write),
 * checks it (a regular file, non-empty, a multiple of 2 MiB, not attached twice), reserves its
 * guest-physical range above RAM and asks the VMM to map it there (a KVM memory slot, read-only
 * for a read-only device). The device worker only serves flush requests, by fsync of the file.
 *
 * Firecracker pads a file that is not a multiple of 2 MiB with anonymous memory the guest may
 * write but that never reaches the file; we refuse such files instead (the message says so).
 */
import { closeSync, constants, fstatSync, fsyncSync, openSync } from 'node:fs';
import { resolve } from 'node:path';
import { ConfigError } from '../../../util/errors.js';
import type { DeviceType } from '../descriptor.js';
import type { RateLimiterConfig } from '../rate-limiter.js';
import { PMEM_ALIGN, PmemDevice, pmemIdentity } from './pmem.js';

export interface PmemConfig {
  kind: 'pmem';
  /** Firecracker's pmem id. */
  id: string;
  path: string;
  readOnly: boolean;
  /** Firecracker's pmem rate_limiter, on flush requests (default: none). */
  rateLimiter?: RateLimiterConfig;
}

export interface PmemHost {
  fd: number;
  path: string;
  readOnly: boolean;
  size: number;
  guestAddr: number;
  rateLimiter?: RateLimiterConfig;
}

/** The guest-physical alignment of each pmem region's start (a memory section of x86 Linux). */
export const PMEM_REGION_ALIGN = 128 * 1024 * 1024;
/** Largest backing file we map (the guest-physical space planned above RAM is bounded too). */
export const PMEM_MAX_SIZE = 64 * 1024 * 1024 * 1024;

export function openPmemFile(c: PmemConfig): {
  fd: number;
  path: string;
  size: number;
  dev: number;
  ino: number;
} {
  const what = `pmem ${c.id} (${c.path})`;
  if (typeof c.path !== 'string' || c.path === '')
    throw new ConfigError(`pmem ${c.id}: no path_on_host`);
  const path = resolve(c.path);
  let fd: number;
  try {
    fd = openSync(
      path,
      (c.readOnly ? constants.O_RDONLY : constants.O_RDWR) | constants.O_NONBLOCK,
    );
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') throw new ConfigError(`${what}: the file does not exist`);
    if (code === 'EISDIR') throw new ConfigError(`${what}: is a directory, not a file`);
    if (!c.readOnly && (code === 'EACCES' || code === 'EPERM' || code === 'EROFS'))
      throw new ConfigError(`${what}: not writable by this user (attach it with read_only: true)`);
    throw new ConfigError(`${what}: cannot open the file: ${code ?? (e as Error).message}`);
  }
  try {
    const st = fstatSync(fd);
    if (!st.isFile()) throw new ConfigError(`${what}: path_on_host is not a regular file`);
    if (st.size === 0) throw new ConfigError(`${what}: the file is empty`);
    if (st.size % PMEM_ALIGN !== 0)
      throw new ConfigError(
        `${what}: the file's size (${st.size} bytes) is not a multiple of 2 MiB; the guest maps pmem in 2 MiB units (extend it, e.g. truncate -s %2M)`,
      );
    if (st.size > PMEM_MAX_SIZE)
      throw new ConfigError(`${what}: the file is larger than ${PMEM_MAX_SIZE / 2 ** 30} GiB`);
    return { fd, path, size: st.size, dev: st.dev, ino: st.ino };
  } catch (e) {
    closeSync(fd);
    throw e;
  }
}

export const pmemDevice: DeviceType<PmemConfig, PmemHost> = {
  kind: 'pmem',
  metricsGroup: 'pmem',
  open(config, ctx) {
    const what = `pmem ${config.id} (${config.path})`;
    const f = openPmemFile(config);
    try {
      const other = ctx.claim(`image ${f.dev}:${f.ino}`, what);
      if (other !== undefined)
        throw new ConfigError(`${what}: the same file is already attached as ${other}`);
      if (!ctx.allocateGuestMemory)
        throw new ConfigError(`${what}: this VM has no guest-physical room for device memory`);
      const guestAddr = ctx.allocateGuestMemory(f.size, PMEM_REGION_ALIGN);
      const host: PmemHost = {
        fd: f.fd,
        path: f.path,
        readOnly: config.readOnly,
        size: f.size,
        guestAddr,
        ...(config.rateLimiter ? { rateLimiter: config.rateLimiter } : {}),
      };
      return {
        name: `virtio-pmem ${config.id} (${f.path}${config.readOnly ? ', read-only' : ''})`,
        identity: pmemIdentity(guestAddr, f.size),
        host,
        warnings: [],
        memory: [{ guestAddr, size: f.size, fd: f.fd, offset: 0, readOnly: config.readOnly }],
        close: () => closeSync(f.fd),
      };
    } catch (e) {
      closeSync(f.fd);
      throw e;
    }
  },
  create(host, env) {
    const dev = new PmemDevice(
      env.name,
      () => fsyncSync(host.fd),
      (m) => env.log(m),
      { fileSize: host.size, ...(host.rateLimiter ? { rateLimiter: host.rateLimiter } : {}) },
    );
    return {
      backend: dev,
      // Firecracker's PmemMetrics names (queue_event_count, event_fails), then ours.
      metrics: () => ({
        queue_event_count: dev.counters.flushes + dev.counters.flushFails,
        event_fails: dev.counters.flushFails,
        flush_count: dev.counters.flushes,
        flush_fails: dev.counters.flushFails,
        invalid_reqs_count: dev.counters.badRequests,
        rate_limiter_throttled_events: dev.counters.throttled,
        rate_limiter_event_count: dev.counters.throttleEvents,
      }),
    };
  },
};

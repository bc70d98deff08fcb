/**
 * PATCH /drives/{id} after boot, as Firecracker's update_disk_image (helper P, issue 15): the
 * new image is opened and checked on the main thread with the same least-privilege rules as at
 * start (block/config.ts), handed to the device worker through its mailbox ('update-block'),
 * which swaps the backend's file, writes the new capacity into the config space, bumps
 * ConfigGeneration and raises a config-change interrupt if the driver is live. The main thread
 * keeps owning the descriptors: the old one is closed once the worker has let go of it. A
 * failure anywhere leaves the drive as it was (the new descriptor is closed).
 */
import { closeSync } from 'node:fs';
import { openReplacementImage, type BlockHost } from '../devices/virtio/block/config.js';
import { ConfigError } from '../util/errors.js';
import { log } from '../util/log.js';
import type { BuiltVm } from './builder.js';
import type { DriveConfig } from './resources.js';
import type { VirtioSlot } from './virtio-plan.js';
import type { RateLimiterTarget } from './device-worker-protocol.js';

/** A block slot's host side (the registry's union does not narrow on kind here). */
const hostOf = (s: VirtioSlot): BlockHost => s.host as BlockHost;

export interface DriveImageChange {
  /** The absolute path now served. */
  path: string;
  /** The disk size now, in 512-byte sectors. */
  capacity: number;
}

/** Swaps running drive `drive`'s image for `newPath`. Throws ConfigError; nothing changes then. */
export async function replaceDriveImage(
  built: BuiltVm,
  drive: DriveConfig,
  newPath: string,
): Promise<DriveImageChange> {
  const id = drive.drive_id;
  // A VM without virtio devices (or a test's stand-in) has no slots.
  const blocks = (built.parts?.plan?.slots ?? []).filter((s) => s.kind === 'block');
  const slot = blocks.find((s) => s.id === id);
  const worker = built.deviceWorker;
  if (!slot || !worker) throw new ConfigError(`drive ${id} is not attached to the running VM`);
  const opened = openReplacementImage(
    {
      kind: 'block',
      id,
      path: newPath,
      readOnly: hostOf(slot).readOnly,
      allowBlockDevice: drive.allow_block_device === true,
    },
    blocks.filter((s) => s !== slot).map((s) => ({ id: s.id, fd: hostOf(s).fd })),
  );
  try {
    await worker.request({ op: 'update-block', id, fd: opened.fd, capacity: opened.capacity });
  } catch (e) {
    closeSync(opened.fd);
    throw new ConfigError(
      `drive ${id}: the device did not take the new image: ${(e as Error).message}`,
    );
  }
  opened.warnings.forEach((w) => log('warn', w));
  const old = hostOf(slot).fd;
  // The plan's closer closes slot.host.fd at teardown: from now on, the new descriptor.
  Object.assign(hostOf(slot), {
    fd: opened.fd,
    path: opened.path,
    sizeBytes: opened.sizeBytes,
    capacity: opened.capacity,
  });
  closeSync(old);
  log('info', `drive ${id}: now serves ${opened.path} (${opened.capacity} sectors)`);
  return { path: opened.path, capacity: opened.capacity };
}

/**
 * PATCH /drives/{id}, /network-interfaces/{id} or /pmem/{id} with rate limiters, after boot (issue 16): the
 * running device takes the new limits through the device worker's mailbox
 * ('update-rate-limiter'). The caller has checked the values (deviceRateLimiter). Throws
 * ConfigError when the device is not running or refuses; nothing changes then.
 */
export async function updateRateLimiter(built: BuiltVm, target: RateLimiterTarget): Promise<void> {
  const worker = built.deviceWorker;
  const slots = built.parts?.plan?.slots ?? [];
  const what =
    target.kind === 'net'
      ? `network interface ${target.id}`
      : `${target.kind === 'block' ? 'drive' : target.kind === 'pmem' ? 'pmem device' : 'device'} ${target.id}`;
  if (!worker || !slots.some((s) => s.kind === target.kind && s.id === target.id))
    throw new ConfigError(`${what} is not attached to the running VM`);
  try {
    await worker.request({ op: 'update-rate-limiter', target });
  } catch (e) {
    throw new ConfigError(
      `${what}: the device did not take the rate limiter: ${(e as Error).message}`,
    );
  }
  log('info', `${what}: rate limiter updated`);
}

/**
 * The host side of a virtio-blk device: the image is opened once, and everything known about
 * it (type, size, identity) comes from that open descriptor (fstat), not from a separate stat of
 * the path, so the file checked is the file served. Every failure is a ConfigError naming the
 * drive (Firecracker refuses the same things).
 *
 * Image size: a file whose size is not a multiple of 512 is accepted and rounded DOWN to whole
 * sectors, with a warning, as Firecracker does (the tail is invisible to the guest); a file
 * smaller than one sector is refused.
 */
import { closeSync, constants, fstatSync, openSync, readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { ConfigError } from '../../../util/errors.js';
import { deviceNumber } from '../../../util/fs.js';
import type { OpenContext } from '../descriptor.js';
import type { RateLimiterConfig } from '../rate-limiter.js';
import { BLK_ID_BYTES, SECTOR_SIZE } from './request.js';

export interface BlockConfig {
  kind: 'block';
  /** The drive's name (Firecracker's drive_id): in log lines and metrics. */
  id: string;
  path: string;
  readOnly: boolean;
  /** GET_ID answer: at most 20 bytes once UTF-8 encoded (default: none). */
  serial?: string;
  /** A host block device may back the drive (the API's allow_block_device); default: refused. */
  allowBlockDevice?: boolean;
  /** Firecracker's drive rate_limiter (enforced by the device; default: none). */
  rateLimiter?: RateLimiterConfig;
  /**
   * The engine asked for (Firecracker's io_engine), resolved: VmResources fills in the default,
   * "Async" (issue 17). "Async" is served with Sync where io_uring is unavailable (one log line).
   */
  ioEngine: 'Sync' | 'Async';
  /** The drive left io_engine unset and got the default (the fallback's log line says so). */
  ioEngineDefaulted?: boolean;
}

/** What opening an image needs: a drive's config without its engine. */
export type BlockImageConfig = Omit<BlockConfig, 'ioEngine' | 'ioEngineDefaulted'>;

/** An open image and its geometry. */
export interface BlockImage {
  fd: number;
  path: string; // absolute
  readOnly: boolean;
  serial: Uint8Array;
  sizeBytes: number;
  capacity: number; // sectors
}

/** What the device worker needs: the open image, its rate limiter and its engine. */
export interface BlockHost extends BlockImage {
  /** The drive's rate limiter at start (BlockConfig.rateLimiter). */
  rateLimiter?: RateLimiterConfig;
  /** BlockConfig.ioEngine. */
  ioEngine: 'Sync' | 'Async';
  /** BlockConfig.ioEngineDefaulted. */
  ioEngineDefaulted?: boolean;
}

/** Opens and checks one drive's image; the caller closes `fd`. Throws ConfigError. */
export function openBlockImage(
  c: BlockImageConfig,
  ctx: Pick<OpenContext, 'claim'>,
): BlockImage & { warnings: string[] } {
  const what = `drive ${c.id} (${c.path})`;
  if (typeof c.path !== 'string' || c.path === '')
    throw new ConfigError(`drive ${c.id}: no image path`);
  const serial = new TextEncoder().encode(c.serial ?? '');
  if (serial.length > BLK_ID_BYTES)
    throw new ConfigError(`${what}: serial is longer than ${BLK_ID_BYTES} bytes`);
  const path = resolve(c.path);
  let fd: number;
  try {
    // O_NONBLOCK: opening a FIFO named as an image must not hang the VMM (it is refused below).
    fd = openSync(
      path,
      (c.readOnly ? constants.O_RDONLY : constants.O_RDWR) | constants.O_NONBLOCK,
    );
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    if (code === 'ENOENT') throw new ConfigError(`${what}: the image does not exist`);
    if (code === 'EISDIR') throw new ConfigError(`${what}: is a directory, not a disk image`);
    if (!c.readOnly && (code === 'EACCES' || code === 'EPERM' || code === 'EROFS'))
      throw new ConfigError(
        `${what}: not writable by this user (attach it read-only: ,ro on --drive, is_read_only in the API)`,
      );
    if (code === 'EACCES' || code === 'EPERM') throw new ConfigError(`${what}: not readable`);
    throw new ConfigError(`${what}: cannot open the image: ${code ?? (e as Error).message}`);
  }
  try {
    const st = fstatSync(fd);
    if (st.isDirectory()) throw new ConfigError(`${what}: is a directory, not a disk image`);
    if (st.isBlockDevice() && c.allowBlockDevice !== true) {
      throw new ConfigError(
        `${what}: path_on_host is a block device; refused unless asked for explicitly ("allow_block_device": true on the drive, ,blockdev on --drive)`,
      );
    }
    if (!st.isFile() && !st.isBlockDevice())
      throw new ConfigError(`${what}: path_on_host is not a regular file or block device`);
    const other = ctx.claim(`image ${st.dev}:${st.ino}`, what);
    if (other !== undefined)
      throw new ConfigError(`${what}: the same image as ${other} (one file, one drive)`);
    const sizeBytes = st.isBlockDevice() ? blockDeviceSize(path, st.rdev) : st.size;
    const warnings: string[] = [];
    if (sizeBytes < SECTOR_SIZE)
      throw new ConfigError(`${what}: ${sizeBytes} bytes is smaller than one sector`);
    if (sizeBytes % SECTOR_SIZE !== 0) {
      warnings.push(
        `${what}: size ${sizeBytes} is not a multiple of ${SECTOR_SIZE}; the last ${sizeBytes % SECTOR_SIZE} bytes are not visible to the guest`,
      );
    }
    return {
      fd,
      path,
      readOnly: c.readOnly,
      serial,
      sizeBytes,
      capacity: Math.floor(sizeBytes / SECTOR_SIZE),
      warnings,
    };
  } catch (e) {
    closeSync(fd);
    throw e;
  }
}

/** The size of a host block device (stat reports 0 for it): /sys/dev/block/MAJ:MIN/size sectors. */
function blockDeviceSize(path: string, rdev: number): number {
  const { major, minor } = deviceNumber(rdev);
  let sectors = NaN;
  try {
    sectors = Number(readFileSync(`/sys/dev/block/${major}:${minor}/size`, 'utf8').trim());
  } catch {
    // fall through
  }
  if (!Number.isSafeInteger(sectors))
    throw new ConfigError(`${path}: cannot read the block device's size`);
  return sectors * 512;
}

/**
 * PATCH /drives after boot (helper P): opens a running drive's new image with every check of
 * openBlockImage (same read-only mode, serial and block-device permission as the drive had).
 * The new image may be the drive's own current file (re-read after a resize on the host), but
 * not an image another drive serves: `others` are their open descriptors. Throws ConfigError;
 * the caller closes the returned fd (or hands it to the device and closes the old one).
 */
export function openReplacementImage(
  c: BlockImageConfig,
  others: ReadonlyArray<{ id: string; fd: number }>,
): BlockImage & { warnings: string[] } {
  if (typeof c.path !== 'string' || c.path === '' || c.path.includes('\0'))
    throw new ConfigError(`drive ${c.id}: path_on_host is not a valid path`);
  const taken = new Map<string, string>();
  for (const o of others) {
    const st = fstatSync(o.fd);
    taken.set(`image ${st.dev}:${st.ino}`, `drive ${o.id}`);
  }
  return openBlockImage(c, { claim: (resource) => taken.get(resource) });
}

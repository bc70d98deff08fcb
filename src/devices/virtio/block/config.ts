/**
 * Validation of block-device configurations, before boot (Firecracker refuses the same
 * things at PUT /drives time). Every failure is a ConfigError naming the drive.
 *
 * Image size: a file whose size is not a multiple of 512 is accepted and rounded DOWN to whole
 * sectors, with a warning, as Firecracker does (the tail is invisible to the guest); a file
 * smaller than one sector is refused.
 */
import { accessSync, constants, readFileSync, statSync } from 'node:fs';
import { resolve } from 'node:path';
import { ConfigError } from '../../../util/errors.js';
import { BLK_ID_BYTES, SECTOR_SIZE } from './request.js';

export interface BlockConfig {
  kind: 'block';
  path: string;
  readOnly: boolean;
  /** GET_ID answer: at most 20 bytes once UTF-8 encoded. */
  serial?: string;
}

export interface ValidatedBlock {
  path: string; // absolute
  readOnly: boolean;
  serial: Uint8Array;
  sizeBytes: number;
  capacity: number; // sectors
  warnings: string[];
}

/** Checks every drive and the set of drives; throws ConfigError on the first problem. */
export function validateBlockConfigs(configs: readonly BlockConfig[]): ValidatedBlock[] {
  const seen = new Map<string, string>(); // dev:ino -> path
  return configs.map((c, i) => {
    const what = `drive ${i} (${c.path})`;
    if (typeof c.path !== 'string' || c.path === '')
      throw new ConfigError(`drive ${i}: no image path`);
    const path = resolve(c.path);
    let st;
    try {
      st = statSync(path);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      throw new ConfigError(
        code === 'ENOENT'
          ? `${what}: the image does not exist`
          : `${what}: cannot open the image: ${code ?? (e as Error).message}`,
      );
    }
    if (st.isDirectory()) throw new ConfigError(`${what}: is a directory, not a disk image`);
    if (!st.isFile() && !st.isBlockDevice())
      throw new ConfigError(`${what}: not a regular file or block device`);
    const key = `${st.dev}:${st.ino}`;
    const other = seen.get(key);
    if (other !== undefined)
      throw new ConfigError(`${what}: the same image as ${other} (one file, one drive)`);
    seen.set(key, c.path);
    try {
      accessSync(path, c.readOnly ? constants.R_OK : constants.R_OK | constants.W_OK);
    } catch {
      throw new ConfigError(
        c.readOnly
          ? `${what}: not readable`
          : `${what}: not writable by this user (attach it read-only: ,ro on --drive, is_read_only in the API)`,
      );
    }
    const sizeBytes = st.isBlockDevice() ? blockDeviceSize(path) : st.size;
    const warnings: string[] = [];
    if (sizeBytes < SECTOR_SIZE)
      throw new ConfigError(`${what}: ${sizeBytes} bytes is smaller than one sector`);
    if (sizeBytes % SECTOR_SIZE !== 0) {
      warnings.push(
        `${what}: size ${sizeBytes} is not a multiple of ${SECTOR_SIZE}; the last ${sizeBytes % SECTOR_SIZE} bytes are not visible to the guest`,
      );
    }
    const serial = new TextEncoder().encode(c.serial ?? '');
    if (serial.length > BLK_ID_BYTES)
      throw new ConfigError(`${what}: serial is longer than ${BLK_ID_BYTES} bytes`);
    return {
      path,
      readOnly: c.readOnly,
      serial,
      sizeBytes,
      capacity: Math.floor(sizeBytes / SECTOR_SIZE),
      warnings,
    };
  });
}

/** The size of a host block device (stat reports 0 for it): /sys/dev/block/MAJ:MIN/size sectors. */
function blockDeviceSize(path: string): number {
  const rdev = statSync(path).rdev;
  // glibc's gnu_dev_major/minor encoding.
  const major = ((rdev >>> 8) & 0xfff) | (Math.floor(rdev / 2 ** 32) & ~0xfff);
  const minor = (rdev & 0xff) | ((rdev >>> 12) & ~0xff);
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

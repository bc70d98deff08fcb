/** Small file-system helpers shared across layers. */
import { lstatSync, unlinkSync, type Stats } from 'node:fs';

/** Removes `path` if it is there; a path that is not (or cannot be removed) is left as it is. */
export function unlinkQuietly(path: string): void {
  try {
    unlinkSync(path);
  } catch {
    // not there, or gone already
  }
}

/**
 * Removes `path` only if what is there now passes `isOurs` (looked at without following a
 * link): a socket or file of ours, never something put there under its name. True if removed.
 */
export function unlinkIfOurs(path: string, isOurs: (st: Stats) => boolean): boolean {
  try {
    const st = lstatSync(path, { throwIfNoEntry: false });
    if (!st || !isOurs(st)) return false;
    unlinkSync(path);
    return true;
  } catch {
    return false; // gone meanwhile
  }
}

/**
 * A device number (stat's `rdev`) as major and minor, glibc's gnu_dev_major/minor encoding
 * (12+ bits of major, 20 of minor; rdev can exceed 32 bits, hence no bit operators on it whole).
 */
export function deviceNumber(rdev: number): { major: number; minor: number } {
  const low = rdev % 2 ** 32;
  const high = Math.floor(rdev / 2 ** 32);
  return {
    major: ((low >>> 8) & 0xfff) | (high & ~0xfff),
    minor: (low & 0xff) | ((low >>> 12) & ~0xff),
  };
}

/** Whether `st` is the character device `major`:`minor` (e.g. /dev/null 1:3). */
export function isCharDevice(st: Stats, major: number, minor: number): boolean {
  if (!st.isCharacterDevice()) return false;
  const d = deviceNumber(st.rdev);
  return d.major === major && d.minor === minor;
}

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

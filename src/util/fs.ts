/** Small file-system helpers shared across layers. */
import { unlinkSync } from 'node:fs';

/** Removes `path` if it is there; a path that is not (or cannot be removed) is left as it is. */
export function unlinkQuietly(path: string): void {
  try {
    unlinkSync(path);
  } catch {
    // not there, or gone already
  }
}

/**
 * The host process's glibc heap: malloc_trim(0) through the shim (mallocTrim). Free memory at
 * the top of the main arena goes back with brk, free pages inside every arena with
 * madvise(MADV_DONTNEED) (both in every seccomp role's list). A process that runs many VMs one
 * after another (`serve --mode shared`, src/daemon/trim.ts) calls it when it goes idle.
 */
import { native } from '../kvm/native.js';

/** malloc_trim(0): true when memory went back to the system. */
export function mallocTrim(): boolean {
  return native().mallocTrim() === 1;
}

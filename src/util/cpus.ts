/**
 * How many CPUs this process may run on, as `os.availableParallelism()` counts them (the
 * affinity mask), without loading `node:os` where /proc is there to read: that module (its
 * source, code cache and binding) is ~0.25 MiB of a process's RSS, and a `run` with its kernel
 * given needs nothing else from it (the bundles load builtins such as it on first use:
 * scripts/bundle.mjs LAZY_BUILTINS).
 */
import { readFileSync } from 'node:fs';
import { availableParallelism } from 'node:os';

/** The CPUs in a cpulist ("0-3,8,10-11"), or undefined when it is not one. */
export function cpuListCount(list: string): number | undefined {
  let n = 0;
  for (const part of list.trim().split(',')) {
    const m = /^(\d+)(?:-(\d+))?$/.exec(part);
    if (!m) return undefined;
    const lo = Number(m[1]);
    const hi = m[2] === undefined ? lo : Number(m[2]);
    if (hi < lo) return undefined;
    n += hi - lo + 1;
  }
  return n > 0 ? n : undefined;
}

/**
 * The count of /proc/self/status's Cpus_allowed_list (the thread group leader's mask, which a
 * VMM's threads share), else os.availableParallelism() (no /proc: a jail).
 */
export function cpusAllowed(): number {
  let status: string | undefined;
  try {
    status = readFileSync('/proc/self/status', 'latin1');
  } catch {
    // no /proc
  }
  const list = status !== undefined ? /^Cpus_allowed_list:\s*(\S+)$/m.exec(status)?.[1] : undefined;
  return (list !== undefined ? cpuListCount(list) : undefined) ?? availableParallelism();
}

/**
 * Clocks that do not load `node:perf_hooks`. Node's global `performance` loads perf_hooks and
 * ten internal modules with it on its first use (~0.9 MiB of a process's RSS: their code, and
 * the node binary's pages that hold their source), to read the clock `process.hrtime()` reads.
 * A plain `run` needs nothing else from it.
 */

/**
 * Monotonic milliseconds with a fraction, as `performance.now()` but from CLOCK_MONOTONIC's own
 * origin, so a reading means the same in every thread of the process (a worker's
 * `performance.now()` counts from that worker's start).
 */
export function monoMs(): number {
  const t = process.hrtime();
  return t[0] * 1e3 + t[1] / 1e6;
}

/** monoMs() when Node started this process (where `process.uptime()` counts from). */
export const processStartMs = monoMs() - process.uptime() * 1e3;

/** Wall-clock ms minus monoMs(), taken once per thread: whole ms, as Date.now() gives them. */
const epochAnchor = Date.now() - monoMs();

/** The wall-clock time (epoch ms, within a millisecond) of the monoMs() reading `ms`. */
export function epochOf(ms: number): number {
  return epochAnchor + ms;
}

/** Now, as epoch ms with a fraction (for time stamps in logs). */
export function epochMs(): number {
  return epochOf(monoMs());
}

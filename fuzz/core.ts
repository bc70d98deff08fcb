/**
 * The fuzz runner: seeded, deterministic per seed, coverage-free. A target runs `cases` cases;
 * case i draws from its own PRNG (seed mixed with i). Cases are grouped in sessions of
 * `target.session` cases that share one device/state (so that what a guest grows over many
 * requests can be seen); a failing case is replayed with `--seed S --from <session start>
 * --cases <n>`, which rebuilds the session and runs it up to that case.
 *
 * Properties every target checks (a case throws FuzzFailure, or any other exception escapes):
 * - no exception escapes the code under test (it catches everything guest- or peer-made);
 * - bounded heap: `heapUsed` after `global.gc()` is sampled at session ends and must not grow
 *   by more than `heapLimitMiB` within a session, nor over the whole run;
 * - progress: targets count the iterations of each wake-up (kicks, loop dispatches) and fail a
 *   wake-up that spins.
 */
import v8 from 'node:v8';
import vm from 'node:vm';
import { Prng } from '../src/devices/virtio/testing/prng.js';

export { Prng };

/** A property that does not hold: reported with the case's seed. */
export class FuzzFailure extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'FuzzFailure';
  }
}

export function fail(message: string): never {
  throw new FuzzFailure(message);
}

/** The PRNG seed of case `i` of a run seeded `seed` (splitmix-style mixing). */
export function caseSeed(seed: number, i: number): number {
  let z = (seed ^ Math.imul(i + 1, 0x9e3779b9)) >>> 0;
  z = Math.imul(z ^ (z >>> 16), 0x85ebca6b) >>> 0;
  z = Math.imul(z ^ (z >>> 13), 0xc2b2ae35) >>> 0;
  return (z ^ (z >>> 16)) >>> 0;
}

export interface Session {
  /** Runs one case; may be async (the HTTP target). */
  run(rng: Prng, index: number): void | Promise<void>;
  /** Ends the session (close fds, stop workers); checked for leaks after. */
  close?(): void | Promise<void>;
  /** Guest RAM of a virtio session (the racing vCPU rewrites it). */
  ram?: { sabs: SharedArrayBuffer[] };
  /** What the session exercised, printed: summed over sessions (`max_*`: their maximum). */
  stats?(): Record<string, number>;
  /** The rig of a virtio session (racing mode relaxes the driver-side checks). */
  rig?: { racing: boolean };
}

export interface Target {
  name: string;
  /** What is fuzzed, one line (printed with --list). */
  what: string;
  /** Cases of a full run (npm run fuzz). */
  cases: number;
  /** Cases per session (one device lives this long). */
  session: number;
  /** Heap growth allowed within a session, MiB (default 48). */
  heapLimitMiB?: number;
  /** Builds the state of one session from its own PRNG. */
  open(rng: Prng): Session | Promise<Session>;
}

export interface CaseFailure {
  case: number;
  sessionStart: number;
  message: string;
  /** Failures of the same shape (numbers masked) in this run. */
  count: number;
}

export interface TargetResult {
  name: string;
  cases: number;
  seconds: number;
  failures: CaseFailure[];
  /** All failures (of the shapes kept and the others). */
  failureCount: number;
  /** Distinct shapes beyond the `keep` first. */
  failureShapesDropped: number;
  heapStartMiB: number;
  heapMaxMiB: number;
  stats: Record<string, number>;
}

const MiB = 1024 * 1024;

let gcFn: (() => void) | undefined;
/** global.gc, or the same function obtained at run time when node was not started with --expose-gc. */
function collector(): (() => void) | undefined {
  if (gcFn) return gcFn;
  const g = (globalThis as { gc?: () => void }).gc;
  if (g) return (gcFn = g);
  try {
    v8.setFlagsFromString('--expose-gc');
    gcFn = vm.runInNewContext('gc') as () => void;
  } catch {
    gcFn = undefined;
  }
  return gcFn;
}

export function heapMiB(): number {
  const gc = collector();
  if (gc) {
    gc();
    gc();
  }
  return process.memoryUsage().heapUsed / MiB;
}

export function hasGc(): boolean {
  return collector() !== undefined;
}

export interface RunOptions {
  seed: number;
  cases: number;
  from?: number;
  /** Stop starting new sessions after this many seconds. */
  timeSec?: number;
  /** Distinct failure shapes kept per target (default 64). */
  keep?: number;
  /** Whole-run heap growth allowed (MiB). */
  runHeapLimitMiB?: number;
}

function describe(e: unknown): string {
  if (e instanceof FuzzFailure) return e.message;
  const err = e as Error;
  const where = (err?.stack ?? '').split('\n').slice(1, 4).join(' | ').trim();
  return `exception escaped: ${err?.name ?? 'Error'}: ${err?.message ?? String(e)}${where ? ` at ${where}` : ''}`;
}

export async function runTarget(t: Target, o: RunOptions): Promise<TargetResult> {
  // Distinct failure shapes kept (numbers masked: a run has few); the rest are only counted.
  const keep = o.keep ?? 64;
  let failureShapesDropped = 0;
  const from = o.from ?? 0;
  const end = from + o.cases;
  const failures: CaseFailure[] = [];
  const seen = new Map<string, CaseFailure>();
  let failureCount = 0;
  const record = (c: number, start: number, message: string) => {
    failureCount++;
    // One entry per distinct message shape (numbers masked), the first case that showed it.
    const shape = message.replace(/0x[0-9a-f]+|\d+/gi, '#').slice(0, 160);
    const prev = seen.get(shape);
    if (prev) {
      prev.count++;
      return;
    }
    const f = { case: c, sessionStart: start, message, count: 1 };
    seen.set(shape, f);
    if (failures.length < keep) failures.push(f);
    else failureShapesDropped++;
  };
  const t0 = performance.now();
  const heapStart = heapMiB();
  let heapMax = heapStart;
  let done = 0;
  const stats: Record<string, number> = {};
  for (let start = from; start < end;) {
    if (o.timeSec !== undefined && (performance.now() - t0) / 1000 > o.timeSec) break;
    // Sessions end at multiples of t.session; one starts at a boundary, or after a failing
    // case (so `--from <its start>` replays it).
    const sessionEnd = Math.min(end, (Math.floor(start / t.session) + 1) * t.session);
    let failed = false;
    // Heap is sampled around whole sessions only (a session cut short by a failure is not).
    const whole = start % t.session === 0 && sessionEnd - start === t.session;
    const before = whole ? heapMiB() : 0;
    let session: Session | undefined;
    try {
      session = await t.open(new Prng(caseSeed(o.seed ^ 0x5e55_1014, start)));
    } catch (e) {
      record(start, start, `session setup: ${describe(e)}`);
      start = sessionEnd;
      continue;
    }
    let i = start;
    for (; i < sessionEnd; i++) {
      done++;
      try {
        await session.run(new Prng(caseSeed(o.seed, i)), i);
      } catch (e) {
        record(i, start, describe(e));
        // The session's state is suspect after a failure: a fresh one takes the next case.
        i++;
        failed = true;
        break;
      }
    }
    for (const [k, v] of Object.entries(session.stats?.() ?? {}))
      stats[k] = k.startsWith('max_') ? Math.max(stats[k] ?? 0, v) : (stats[k] ?? 0) + v;
    try {
      await session.close?.();
    } catch (e) {
      record(i - 1, start, `session close: ${describe(e)}`);
    }
    const after = whole && !failed ? heapMiB() : before;
    heapMax = Math.max(heapMax, after);
    const limit = t.heapLimitMiB ?? 48;
    if (whole && !failed && after - before > limit)
      record(
        i - 1,
        start,
        `${t.name}: heap grew ${(after - before).toFixed(1)} MiB in one session of ${i - start} cases (limit ${limit} MiB)`,
      );
    if (whole && !failed && after - heapStart > (o.runHeapLimitMiB ?? 128))
      record(
        i - 1,
        start,
        `${t.name}: heap grew ${(after - heapStart).toFixed(1)} MiB over the run (limit ${o.runHeapLimitMiB ?? 128} MiB)`,
      );
    start = failed ? i : sessionEnd;
  }
  return {
    name: t.name,
    cases: done,
    seconds: (performance.now() - t0) / 1000,
    failures,
    failureCount,
    failureShapesDropped,
    heapStartMiB: heapStart,
    heapMaxMiB: heapMax,
    stats,
  };
}

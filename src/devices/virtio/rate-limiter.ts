/**
 * Token-bucket rate limiters for virtio devices (issue 16), with Firecracker's semantics (its
 * docs/api_requests/patch-block.md and the RateLimiter/TokenBucket of its API description):
 *
 * - A bucket holds at most `size` tokens and starts full; it refills continuously at `size`
 *   tokens per `refill_time` ms. `one_time_burst` is an extra budget spent first, once, and
 *   never refilled. A bucket with size 0 or refill_time 0 is no bucket (no limit).
 * - A limiter has two independent buckets: `bandwidth` (bytes) and `ops` (requests/frames).
 *   A request takes its ops tokens and its bytes; if either does not fit, nothing is taken and
 *   the request waits (the device leaves it on its queue).
 * - A request bigger than the whole bucket (bytes > size) is let through once, empties the
 *   bucket, and blocks the limiter for the time the excess takes to refill (Firecracker's
 *   "over-consumption"). Unlike Firecracker, the bucket does not refill during that block (its
 *   refill clock starts when the excess is paid): Firecracker's goes on refilling, so a stream
 *   of requests of 3 bucket sizes passes at 1.5 times the rate; here the long-run rate holds
 *   whatever the request sizes (the property test checks it).
 * - A request that does not fit consumes whatever one_time_burst was left (as Firecracker does)
 *   and fails.
 *
 * Where we differ from Firecracker, on purpose: a failed request is told exactly how long until
 * its tokens are there (Firecracker re-arms a 100 ms timer and retries), so the device sleeps
 * once per throttling and wakes when the request fits: no polling.
 *
 * Pure: time comes from the `now()` given (milliseconds, monotonic; tests pass a fake clock).
 * Time and tokens are doubles: API values are integers below 2^64, and the arithmetic stays in
 * [0, size] for tokens and is clamped for time, so no rounding makes a budget negative.
 */
import { PersistError, f64, optional, struct, versioned } from '../../util/persist.js';
import { monoMs } from '../../util/clock.js';

/** One bucket as the API gives it (Firecracker's TokenBucket). */
export interface TokenBucketConfig {
  size: number;
  one_time_burst?: number;
  /** Milliseconds to refill the whole bucket. */
  refill_time: number;
}

/** Firecracker's RateLimiter: independent bytes and ops buckets, each optional. */
export interface RateLimiterConfig {
  bandwidth?: TokenBucketConfig;
  ops?: TokenBucketConfig;
}

/** The shortest sleep of a throttled queue, in ms (the loop's timers have ms granularity). */
export const MIN_THROTTLE_MS = 1;

/** What a bucket's reduce() did. */
export type Reduction =
  | { kind: 'ok' }
  | { kind: 'fail' }
  /** Let through, but `ratio` bucket sizes too many: the limiter blocks for ratio * refill. */
  | { kind: 'over'; ratio: number };

/** A bucket is configured (Firecracker: size 0 or refill_time 0 means no bucket). */
export function bucketEnabled(c: TokenBucketConfig | undefined): c is TokenBucketConfig {
  return c !== undefined && c.size > 0 && c.refill_time > 0;
}

/** Throws RangeError naming `what` unless every value is a non-negative integer. */
export function checkBucketConfig(c: TokenBucketConfig, what: string): void {
  for (const [k, v] of [
    ['size', c.size],
    ['refill_time', c.refill_time],
    ['one_time_burst', c.one_time_burst ?? 0],
  ] as const)
    if (typeof v !== 'number' || !Number.isFinite(v) || v < 0 || !Number.isInteger(v))
      throw new RangeError(`${what}.${k}: ${String(v)} is not a non-negative integer`);
}

/** Saved state of one bucket (Firecracker saves the same: config, budget, time since update). */
export const BucketState = struct({
  size: f64,
  /** The one_time_burst configured (to compare with a PATCH), and what is left of it. */
  configuredBurst: f64,
  oneTimeBurst: f64,
  refillTime: f64,
  budget: f64,
  /** ms since the last refill was accounted (negative: the refill clock starts later). */
  elapsed: f64,
});
export type BucketStateT = ReturnType<typeof BucketState.read>;

/** Float64 slots of a bucket's changing state (budget, one-time burst left, last update). */
export const BUCKET_STATE_SLOTS = 3;
const B_BUDGET = 0;
const B_BURST = 1;
const B_LAST_UPDATE = 2;

/**
 * Where a bucket keeps its changing state: by default its own array. A bucket several threads
 * share (the UART's, used by every vCPU thread) gives a view of a SharedArrayBuffer instead;
 * `attach` then takes the state another thread's bucket initialised there. The caller orders
 * the accesses (a lock) and gives every thread the same clock.
 */
export interface BucketStore {
  slots: Float64Array;
  attach?: boolean;
}

export class TokenBucket {
  readonly size: number;
  readonly refillTime: number;
  /** The one_time_burst given at configuration (for comparing configurations). */
  readonly initialBurst: number;
  private readonly st: Float64Array;

  constructor(c: TokenBucketConfig, now: number, store?: BucketStore) {
    checkBucketConfig(c, 'bucket');
    if (!bucketEnabled(c)) throw new RangeError('a bucket needs size > 0 and refill_time > 0');
    this.size = c.size;
    this.refillTime = c.refill_time;
    this.initialBurst = c.one_time_burst ?? 0;
    if (store && store.slots.length !== BUCKET_STATE_SLOTS)
      throw new RangeError(`a bucket store has ${BUCKET_STATE_SLOTS} slots`);
    this.st = store?.slots ?? new Float64Array(BUCKET_STATE_SLOTS);
    if (store?.attach) return;
    this.budget = c.size;
    this.burst = this.initialBurst;
    this.lastUpdate = now;
  }

  private get budget(): number {
    return this.st[B_BUDGET]!;
  }
  private set budget(v: number) {
    this.st[B_BUDGET] = v;
  }
  private get burst(): number {
    return this.st[B_BURST]!;
  }
  private set burst(v: number) {
    this.st[B_BURST] = v;
  }
  private get lastUpdate(): number {
    return this.st[B_LAST_UPDATE]!;
  }
  private set lastUpdate(v: number) {
    this.st[B_LAST_UPDATE] = v;
  }

  /** The tokens in the bucket now (not counting the one-time burst). */
  available(now: number): number {
    this.refill(now);
    return this.budget;
  }

  get oneTimeBurst(): number {
    return this.burst;
  }

  sameConfig(c: TokenBucketConfig): boolean {
    return (
      c.size === this.size &&
      c.refill_time === this.refillTime &&
      (c.one_time_burst ?? 0) === this.initialBurst
    );
  }

  /**
   * Adds the tokens earned since the last update. Only whole tokens are added, and the clock
   * of the bucket advances by exactly their time, so a fraction earned is not lost.
   */
  private refill(now: number): void {
    const dt = now - this.lastUpdate;
    // Not yet: after an over-consumption the refill clock starts when the excess is paid.
    if (!(dt > 0)) return;
    const earned = Math.floor((dt * this.size) / this.refillTime);
    if (earned <= 0) return;
    if (this.budget + earned >= this.size) {
      this.budget = this.size;
      this.lastUpdate = now; // full: what is earned beyond is dropped, as is its time
    } else {
      this.budget += earned;
      this.lastUpdate = Math.min(now, this.lastUpdate + (earned * this.refillTime) / this.size);
    }
  }

  /** Takes `tokens` (Firecracker's TokenBucket::reduce). */
  reduce(tokens: number, now: number): Reduction {
    if (this.burst > 0) {
      if (this.burst >= tokens) {
        this.burst -= tokens;
        return { kind: 'ok' };
      }
      tokens -= this.burst;
      this.burst = 0;
    }
    if (tokens > this.budget) {
      this.refill(now);
      if (tokens > this.size) {
        const excess = tokens - this.budget;
        this.budget = 0;
        // The excess is paid in time: no refill until then (see the module comment).
        this.lastUpdate = Math.max(this.lastUpdate, now) + (excess * this.refillTime) / this.size;
        return { kind: 'over', ratio: excess / this.size };
      }
      if (tokens > this.budget) return { kind: 'fail' };
    }
    this.budget -= tokens;
    return { kind: 'ok' };
  }

  /** Gives back tokens taken (a request that then did not go), up to a full bucket. */
  replenish(tokens: number): void {
    this.budget = Math.min(this.size, this.budget + tokens);
  }

  /**
   * ms until a request of `tokens` goes; 0 if it does now. One over the size goes once the
   * bucket's refill clock runs (no over-consumption being paid).
   */
  waitFor(tokens: number, now: number): number {
    this.refill(now);
    if (tokens > this.size + this.burst) return Math.max(0, this.lastUpdate - now);
    const missing = tokens - this.burst - this.budget;
    if (missing <= 0) return 0;
    const ms = (missing * this.refillTime) / this.size - (now - this.lastUpdate);
    return Math.max(0, ms);
  }

  save(now: number): BucketStateT {
    this.refill(now);
    return {
      size: this.size,
      configuredBurst: this.initialBurst,
      oneTimeBurst: this.burst,
      refillTime: this.refillTime,
      budget: this.budget,
      elapsed: now - this.lastUpdate,
    };
  }

  /** A bucket from saved state (input: checked, throws PersistError). */
  static fromState(s: BucketStateT, now: number, what: string): TokenBucket {
    const fin = (v: number) => Number.isFinite(v) && v >= 0;
    if (![s.size, s.configuredBurst, s.oneTimeBurst, s.refillTime, s.budget].every(fin))
      throw new PersistError(`${what}: a value is negative or not finite`);
    if (
      !(s.size > 0 && s.refillTime > 0) ||
      !Number.isInteger(s.size) ||
      !Number.isInteger(s.refillTime)
    )
      throw new PersistError(`${what}: size ${s.size}, refill_time ${s.refillTime}`);
    if (s.budget > s.size) throw new PersistError(`${what}: budget ${s.budget} > size ${s.size}`);
    const b = new TokenBucket(
      { size: s.size, refill_time: s.refillTime, one_time_burst: Math.floor(s.configuredBurst) },
      now,
    );
    b.budget = s.budget;
    b.burst = s.oneTimeBurst;
    // Time since the last update carries over (Firecracker's elapsed_ns), at most one refill.
    if (!Number.isFinite(s.elapsed)) throw new PersistError(`${what}: elapsed ${s.elapsed}`);
    // Time since the last update carries over (Firecracker's elapsed_ns), at most one refill;
    // negative: the refill clock starts later (an over-consumption being paid), an hour at most.
    b.lastUpdate = now - Math.max(-3_600_000, Math.min(s.elapsed, s.refillTime));
    return b;
  }
}

/** A limiter's saved state: its buckets and how long it was still blocked for. */
export const RateLimiterStateV1 = versioned(
  'rate-limiter',
  1,
  struct({
    bandwidth: optional(BucketState),
    ops: optional(BucketState),
    /** ms the limiter was still blocked (over-consumption or a failed request). */
    blocked: f64,
  }),
);

/** A throttling decision: go (tokens taken) or wait `ms` (nothing taken). */
export type Admission = { go: true } | { go: false; ms: number };

const GO: Admission = { go: true };

export class RateLimiter {
  private bandwidth: TokenBucket | undefined;
  private ops: TokenBucket | undefined;
  /** No request goes before this time (Firecracker's timer_active). */
  private blockedUntil = 0;

  constructor(
    config: RateLimiterConfig | undefined,
    private readonly now: () => number,
  ) {
    this.update(config ?? {});
  }

  /** A bucket is configured: the device has to ask. */
  get active(): boolean {
    return this.bandwidth !== undefined || this.ops !== undefined;
  }

  /** The configuration now (as the API would show it). */
  config(): RateLimiterConfig {
    const c = (b: TokenBucket | undefined) =>
      b && { size: b.size, refill_time: b.refillTime, one_time_burst: b.initialBurst };
    const out: RateLimiterConfig = {};
    if (this.bandwidth) out.bandwidth = c(this.bandwidth)!;
    if (this.ops) out.ops = c(this.ops)!;
    return out;
  }

  /**
   * New configuration (PATCH): a bucket whose configuration did not change keeps its state; a
   * changed one starts afresh (full, with its one-time burst), a missing or zero one is
   * removed. Firecracker replaces only the buckets an update names; the API layer merges the
   * update into the stored configuration first, so an unnamed bucket arrives unchanged. A
   * block in force is lifted: the new buckets decide. Throws RangeError on a bad value
   * (changing nothing).
   */
  update(config: RateLimiterConfig): void {
    const t = this.now();
    const next = (cur: TokenBucket | undefined, c: TokenBucketConfig | undefined, what: string) => {
      if (c !== undefined) checkBucketConfig(c, what);
      if (!bucketEnabled(c)) return undefined;
      return cur?.sameConfig(c) ? cur : new TokenBucket(c, t);
    };
    const bw = next(this.bandwidth, config.bandwidth, 'bandwidth');
    const ops = next(this.ops, config.ops, 'ops');
    const changed = bw !== this.bandwidth || ops !== this.ops;
    this.bandwidth = bw;
    this.ops = ops;
    if (changed) this.blockedUntil = 0;
  }

  /**
   * Takes `bytes` bandwidth tokens and `ops` ops tokens for one request: go, or how many ms to
   * wait before asking again (then nothing was taken; when the wait is over the request fits,
   * unless another took the tokens meanwhile).
   */
  consume(bytes: number, ops: number): Admission {
    if (!this.active) return GO;
    const t = this.now();
    if (t < this.blockedUntil) {
      // Blocked: until then, and until this request's tokens are there.
      const ms = Math.max(
        this.blockedUntil - t,
        this.ops && ops > 0 ? this.ops.waitFor(ops, t) : 0,
        this.bandwidth && bytes > 0 ? this.bandwidth.waitFor(bytes, t) : 0,
      );
      return { go: false, ms: this.sleep(ms) };
    }
    this.blockedUntil = 0;
    let over = 0; // ms of block owed by an over-consumption
    if (this.ops && ops > 0) {
      const r = this.ops.reduce(ops, t);
      if (r.kind === 'fail') return this.wait(bytes, ops, t);
      if (r.kind === 'over') over = Math.max(over, r.ratio * this.ops.refillTime);
    }
    if (this.bandwidth && bytes > 0) {
      const r = this.bandwidth.reduce(bytes, t);
      if (r.kind === 'fail') {
        if (this.ops && ops > 0) this.ops.replenish(ops);
        return this.wait(bytes, ops, t);
      }
      if (r.kind === 'over') over = Math.max(over, r.ratio * this.bandwidth.refillTime);
    }
    if (over > 0) this.blockedUntil = t + over;
    return GO;
  }

  /** Nothing taken: the wait until both buckets have this request's tokens. */
  private wait(bytes: number, ops: number, t: number): Admission {
    const ms = this.sleep(
      Math.max(
        this.ops && ops > 0 ? this.ops.waitFor(ops, t) : 0,
        this.bandwidth && bytes > 0 ? this.bandwidth.waitFor(bytes, t) : 0,
      ),
    );
    this.blockedUntil = t + ms;
    return { go: false, ms };
  }

  /** Whole ms, at least MIN_THROTTLE_MS. */
  private sleep(ms: number): number {
    return Math.max(MIN_THROTTLE_MS, Math.ceil(ms));
  }

  /** Tokens in each bucket now (tests, metrics). */
  available(): { bandwidth?: number; ops?: number } {
    const t = this.now();
    return {
      ...(this.bandwidth ? { bandwidth: this.bandwidth.available(t) } : {}),
      ...(this.ops ? { ops: this.ops.available(t) } : {}),
    };
  }

  save(): Uint8Array {
    const t = this.now();
    return RateLimiterStateV1.encode({
      bandwidth: this.bandwidth?.save(t),
      ops: this.ops?.save(t),
      blocked: Math.max(0, this.blockedUntil - t),
    });
  }

  /** Loads saved state (config and tokens); throws PersistError, changing nothing. */
  restore(bytes: Uint8Array): void {
    const s = RateLimiterStateV1.decodeOrThrow(bytes);
    const t = this.now();
    const bw = s.bandwidth && TokenBucket.fromState(s.bandwidth, t, 'rate-limiter.bandwidth');
    const ops = s.ops && TokenBucket.fromState(s.ops, t, 'rate-limiter.ops');
    if (!Number.isFinite(s.blocked) || s.blocked < 0)
      throw new PersistError(`rate-limiter: blocked for ${s.blocked} ms`);
    // A saved block is input: an hour at most.
    const maxBlock = 3_600_000;
    this.bandwidth = bw;
    this.ops = ops;
    this.blockedUntil = s.blocked > 0 ? t + Math.min(s.blocked, maxBlock) : 0;
  }
}

/** The monotonic clock of the device worker, in ms (util/clock.ts). */
export const monotonicMs: () => number = monoMs;

/**
 * CLOCK_MONOTONIC in ms, the same in every thread of the process (monoMs() counts from
 * each thread's own start): for a bucket that several threads share.
 */
export const processMonotonicMs = (): number => {
  const [s, ns] = process.hrtime();
  return s * 1000 + ns / 1e6;
};

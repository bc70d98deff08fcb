import { test } from 'node:test';
import assert from 'node:assert/strict';
import { PersistError } from '../../util/persist.js';
import { Prng } from './testing/prng.js';
import {
  RateLimiter,
  RateLimiterStateV1,
  TokenBucket,
  type RateLimiterConfig,
} from './rate-limiter.js';

/** A limiter over a clock the test moves. */
function limiter(c: RateLimiterConfig) {
  const clock = { t: 1000 };
  const l = new RateLimiter(c, () => clock.t);
  return { l, clock };
}
const wait = (a: ReturnType<RateLimiter['consume']>) => (a.go ? 0 : a.ms);

test('a bucket starts full, refills at size per refill_time, and says exactly how long to wait', () => {
  const { l, clock } = limiter({ bandwidth: { size: 1000, refill_time: 100 } });
  assert.equal(l.active, true);
  assert.deepEqual(l.consume(600, 0), { go: true });
  assert.deepEqual(l.consume(400, 0), { go: true });
  assert.deepEqual(l.available(), { bandwidth: 0 });
  // 500 bytes take 50 ms to refill: the answer is that, not a poll interval.
  assert.deepEqual(l.consume(500, 0), { go: false, ms: 50 });
  // Asking again before then: blocked for what is left, nothing taken.
  clock.t += 20;
  assert.deepEqual(l.consume(1, 0), { go: false, ms: 30 });
  clock.t += 30;
  assert.deepEqual(l.consume(500, 0), { go: true });
  assert.deepEqual(l.available(), { bandwidth: 0 });
  // Whole tokens only, and the fraction earned is kept: 0.5625 ms earns 5.625 tokens.
  clock.t += 0.5625;
  assert.deepEqual(l.available(), { bandwidth: 5 });
  clock.t += 0.0625;
  assert.deepEqual(l.available(), { bandwidth: 6 });
  // Never more than size.
  clock.t += 10_000;
  assert.deepEqual(l.available(), { bandwidth: 1000 });
});

test('one_time_burst is spent first, once, and never refilled', () => {
  const { l, clock } = limiter({ bandwidth: { size: 100, one_time_burst: 250, refill_time: 10 } });
  assert.equal(wait(l.consume(200, 0)), 0); // from the burst
  assert.deepEqual(l.available(), { bandwidth: 100 });
  assert.equal(wait(l.consume(120, 0)), 0); // 50 of burst + 70 of budget
  assert.deepEqual(l.available(), { bandwidth: 30 });
  clock.t += 1000;
  assert.equal(wait(l.consume(100, 0)), 0);
  assert.deepEqual(l.available(), { bandwidth: 0 });
  assert.ok(wait(l.consume(1, 0)) > 0, 'the burst is gone');
});

test("a request that does not fit loses what was left of the burst (Firecracker's reduce)", () => {
  const b = new TokenBucket({ size: 100, one_time_burst: 30, refill_time: 100 }, 0);
  assert.deepEqual(b.reduce(90, 0), { kind: 'ok' }); // 30 burst + 60 budget
  assert.deepEqual(b.reduce(60, 0), { kind: 'fail' }); // 40 left
  assert.equal(b.oneTimeBurst, 0);
  assert.equal(b.available(0), 40);
});

test('ops: one token per request, independent of the bytes', () => {
  const { l, clock } = limiter({ ops: { size: 3, refill_time: 30 } });
  for (let i = 0; i < 3; i++) assert.equal(wait(l.consume(1 << 20, 1)), 0);
  assert.equal(wait(l.consume(0, 1)), 10);
  clock.t += 10;
  assert.equal(wait(l.consume(1 << 20, 1)), 0);
});

test('both buckets: a request the bandwidth refuses gives its ops token back', () => {
  const { l } = limiter({
    ops: { size: 10, refill_time: 1000 },
    bandwidth: { size: 100, refill_time: 1000 },
  });
  assert.equal(wait(l.consume(100, 1)), 0);
  assert.deepEqual(l.available(), { ops: 9, bandwidth: 0 });
  assert.ok(wait(l.consume(50, 1)) > 0);
  assert.deepEqual(l.available(), { ops: 9, bandwidth: 0 });
});

test('a request bigger than the bucket goes once, then the limiter blocks for the excess', () => {
  const { l, clock } = limiter({ bandwidth: { size: 1000, refill_time: 100 } });
  assert.equal(wait(l.consume(200, 0)), 0);
  // 3000 > size: goes; 800 were there, 2200 are owed: 2.2 refills = 220 ms blocked.
  assert.equal(wait(l.consume(3000, 0)), 0);
  // 220 ms of block, then 0.1 ms for the token itself (whole ms).
  assert.equal(wait(l.consume(1, 0)), 221);
  clock.t += 219;
  assert.equal(wait(l.consume(1, 0)), 2);
  // The bucket starts refilling when the block ends: empty then, 10 tokens 1 ms later.
  clock.t += 1;
  assert.deepEqual(l.available(), { bandwidth: 0 });
  clock.t += 1;
  assert.deepEqual(l.available(), { bandwidth: 10 });
  assert.equal(wait(l.consume(10, 0)), 0);
});

test('reconfigure mid-flight: unchanged buckets keep their state, changed ones start full, 0 removes', () => {
  const { l, clock } = limiter({
    bandwidth: { size: 1000, refill_time: 100 },
    ops: { size: 10, refill_time: 100 },
  });
  assert.equal(wait(l.consume(1000, 5)), 0);
  assert.ok(wait(l.consume(500, 1)) > 0); // throttled, blocked for 50 ms
  // The same configuration again (a PATCH of the other bucket): state kept, block kept.
  l.update({ bandwidth: { size: 1000, refill_time: 100 }, ops: { size: 10, refill_time: 100 } });
  assert.deepEqual(l.available(), { bandwidth: 0, ops: 5 });
  assert.ok(wait(l.consume(1, 0)) > 0);
  // A new bandwidth bucket: full at once, the block lifted; ops untouched.
  l.update({ bandwidth: { size: 4000, refill_time: 100 }, ops: { size: 10, refill_time: 100 } });
  assert.deepEqual(l.available(), { bandwidth: 4000, ops: 5 });
  assert.equal(wait(l.consume(500, 1)), 0);
  // size 0: no bucket (Firecracker's "disabled"); {}: no limit at all.
  l.update({ bandwidth: { size: 0, refill_time: 100 }, ops: { size: 10, refill_time: 100 } });
  assert.deepEqual(l.config(), { ops: { size: 10, refill_time: 100, one_time_burst: 0 } });
  l.update({});
  assert.equal(l.active, false);
  assert.equal(wait(l.consume(1e12, 1e6)), 0);
  // Bad values: refused, nothing changed.
  l.update({ ops: { size: 2, refill_time: 10 } });
  assert.throws(() => l.update({ ops: { size: -1, refill_time: 10 } }), RangeError);
  assert.throws(() => l.update({ bandwidth: { size: 1.5, refill_time: 10 } }), RangeError);
  assert.deepEqual(l.config(), { ops: { size: 2, refill_time: 10, one_time_burst: 0 } });
  clock.t += 1;
});

test('saved state: tokens, burst, time since the refill and a block travel; bad blobs are refused', () => {
  const { l, clock } = limiter({
    bandwidth: { size: 1000, one_time_burst: 500, refill_time: 100 },
    ops: { size: 10, refill_time: 100 },
  });
  assert.equal(wait(l.consume(1300, 4)), 0); // burst gone, 200 left
  clock.t += 5.5; // 55 tokens earned, +0.5 ms towards the next... 5 already whole
  const saved = l.save();
  // Restored later on another clock: same tokens, and the earned part carries over.
  const other = { t: 77 };
  const r = new RateLimiter(undefined, () => other.t);
  r.restore(saved);
  assert.deepEqual(r.config(), l.config());
  assert.deepEqual(r.available(), l.available());
  other.t += 10;
  clock.t += 10;
  assert.deepEqual(r.available(), l.available());
  // A block in force travels too.
  assert.equal(wait(l.consume(5000, 0)), 0); // over-consumption
  const blocked = wait(l.consume(1, 0));
  assert.ok(blocked > 0);
  r.restore(l.save());
  assert.equal(wait(r.consume(1, 0)), blocked);

  const bad = (bytes: Uint8Array, re: RegExp) => {
    const before = r.save();
    assert.throws(
      () => r.restore(bytes),
      (e) => e instanceof PersistError && re.test(e.message),
    );
    assert.deepEqual(r.save(), before, 'unchanged');
  };
  bad(saved.subarray(0, saved.length - 3), /truncated|bytes/);
  bad(Uint8Array.of(1, 2, 3), /truncated|record/);
  // A budget above the size.
  const st = RateLimiterStateV1.decodeOrThrow(saved);
  st.bandwidth!.budget = 2000;
  const edited = RateLimiterStateV1.encode(st);
  bad(edited, /budget 2000 > size 1000/);
});

/**
 * Property test of the arithmetic: random buckets, a greedy sender of random request sizes that
 * sleeps exactly the time it is told. Checked at every step: nothing is ever admitted beyond
 * what the bucket allows (size + burst + rate x time, plus one over-sized request, which the
 * block then pays back: a bucket that refilled during that block, as Firecracker's does, fails
 * this after a few over-sized requests); after sleeping the wait it was given, a lone sender's
 * request always goes (so a throttled queue wakes once per throttling, never polls); and the
 * long-run rate is the configured one.
 */
test('property: never more than the bucket allows, one wake-up per throttling, the configured rate', () => {
  const rng = new Prng(20261130);
  for (let round = 0; round < 300; round++) {
    const size = 1 + rng.below(rng.chance(0.5) ? 100 : 1_000_000);
    const refill = 1 + rng.below(rng.chance(0.5) ? 10 : 2000);
    const burst = rng.chance(0.3) ? rng.below(size * 3) : 0;
    const useOps = rng.chance(0.3);
    const opsSize = 1 + rng.below(50);
    const clock = { t: rng.below(1e6) };
    const t0 = clock.t;
    const l = new RateLimiter(
      {
        bandwidth: { size, refill_time: refill, one_time_burst: burst },
        ...(useOps ? { ops: { size: opsSize, refill_time: refill } } : {}),
      },
      () => clock.t,
    );
    const maxReq = rng.chance(0.2) ? size * 3 : size; // some over-sized requests
    let admitted = 0;
    let largestExcess = 0;
    let ops = 0;
    let throttles = 0;
    for (let step = 0; step < 400; step++) {
      const want = 1 + rng.below(maxReq);
      const a = l.consume(want, 1);
      if (!a.go) {
        throttles++;
        assert.ok(a.ms >= 1 && Number.isInteger(a.ms), `wait ${a.ms}`);
        clock.t += a.ms;
        // A lone sender that slept what it was told goes now.
        assert.equal(l.consume(want, 1).go, true, `round ${round} step ${step}: woke too early`);
      }
      admitted += want;
      ops++;
      // An over-sized request goes whole on whatever was left: bound it by its size.
      if (want > size) largestExcess = Math.max(largestExcess, want);
      const elapsed = clock.t - t0;
      const allowed = size + burst + (elapsed * size) / refill + largestExcess;
      assert.ok(admitted <= allowed + 1e-6, `round ${round}: ${admitted} > ${allowed}`);
      if (useOps) assert.ok(ops <= opsSize + (elapsed * opsSize) / refill + 1e-6);
      if (rng.chance(0.05)) clock.t += rng.below(refill * 2); // idle time
    }
    // Long run with a busy sender of bucket-sized requests and no idle time: the rate is the
    // configured one within 1% + one request (the initial fill, and ceil() of the waits).
    if (!useOps && size >= 1000 && refill >= 100) {
      const start = clock.t;
      const l = new RateLimiter({ bandwidth: { size, refill_time: refill } }, () => clock.t);
      let sent = 0;
      for (let i = 0; i < 200; i++) {
        const a = l.consume(size / 4, 0);
        if (a.go) sent += size / 4;
        else clock.t += a.ms;
      }
      const rate = sent / (clock.t - start);
      const want = size / refill;
      assert.ok(rate <= want * 1.01 + (size * 2) / (clock.t - start), `rate ${rate} > ${want}`);
      assert.ok(rate >= want * 0.95, `round ${round}: rate ${rate} < ${want}`);
    }
    assert.ok(throttles > 0 || admitted <= size + burst + largestExcess + (clock.t - t0) * size);
  }
});

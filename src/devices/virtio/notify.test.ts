/**
 * Notification suppression and VIRTIO_F_RING_EVENT_IDX (issue 17; virtio 1.2 §2.7.7, §2.7.10):
 * kicks suppressed while a queue drains, re-enabled race-free at the empty pop, used_event
 * honoured with u16 wraparound, one used.idx store and at most one interrupt per turn, and no
 * lost wake-up when a turn stops on its budget. The driver side is MockQueue playing Linux's
 * virtqueue_kick_prepare / virtqueue_get_buf.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { GuestMemory } from '../../memory/guest-memory.js';
import type { DescriptorChain } from './chain.js';
import { QUEUE_BUDGET_CHAINS, VIRTIO_F_RING_EVENT_IDX, bit } from './constants.js';
import { TURN_TIMING_EVERY, timedTurns, type VirtioBackend } from './device.js';
import { type QueuePosition, Virtqueue, needEvent } from './queue.js';
import { rngIdentity } from './rng/rng.js';
import { harness } from './testing/harness.js';
import { GuestAllocator, MockQueue } from './testing/mock-driver.js';
import { Prng } from './testing/prng.js';

const RAM = 1 << 20;
const MODES = [
  { name: 'EVENT_IDX', eventIdx: true },
  { name: 'NO_NOTIFY', eventIdx: false },
] as const;

function setup(eventIdx: boolean, size = 8, position?: QueuePosition) {
  const mem = GuestMemory.anonymous([{ base: 0, size: RAM }]);
  const alloc = new GuestAllocator(0x1000, RAM);
  const mq = new MockQueue(mem, alloc, size);
  if (position) mq.startAt(position.nextAvail);
  const r = Virtqueue.create(
    mem,
    { size, desc: mq.desc, driver: mq.avail, device: mq.used },
    { indirect: false, maxSize: 256, eventIdx },
    position,
  );
  assert.ok(r.ok);
  const buf = alloc.alloc(64);
  const add = () => mq.addChain([{ addr: buf, len: 64, write: true }]);
  return { mem, mq, q: r.value, add };
}

function popHead(q: Virtqueue): number {
  const p = q.pop();
  assert.equal(p.kind, 'chain', JSON.stringify(p));
  return (p as { chain: DescriptorChain }).chain.head;
}

for (const { name, eventIdx } of MODES) {
  test(`${name}: no kicks while the device drains; the empty pop asks for the next one`, () => {
    const { mq, q, add } = setup(eventIdx);
    add();
    assert.equal(mq.kickNeeded(eventIdx), true, 'the first buffer is kicked');
    q.suppressKicks();
    if (!eventIdx) assert.equal(mq.usedFlags() & 1, 1, 'NO_NOTIFY while draining');
    popHead(q);
    // The driver, on another CPU, adds two more while we drain: no kick.
    add();
    add();
    assert.equal(mq.kickNeeded(eventIdx), false);
    popHead(q);
    popHead(q);
    assert.equal(q.pop().kind, 'empty');
    assert.equal(q.kicksSuppressed, false);
    if (eventIdx) assert.equal(mq.availEvent(), 3, 'avail_event = the next entry we consume');
    else assert.equal(mq.usedFlags() & 1, 0, 'NO_NOTIFY cleared');
    add();
    assert.equal(mq.kickNeeded(eventIdx), true, 'drained: the next buffer is kicked');
    // Empty again after that one: nothing more to write, and still no buffer missed.
    popHead(q);
    assert.equal(q.pop().kind, 'empty');
    add();
    assert.equal(mq.kickNeeded(eventIdx), true);
  });

  test(`${name}: a buffer added between the last look and the re-enable is not lost`, () => {
    const { mq, q, add } = setup(eventIdx);
    add();
    assert.equal(mq.kickNeeded(eventIdx), true);
    q.suppressKicks();
    const first = popHead(q);
    let raced: number | undefined;
    let kicked: boolean | undefined;
    q.beforeReenableForTest = () => {
      if (raced !== undefined) return;
      // We saw avail.idx == our position; the driver adds now, and sees kicks still off.
      raced = add();
      kicked = mq.kickNeeded(eventIdx);
    };
    // The driver did not kick: the device's second look after re-enabling must find it.
    assert.equal(popHead(q), raced);
    assert.equal(kicked, false, 'the driver saw kicks off');
    assert.notEqual(raced, first);
    assert.equal(q.notifyCounters.reenableRaces, 1);
    assert.equal(q.kicksSuppressed, true, 'still draining: kicks stay off');
    assert.equal(q.pop().kind, 'empty');
    add();
    assert.equal(mq.kickNeeded(eventIdx), true);
  });

  test(`${name}: a restored queue re-enables kicks it may have left off`, () => {
    const { mq, q, mem, add } = setup(eventIdx);
    q.suppressKicks();
    // Another Virtqueue over the same rings (a restore) starts with no idea of what was written.
    const r = Virtqueue.create(
      mem,
      { size: 8, desc: mq.desc, driver: mq.avail, device: mq.used },
      { indirect: false, maxSize: 256, eventIdx },
      q.position(),
    );
    assert.ok(r.ok);
    assert.equal(r.value.pop().kind, 'empty');
    add();
    assert.equal(mq.kickNeeded(eventIdx), true);
  });
}

test('needEvent is vring_need_event: event in [old, new) modulo 2^16', () => {
  const rng = new Prng(17);
  for (let i = 0; i < 20_000; i++) {
    const old = rng.below(0x10000);
    const n = rng.chance(0.3) ? rng.below(8) : rng.below(0x10000);
    const now = (old + n) & 0xffff;
    // Events near the interval's edges most of the time.
    const ev = rng.chance(0.5) ? rng.below(0x10000) : (old + rng.below(n + 3) - 1) & 0xffff;
    let inRange = false;
    for (let k = 0; k < n && !inRange; k++) inRange = ((old + k) & 0xffff) === ev;
    assert.equal(needEvent(ev, now, old), inRange, `event ${ev} old ${old} new ${now}`);
  }
});

test('EVENT_IDX: used_event is honoured across the 65535 -> 0 wrap', () => {
  const start = 65532;
  const { mq, q, add } = setup(true, 8, { nextAvail: start, nextUsed: start });
  const use = (k: number) => {
    for (let i = 0; i < k; i++) {
      add();
      q.pushUsed(popHead(q), 1);
    }
  };
  use(1); // used.idx 65533
  assert.equal(q.needsInterrupt(), true, 'a restored queue interrupts at its first decision');
  mq.setUsedEvent(65534);
  use(2); // 65535: 65534 in [65533, 65535)
  assert.equal(q.needsInterrupt(), true);
  mq.setUsedEvent(0);
  use(3); // 65535 -> 2: 0 in [65535, 2), across the wrap
  assert.equal(mq.usedIdx(), 2);
  assert.equal(q.needsInterrupt(), true);
  mq.setUsedEvent(5);
  use(2); // 2 -> 4: 5 not yet
  assert.equal(q.needsInterrupt(), false);
  use(2); // 4 -> 6: now
  assert.equal(q.needsInterrupt(), true);
  mq.setUsedEvent(65530); // behind: the driver does not want one
  use(1);
  assert.equal(q.needsInterrupt(), false);
  assert.equal(q.needsInterrupt(), false, 'nothing used since: nothing due');
  assert.deepEqual(
    { irqs: q.notifyCounters.interrupts, suppressed: q.notifyCounters.interruptsSuppressed },
    { irqs: 4, suppressed: 3 },
  );
});

test('without EVENT_IDX, used_event is ignored and NO_INTERRUPT decides', () => {
  const { mq, q, add } = setup(false);
  add();
  q.pushUsed(popHead(q), 1);
  mq.setUsedEvent(100);
  assert.equal(q.needsInterrupt(), true);
  mq.setAvailFlags(1);
  add();
  q.pushUsed(popHead(q), 1);
  assert.equal(q.needsInterrupt(), false);
});

test('a batch publishes used.idx once, at its end', () => {
  const { mq, q, add } = setup(true);
  q.beginBatch();
  for (let i = 0; i < 5; i++) {
    add();
    q.pushUsed(popHead(q), 7);
    assert.equal(mq.usedIdx(), 0, 'not visible inside the batch');
  }
  assert.equal(q.unpublished, 5);
  assert.equal(q.needsInterrupt(), true);
  assert.equal(mq.usedIdx(), 5);
  assert.equal(q.notifyCounters.usedPublishes, 1);
  assert.equal(mq.takeUsed().length, 5);
  // Outside a batch every pushUsed is published at once (backends that call nothing new).
  add();
  q.pushUsed(popHead(q), 7);
  assert.equal(mq.usedIdx(), 6);
});

/** A backend that plays the driver while it serves: what did the driver see mid-drain? */
class Observer implements VirtioBackend {
  readonly name = 'observer';
  served = 0;
  usedIdxSeen: number[] = [];
  kickSeen: boolean[] = [];
  /** Called inside handle(): the driver's moves during the drain. */
  during: ((served: number) => void) | undefined;
  constructor(readonly mq: () => MockQueue) {}
  handle(): number {
    this.served++;
    this.usedIdxSeen.push(this.mq().usedIdx());
    this.during?.(this.served);
    return 1;
  }
}

for (const { name, eventIdx } of MODES) {
  const features = (f: bigint) => (eventIdx ? f : f & ~bit(VIRTIO_F_RING_EVENT_IDX));

  test(`${name}: one turn, one used.idx store, one interrupt, no kick for buffers added meanwhile`, () => {
    let mq!: MockQueue;
    const b = new Observer(() => mq);
    const h = harness(rngIdentity(), b);
    [mq] = h.start({ features }) as [MockQueue];
    const buf = h.alloc.alloc(16);
    const add = () => mq.addChain([{ addr: buf, len: 16, write: true }]);
    for (let i = 0; i < 10; i++) add();
    assert.equal(mq.kickNeeded(eventIdx), true);
    b.during = (n) => {
      if (n === 3) {
        add();
        b.kickSeen.push(mq.kickNeeded(eventIdx));
      }
    };
    h.kick();
    assert.equal(b.served, 11, 'the buffer added mid-drain was served in the same turn');
    assert.deepEqual(new Set(b.usedIdxSeen), new Set([0]), 'used.idx unchanged during the turn');
    assert.deepEqual(b.kickSeen, [false], 'no kick while draining');
    assert.equal(mq.takeUsed().length, 11);
    assert.equal(h.interrupts(), 1);
    const d = h.device.deviceState;
    assert.ok(d.kind === 'active');
    assert.equal(d.queues[0]!.notifyCounters.usedPublishes, 1);
    const m = h.device.metrics();
    assert.deepEqual([m.queue0_kicks, m.queue0_irqs, m.queue0_used], [1, 1, 11]);
    assert.equal(m.queue0_turns, 1, 'one turn served the 11 chains');
    assert.ok(typeof m.queue0_turn_us === 'number' && m.queue0_turn_us >= 0);
    add();
    assert.equal(mq.kickNeeded(eventIdx), true, 'drained: kicks are back on');
    // One turn in TURN_TIMING_EVERY is timed (the first was); the metric is their mean x turns.
    b.during = () => {};
    for (let i = 0; i < 2 * TURN_TIMING_EVERY; i++) {
      if (i > 0) add();
      h.kick();
    }
    const c = h.device.counters;
    assert.equal(c.turns[0], 1 + 2 * TURN_TIMING_EVERY);
    assert.equal(timedTurns(c.turns[0]!), 3, 'turns 1, 1 + EVERY and 1 + 2 x EVERY were timed');
    assert.ok(c.turnUs[0]! > 0);
    const m2 = h.device.metrics();
    assert.equal(m2.queue0_turn_us, Math.round((c.turnUs[0]! * c.turns[0]!) / 3));
  });

  test(`${name}: a turn stopped by its budget keeps going without kicks and loses nothing`, () => {
    let mq!: MockQueue;
    const b = new Observer(() => mq);
    const h = harness(rngIdentity(), b);
    [mq] = h.start({ features, queueSize: 256 }) as [MockQueue];
    const buf = h.alloc.alloc(16);
    const add = () => mq.addChain([{ addr: buf, len: 16, write: true }]);
    for (let i = 0; i < 200; i++) add();
    assert.equal(mq.kickNeeded(eventIdx), true);
    h.kick();
    assert.equal(b.served, QUEUE_BUDGET_CHAINS);
    assert.equal(h.deferred.size, 1, "the next turn is the device's own");
    // The driver takes what is used and adds more: no kick is due, and none is needed.
    assert.equal(mq.takeUsed().length, QUEUE_BUDGET_CHAINS);
    for (let i = 0; i < 20; i++) add();
    assert.equal(mq.kickNeeded(eventIdx), false);
    h.deferred.drain();
    assert.equal(b.served, 220);
    assert.equal(mq.takeUsed().length, 220 - QUEUE_BUDGET_CHAINS);
    add();
    assert.equal(mq.kickNeeded(eventIdx), true, 'drained: the driver kicks again');
    h.kick();
    assert.equal(b.served, 221);
  });

  test(`${name}: a driver that kicks only when asked never hangs (random interleavings)`, () => {
    for (const seed of [1, 2, 3, 4, 5, 6, 7, 8]) {
      const rng = new Prng(seed * 7919);
      let mq!: MockQueue;
      const b = new Observer(() => mq);
      const h = harness(rngIdentity(), b);
      const size = rng.pick([4, 8, 64, 256]);
      [mq] = h.start({ features, queueSize: size }) as [MockQueue];
      const buf = h.alloc.alloc(16);
      let added = 0;
      let taken = 0;
      let pendingKick = false;
      // Sometimes the driver adds while the device is in the middle of a turn (another CPU).
      b.during = () => {
        if (rng.chance(0.05) && added - taken < size) {
          mq.addChain([{ addr: buf, len: 16, write: true }]);
          added++;
          // The ioeventfd is read by the loop after this event, never inside it.
          if (mq.kickNeeded(eventIdx)) pendingKick = true;
        }
      };
      for (let step = 0; step < 400; step++) {
        const r = rng.below(10);
        if (r < 5) {
          const k = 1 + rng.below(size);
          for (let i = 0; i < k && added - taken < size; i++) {
            mq.addChain([{ addr: buf, len: 16, write: true }]);
            added++;
          }
          if (mq.kickNeeded(eventIdx)) h.kick();
        } else if (r < 8) taken += mq.takeUsed().length;
        else h.deferred.runRound();
        if (pendingKick) {
          pendingKick = false;
          h.kick();
        }
      }
      // Quiet now: the device's own turns finish, the driver takes what is used.
      if (pendingKick) h.kick();
      h.deferred.drain();
      taken += mq.takeUsed().length;
      assert.equal(taken, added, `seed ${seed}: ${added - taken} buffers never served`);
      assert.equal(b.served, added);
    }
  });
}

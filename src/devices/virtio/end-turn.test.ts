/**
 * VirtioBackend.endTurn (issue 17, virtio-net's batched TX): called once at the end of every
 * turn of a drained queue, including turns that stop on the work budget or the rate limiter,
 * before the turn's used entries are published; an exception from it breaks the device, as one
 * from handle() does, and the turn's chains are still returned.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { harness } from './testing/harness.js';
import type { DescriptorChain } from './chain.js';
import { QUEUE_BUDGET_CHAINS, STATUS_DEVICE_NEEDS_RESET } from './constants.js';
import type { VirtioBackend } from './device.js';
import { rngIdentity } from './rng/rng.js';

class TurnBackend implements VirtioBackend {
  readonly name = 'end-turn test';
  handled = 0;
  /** Per endTurn call: (queue, chains handled so far, used.idx the driver could see). */
  turns: Array<{ queue: number; handled: number; usedIdx: number }> = [];
  usedIdx: () => number = () => -1;
  throwAtEnd = false;
  /** admit() says "wait" for the chain with this ordinal (0-based), once. */
  throttleAt = -1;
  handle(_queue: number, _chain: DescriptorChain): number {
    this.handled++;
    return 0;
  }
  admit(): number {
    if (this.handled === this.throttleAt) {
      this.throttleAt = -1;
      return 5;
    }
    return 0;
  }
  endTurn(queue: number): void {
    this.turns.push({ queue, handled: this.handled, usedIdx: this.usedIdx() });
    if (this.throwAtEnd) throw new Error('batch failed');
  }
}

function setup() {
  const b = new TurnBackend();
  const h = harness(rngIdentity(), b);
  const [q] = h.start();
  b.usedIdx = () => h.mem.readU16(q!.used + 2);
  b.turns = []; // the activation's own look at the queue
  const put = (n: number) => {
    for (let i = 0; i < n; i++) q!.addChain([{ addr: h.alloc.alloc(16), len: 16 }]);
  };
  return { b, h, q: q!, put };
}

test('endTurn: once per turn, before the used entries are published', () => {
  const { b, h, q, put } = setup();
  put(3);
  h.kick();
  assert.deepEqual(b.turns, [{ queue: 0, handled: 3, usedIdx: 0 }]);
  assert.equal(q.takeUsed().length, 3);
  h.kick(); // nothing available: still a turn, still one call
  assert.equal(b.turns.length, 2);
});

test('endTurn: turns that stop on the budget or the rate limiter end with it too', () => {
  const { b, h, q, put } = setup();
  put(QUEUE_BUDGET_CHAINS + 10);
  h.kick();
  assert.deepEqual(b.turns, [{ queue: 0, handled: QUEUE_BUDGET_CHAINS, usedIdx: 0 }]);
  h.deferred.drain();
  assert.equal(b.turns.length, 2);
  assert.equal(b.turns[1]!.handled, QUEUE_BUDGET_CHAINS + 10);
  assert.equal(b.turns[1]!.usedIdx, QUEUE_BUDGET_CHAINS, 'the first turn was published after it');
  assert.equal(q.takeUsed().length, QUEUE_BUDGET_CHAINS + 10);

  const before = b.handled;
  b.throttleAt = before + 2;
  put(4);
  h.kick();
  assert.equal(b.turns.length, 3, 'the throttled turn ended with endTurn');
  assert.equal(b.turns[2]!.handled, before + 2);
  h.clock.advance(10);
  assert.equal(b.turns.length, 4);
  assert.equal(b.turns[3]!.handled, before + 4);
  assert.equal(q.takeUsed().length, 4);
});

test('endTurn: an exception breaks the device; the turn’s chains are returned', () => {
  const { b, h, q, put } = setup();
  b.throwAtEnd = true;
  put(2);
  h.kick();
  assert.equal(q.takeUsed().length, 2);
  assert.ok(h.device.state.snapshot().status & STATUS_DEVICE_NEEDS_RESET);
  assert.equal(h.device.metrics().device_failures, 1);
  assert.ok(h.logs.some((l) => /batch failed/.test(l)));
});

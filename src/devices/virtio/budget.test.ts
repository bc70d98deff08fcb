/**
 * The generic data plane against hostile and broken work (issue 12): a queue's turn is bounded
 * (QUEUE_BUDGET_CHAINS / QUEUE_BUDGET_BYTES) and yields to the loop, so devices take turns; an
 * exception out of a backend breaks that device (DEVICE_NEEDS_RESET), not the VMM.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { DeferQueue, harness } from './testing/harness.js';
import type { DescriptorChain } from './chain.js';
import {
  INT_CONFIG_CHANGE,
  QUEUE_BUDGET_BYTES,
  QUEUE_BUDGET_CHAINS,
  STATUS_DEVICE_NEEDS_RESET,
} from './constants.js';
import type { QueueIo, VirtioBackend } from './device.js';
import { RngDevice, rngIdentity } from './rng/rng.js';
import { BLK_SIZE_MAX, BlockDevice, blockIdentity } from './block/block.js';
import { VIRTIO_BLK_T_IN } from './block/request.js';

test('a queue serves at most QUEUE_BUDGET_CHAINS chains per turn, then yields and goes on', () => {
  const rng = new RngDevice();
  const h = harness(rngIdentity(), rng);
  const [q] = h.start();
  for (let i = 0; i < 200; i++) q!.addChain([{ addr: h.alloc.alloc(16), len: 16, write: true }]);
  h.kick();
  assert.equal(q!.takeUsed().length, QUEUE_BUDGET_CHAINS);
  assert.equal(h.interrupts(), 1, 'the chains of a turn are announced at its end');
  assert.equal(h.deferred.size, 1, 'its next turn is scheduled');
  h.kick(); // the guest kicks again: the scheduled turn will see it, no second turn
  assert.equal(q!.takeUsed().length, 0);
  assert.equal(h.deferred.size, 1);
  assert.equal(h.deferred.drain(), 3);
  assert.equal(q!.takeUsed().length, 200 - QUEUE_BUDGET_CHAINS);
  const m = h.device.metrics();
  assert.equal(m.queue_budget_yields, 3);
  assert.equal(m.device_failures, 0);
  // Two kicks from the driver. Interrupts: the first turn's, and the second turn's (the driver
  // took the first 64, so its used_event asked for the 65th); it took nothing more, so the last
  // two turns interrupt nobody (EVENT_IDX).
  assert.equal(m.queue0_kicks, 2);
  assert.equal(m.entropy_event_count, 2);
  assert.equal(m.queue0_used, 200);
  assert.equal(m.queue0_irqs, 2);
  assert.equal(m.queue0_irqs_suppressed, 2);
});

test('two devices take turns: a huge kick does not make the other wait for all of it', () => {
  const loop = new DeferQueue();
  const sectors = (1 << 30) / 512;
  let blkBytes = 0;
  const blk = new BlockDevice({
    name: 'blk',
    file: {
      read: (b) => void (blkBytes += b.length),
      write: () => undefined,
      flush: () => undefined,
    },
    capacity: sectors,
    readOnly: false,
    serial: new Uint8Array(0),
    log: () => undefined,
  });
  const hb = harness(blockIdentity(sectors, false), blk, { deferred: loop, name: 'blk' });
  const [bq] = hb.start();
  // 128 reads of 1 MiB each (8 segments aliasing one 128 KiB buffer): 128 MiB in one kick.
  const buf = hb.alloc.alloc(BLK_SIZE_MAX, 4096);
  for (let i = 0; i < 128; i++) {
    const hdr = hb.alloc.alloc(16);
    hb.mem.writeU32(hdr, VIRTIO_BLK_T_IN);
    const segs = Array.from({ length: 8 }, () => ({ addr: buf, len: BLK_SIZE_MAX, write: true }));
    const st = hb.alloc.alloc(1, 1);
    bq!.addIndirectChain(
      [{ addr: hdr, len: 16 }, ...segs, { addr: st, len: 1, write: true }],
      hb.alloc.alloc(16 * 10, 16),
    );
  }
  const hr = harness(rngIdentity(), new RngDevice(), { deferred: loop, name: 'rng' });
  const [rq] = hr.start();
  for (let i = 0; i < 3; i++) rq!.addChain([{ addr: hr.alloc.alloc(64), len: 64, write: true }]);

  hb.kick(); // one turn of blk: up to the byte budget
  const perTurn = QUEUE_BUDGET_BYTES / (8 * BLK_SIZE_MAX);
  assert.equal(bq!.takeUsed().length, perTurn);
  assert.equal(blkBytes, QUEUE_BUDGET_BYTES);
  hr.kick(); // rng, kicked meanwhile, is served at once: blk's rest waits for its turns
  assert.equal(rq!.takeUsed().length, 3);
  // Both keep yielding: blk and a busy rng alternate round by round.
  for (let i = 0; i < 200; i++) rq!.addChain([{ addr: hr.alloc.alloc(16), len: 16, write: true }]);
  hr.kick();
  loop.drain();
  assert.equal(bq!.takeUsed().length, 128 - perTurn);
  assert.equal(rq!.takeUsed().length, 200);
  assert.deepEqual(loop.log.slice(0, 6), ['blk', 'rng', 'blk', 'rng', 'blk', 'rng']);
  assert.equal(loop.log.filter((x) => x === 'blk').length, 128 / perTurn - 1);
  assert.equal(blkBytes, 128 << 20);
});

/** An rng whose handle() throws when `boom` is set (a bug of ours, or an unexpected host error). */
class FlakyRng implements VirtioBackend {
  readonly name = 'flaky-rng';
  boom = false;
  activations = 0;
  deactivations = 0;
  private readonly rng = new RngDevice();
  handle(queue: number, chain: DescriptorChain): number {
    if (this.boom) throw new Error('backend bug');
    return this.rng.handle(queue, chain);
  }
  activate(_f: bigint, _io: QueueIo): void {
    this.activations++;
  }
  deactivate(): void {
    this.deactivations++;
  }
}

test('an exception in a backend breaks that device (NEEDS_RESET, logged once, counted), not the others', () => {
  const loop = new DeferQueue();
  const flaky = new FlakyRng();
  const h = harness(rngIdentity(), flaky, { deferred: loop });
  const [q] = h.start();
  const other = harness(rngIdentity(), new RngDevice(), { deferred: loop });
  const [oq] = other.start();
  q!.addChain([{ addr: h.alloc.alloc(8), len: 8, write: true }]);
  h.kick();
  assert.deepEqual(q!.takeUsed(), [{ id: 0, len: 8 }]);
  flaky.boom = true;
  for (let i = 0; i < 3; i++) q!.addChain([{ addr: h.alloc.alloc(8), len: 8, write: true }]);
  h.kick();
  // The chain in hand is returned failed; the device stops serving its queue.
  assert.deepEqual(
    q!.takeUsed().map((u) => u.len),
    [0],
  );
  assert.ok(h.driver.status() & STATUS_DEVICE_NEEDS_RESET);
  assert.ok(h.driver.takeInterrupt() & INT_CONFIG_CHANGE);
  assert.equal(h.device.deviceState.kind, 'inactive');
  assert.equal(flaky.deactivations, 1);
  h.kick();
  h.kick();
  assert.equal(q!.takeUsed().length, 0, 'a broken device serves nothing until reset');
  assert.equal(h.logs.filter((l) => /needs a reset/.test(l)).length, 1, 'logged once');
  assert.equal(h.device.counters.failures, 1);
  assert.equal(h.transport.state.counters().needsReset, 1);
  // The other device on the same loop keeps working.
  oq!.addChain([{ addr: other.alloc.alloc(8), len: 8, write: true }]);
  other.kick();
  assert.deepEqual(oq!.takeUsed(), [{ id: 0, len: 8 }]);
  // The driver's reset revives the broken one.
  flaky.boom = false;
  const [q2] = h.start();
  q2!.addChain([{ addr: h.alloc.alloc(8), len: 8, write: true }]);
  h.kick();
  assert.deepEqual(q2!.takeUsed(), [{ id: 0, len: 8 }]);
  assert.equal(flaky.activations, 2);
});

test('an exception in activation or in backend work outside kicks is a device failure too', () => {
  const flaky = new FlakyRng();
  flaky.activate = () => {
    throw new Error('activation bug');
  };
  const h = harness(rngIdentity(), flaky);
  h.start();
  assert.ok(h.driver.status() & STATUS_DEVICE_NEEDS_RESET);
  assert.equal(h.device.deviceState.kind, 'inactive');
  assert.equal(h.device.counters.failures, 1);

  const h2 = harness(rngIdentity(), new FlakyRng());
  h2.start();
  // What the device worker does with a backend's own fds and timers.
  h2.device.guard('host fd 7', () => {
    throw new Error('subscriber bug');
  });
  assert.ok(h2.driver.status() & STATUS_DEVICE_NEEDS_RESET);
  assert.equal(h2.device.metrics().device_failures, 1);
  assert.match(h2.logs.join('\n'), /host fd 7 failed with an exception/);
});

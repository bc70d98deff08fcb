/**
 * Rate limiters on the devices (issue 16), over the test harness: a throttled queue leaves its
 * request on the ring and sleeps on one timer until the tokens are there (no polling: the
 * timers that fire are counted), kicks meanwhile serve nothing, a PATCH wakes it, and the
 * limiter's state travels with the device's saved state.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { RateLimiterConfig } from './rate-limiter.js';
import { VirtioDeviceStateV1 } from './device-state.js';
import { FakeClock, harness, type Harness } from './testing/harness.js';
import type { MockQueue } from './testing/mock-driver.js';
import { BlockDevice, blockIdentity, type BlockFile } from './block/block.js';
import { VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_FLUSH } from './block/request.js';
import { RngDevice, rngIdentity } from './rng/rng.js';
import { NET_HDR_SIZE } from './net/header.js';
import { NetDevice, RX_QUEUE, TX_QUEUE, netIdentity, type TapIo } from './net/net.js';

const SECTORS = 1024;

function blk(limiter: RateLimiterConfig, clock = new FakeClock()) {
  const image = new Uint8Array(SECTORS * 512);
  const file: BlockFile = {
    read: (b, pos) => b.set(image.subarray(pos, pos + b.length)),
    write: (b, pos) => image.set(b, pos),
    flush: () => undefined,
  };
  const dev = new BlockDevice({
    name: 'blk',
    file,
    capacity: SECTORS,
    readOnly: false,
    serial: new Uint8Array(0),
    log: () => undefined,
    rateLimiter: limiter,
    now: clock.now,
  });
  const h = harness(blockIdentity(SECTORS, false), dev, { clock });
  const [q] = h.start();
  return { h, q: q!, dev, clock };
}

/** Makes a read of `len` bytes available (no kick); returns its status address. */
function read(h: Harness, q: MockQueue, sector: number, len: number, type = VIRTIO_BLK_T_IN) {
  const hdr = h.alloc.alloc(16);
  h.mem.writeU32(hdr, type);
  h.mem.writeU64(hdr + 8, BigInt(sector));
  const data = len > 0 ? [{ addr: h.alloc.alloc(len, 512), len, write: true }] : [];
  const st = h.alloc.alloc(1, 1);
  h.mem.writeU8(st, 0xee);
  q.addChain([{ addr: hdr, len: 16 }, ...data, { addr: st, len: 1, write: true }]);
  return st;
}

test('virtio-blk: a throttled queue sleeps once per throttling and resumes after the refill', () => {
  // 8 KiB per 100 ms; each read is 4 KiB: two go at once, then one per 50 ms.
  const { h, q, dev, clock } = blk({ bandwidth: { size: 8192, refill_time: 100 } });
  const st = [0, 1, 2, 3, 4].map((i) => read(h, q, i * 8, 4096));
  h.kick();
  assert.equal(q.takeUsed().length, 2);
  assert.equal(h.mem.readU8(st[2]!), 0xee, 'the third request waits, untouched');
  assert.equal(clock.pending, 1, 'one timer');
  assert.equal(clock.next, 50);
  // Kicks while asleep serve nothing and arm nothing more.
  for (let i = 0; i < 10; i++) h.kick();
  assert.equal(q.takeUsed().length, 0);
  assert.equal(clock.pending, 1);
  clock.advance(49);
  assert.equal(q.takeUsed().length, 0);
  clock.advance(1);
  assert.equal(q.takeUsed().length, 1);
  assert.equal(h.mem.readU8(st[2]!), VIRTIO_BLK_S_OK);
  clock.advance(100);
  assert.equal(q.takeUsed().length, 2);
  assert.equal(clock.pending, 0, 'the queue is empty: nothing armed');
  // One wake-up per throttled request: no polling.
  assert.equal(clock.fired, 3);
  assert.equal(h.device.counters.throttleWakeups, 3);
  assert.equal(dev.counters.throttled, 3);
  assert.equal(dev.counters.throttleEvents, 3);
  assert.equal(dev.counters.reads, 5);
  assert.ok(h.interrupts() >= 3);
});

test('virtio-blk: ops count every request; malformed ones are not charged', () => {
  const { h, q, dev, clock } = blk({ ops: { size: 2, refill_time: 1000 } });
  read(h, q, 0, 0, VIRTIO_BLK_T_FLUSH);
  read(h, q, 0, 512);
  read(h, q, 0, 512);
  h.kick();
  assert.equal(q.takeUsed().length, 2);
  assert.equal(dev.counters.throttled, 1);
  // A request past the end of the disk is refused (IOERR) without I/O: not charged, but it
  // waits its turn behind the throttled one.
  read(h, q, SECTORS + 10, 512);
  clock.advance(500);
  const used = q.takeUsed();
  assert.equal(used.length, 2);
  assert.equal(dev.counters.badRequests, 1);
  assert.deepEqual(dev.limiter.available(), { ops: 0 });
});

test('virtio-blk: a PATCH wakes a sleeping queue; the new limits apply at once', () => {
  const { h, q, dev, clock } = blk({ bandwidth: { size: 4096, refill_time: 1000 } });
  for (let i = 0; i < 4; i++) read(h, q, i * 8, 4096);
  h.kick();
  assert.equal(q.takeUsed().length, 1);
  assert.equal(clock.next, 1000);
  dev.updateRateLimiter({ bandwidth: { size: 8192, refill_time: 1000 } });
  h.device.wakeThrottled();
  // A new bucket starts full: two more go now, the last waits 500 ms.
  assert.equal(q.takeUsed().length, 2);
  assert.equal(clock.pending, 1);
  assert.equal(clock.next, 500);
  dev.updateRateLimiter({});
  h.device.wakeThrottled();
  assert.equal(q.takeUsed().length, 1);
  assert.equal(clock.pending, 0, 'the old timer was cancelled');
  clock.advance(2000);
  assert.equal(clock.fired, 0);
});

test("virtio-blk: the limiter's tokens travel with the saved state", () => {
  const a = blk({ bandwidth: { size: 8192, refill_time: 100 } });
  read(a.h, a.q, 0, 8192);
  a.h.kick();
  a.q.takeUsed();
  a.clock.advance(25); // 2048 tokens back
  const saved = a.h.device.save();
  // A fresh device of the restored VM (built without a limiter: the saved one is loaded).
  const clock = new FakeClock();
  const fresh = new BlockDevice({
    name: 'blk',
    file: { read: () => undefined, write: () => undefined, flush: () => undefined },
    capacity: SECTORS,
    readOnly: false,
    serial: new Uint8Array(0),
    log: () => undefined,
    now: clock.now,
  });
  const b = harness(blockIdentity(SECTORS, false), fresh, {
    mem: a.h.mem,
    alloc: a.h.alloc,
    clock,
  });
  const r = b.device.restore(saved);
  assert.ok(r.ok, r.ok ? '' : r.error.message);
  assert.deepEqual(fresh.limiter.config(), {
    bandwidth: { size: 8192, refill_time: 100, one_time_burst: 0 },
  });
  assert.deepEqual(fresh.limiter.available(), { bandwidth: 2048 });
  clock.advance(25);
  assert.deepEqual(fresh.limiter.available(), { bandwidth: 4096 });
  // A damaged limiter state is refused; the device stays as it was.
  const bad = VirtioDeviceStateV1.decodeOrThrow(saved);
  bad.backend = bad.backend!.subarray(0, bad.backend!.length - 8);
  const c = harness(blockIdentity(SECTORS, false), blk({}).dev, { mem: a.h.mem, alloc: a.h.alloc });
  const r2 = c.device.restore(VirtioDeviceStateV1.encode(bad));
  assert.ok(!r2.ok && /virtio-blk/.test(r2.error.message));
  assert.equal(c.device.deviceState.kind, 'inactive');
});

test('virtio-rng: bytes and ops are limited; a throttled request waits on the ring', () => {
  const clock = new FakeClock();
  const rng = new RngDevice({
    rateLimiter: { bandwidth: { size: 64, refill_time: 10 } },
    now: clock.now,
  });
  const h = harness(rngIdentity(), rng, { clock });
  const [q] = h.start();
  for (let i = 0; i < 4; i++) q!.addChain([{ addr: h.alloc.alloc(32), len: 32, write: true }]);
  h.kick();
  assert.equal(q!.takeUsed().length, 2);
  assert.equal(clock.next, 5);
  clock.advance(10);
  assert.equal(q!.takeUsed().length, 2);
  assert.equal(rng.bytes, 128);
  assert.equal(rng.throttled, 2);
  assert.equal(rng.throttleEvents, 2);
  assert.equal(clock.fired, 2);
});

class FakeTap implements TapIo {
  inbox: Uint8Array[] = [];
  sent: Uint8Array[] = [];
  interest = false;
  readv(bufs: Uint8Array[]): number {
    const f = this.inbox.shift();
    if (!f) return -1;
    let n = 0;
    for (const b of bufs) {
      const take = Math.min(b.length, f.length - n);
      b.set(f.subarray(n, n + take));
      n += take;
    }
    return f.length;
  }
  writev(bufs: Uint8Array[]): number {
    const total = bufs.reduce((a, b) => a + b.length, 0);
    this.sent.push(new Uint8Array(total));
    return total;
  }
  setOffload(): void {}
  setReadInterest(on: boolean): void {
    this.interest = on;
  }
}

function net(rx: RateLimiterConfig | undefined, tx: RateLimiterConfig | undefined) {
  const clock = new FakeClock();
  const tap = new FakeTap();
  const dev = new NetDevice('net', tap, () => undefined, {
    ...(rx ? { rx } : {}),
    ...(tx ? { tx } : {}),
    setTimer: (ms, fn) => clock.after(ms, fn),
    now: clock.now,
  });
  const h = harness(netIdentity(undefined, false), dev, { clock });
  const [rxq, txq] = h.start();
  return { h, dev, tap, clock, rxq: rxq!, txq: txq! };
}

const frame = (payload: number) => new Uint8Array(NET_HDR_SIZE + payload);

test('virtio-net TX: frames over the limit stay on the TX queue until the tokens are there', () => {
  const { h, dev, tap, clock, txq } = net(undefined, { ops: { size: 2, refill_time: 100 } });
  for (let i = 0; i < 5; i++) {
    const a = h.alloc.alloc(NET_HDR_SIZE + 100);
    txq.addChain([{ addr: a, len: NET_HDR_SIZE + 100 }]);
  }
  h.kick(TX_QUEUE);
  assert.equal(tap.sent.length, 2);
  assert.equal(clock.next, 50);
  h.kick(TX_QUEUE);
  assert.equal(tap.sent.length, 2, 'a kick does not wake a sleeping queue');
  clock.advance(50);
  assert.equal(tap.sent.length, 3);
  clock.advance(100);
  assert.equal(tap.sent.length, 5);
  assert.equal(dev.counters.txThrottled, 3);
  assert.equal(dev.counters.txThrottleEvents, 3);
  assert.equal(clock.fired, 3);
});

test('virtio-net RX: a frame over the limit is held in its buffer, the TAP unwatched, then delivered', () => {
  // 1000 bytes per 100 ms; frames of 600 bytes.
  const { h, dev, tap, clock, rxq } = net(
    { bandwidth: { size: 1000, refill_time: 100 } },
    undefined,
  );
  for (let i = 0; i < 4; i++) rxq.addChain([{ addr: h.alloc.alloc(2048), len: 2048, write: true }]);
  tap.inbox.push(frame(600), frame(600), frame(600));
  h.kick(RX_QUEUE); // buffers added: RX reads the TAP
  assert.equal(rxq.takeUsed().length, 1);
  assert.equal(tap.interest, false, 'not watched while throttled');
  assert.equal(tap.inbox.length, 1, 'the second frame is read and held, the third waits');
  assert.equal(clock.next, 20);
  // Kicks (more buffers) while asleep do nothing.
  rxq.addChain([{ addr: h.alloc.alloc(2048), len: 2048, write: true }]);
  h.kick(RX_QUEUE);
  assert.equal(rxq.takeUsed().length, 0);
  clock.advance(20);
  const used = rxq.takeUsed();
  assert.equal(used.length, 1);
  assert.equal(used[0]!.len, NET_HDR_SIZE + 600);
  clock.advance(60);
  assert.equal(rxq.takeUsed().length, 1);
  assert.equal(dev.counters.rxFrames, 3);
  assert.equal(dev.counters.rxThrottled, 2);
  assert.equal(clock.fired, 2);
  // All delivered: the TAP is watched again.
  assert.equal(tap.interest, true);

  // A snapshot while a frame is held: the buffer goes back empty, the frame is dropped.
  tap.inbox.push(frame(900), frame(900));
  dev.onTapReadable();
  assert.equal(rxq.takeUsed().length, 0);
  assert.equal(clock.pending, 1);
  const saved = dev.save();
  assert.equal(dev.counters.rxThrottledDropped, 1);
  assert.equal(clock.pending, 0);
  assert.ok(saved.length > 0);
});

test('virtio-net: PATCH of the RX limiter wakes a held frame at once', () => {
  const { h, dev, tap, clock, rxq } = net(
    { bandwidth: { size: 1000, refill_time: 1000 } },
    undefined,
  );
  for (let i = 0; i < 3; i++) rxq.addChain([{ addr: h.alloc.alloc(2048), len: 2048, write: true }]);
  tap.inbox.push(frame(800), frame(800));
  dev.onTapReadable();
  assert.equal(rxq.takeUsed().length, 1);
  dev.updateRateLimiters({}, undefined);
  // Not at once (the worker may be paused): on the loop's next round.
  assert.equal(rxq.takeUsed().length, 0);
  assert.equal(clock.next, 0);
  clock.advance(0);
  assert.equal(rxq.takeUsed().length, 1);
  assert.equal(clock.pending, 0);
  assert.equal(tap.interest, true);
});

import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  closeSync,
  fsyncSync,
  mkdtempSync,
  openSync,
  rmSync,
  truncateSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ConfigError } from '../../../util/errors.js';
import { FakeClock, harness } from '../testing/harness.js';
import { VirtioDeviceStateV1 } from '../device-state.js';
import { DEVICE_ID_PMEM } from '../constants.js';
import { openPmemFile, pmemDevice } from './descriptor.js';
import { PMEM_ALIGN, PmemDevice, VIRTIO_PMEM_REQ_TYPE_FLUSH, pmemIdentity } from './pmem.js';

function request(h: ReturnType<typeof harness>, type: number, respLen = 4) {
  const req = h.alloc.alloc(4);
  new DataView(h.mem.view(req, 4).buffer, h.mem.view(req, 4).byteOffset).setUint32(0, type, true);
  const resp = h.alloc.alloc(Math.max(respLen, 1));
  h.mem.view(resp, 4).fill(0xee);
  return { req, resp };
}

function ret(h: ReturnType<typeof harness>, addr: number): number {
  const v = h.mem.view(addr, 4);
  return new DataView(v.buffer, v.byteOffset, 4).getUint32(0, true);
}

test('virtio-pmem identity: device 27, one queue, config space = le64 start, le64 size', () => {
  const id = pmemIdentity(0x1_4000_0000, 6 * PMEM_ALIGN);
  assert.equal(id.deviceId, DEVICE_ID_PMEM);
  assert.equal(id.queueSizes.length, 1);
  const v = new DataView(id.config.buffer);
  assert.equal(v.getBigUint64(0, true), 0x1_4000_0000n);
  assert.equal(v.getBigUint64(8, true), BigInt(6 * PMEM_ALIGN));
});

test('virtio-pmem answers a flush with ret 0 after flushing, and a bad request with ret 1', () => {
  let flushes = 0;
  const dev = new PmemDevice('pmem0', () => flushes++);
  const h = harness(pmemIdentity(0x1_0000_0000, PMEM_ALIGN), dev);
  const [q] = h.start();
  const a = request(h, VIRTIO_PMEM_REQ_TYPE_FLUSH);
  q!.addChain([
    { addr: a.req, len: 4 },
    { addr: a.resp, len: 4, write: true },
  ]);
  const b = request(h, 7);
  q!.addChain([
    { addr: b.req, len: 4 },
    { addr: b.resp, len: 4, write: true },
  ]);
  // No room for the response: nothing written, used.len 0.
  const c = request(h, VIRTIO_PMEM_REQ_TYPE_FLUSH);
  q!.addChain([{ addr: c.req, len: 4 }]);
  h.kick();
  assert.deepEqual(
    q!.takeUsed().map((u) => u.len),
    [4, 4, 0],
  );
  assert.equal(ret(h, a.resp), 0);
  assert.equal(ret(h, b.resp), 1);
  assert.equal(flushes, 1);
  assert.deepEqual(dev.counters, {
    flushes: 1,
    flushFails: 0,
    badRequests: 2,
    throttled: 0,
    throttleEvents: 0,
  });
});

test('virtio-pmem: a failing flush (a host I/O error) answers ret 1, is counted and logged once', () => {
  const logs: string[] = [];
  // A real fsync on a closed descriptor: EBADF.
  const dir = mkdtempSync(join(tmpdir(), 'pmem-'));
  const fd = openSync(join(dir, 'f'), 'w');
  closeSync(fd);
  const dev = new PmemDevice(
    'pmem0',
    () => fsyncSync(fd),
    (m) => logs.push(m),
  );
  const h = harness(pmemIdentity(0x1_0000_0000, PMEM_ALIGN), dev);
  const [q] = h.start();
  for (let i = 0; i < 2; i++) {
    const r = request(h, VIRTIO_PMEM_REQ_TYPE_FLUSH);
    q!.addChain([
      { addr: r.req, len: 4 },
      { addr: r.resp, len: 4, write: true },
    ]);
    h.kick();
    assert.equal(ret(h, r.resp), 1);
  }
  assert.equal(dev.counters.flushFails, 2);
  assert.equal(logs.length, 1);
  assert.match(logs[0]!, /flush failed/);
  rmSync(dir, { recursive: true });
});

test('virtio-pmem open: refuses missing, empty and unaligned files; reserves aligned guest memory', () => {
  const dir = mkdtempSync(join(tmpdir(), 'pmem-'));
  try {
    const f = join(dir, 'img');
    assert.throws(
      () => openPmemFile({ kind: 'pmem', id: 'p', path: f, readOnly: true }),
      /does not exist/,
    );
    writeFileSync(f, '');
    assert.throws(() => openPmemFile({ kind: 'pmem', id: 'p', path: f, readOnly: true }), /empty/);
    truncateSync(f, PMEM_ALIGN + 4096);
    assert.throws(
      () => openPmemFile({ kind: 'pmem', id: 'p', path: f, readOnly: true }),
      (e: unknown) => e instanceof ConfigError && /multiple of 2 MiB/.test((e as Error).message),
    );
    truncateSync(f, 2 * PMEM_ALIGN);
    const asked: Array<[number, number]> = [];
    const claims = new Map<string, string>();
    const ctx = {
      sys: {} as never,
      claim: (r: string, o: string) => {
        const prev = claims.get(r);
        if (prev === undefined) claims.set(r, o);
        return prev;
      },
      allocateGuestMemory: (size: number, align: number) => {
        asked.push([size, align]);
        return 0x1_4000_0000;
      },
    };
    const opened = pmemDevice.open({ kind: 'pmem', id: 'p', path: f, readOnly: true }, ctx);
    try {
      assert.deepEqual(asked, [[2 * PMEM_ALIGN, 128 * 1024 * 1024]]);
      assert.deepEqual(
        opened.memory?.map((m) => [m.guestAddr, m.size, m.readOnly]),
        [[0x1_4000_0000, 2 * PMEM_ALIGN, true]],
      );
      // The same file twice is refused.
      assert.throws(
        () => pmemDevice.open({ kind: 'pmem', id: 'q', path: f, readOnly: true }, ctx),
        /already attached/,
      );
      // No room planned: refused with a message.
      assert.throws(
        () =>
          pmemDevice.open(
            { kind: 'pmem', id: 'r', path: f, readOnly: true },
            { sys: {} as never, claim: () => undefined },
          ),
        /no guest-physical room/,
      );
    } finally {
      opened.close();
    }
  } finally {
    rmSync(dir, { recursive: true });
  }
});

/** A pmem device of `size` bytes with a rate limiter on a fake clock; flush() adds a request. */
function limitedPmem(limiter: object, size = PMEM_ALIGN, clock = new FakeClock()) {
  let flushes = 0;
  const dev = new PmemDevice('pmem0', () => flushes++, undefined, {
    fileSize: size,
    rateLimiter: limiter,
    now: clock.now,
  });
  const h = harness(pmemIdentity(0x1_0000_0000, size), dev, { clock });
  const [q] = h.start();
  const flush = () => {
    const r = request(h, VIRTIO_PMEM_REQ_TYPE_FLUSH);
    q!.addChain([
      { addr: r.req, len: 4 },
      { addr: r.resp, len: 4, write: true },
    ]);
    return r.resp;
  };
  return { dev, h, q: q!, flush, clock, flushes: () => flushes };
}

test('virtio-pmem rate limiter: a flush over the ops bucket waits on one timer, no polling', () => {
  const { dev, h, q, flush, clock, flushes } = limitedPmem({ ops: { size: 2, refill_time: 100 } });
  const resp = [flush(), flush(), flush(), flush()];
  h.kick();
  assert.equal(q.takeUsed().length, 2);
  assert.equal(flushes(), 2);
  assert.equal(ret(h, resp[2]!), 0xeeeeeeee, 'the third waits on the ring, untouched');
  assert.equal(clock.pending, 1, 'one timer');
  assert.equal(clock.next, 50, 'when one ops token is back');
  for (let i = 0; i < 10; i++) h.kick();
  assert.equal(q.takeUsed().length, 0, 'kicks while throttled serve nothing');
  assert.equal(clock.pending, 1, '...and arm nothing more');
  clock.advance(49);
  assert.equal(q.takeUsed().length, 0);
  clock.advance(1);
  assert.equal(q.takeUsed().length, 1);
  assert.equal(ret(h, resp[2]!), 0);
  clock.advance(50);
  assert.equal(q.takeUsed().length, 1);
  assert.equal(clock.pending, 0, 'the queue is empty: nothing armed');
  assert.equal(clock.fired, 2, 'one wake-up per throttling');
  assert.equal(flushes(), 4);
  assert.equal(dev.counters.throttled, 2);
  assert.equal(dev.counters.throttleEvents, 2);
});

test("virtio-pmem rate limiter: a flush takes the file's size in bandwidth tokens", () => {
  // A bucket of two files per second: two flushes go, the third waits half a second.
  const size = 4 * PMEM_ALIGN;
  const { h, q, flush, clock } = limitedPmem(
    { bandwidth: { size: 2 * size, refill_time: 1000 } },
    size,
  );
  flush();
  flush();
  flush();
  h.kick();
  assert.equal(q.takeUsed().length, 2);
  assert.equal(clock.next, 500);
  clock.advance(500);
  assert.equal(q.takeUsed().length, 1);
});

test('virtio-pmem rate limiter: a PATCH applies at once and wakes the queue; state is saved', () => {
  const { dev, h, q, flush, clock } = limitedPmem({ ops: { size: 1, refill_time: 10_000 } });
  flush();
  flush();
  flush();
  h.kick();
  assert.equal(q.takeUsed().length, 1);
  assert.equal(clock.next, 10_000);
  dev.updateRateLimiter({ ops: { size: 5, refill_time: 1000 } });
  h.device.wakeThrottled();
  assert.equal(q.takeUsed().length, 2, 'the new (full) bucket lets both go');
  assert.deepEqual(dev.limiter.available(), { ops: 3 });
  // The limiter's tokens travel with the device's saved state.
  const saved = h.device.save();
  const clock2 = new FakeClock();
  const fresh = new PmemDevice('pmem0', () => undefined, undefined, {
    fileSize: PMEM_ALIGN,
    now: clock2.now,
  });
  const b = harness(pmemIdentity(0x1_0000_0000, PMEM_ALIGN), fresh, {
    mem: h.mem,
    alloc: h.alloc,
    clock: clock2,
  });
  const r = b.device.restore(saved);
  assert.ok(r.ok, r.ok ? '' : r.error.message);
  assert.deepEqual(fresh.limiter.config(), {
    ops: { size: 5, refill_time: 1000, one_time_burst: 0 },
  });
  assert.deepEqual(fresh.limiter.available(), { ops: 3 });
  // A saved state from before pmem saved its limiter (no backend bytes) still restores.
  const old = VirtioDeviceStateV1.decodeOrThrow(saved);
  delete old.backend;
  const c = harness(pmemIdentity(0x1_0000_0000, PMEM_ALIGN), new PmemDevice('p', () => undefined), {
    mem: h.mem,
    alloc: h.alloc,
  });
  const r2 = c.device.restore(VirtioDeviceStateV1.encode(old));
  assert.ok(r2.ok, r2.ok ? '' : r2.error.message);
});

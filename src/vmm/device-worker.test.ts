/**
 * The device worker as a real Worker thread over memfd guest RAM (needs the native addon, not
 * KVM): the test plays both the vCPU (an MmioTransport on its own MMIO bus) and KVM (it writes
 * the queue's eventfd, as KVM_IOEVENTFD would, and reads the irqfd, as KVM_IRQFD would).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Bus } from '../devices/bus.js';
import { REG } from '../devices/virtio/mmio.js';
import { VirtioMmioState } from '../devices/virtio/mmio-state.js';
import { MmioDriver, GuestAllocator, MockQueue } from '../devices/virtio/testing/mock-driver.js';
import { VIRTIO_BLK_S_OK, VIRTIO_BLK_T_OUT } from '../devices/virtio/block/request.js';
import { native } from '../kvm/native.js';
import { createGuestRam, mapGuestRam } from './guest-ram.js';
import { startDeviceWorker } from './device-worker-handle.js';
import { guardedLoop } from './device-loop.js';
import { EventLoop } from '../events/event-loop.js';
import { EFD_NONBLOCK } from '../kvm/native.js';
import { harness } from '../devices/virtio/testing/harness.js';
import { RngDevice, rngIdentity } from '../devices/virtio/rng/rng.js';
import { STATUS_DEVICE_NEEDS_RESET } from '../devices/virtio/constants.js';
import { closeVirtio, planVirtioDevices, transportSlots } from './virtio-plan.js';
import { attachVirtioTransports } from './virtio-transport.js';
import { VIRTIO_MMIO_BASE } from '../arch/x86_64/layout.js';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function until(what: string, f: () => boolean, ms = 5000): Promise<void> {
  const end = Date.now() + ms;
  while (!f()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(2);
  }
}

test('device worker: kicks through eventfds, used rings and irqfds, reset and stop', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'typervisor-dw-'));
  const path = join(dir, 'disk.img');
  writeFileSync(path, new Uint8Array(64 * 512));
  const layout = createGuestRam([{ base: 0, size: 4 << 20 }]);
  const ram = mapGuestRam(layout);
  const plan = planVirtioDevices([
    { kind: 'rng', id: 'entropy' },
    { kind: 'block', id: 'disk', path, readOnly: false, serial: 'x', ioEngine: 'Sync' },
  ]);
  const logs: string[] = [];
  const dw = startDeviceWorker(plan, layout, {
    log: (m) => logs.push(m),
    onFatal: (m) => logs.push(`FATAL ${m}`),
  });
  try {
    assert.deepEqual(
      plan.slots.map((s) => [s.addr, s.gsi]),
      [
        [VIRTIO_MMIO_BASE, 5],
        [VIRTIO_MMIO_BASE + 0x1000, 6],
      ],
    );
    const mmio = new Bus();
    attachVirtioTransports(transportSlots(plan), plan.controlFd, mmio);
    const mem = ram.memory;
    const alloc = new GuestAllocator(0x10000, 4 << 20);
    const drv = (i: number) => new MmioDriver(mmio.resolve(plan.slots[i]!.addr, 4)!.device);
    const n = native();

    // rng: handshake in "the vCPU", then a kick written straight to the queue eventfd.
    const rngDrv = drv(0);
    assert.ok(rngDrv.negotiate((f) => f));
    const rq = new MockQueue(mem, alloc, 16);
    rngDrv.setupQueue(0, rq);
    rngDrv.driverOk();
    const buf = alloc.alloc(128);
    rq.addChain([{ addr: buf, len: 128, write: true }]);
    n.eventfdWrite(plan.slots[0]!.queueFds[0]!, 1);
    await until('rng used ring', () => rq.usedIdx() === 1);
    assert.deepEqual(rq.takeUsed(), [{ id: 0, len: 128 }]);
    assert.ok(mem.view(buf, 128).some((x) => x !== 0));
    await until('rng irqfd', () => n.eventfdRead(plan.slots[0]!.irqFd) > 0n);
    assert.equal(rngDrv.takeInterrupt(), 1);

    // block: a write through the fallback QueueNotify path (the transport writes the eventfd).
    const blkDrv = drv(1);
    assert.ok(blkDrv.negotiate((f) => f));
    const bq = new MockQueue(mem, alloc, 64);
    blkDrv.setupQueue(0, bq);
    blkDrv.driverOk();
    const hdr = alloc.alloc(16);
    mem.writeU32(hdr, VIRTIO_BLK_T_OUT);
    mem.writeU64(hdr + 8, 2n);
    const data = alloc.alloc(512);
    mem.fill(data, 512, 0xab);
    const st = alloc.alloc(1);
    mem.writeU8(st, 0xff);
    bq.addChain([
      { addr: hdr, len: 16 },
      { addr: data, len: 512 },
      { addr: st, len: 1, write: true },
    ]);
    blkDrv.write(REG.QUEUE_NOTIFY, 0);
    await until('block used ring', () => bq.usedIdx() === 1);
    assert.equal(mem.readU8(st), VIRTIO_BLK_S_OK);
    assert.ok(
      readFileSync(path)
        .subarray(1024, 1536)
        .every((x) => x === 0xab),
    );
    await until('block irqfd', () => n.eventfdRead(plan.slots[1]!.irqFd) > 0n);

    // Reset of an active device: the vCPU's write waits for the worker to drop the queues.
    blkDrv.write(REG.STATUS, 0);
    assert.equal(new VirtioMmioState(plan.slots[1]!.state).resetPending(), false);
    bq.addChain([
      { addr: hdr, len: 16 },
      { addr: data, len: 512 },
      { addr: st, len: 1, write: true },
    ]);
    n.eventfdWrite(plan.slots[1]!.queueFds[0]!, 1);
    await sleep(50);
    assert.equal(bq.usedIdx(), 1, 'no processing after reset');

    const counters = await dw.counters();
    assert.equal(counters.length, 2);
    assert.equal(counters[0]!.transport.interrupts, 1);
    assert.deepEqual(logs, []);
  } finally {
    await dw.stop();
    closeVirtio(plan);
    ram.unmap();
    native().close(layout.memfd);
    rmSync(dir, { recursive: true });
  }
});

test('device worker mailbox: counters per device, pause holds kicks, save, restore elsewhere', async () => {
  const layout = createGuestRam([{ base: 0, size: 4 << 20 }]);
  const ram = mapGuestRam(layout);
  const logs: string[] = [];
  const start = () => {
    const plan = planVirtioDevices([{ kind: 'rng', id: 'entropy' }]);
    const dw = startDeviceWorker(plan, layout, { log: (m) => logs.push(m) });
    const mmio = new Bus();
    attachVirtioTransports(transportSlots(plan), plan.controlFd, mmio);
    return { plan, dw, mmio };
  };
  const a = start();
  let b: ReturnType<typeof start> | undefined;
  const n = native();
  try {
    const mem = ram.memory;
    const alloc = new GuestAllocator(0x10000, 4 << 20);
    const drv = new MmioDriver(a.mmio.resolve(a.plan.slots[0]!.addr, 4)!.device);
    assert.ok(drv.negotiate((f) => f));
    const q = new MockQueue(mem, alloc, 16);
    drv.setupQueue(0, q);
    drv.driverOk();
    const kick = (len: number) => {
      q.addChain([{ addr: alloc.alloc(len), len, write: true }]);
      n.eventfdWrite(a.plan.slots[0]!.queueFds[0]!, 1);
    };
    kick(100);
    await until('first request', () => q.usedIdx() === 1);
    const c = await a.dw.counters();
    assert.deepEqual(
      c.map((d) => [d.kind, d.id, d.group]),
      [['rng', 'entropy', 'entropy']],
    );
    assert.equal(c[0]!.device.entropy_bytes, 100);
    // PATCH /drives names a block device: an rng one is not one (the worker says so).
    await assert.rejects(
      a.dw.request({ op: 'update-block', id: 'entropy', fd: 0, capacity: 8 }),
      /this VM has no block device "entropy"/,
    );

    // Saving needs the devices paused; paused, a kick waits.
    await assert.rejects(a.dw.request({ op: 'save' }), /only while the devices are paused/);
    await a.dw.request({ op: 'pause' });
    kick(50);
    await sleep(100);
    assert.equal(q.usedIdx(), 1, 'a paused device worker serves nothing');
    const saved = await a.dw.request({ op: 'save' });
    assert.deepEqual(
      saved.map((d) => [d.kind, d.id]),
      [['rng', 'entropy']],
    );
    await a.dw.stop();

    // A fresh device worker (a restored VM) takes the state and serves the request in flight.
    b = start();
    await b.dw.request({ op: 'pause' });
    await assert.rejects(
      b.dw.request({ op: 'restore', devices: [{ ...saved[0]!, id: 'other' }] }),
      /lacks/,
    );
    await assert.rejects(
      b.dw.request({ op: 'restore', devices: [{ ...saved[0]!, state: new Uint8Array(8) }] }),
      /rng device "entropy"/,
    );
    await b.dw.request({ op: 'restore', devices: saved });
    const again = await b.dw.request({ op: 'save' });
    assert.deepEqual(again, saved, 'save -> restore -> save gives the same bytes');
    await b.dw.request({ op: 'resume' });
    await until('the request in flight, served after restore', () => q.usedIdx() === 2);
    assert.equal((await b.dw.counters())[0]!.device.entropy_bytes, 50);
    assert.deepEqual(logs, []);
  } finally {
    await a.dw.stop();
    // After the worker ends, its last report still answers; requests are refused.
    assert.equal((await a.dw.counters())[0]?.device.entropy_bytes, 100);
    await assert.rejects(a.dw.request({ op: 'counters' }), /ended/);
    closeVirtio(a.plan);
    if (b) {
      await b.dw.stop();
      closeVirtio(b.plan);
    }
    ram.unmap();
    native().close(layout.memfd);
  }
});

test('device worker: a backend fd or timer that throws breaks its device, not the loop, and cannot spin', () => {
  const n = native();
  const internal: unknown[] = [];
  const loop = new EventLoop((e) => internal.push(e));
  const efd = n.eventfd(0, EFD_NONBLOCK);
  try {
    const h = harness(rngIdentity(), new RngDevice());
    h.start();
    const ops = guardedLoop(loop, () => h.device);
    let calls = 0;
    // Never reads its fd: it stays readable. The throw breaks the device; the registration's
    // interest is then cleared (the device is not active), so the loop does not call it again.
    const tag = ops.add(efd, {
      process: () => {
        calls++;
        throw new Error('subscriber bug');
      },
    });
    n.eventfdWrite(efd, 1);
    loop.runOnce(100);
    assert.equal(calls, 1);
    assert.ok(h.driver.status() & STATUS_DEVICE_NEEDS_RESET);
    for (let i = 0; i < 5; i++) loop.runOnce(0);
    assert.equal(calls, 1, 'no spin on a readable fd whose handler throws');
    ops.modify(tag, 0x1); // the backend asks again: watched again
    loop.runOnce(100);
    assert.equal(calls, 2);
    ops.setTimer(0, () => {
      throw new Error('timer bug');
    });
    loop.runOnce(0);
    assert.equal(h.device.counters.failures, 3);
    assert.deepEqual(internal, [], 'nothing reached the loop as an internal error');
    assert.equal(h.logs.filter((l) => /needs a reset/.test(l)).length, 1, 'logged once');
  } finally {
    loop.close();
    n.close(efd);
  }
});

test('device worker: a kick over the work budget goes on in later turns of the loop', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'typervisor-dw-'));
  const path = join(dir, 'disk.img');
  writeFileSync(path, new Uint8Array(1 << 20));
  const layout = createGuestRam([{ base: 0, size: 4 << 20 }]);
  const ram = mapGuestRam(layout);
  const plan = planVirtioDevices([
    { kind: 'block', id: 'disk', path, readOnly: true, ioEngine: 'Sync' },
    { kind: 'rng', id: 'entropy' },
  ]);
  const logs: string[] = [];
  const dw = startDeviceWorker(plan, layout, { log: (m) => logs.push(m) });
  const n = native();
  try {
    const mmio = new Bus();
    attachVirtioTransports(transportSlots(plan), plan.controlFd, mmio);
    const mem = ram.memory;
    const alloc = new GuestAllocator(0x10000, 4 << 20);
    const drv = (i: number) => new MmioDriver(mmio.resolve(plan.slots[i]!.addr, 4)!.device);
    const [blkDrv, rngDrv] = [drv(0), drv(1)];
    const bq = new MockQueue(mem, alloc, 64);
    const rq = new MockQueue(mem, alloc, 16);
    for (const [d, q] of [
      [blkDrv, bq],
      [rngDrv, rq],
    ] as const) {
      assert.ok(d.negotiate((f) => f));
      d.setupQueue(0, q);
      d.driverOk();
    }
    // 64 reads of the whole 1 MiB disk (8 segments aliasing one 128 KiB buffer): 64 MiB, four
    // turns of QUEUE_BUDGET_BYTES.
    const buf = alloc.alloc(128 << 10, 4096);
    for (let i = 0; i < 64; i++) {
      const hdr = alloc.alloc(16);
      mem.writeU32(hdr, 0); // VIRTIO_BLK_T_IN
      mem.writeU64(hdr + 8, 0n);
      const segs = Array.from({ length: 8 }, () => ({ addr: buf, len: 128 << 10, write: true }));
      bq.addIndirectChain(
        [{ addr: hdr, len: 16 }, ...segs, { addr: alloc.alloc(1, 1), len: 1, write: true }],
        alloc.alloc(16 * 10, 16),
      );
    }
    rq.addChain([{ addr: alloc.alloc(32), len: 32, write: true }]);
    n.eventfdWrite(plan.slots[0]!.queueFds[0]!, 1);
    n.eventfdWrite(plan.slots[1]!.queueFds[0]!, 1);
    await until('every block request', () => bq.usedIdx() === 64);
    await until('the rng request', () => rq.usedIdx() === 1);
    const [blk, rng] = await dw.counters();
    assert.equal(blk!.device.read_bytes, 64 << 20);
    assert.equal(blk!.device.queue_budget_yields, 3);
    assert.equal(blk!.device.device_failures, 0);
    assert.equal(rng!.device.entropy_bytes, 32);
    assert.deepEqual(logs, []);
  } finally {
    await dw.stop();
    closeVirtio(plan);
    ram.unmap();
    native().close(layout.memfd);
    rmSync(dir, { recursive: true });
  }
});

test('device worker save: a DRIVER_OK the paused worker has not handled is caught up first (quiesce)', async () => {
  const layout = createGuestRam([{ base: 0, size: 4 << 20 }]);
  const ram = mapGuestRam(layout);
  const plan = planVirtioDevices([{ kind: 'rng', id: 'entropy' }]);
  const logs: string[] = [];
  const dw = startDeviceWorker(plan, layout, { log: (m) => logs.push(m) });
  const n = native();
  try {
    const mmio = new Bus();
    attachVirtioTransports(transportSlots(plan), plan.controlFd, mmio);
    await dw.request({ op: 'pause' });
    // The driver activates the device while the data plane is paused (the vCPUs ran on).
    const drv = new MmioDriver(mmio.resolve(plan.slots[0]!.addr, 4)!.device);
    assert.ok(drv.negotiate((f) => f));
    const alloc = new GuestAllocator(0x10000, 4 << 20);
    const q = new MockQueue(ram.memory, alloc, 16);
    drv.setupQueue(0, q);
    drv.driverOk();
    q.addChain([{ addr: alloc.alloc(64), len: 64, write: true }]);
    n.eventfdWrite(plan.slots[0]!.queueFds[0]!, 1);
    await sleep(50);
    assert.equal(q.usedIdx(), 0, 'paused: nothing served');
    const saved = await dw.request({ op: 'save' });
    assert.equal(saved.length, 1);
    // Saved as active: after resume the same worker serves the queue from where it stood.
    await dw.request({ op: 'resume' });
    await until('the kick made while paused', () => q.usedIdx() === 1);
    assert.deepEqual(logs, []);
  } finally {
    await dw.stop();
    closeVirtio(plan);
    ram.unmap();
    native().close(layout.memfd);
  }
});

test('device worker: a rate-limited queue sleeps on a loop timer; update-rate-limiter wakes it', async () => {
  const layout = createGuestRam([{ base: 0, size: 4 << 20 }]);
  const ram = mapGuestRam(layout);
  const logs: string[] = [];
  // One request per 300 ms.
  const plan = planVirtioDevices([
    { kind: 'rng', id: 'entropy', rateLimiter: { ops: { size: 1, refill_time: 300 } } },
  ]);
  const dw = startDeviceWorker(plan, layout, { log: (m) => logs.push(m) });
  const mmio = new Bus();
  attachVirtioTransports(transportSlots(plan), plan.controlFd, mmio);
  const n = native();
  try {
    const alloc = new GuestAllocator(0x10000, 4 << 20);
    const drv = new MmioDriver(mmio.resolve(plan.slots[0]!.addr, 4)!.device);
    assert.ok(drv.negotiate((f) => f));
    const q = new MockQueue(ram.memory, alloc, 16);
    drv.setupQueue(0, q);
    drv.driverOk();
    const kick = () => {
      q.addChain([{ addr: alloc.alloc(16), len: 16, write: true }]);
      n.eventfdWrite(plan.slots[0]!.queueFds[0]!, 1);
    };
    kick();
    kick();
    await until('first request', () => q.usedIdx() >= 1);
    // The second waits for its token, then the loop's timer serves it (no kick needed).
    await until('second request, after the refill', () => q.usedIdx() === 2);
    let c = (await dw.counters())[0]!.device;
    assert.equal(c.entropy_rate_limiter_throttled, 1);
    assert.equal(c.rate_limiter_event_count, 1);

    // A limit that would hold the next request for a minute; then lifted by the mailbox.
    await dw.request({
      op: 'update-rate-limiter',
      target: { kind: 'rng', id: 'entropy', limiter: { ops: { size: 1, refill_time: 60_000 } } },
    });
    kick();
    kick();
    await until('third request (the new bucket starts full)', () => q.usedIdx() === 3);
    await sleep(200);
    assert.equal(q.usedIdx(), 3, 'the fourth waits for its token');
    await dw.request({
      op: 'update-rate-limiter',
      target: { kind: 'rng', id: 'entropy', limiter: {} },
    });
    await until('fourth request, woken by the update', () => q.usedIdx() === 4);
    c = (await dw.counters())[0]!.device;
    assert.equal(c.entropy_rate_limiter_throttled, 2);
    await assert.rejects(
      dw.request({
        op: 'update-rate-limiter',
        target: { kind: 'block', id: 'entropy', limiter: {} },
      }),
      /this VM has no block device "entropy"/,
    );
    assert.deepEqual(logs, []);
  } finally {
    await dw.stop();
    closeVirtio(plan);
    ram.unmap();
    native().close(layout.memfd);
  }
});

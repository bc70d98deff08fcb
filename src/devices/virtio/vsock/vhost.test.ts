/**
 * virtio-vsock's vhost backend against a recording stand-in for /dev/vhost-vsock: what the
 * kernel is told (features, memory table, each ring's size, base, addresses, kick and call
 * eventfds), when it runs (activation, pause, resume, reset), how its calls become interrupts,
 * and how a save reads the kernel's position back and a restore hands it over. The real kernel
 * runs in the lab (test/inlab/vsock-vhost.test.ts).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ConfigError } from '../../../util/errors.js';
import { VHOST } from '../../../util/vhost-abi.js';
import {
  INT_USED_BUFFER,
  VIRTIO_F_RING_EVENT_IDX,
  VIRTIO_F_RING_INDIRECT_DESC,
  VIRTIO_F_VERSION_1,
  bit,
} from '../constants.js';
import type { EventOps, HostSys } from '../descriptor.js';
import { GuestMemory } from '../../../memory/guest-memory.js';
import { RAM_BASE, RAM_SIZE, harness } from '../testing/harness.js';
import { GuestAllocator, type MockQueue } from '../testing/mock-driver.js';
import { EVENT_TRANSPORT_RESET } from './packet.js';
import {
  VhostVsockDevice,
  adoptInheritedVhostVsock,
  memoryTable,
  openVhostVsock,
  vhostDeviceFeatures,
} from './vhost.js';
import { EVENT_QUEUE, RX_QUEUE, TX_QUEUE, vsockIdentity } from './vsock.js';

const CID = 7;
const VHOST_FD = 40;
const KICK_FDS = [50, 51, 52];
const RAM_HOST = 0x7f00_0000_0000n;
const KERNEL_FEATURES =
  bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_RING_EVENT_IDX) | bit(VIRTIO_F_RING_INDIRECT_DESC);

const NAMES = new Map<number, string>(Object.entries(VHOST).map(([k, v]) => [v, k]));

/** A HostSys that records vhost ioctls and eventfd writes; GET_VRING_BASE answers `bases`. */
function fakeSys(opts: { openError?: string; cidError?: string } = {}) {
  const calls: Array<{ op: string; arg: number[] | bigint[] | Uint8Array }> = [];
  const writes: number[] = [];
  const bases = new Map<number, number>();
  let nextFd = 60;
  const closed: number[] = [];
  const errno = (code: string) => Object.assign(new Error(`failed (${code})`), { code });
  const sys = {
    open: () => {
      if (opts.openError) throw errno(opts.openError);
      return VHOST_FD;
    },
    close: (fd: number) => void closed.push(fd),
    eventfd: () => nextFd++,
    eventfdWrite: (fd: number) => void writes.push(fd),
    eventfdRead: () => 1n,
    bufferAddress: () => RAM_HOST,
    ioctl(fd: number, request: number, arg: unknown) {
      assert.equal(fd, VHOST_FD);
      const op = NAMES.get(request) ?? `0x${request.toString(16)}`;
      if (op === 'VSOCK_SET_GUEST_CID' && opts.cidError) throw errno(opts.cidError);
      if (op === 'GET_FEATURES') (arg as BigUint64Array)[0] = KERNEL_FEATURES;
      if (op === 'GET_VRING_BASE') {
        const s = arg as Uint32Array;
        s[1] = bases.get(s[0]!) ?? 0;
      }
      const a =
        arg instanceof BigUint64Array
          ? [...arg]
          : arg instanceof Uint32Array || arg instanceof Int32Array
            ? [...arg]
            : arg instanceof Uint8Array
              ? Uint8Array.from(arg)
              : [Number(arg)];
      calls.push({ op, arg: a as number[] });
      return 0;
    },
  } as unknown as HostSys;
  return { sys, calls, writes, bases, closed };
}

/** The loop: the call eventfds' subscribers, to fire as the kernel would. */
function fakeLoop() {
  const subs = new Map<number, () => void>();
  const loop: EventOps = {
    add: (fd, s) => (subs.set(fd, () => s.process(1)), fd),
    modify() {},
    remove: (tag) => void subs.delete(tag),
    setTimer: () => () => {},
  };
  return { loop, subs };
}

/** A device over fresh guest memory, or over `mem` (a restored VM sees the same RAM). */
function withDevice(f: ReturnType<typeof fakeSys>, mem?: GuestMemory, alloc?: GuestAllocator) {
  const { loop, subs } = fakeLoop();
  const id = { ...vsockIdentity(CID), features: vhostDeviceFeatures(KERNEL_FEATURES) };
  const m = mem ?? GuestMemory.anonymous([{ base: RAM_BASE, size: RAM_SIZE }]);
  const al = alloc ?? new GuestAllocator(0x1000, RAM_SIZE);
  const dev = new VhostVsockDevice(
    'virtio-vsock test',
    CID,
    VHOST_FD,
    KERNEL_FEATURES,
    KICK_FDS,
    f.sys,
    loop,
    m,
  );
  const h = harness(id, dev, { mem: m, alloc: al });
  return { h, dev, subs };
}

test('memoryTable: struct vhost_memory with one 32-byte region per RAM region', () => {
  const t = memoryTable([
    { base: 0, size: 0x1000, host: 0x10n },
    { base: 0x1_0000_0000, size: 0x2000, host: 0x20n },
  ]);
  const v = new DataView(t.buffer);
  assert.equal(t.length, 8 + 64);
  assert.equal(v.getUint32(0, true), 2);
  assert.equal(v.getBigUint64(8 + 32, true), 0x1_0000_0000n);
  assert.equal(v.getBigUint64(8 + 32 + 8, true), 0x2000n);
  assert.equal(v.getBigUint64(8 + 32 + 16, true), 0x20n);
});

test('openVhostVsock: owner, features, CID; clear errors for a missing device or a CID in use', () => {
  const f = fakeSys();
  const v = openVhostVsock(f.sys, CID);
  assert.deepEqual(
    f.calls.map((c) => c.op),
    ['SET_OWNER', 'GET_FEATURES', 'VSOCK_SET_GUEST_CID'],
  );
  assert.deepEqual(f.calls[2]!.arg, [BigInt(CID)]);
  assert.equal(v.kernelFeatures, KERNEL_FEATURES);
  assert.throws(
    () => openVhostVsock(fakeSys({ openError: 'ENOENT' }).sys, CID),
    (e: unknown) => e instanceof ConfigError && /modprobe vhost_vsock/.test(e.message),
  );
  const busy = fakeSys({ cidError: 'EADDRINUSE' });
  assert.throws(
    () => openVhostVsock(busy.sys, CID),
    (e: unknown) => e instanceof ConfigError && /guest_cid 7 is in use/.test(e.message),
  );
  assert.deepEqual(busy.closed, [VHOST_FD], 'the device is closed again on failure');
});

test("openVhostVsock: the jailer's descriptor is used once, for its CID only, without opening the device", () => {
  try {
    adoptInheritedVhostVsock(VHOST_FD, CID);
    const f = fakeSys({ openError: 'ENOENT' }); // a jail has no /dev/vhost-vsock
    assert.throws(
      () => openVhostVsock(f.sys, CID + 1),
      (e: unknown) =>
        e instanceof ConfigError &&
        /guest_cid 8: this VMM was given \/dev\/vhost-vsock for guest CID 7 only/.test(e.message),
    );
    const v = openVhostVsock(f.sys, CID);
    assert.equal(v.fd, VHOST_FD);
    assert.deepEqual(
      f.calls.map((c) => c.op),
      ['SET_OWNER', 'GET_FEATURES', 'VSOCK_SET_GUEST_CID'],
    );
    assert.throws(
      () => openVhostVsock(f.sys, CID),
      (e: unknown) => e instanceof ConfigError && /was used already/.test(e.message),
    );
    // Without one, a jailed VMM's open fails with a pointer to the jailer's flag.
    adoptInheritedVhostVsock(undefined);
    assert.throws(
      () => openVhostVsock(f.sys, CID),
      (e: unknown) => e instanceof ConfigError && /--vhost-vsock-cid/.test(e.message),
    );
  } finally {
    adoptInheritedVhostVsock(undefined);
  }
});

test('vhost: DRIVER_OK hands the kernel the rings and starts it; kicks are passed on, never served here', () => {
  const f = fakeSys();
  const { h, subs } = withDevice(f);
  const [rx, tx] = h.start() as MockQueue[];
  const ops = f.calls.map((c) => c.op);
  assert.deepEqual(ops, [
    'SET_FEATURES',
    'SET_MEM_TABLE',
    ...[0, 1].flatMap(() => [
      'SET_VRING_NUM',
      'SET_VRING_BASE',
      'SET_VRING_ADDR',
      'SET_VRING_KICK',
      'SET_VRING_CALL',
      'SET_VRING_ERR',
    ]),
    'VSOCK_SET_RUNNING',
  ]);
  const features = (f.calls[0]!.arg as bigint[])[0]!;
  assert.equal(features & KERNEL_FEATURES, features, 'only features the kernel has');
  assert.ok(features & bit(VIRTIO_F_RING_EVENT_IDX));
  const mt = new DataView((f.calls[1]!.arg as Uint8Array).buffer);
  assert.equal(mt.getUint32(0, true), 1);
  assert.equal(mt.getBigUint64(8 + 8, true), BigInt(RAM_SIZE));
  assert.equal(mt.getBigUint64(8 + 16, true), RAM_HOST);
  for (const [i, q] of [rx!, tx!].entries()) {
    const at = 2 + 6 * i;
    assert.deepEqual(f.calls[at]!.arg, [i, q.size]);
    assert.deepEqual(f.calls[at + 1]!.arg, [i, 0]);
    const a = new DataView((f.calls[at + 2]!.arg as Uint8Array).buffer);
    assert.equal(a.getUint32(0, true), i);
    assert.equal(a.getBigUint64(8, true), RAM_HOST + BigInt(q.desc));
    assert.equal(a.getBigUint64(16, true), RAM_HOST + BigInt(q.used));
    assert.equal(a.getBigUint64(24, true), RAM_HOST + BigInt(q.avail));
    assert.deepEqual(f.calls[at + 3]!.arg, [i, KICK_FDS[i]]);
    const callFd = (f.calls[at + 4]!.arg as number[])[1]!;
    assert.ok(subs.has(callFd), 'the call eventfd is on the loop');
    const errFd = (f.calls[at + 5]!.arg as number[])[1]!;
    assert.ok(subs.has(errFd) && errFd !== callFd, 'the error eventfd is on the loop');
  }
  assert.deepEqual(f.calls.at(-1)!.arg, [1]);
  // Activation passes a kick to both data queues (buffers posted before DRIVER_OK).
  assert.deepEqual(f.writes, [KICK_FDS[0], KICK_FDS[1]]);
  // A buffer on TX and a kick that reached the device: passed to the kernel, not consumed here.
  const a = h.alloc.alloc(64);
  tx!.addChain([{ addr: a, len: 64 }]);
  h.kick(TX_QUEUE);
  assert.deepEqual(f.writes.at(-1), KICK_FDS[1]);
  assert.equal(tx!.takeUsed().length, 0, "the ring is the kernel's");
});

test('vhost: a call of the kernel raises the used-buffer interrupt', () => {
  const f = fakeSys();
  const { h, subs } = withDevice(f);
  h.start();
  const callFds = f.calls
    .filter((c) => c.op === 'SET_VRING_CALL')
    .map((c) => (c.arg as number[])[1]!);
  const before = h.interrupts();
  subs.get(callFds[RX_QUEUE]!)!();
  assert.equal(h.interrupts(), before + 1);
  assert.ok(h.driver.read(0x60) & INT_USED_BUFFER, 'InterruptStatus has the used-buffer bit');
});

test('vhost: pause stops the kernel, resume starts it; activation while paused waits for resume', () => {
  const f = fakeSys();
  const { h, dev } = withDevice(f);
  dev.pause();
  h.start();
  const running = () =>
    f.calls.filter((c) => c.op === 'VSOCK_SET_RUNNING').map((c) => (c.arg as number[])[0]);
  assert.deepEqual(running(), [], 'not started while paused');
  h.device.resume();
  assert.deepEqual(running(), [1]);
  h.device.pause();
  assert.deepEqual(running(), [1, 0]);
  h.device.resume();
  assert.deepEqual(running(), [1, 0, 1]);
  // A reset stops it.
  h.driver.write(0x70, 0);
  h.device.onLifecycle();
  assert.deepEqual(running(), [1, 0, 1, 0]);
});

test("vhost: a save reads the kernel's positions; a restore starts the kernel there and owes TRANSPORT_RESET", () => {
  const f = fakeSys();
  const a = withDevice(f);
  const [rx, , ev] = a.h.start() as MockQueue[];
  // The kernel took 5 RX buffers and returned them: used.idx is 5 in guest RAM.
  for (let i = 0; i < 5; i++) {
    const b = a.h.alloc.alloc(4096);
    rx!.addChain([{ addr: b, len: 4096, write: true }]);
  }
  a.h.mem.view(rx!.used + 2, 2).set([5, 0]);
  f.bases.set(RX_QUEUE, 5);
  a.h.device.pause();
  const saved = a.h.device.save();
  assert.ok(f.calls.some((c) => c.op === 'GET_VRING_BASE'));
  void ev;

  const g = fakeSys();
  const b = withDevice(g, a.h.mem, a.h.alloc);
  b.h.device.pause();
  const r = b.h.device.restore(saved);
  assert.ok(r.ok, r.ok ? '' : r.error.message);
  const base = g.calls.find(
    (c) => c.op === 'SET_VRING_BASE' && (c.arg as number[])[0] === RX_QUEUE,
  );
  assert.deepEqual(base?.arg, [RX_QUEUE, 5], 'the kernel continues where the saved one stopped');
  assert.equal(g.calls.filter((c) => c.op === 'VSOCK_SET_RUNNING').length, 0, 'paused: not yet');
  b.h.device.resume();
  assert.deepEqual(g.calls.at(-1), { op: 'VSOCK_SET_RUNNING', arg: [1] });
  // The event queue gets TRANSPORT_RESET at its next buffer.
  const evq = ev!;
  const e = a.h.alloc.alloc(8);
  evq.addChain([{ addr: e, len: 8, write: true }]);
  b.h.kick(EVENT_QUEUE);
  const used = evq.takeUsed();
  assert.equal(used.length, 1);
  assert.equal(
    new DataView(a.h.mem.view(e, 4).slice().buffer).getUint32(0, true),
    EVENT_TRANSPORT_RESET,
  );
});

test('vhost: a saved state for another CID is refused', () => {
  const f = fakeSys();
  const { dev } = withDevice(f);
  const other = withDevice(fakeSys()).dev;
  Object.defineProperty(other, 'cid', { value: CID + 1 });
  assert.throws(() => dev.restore(other.save()), /saved for guest CID 8/);
});

test('vhost: a ring the kernel reports broken is a guest error: DEVICE_NEEDS_RESET, the kernel stopped', () => {
  const f = fakeSys();
  const { h, dev, subs } = withDevice(f);
  h.start();
  const errFd = f.calls.find(
    (c) => c.op === 'SET_VRING_ERR' && (c.arg as number[])[0] === TX_QUEUE,
  )!;
  const before = h.interrupts();
  subs.get((errFd.arg as number[])[1]!)!();
  assert.ok(h.driver.read(0x70) & 0x40, 'DEVICE_NEEDS_RESET');
  assert.equal(h.interrupts(), before + 1, 'a config-change interrupt');
  assert.deepEqual(f.calls.at(-1), { op: 'VSOCK_SET_RUNNING', arg: [0] }, 'the kernel stopped');
  assert.equal(dev.counters.errors, 1);
  assert.match(h.logs.join('\n'), /refused the ring/);
  assert.equal(h.device.deviceState.kind, 'inactive');
});

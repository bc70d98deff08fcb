import { test } from 'node:test';
import assert from 'node:assert/strict';
import { BlockDevice, blockIdentity, type BlockFile } from './block/block.js';
import {
  VIRTIO_BLK_S_OK,
  VIRTIO_BLK_T_FLUSH,
  VIRTIO_BLK_T_IN,
  VIRTIO_BLK_T_OUT,
} from './block/request.js';
import type { DescriptorChain } from './chain.js';
import {
  INT_USED_BUFFER,
  STATUS_DEVICE_NEEDS_RESET,
  STATUS_DRIVER_OK,
  VIRTIO_F_RING_EVENT_IDX,
  VIRTIO_F_VERSION_1,
  bit,
} from './constants.js';
import { type SavedDevice, VirtioDeviceStateV1 } from './device-state.js';
import { type QueueIo, type VirtioBackend, VirtioDevice } from './device.js';
import { VirtioMmioState } from './mmio-state.js';
import { MmioTransport, REG } from './mmio.js';
import { RngDevice, rngIdentity } from './rng/rng.js';
import { type Harness, harness } from './testing/harness.js';
import { MmioDriver, MockQueue } from './testing/mock-driver.js';
import { Prng } from './testing/prng.js';
import { PersistError } from '../../util/persist.js';

/** A second device over the same guest memory, as a restored VM gets it. */
function over(h: Harness, id = rngIdentity(), backend: VirtioBackend = new RngDevice()): Harness {
  return harness(id, backend, { mem: h.mem, alloc: h.alloc });
}

function restoreOk(h: Harness, bytes: Uint8Array): void {
  const r = h.device.restore(bytes);
  assert.ok(r.ok, r.ok ? '' : r.error.message);
}

test('rng: requests in flight survive save -> restore; each completes exactly once', () => {
  const h = harness(rngIdentity(), new RngDevice());
  const [q] = h.start({ queueSize: 8 });
  const bufs = [16, 32, 48, 64, 80].map((len) => ({ addr: h.alloc.alloc(len), len }));
  const add = (i: number) => q!.addChain([{ ...bufs[i]!, write: true }]);
  const heads = [add(0), add(1), add(2)];
  h.kick(); // served, used entries not yet read by the guest, interrupt not acknowledged
  heads.push(add(3), add(4)); // available, not served (the kick is lost with the old process)
  assert.equal(h.interrupts(), 1);
  assert.ok(h.device.isQuiescent());
  const bytes = h.device.save();

  const h2 = over(h);
  restoreOk(h2, bytes);
  assert.deepEqual(h2.device.save(), bytes, 'save(restore(x)) is x');
  assert.equal(h2.interrupts(), 0, 'restore raises no interrupt');
  assert.equal(h2.driver.read(REG.INTERRUPT_STATUS), INT_USED_BUFFER, 'pending bit restored');
  const d = h2.device.deviceState;
  assert.equal(d.kind, 'active');
  assert.deepEqual(d.kind === 'active' && d.queues[0]!.position(), { nextAvail: 3, nextUsed: 3 });
  assert.equal(h.mem.readU16(q!.used + 2), 3);

  h2.device.kickAll();
  assert.equal(h2.interrupts(), 1);
  assert.deepEqual(
    q!.takeUsed(),
    heads.map((id, i) => ({ id, len: bufs[i]!.len })),
  );
  for (const b of bufs.slice(3)) assert.ok(h.mem.view(b.addr, b.len).some((x) => x !== 0));
  h2.device.kickAll();
  h2.kick();
  assert.deepEqual(q!.takeUsed(), [], 'nothing completes twice');
  assert.equal(h2.interrupts(), 1, 'no interrupt without used buffers');
  // The guest goes on using the restored device.
  const more = add(0);
  h2.kick();
  assert.deepEqual(q!.takeUsed(), [{ id: more, len: 16 }]);
});

test('rng: a restored ring continues across the u16 wrap of its indices', () => {
  const h = harness(rngIdentity(), new RngDevice());
  const [q] = h.start({ queueSize: 4 });
  const buf = h.alloc.alloc(8);
  for (let i = 0; i < 0xfffe; i++) {
    q!.addChain([{ addr: buf, len: 8, write: true }]);
    h.kick();
  }
  assert.equal(q!.takeUsed().length, 0xfffe);
  const heads = [0, 1, 2].map(() => q!.addChain([{ addr: buf, len: 8, write: true }]));
  const h2 = over(h);
  const bytes = h.device.save();
  restoreOk(h2, bytes);
  assert.deepEqual(h2.device.save(), bytes);
  h2.kick();
  assert.deepEqual(
    q!.takeUsed().map((u) => u.id),
    heads,
  );
  assert.equal(q!.usedIdx(), 1);
});

/** A disk image in memory: what the host file holds, shared by the old and the new device. */
function memoryDisk(sectors: number) {
  const image = new Uint8Array(sectors * 512);
  const file: BlockFile = {
    read: (b, pos) => b.set(image.subarray(pos, pos + b.length)),
    write: (b, pos) => image.set(b, pos),
    flush: () => undefined,
  };
  const device = () =>
    new BlockDevice({
      name: 'mem-blk',
      file,
      capacity: sectors,
      readOnly: false,
      serial: new Uint8Array(0),
      log: () => undefined,
    });
  return { image, device };
}

interface BlkReq {
  type: number;
  head: number;
  status: number;
  data: number;
  len: number;
}

/** Makes one block request available (no kick). */
function blkRequest(h: Harness, q: MockQueue, type: number, sector: number, fill?: number): BlkReq {
  const hdr = h.alloc.alloc(16);
  h.mem.writeU32(hdr, type);
  h.mem.writeU64(hdr + 8, BigInt(sector));
  const st = h.alloc.alloc(1, 1);
  h.mem.writeU8(st, 0xee);
  if (type === VIRTIO_BLK_T_FLUSH) {
    const head = q.addChain([
      { addr: hdr, len: 16 },
      { addr: st, len: 1, write: true },
    ]);
    return { type, head, status: st, data: 0, len: 0 };
  }
  const data = h.alloc.alloc(512, 512);
  if (fill !== undefined) h.mem.fill(data, 512, fill);
  const head = q.addChain([
    { addr: hdr, len: 16 },
    { addr: data, len: 512, write: type === VIRTIO_BLK_T_IN },
    { addr: st, len: 1, write: true },
  ]);
  return { type, head, status: st, data, len: 512 };
}

test('block: served and in-flight requests across save -> restore, in order, exactly once', () => {
  const SECTORS = 32;
  const disk = memoryDisk(SECTORS);
  disk.image.fill(0x77, 6 * 512, 7 * 512);
  const dev1 = disk.device();
  const h = harness(blockIdentity(SECTORS, false), dev1);
  const [q] = h.start({ queueSize: 16 });
  const served = [
    blkRequest(h, q!, VIRTIO_BLK_T_OUT, 5, 0x11),
    blkRequest(h, q!, VIRTIO_BLK_T_IN, 5),
  ];
  h.kick();
  const inFlight = [
    blkRequest(h, q!, VIRTIO_BLK_T_IN, 6), // before the write below: sees the old data
    blkRequest(h, q!, VIRTIO_BLK_T_OUT, 6, 0x22),
    blkRequest(h, q!, VIRTIO_BLK_T_FLUSH, 0),
    blkRequest(h, q!, VIRTIO_BLK_T_IN, 6),
  ];
  for (const r of inFlight) assert.equal(h.mem.readU8(r.status), 0xee, 'not served yet');
  const bytes = h.device.save();

  const dev2 = disk.device();
  const h2 = over(h, blockIdentity(SECTORS, false), dev2);
  restoreOk(h2, bytes);
  assert.deepEqual(h2.device.save(), bytes);
  assert.equal(h2.interrupts(), 0);
  assert.equal(h2.driver.read(0x100), SECTORS, 'capacity in the restored config space');
  h2.kick();
  const all = [...served, ...inFlight];
  assert.deepEqual(
    q!.takeUsed(),
    // used.len: the status byte, and the data for reads.
    all.map((r) => ({ id: r.head, len: 1 + (r.type === VIRTIO_BLK_T_IN ? r.len : 0) })),
  );
  for (const r of all) assert.equal(h.mem.readU8(r.status), VIRTIO_BLK_S_OK);
  assert.ok(h.mem.view(served[1]!.data, 512).every((x) => x === 0x11));
  assert.ok(h.mem.view(inFlight[0]!.data, 512).every((x) => x === 0x77));
  assert.ok(h.mem.view(inFlight[3]!.data, 512).every((x) => x === 0x22));
  assert.ok(disk.image.subarray(6 * 512, 7 * 512).every((x) => x === 0x22));
  assert.deepEqual([dev1.counters.writes, dev1.counters.reads], [1, 1]);
  assert.deepEqual([dev2.counters.writes, dev2.counters.reads, dev2.counters.flushes], [1, 2, 1]);
  h2.kick();
  assert.deepEqual(q!.takeUsed(), []);
});

/**
 * A backend like virtio-net RX: it takes a chain and holds it until host data comes. Its
 * saved state is the held head; it checks that restore() comes before activate(restored).
 */
class HoldingBackend implements VirtioBackend {
  readonly name = 'holding';
  readonly selfServed = [0];
  readonly calls: string[] = [];
  io: QueueIo | undefined;
  held: number | undefined;
  handle(): number {
    return 0;
  }
  activate(_f: bigint, io: QueueIo, restored?: boolean): void {
    this.calls.push(`activate${restored ? ' restored' : ''} held=${this.held}`);
    this.io = io;
  }
  deactivate(): void {
    this.io = undefined;
    this.held = undefined;
  }
  kick(): void {
    if (this.held !== undefined) return;
    const c: DescriptorChain | undefined = this.io?.pop(0);
    this.held = c?.head;
  }
  /** Host data arrived: complete the held chain. */
  complete(len: number): void {
    if (this.held === undefined || !this.io) return;
    this.io.pushUsed(0, this.held, len);
    this.io.notify(0);
    this.held = undefined;
    this.kick();
  }
  save(): Uint8Array {
    return Uint8Array.of(this.held === undefined ? 0 : 1, this.held ?? 0);
  }
  restore(b: Uint8Array): void {
    if (b.length !== 2 || b[0]! > 1) throw new PersistError('holding: bad state');
    this.calls.push('restore');
    this.held = b[0] ? b[1] : undefined;
  }
}

test('a backend holding a chain: restore() before activate(restored), positions count it', () => {
  const id = { ...rngIdentity(), queueSizes: [8] };
  const b1 = new HoldingBackend();
  const h = harness(id, b1);
  // Without EVENT_IDX: the driver below takes nothing between completions and still expects
  // an interrupt for each (with it, its used_event would ask for the first only).
  const [q] = h.start({ features: (f) => f & ~bit(VIRTIO_F_RING_EVENT_IDX) });
  const heads = [0, 1, 2].map(() => q!.addChain([{ addr: h.alloc.alloc(8), len: 8, write: true }]));
  h.kick();
  b1.complete(5); // head 0 used; head 1 taken and held; head 2 available
  assert.equal(b1.held, heads[1]);
  const bytes = h.device.save();

  const b2 = new HoldingBackend();
  const h2 = over(h, id, b2);
  restoreOk(h2, bytes);
  assert.deepEqual(b2.calls, ['restore', `activate restored held=${heads[1]}`]);
  const d = h2.device.deviceState;
  assert.deepEqual(d.kind === 'active' && d.queues[0]!.position(), { nextAvail: 2, nextUsed: 1 });
  assert.deepEqual(h2.device.save(), bytes);
  b2.complete(6);
  b2.complete(7);
  assert.deepEqual(q!.takeUsed(), [
    { id: heads[0], len: 5 },
    { id: heads[1], len: 6 },
    { id: heads[2], len: 7 },
  ]);
  assert.equal(h2.interrupts(), 2);
});

test('an inactive device saved mid-setup is driven to DRIVER_OK after restore', () => {
  const h = harness(rngIdentity(), new RngDevice());
  assert.ok(h.driver.negotiate((f) => f));
  const bytes = h.device.save();
  const h2 = over(h);
  restoreOk(h2, bytes);
  assert.equal(h2.device.deviceState.kind, 'inactive');
  assert.deepEqual(h2.device.save(), bytes);
  const mq = new MockQueue(h.mem, h.alloc, 8);
  h2.driver.setupQueue(0, mq); // FEATURES_OK was set before the save
  h2.driver.driverOk();
  assert.equal(h2.device.deviceState.kind, 'active');
  mq.addChain([{ addr: h.alloc.alloc(8), len: 8, write: true }]);
  h2.kick();
  assert.equal(mq.takeUsed().length, 1);
});

test('a broken device (DEVICE_NEEDS_RESET) restores broken, and a reset recovers it', () => {
  const h = harness(rngIdentity(), new RngDevice());
  assert.ok(h.driver.negotiate((f) => f));
  h.driver.write(REG.QUEUE_SEL, 0);
  h.driver.write(REG.QUEUE_NUM, 16);
  h.driver.write(REG.QUEUE_DESC_HIGH, 0x10); // outside guest RAM
  h.driver.write(REG.QUEUE_READY, 1);
  h.driver.driverOk();
  assert.equal(h.driver.status() & STATUS_DEVICE_NEEDS_RESET, STATUS_DEVICE_NEEDS_RESET);
  const h2 = over(h);
  restoreOk(h2, h.device.save());
  assert.equal(h2.driver.status() & STATUS_DEVICE_NEEDS_RESET, STATUS_DEVICE_NEEDS_RESET);
  assert.equal(h2.device.deviceState.kind, 'inactive');
  h2.start();
  assert.equal(h2.device.deviceState.kind, 'active');
});

test('save() needs a quiescent device; quiesce() catches up with DRIVER_OK and resets', () => {
  const mem = harness(rngIdentity(), new RngDevice()); // for its guest memory
  const sab = VirtioMmioState.createState(rngIdentity(), bit(VIRTIO_F_VERSION_1));
  const device = new VirtioDevice(sab, new RngDevice(), {
    mem: mem.mem,
    interrupt: () => undefined,
    log: () => undefined,
    defer: () => () => undefined,
    after: () => () => undefined,
  });
  // The device worker has not read its control eventfd yet: lifecycle hooks do nothing.
  const t = new MmioTransport(
    sab,
    { lifecycle: () => undefined, notify: () => undefined },
    { resetWaitMs: 0 },
  );
  const d = new MmioDriver(t);
  assert.ok(d.negotiate((f) => f));
  const mq = new MockQueue(mem.mem, mem.alloc, 8);
  d.setupQueue(0, mq);
  d.driverOk();
  assert.equal(device.isQuiescent(), false);
  assert.throws(() => device.save(), /quiesce/);
  assert.equal(device.quiesce(), true);
  assert.equal(device.deviceState.kind, 'active');
  assert.doesNotThrow(() => device.save());
  d.write(REG.STATUS, 0); // a reset the worker has not acknowledged
  assert.equal(device.state.resetPending(), true);
  assert.equal(device.isQuiescent(), false);
  assert.equal(device.quiesce(), true);
  assert.equal(device.deviceState.kind, 'inactive');
  assert.equal(device.state.resetPending(), false);
});

test('bad blobs are refused with a clear error and leave the device unchanged', () => {
  const h = harness(rngIdentity(), new RngDevice());
  const [q] = h.start({ queueSize: 8 });
  q!.addChain([{ addr: h.alloc.alloc(8), len: 8, write: true }]);
  h.kick();
  const good = h.device.save();

  const target = over(h);
  const before = target.device.save();
  const refuse = (bytes: Uint8Array, re: RegExp, t: Harness = target) => {
    const was = t.device.save();
    const r = t.device.restore(bytes);
    assert.ok(!r.ok, `accepted; wanted ${re}`);
    assert.match(r.error.message, re);
    assert.deepEqual(t.device.save(), was, 'unchanged');
    assert.equal(t.device.deviceState.kind, 'inactive');
    assert.equal(t.interrupts(), 0);
  };
  const garbage = new Uint8Array(300);
  new Prng(3).fill(garbage);
  refuse(garbage, /not a Typervisor saved-state record/);
  for (const n of [0, 3, 10, 40, good.length >> 1, good.length - 1])
    refuse(good.subarray(0, n), /truncated/);
  refuse(h.transport.state.save(), /"virtio-mmio-transport" record where "virtio-device"/);

  // Another kind: a block device's state into an rng device.
  const disk = memoryDisk(16);
  const bh = harness(blockIdentity(16, false), disk.device());
  bh.start({ queueSize: 8 });
  refuse(bh.device.save(), /device id 2 \(block\) cannot be restored into device id 4 \(rng\)/);

  const edit = (change: (s: SavedDevice) => void) => {
    const s = VirtioDeviceStateV1.decodeOrThrow(good);
    change(s);
    return VirtioDeviceStateV1.encode(s);
  };
  const active = (s: SavedDevice) => {
    assert.equal(s.device.kind, 'active');
    return s.device as Extract<SavedDevice['device'], { kind: 'active' }>;
  };
  refuse(
    edit((s) => (s.device = { kind: 'inactive' })),
    /inactive, but the driver set DRIVER_OK/,
  );
  refuse(
    edit((s) => (active(s).epoch += 1)),
    /active for reset epoch \d+, transport at \d+/,
  );
  refuse(
    edit((s) => (s.transport.status &= ~STATUS_DRIVER_OK)),
    /active without DRIVER_OK/,
  );
  refuse(
    edit((s) => (active(s).features = 0n)),
    /the driver negotiated/,
  );
  refuse(
    edit((s) => (active(s).queues = [undefined])),
    /queue 0: no position/,
  );
  refuse(
    edit((s) => (active(s).queues[0] = { nextAvail: 20, nextUsed: 0 })),
    /queue 0 cannot be restored .* 20 chains in flight on a queue of 8/,
  );
  refuse(
    edit((s) => (s.transport.queues[0]!.desc = 1n << 40n)),
    /queue 0 cannot be restored over this guest memory: descriptor table .* outside guest RAM/,
  );
  // virtio-rng's backend state is its rate limiter's (issue 16): a damaged one is refused.
  refuse(
    edit((s) => (s.backend = Uint8Array.of(1))),
    /virtio-rng: backend: virtio-rng\.magic: .*truncated/,
  );

  // A backend that refuses its bytes: nothing of the device changes either.
  const id = { ...rngIdentity(), queueSizes: [8] };
  const holder = harness(id, new HoldingBackend());
  holder.start();
  const hb = VirtioDeviceStateV1.decodeOrThrow(holder.device.save());
  hb.backend = Uint8Array.of(9, 9);
  const hb2 = new HoldingBackend();
  refuse(VirtioDeviceStateV1.encode(hb), /holding: bad state/, over(h, id, hb2));
  assert.deepEqual(hb2.calls, []);

  // Into a device that is already running.
  const running = over(h);
  running.start({ queueSize: 8 });
  const r = running.device.restore(good);
  assert.ok(!r.ok && /active device/.test(r.error.message));

  assert.deepEqual(target.device.save(), before);
  restoreOk(target, good);
  assert.deepEqual(target.device.save(), good);
});

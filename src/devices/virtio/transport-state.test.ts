import { test } from 'node:test';
import assert from 'node:assert/strict';
import { blockIdentity } from './block/block.js';
import {
  INT_USED_BUFFER,
  STATUS_ACKNOWLEDGE,
  STATUS_DRIVER,
  STATUS_DRIVER_OK,
  STATUS_FEATURES_OK,
  VIRTIO_F_VERSION_1,
  bit,
} from './constants.js';
import { VirtioMmioState, type VirtioDeviceIdentity } from './mmio-state.js';
import { MmioTransport, REG } from './mmio.js';
import { RngDevice, rngIdentity } from './rng/rng.js';
import { harness } from './testing/harness.js';
import { MmioDriver, MockQueue } from './testing/mock-driver.js';
import { Prng } from './testing/prng.js';
import { type TransportState, TransportStateV1, checkTransportState } from './transport-state.js';

const V1 = bit(VIRTIO_F_VERSION_1);

/** A second register file of the same kind, and a driver reading it through a transport. */
function fresh(id: VirtioDeviceIdentity) {
  const state = new VirtioMmioState(VirtioMmioState.createState(id, V1));
  const transport = new MmioTransport(
    state.s.buffer as SharedArrayBuffer,
    { lifecycle: () => undefined, notify: () => undefined },
    { resetWaitMs: 0 },
  );
  return { state, driver: new MmioDriver(transport) };
}

/** Every readable register, for each queue select: what the driver can observe. */
function observe(d: MmioDriver, queues: number): number[] {
  const out: number[] = [];
  for (const r of [REG.MAGIC, REG.DEVICE_ID, REG.STATUS, REG.INTERRUPT_STATUS]) out.push(d.read(r));
  out.push(d.read(REG.DEVICE_FEATURES), d.read(REG.CONFIG_GENERATION));
  for (let q = 0; q < queues; q++) {
    d.write(REG.QUEUE_SEL, q);
    out.push(d.read(REG.QUEUE_NUM_MAX), d.read(REG.QUEUE_READY));
  }
  return out;
}

test('transport: save -> restore into a fresh register file -> the same bytes and registers', () => {
  const h = harness(rngIdentity(), new RngDevice());
  const [q] = h.start({ queueSize: 16 });
  q!.addChain([{ addr: h.alloc.alloc(32), len: 32, write: true }]);
  h.kick();
  h.driver.write(REG.DEVICE_FEATURES_SEL, 1); // selectors as the driver left them
  h.driver.write(REG.DRIVER_FEATURES_SEL, 1);
  const bytes = h.transport.state.save();
  const saved = TransportStateV1.decodeOrThrow(bytes);
  assert.equal(
    saved.status,
    STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
  );
  assert.equal(saved.interruptStatus, INT_USED_BUFFER, 'not acknowledged yet: saved pending');
  assert.equal(saved.deviceFeaturesSel, 1);
  assert.deepEqual(saved.queues, [
    {
      num: 16,
      ready: true,
      desc: BigInt(q!.desc),
      driver: BigInt(q!.avail),
      device: BigInt(q!.used),
    },
  ]);
  assert.deepEqual(saved.identity, {
    deviceId: 4,
    deviceFeatures: h.transport.state.deviceFeatures,
    queueNumMax: [256],
    configLen: 0,
  });

  const f = fresh(rngIdentity());
  const r = f.state.restore(bytes);
  assert.ok(r.ok, r.ok ? '' : r.error.message);
  assert.deepEqual(f.state.save(), bytes);
  assert.equal(f.state.counters().interrupts, 0, 'counters are not state');
  assert.deepEqual(observe(f.driver, 1), observe(h.driver, 1));
  assert.deepEqual(f.state.snapshot(), h.transport.state.snapshot());
});

test('transport: a device saved mid-negotiation finishes negotiating after restore', () => {
  const id = blockIdentity(64, false);
  const h = harness(id, {
    name: 'nop',
    handle: () => 0,
  });
  const d = h.driver;
  d.write(REG.STATUS, 0);
  d.addStatus(STATUS_ACKNOWLEDGE);
  d.addStatus(STATUS_DRIVER);
  d.write(REG.DRIVER_FEATURES_SEL, 1);
  d.write(REG.DRIVER_FEATURES, 1);
  const bytes = h.transport.state.save();
  const f = fresh(id);
  assert.ok(f.state.restore(bytes).ok);
  assert.deepEqual(f.state.save(), bytes);
  assert.equal(f.driver.read(0x100), 64, 'config space (capacity) restored');
  f.driver.addStatus(STATUS_FEATURES_OK);
  assert.equal(f.driver.status() & STATUS_FEATURES_OK, STATUS_FEATURES_OK);
  const q = new MockQueue(h.mem, h.alloc, 8);
  f.driver.setupQueue(0, q);
  f.driver.driverOk();
  assert.equal(f.driver.status() & STATUS_DRIVER_OK, STATUS_DRIVER_OK);
});

test('transport: garbage, truncation, another kind and impossible values are refused, nothing changes', () => {
  const rngDev = harness(rngIdentity(), new RngDevice());
  rngDev.start({ queueSize: 8 });
  const rngBytes = rngDev.transport.state.save();
  const blk = fresh(blockIdentity(64, false));
  const before = blk.state.save();
  const refuse = (bytes: Uint8Array, re: RegExp, target = blk) => {
    const was = target.state.save();
    const r = target.state.restore(bytes);
    assert.ok(!r.ok, `accepted; wanted ${re}`);
    assert.match(r.error.message, re);
    assert.deepEqual(target.state.save(), was, 'unchanged');
  };
  refuse(rngBytes, /device id 4 \(rng\) cannot be restored into device id 2 \(block\)/);
  const garbage = new Uint8Array(200);
  new Prng(7).fill(garbage);
  refuse(garbage, /not a Typervisor saved-state record/);
  refuse(new Uint8Array(0), /truncated/);
  const blkDev = harness(blockIdentity(64, false), { name: 'nop', handle: () => 0 });
  blkDev.start({ queueSize: 8 });
  const good = blkDev.transport.state.save();
  for (const n of [4, 20, good.length - 1]) refuse(good.subarray(0, n), /truncated/);
  refuse(Uint8Array.of(...good, 0), /trailing/);
  // The same kind with another configuration (a read-only disk offers VIRTIO_BLK_F_RO).
  refuse(fresh(blockIdentity(64, true)).state.save(), /device features .* differ/);

  const edit = (change: (t: TransportState) => void) => {
    const t = TransportStateV1.decodeOrThrow(good);
    change(t);
    return TransportStateV1.encode(t);
  };
  refuse(
    edit((t) => (t.queues[0]!.num = 3)),
    /queue 0 is ready with size 3/,
  );
  refuse(
    edit((t) => (t.queues[0]!.num = 512)),
    /queue 0 is ready with size 512/,
  );
  refuse(
    edit((t) => (t.status |= 0x10)),
    /bits no driver can set/,
  );
  refuse(
    edit((t) => (t.status &= ~STATUS_FEATURES_OK)),
    /skips a step/,
  );
  refuse(
    edit((t) => (t.interruptStatus = 4)),
    /unknown bits/,
  );
  refuse(
    edit((t) => (t.driverFeatures |= bit(40))),
    /FEATURES_OK with driver features/,
  );
  refuse(
    edit((t) => t.queues.push({ ...t.queues[0]! })),
    /2 queues saved for a device with 1/,
  );
  refuse(
    edit((t) => (t.identity.queueNumMax = [128])),
    /QueueNumMax 128/,
  );
  refuse(
    edit((t) => (t.config = new Uint8Array(3))),
    /config holds 3 bytes/,
  );
  assert.deepEqual(blk.state.save(), before);
  // And the good blob still restores.
  assert.ok(blk.state.restore(good).ok);
  assert.deepEqual(blk.state.save(), good);
});

test('transport: a snapshot of a build that did not offer EVENT_IDX yet restores; other feature changes do not', () => {
  const h = harness(rngIdentity(), new RngDevice());
  h.start({ features: (f) => f & ~bit(29) });
  const saved = TransportStateV1.decodeOrThrow(h.transport.state.save());
  const current = h.transport.state.identity();
  assert.ok(current.deviceFeatures & bit(29), 'offered now');
  const older: TransportState = {
    ...saved,
    identity: { ...saved.identity, deviceFeatures: saved.identity.deviceFeatures & ~bit(29) },
  };
  assert.ok(checkTransportState(older, current).ok);
  const other: TransportState = {
    ...saved,
    identity: { ...saved.identity, deviceFeatures: saved.identity.deviceFeatures & ~bit(28) },
  };
  const r = checkTransportState(other, current);
  assert.ok(!r.ok && /differ from this device's/.test(r.error.message));
});

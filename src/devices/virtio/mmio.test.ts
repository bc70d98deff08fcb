import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  INT_USED_BUFFER,
  STATUS_ACKNOWLEDGE,
  STATUS_DEVICE_NEEDS_RESET,
  STATUS_DRIVER,
  STATUS_DRIVER_OK,
  STATUS_FEATURES_OK,
  VIRTIO_F_VERSION_1,
  bit,
} from './constants.js';
import { MMIO_MAGIC, REG } from './mmio.js';
import { RngDevice, rngIdentity } from './rng/rng.js';
import { harness } from './testing/harness.js';
import { MockQueue } from './testing/mock-driver.js';

const rng = () => harness(rngIdentity(), new RngDevice());

test('Linux virtio_mmio probe: magic, version, device id, features, status steps, queues, DRIVER_OK', () => {
  const h = rng();
  const d = h.driver;
  assert.equal(d.read(REG.MAGIC), MMIO_MAGIC);
  assert.equal(d.read(REG.VERSION), 2);
  assert.equal(d.read(REG.DEVICE_ID), 4);
  assert.notEqual(d.read(REG.VENDOR_ID), 0);
  d.write(REG.STATUS, 0);
  assert.equal(d.status(), 0);
  d.addStatus(STATUS_ACKNOWLEDGE);
  d.addStatus(STATUS_DRIVER);
  const offered = d.deviceFeatures();
  assert.ok(offered & bit(VIRTIO_F_VERSION_1));
  assert.equal(offered & bit(29), bit(29), 'EVENT_IDX is offered');
  d.write(REG.DRIVER_FEATURES_SEL, 1);
  d.write(REG.DRIVER_FEATURES, 1); // VERSION_1
  d.write(REG.DRIVER_FEATURES_SEL, 0);
  d.write(REG.DRIVER_FEATURES, 0);
  d.addStatus(STATUS_FEATURES_OK);
  assert.equal(d.status(), STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
  d.write(REG.QUEUE_SEL, 0);
  assert.equal(d.read(REG.QUEUE_READY), 0);
  assert.equal(d.read(REG.QUEUE_NUM_MAX), 256);
  d.write(REG.QUEUE_SEL, 1);
  assert.equal(d.read(REG.QUEUE_NUM_MAX), 0, 'queue 1 does not exist');
  const q = new MockQueue(h.mem, h.alloc, 128);
  d.setupQueue(0, q);
  assert.equal(d.read(REG.QUEUE_READY), 1);
  assert.equal(h.device.deviceState.kind, 'inactive');
  d.driverOk();
  assert.equal(d.status() & STATUS_DRIVER_OK, STATUS_DRIVER_OK);
  assert.equal(h.device.deviceState.kind, 'active');
  // A request and its interrupt, acknowledged by the driver's handler.
  const buf = h.alloc.alloc(64);
  q.addChain([{ addr: buf, len: 64, write: true }]);
  h.kick(0);
  assert.deepEqual(q.takeUsed(), [{ id: 0, len: 64 }]);
  assert.equal(h.interrupts(), 1);
  assert.equal(d.takeInterrupt(), INT_USED_BUFFER);
  assert.equal(d.read(REG.INTERRUPT_STATUS), 0);
  // Config generation and the absent shared-memory regions.
  assert.equal(d.read(REG.CONFIG_GENERATION), 0);
  assert.equal(d.read(REG.SHM_LEN_LOW), 0xffff_ffff);
});

test('FEATURES_OK is refused without VERSION_1 or with unoffered bits', () => {
  const h = rng();
  assert.equal(
    h.driver.negotiate(() => 0n),
    false,
  );
  assert.equal(
    h.driver.negotiate((f) => f | bit(40)),
    false,
  );
  assert.equal(
    h.driver.negotiate((f) => f & bit(VIRTIO_F_VERSION_1)),
    true,
  );
});

test('illegal status sequences are ignored and counted', () => {
  const h = rng();
  const d = h.driver;
  d.write(REG.STATUS, STATUS_DRIVER); // DRIVER without ACKNOWLEDGE
  assert.equal(d.status(), 0);
  d.write(REG.STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DRIVER_OK); // skipping FEATURES_OK
  assert.equal(d.status(), 0);
  d.addStatus(STATUS_ACKNOWLEDGE);
  d.addStatus(STATUS_DRIVER);
  d.write(REG.STATUS, STATUS_ACKNOWLEDGE); // clearing a bit
  assert.equal(d.status(), STATUS_ACKNOWLEDGE | STATUS_DRIVER);
  d.write(REG.STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_DEVICE_NEEDS_RESET); // the device's bit
  assert.equal(d.status(), STATUS_ACKNOWLEDGE | STATUS_DRIVER);
  assert.ok(h.transport.state.counters().illegalStatus >= 3);
  assert.equal(h.device.deviceState.kind, 'inactive');
});

test('queue registers: bad sizes refused, frozen after DRIVER_OK, not before FEATURES_OK', () => {
  const h = rng();
  const d = h.driver;
  d.addStatus(STATUS_ACKNOWLEDGE);
  d.addStatus(STATUS_DRIVER);
  d.write(REG.QUEUE_NUM, 64); // before FEATURES_OK: ignored
  d.write(REG.DRIVER_FEATURES_SEL, 1);
  d.write(REG.DRIVER_FEATURES, 1);
  d.addStatus(STATUS_FEATURES_OK);
  for (const bad of [0, 3, 100, 512]) {
    d.write(REG.QUEUE_NUM, bad);
    d.write(REG.QUEUE_READY, 1);
    assert.equal(d.read(REG.QUEUE_READY), 0, `size ${bad}`);
  }
  const q = new MockQueue(h.mem, h.alloc, 16);
  d.setupQueue(0, q);
  d.driverOk();
  d.write(REG.QUEUE_READY, 0);
  d.write(REG.QUEUE_DESC_LOW, 0x1234);
  assert.equal(d.read(REG.QUEUE_READY), 1);
  const snap = h.transport.state.snapshot();
  assert.equal(snap.queues[0]!.desc, q.desc);
  assert.equal(snap.queues[0]!.size, 16);
});

test('rings outside guest RAM mark the device DEVICE_NEEDS_RESET with a config interrupt', () => {
  const h = rng();
  const d = h.driver;
  assert.ok(d.negotiate((f) => f));
  d.write(REG.QUEUE_SEL, 0);
  d.write(REG.QUEUE_NUM, 16);
  d.write(REG.QUEUE_DESC_LOW, 0);
  d.write(REG.QUEUE_DESC_HIGH, 0x10); // 64 GiB: not RAM
  d.write(REG.QUEUE_READY, 1);
  d.driverOk();
  assert.equal(d.status() & STATUS_DEVICE_NEEDS_RESET, STATUS_DEVICE_NEEDS_RESET);
  assert.equal(d.takeInterrupt(), 2);
  assert.equal(h.interrupts(), 1);
  assert.equal(h.device.deviceState.kind, 'inactive');
  // A reset recovers.
  h.start();
  assert.equal(h.device.deviceState.kind, 'active');
});

test('reset: registers back to their initial values, queues dropped, the device re-initialises', () => {
  const h = rng();
  const [q] = h.start({ queueSize: 8 });
  q!.addChain([{ addr: h.alloc.alloc(16), len: 16, write: true }]);
  h.kick();
  assert.equal(q!.takeUsed().length, 1);
  const epoch = h.transport.state.epoch();
  h.driver.write(REG.STATUS, 0);
  assert.equal(h.driver.status(), 0);
  assert.equal(h.transport.state.epoch(), epoch + 1);
  assert.equal(h.device.deviceState.kind, 'inactive');
  assert.equal(h.transport.state.resetPending(), false, 'the device acknowledged the reset');
  h.driver.write(REG.QUEUE_SEL, 0);
  assert.equal(h.driver.read(REG.QUEUE_READY), 0);
  assert.equal(h.driver.read(REG.INTERRUPT_STATUS), 0);
  // Kicks after reset are ignored; a second initialisation works from index 0.
  h.kick();
  const [q2] = h.start({ queueSize: 8 });
  q2!.addChain([{ addr: h.alloc.alloc(16), len: 16, write: true }]);
  h.kick();
  assert.deepEqual(q2!.takeUsed(), [{ id: 0, len: 16 }]);
});

test('bad accesses: wrong width, write-only reads, config writes are counted, not thrown', () => {
  const h = rng();
  const two = new Uint8Array(2);
  h.transport.read(REG.MAGIC, two);
  assert.deepEqual([...two], [0, 0]);
  h.transport.write(REG.STATUS, two);
  assert.equal(h.driver.read(REG.QUEUE_NOTIFY), 0);
  h.transport.write(0x100, new Uint8Array(4));
  h.transport.read(0x100, new Uint8Array(4)); // rng has no config space
  h.driver.write(REG.QUEUE_NOTIFY, 5); // no such queue
  assert.ok(h.transport.state.counters().badAccesses >= 5);
});

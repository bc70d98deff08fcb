import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  INT_CONFIG_CHANGE,
  INT_USED_BUFFER,
  STATUS_DEVICE_NEEDS_RESET,
  STATUS_DRIVER_OK,
} from './constants.js';
import { REGISTER_PAGE_BYTES, VirtioMmioState } from './mmio-state.js';
import { REG } from './mmio.js';
import { RngDevice, rngIdentity } from './rng/rng.js';
import { harness, PageReader } from './testing/harness.js';
import { Prng } from './testing/prng.js';

// The harness's `registerPage` lets the mock driver read the page (as the guest does through
// KVM's read-only slot) and checks every read against the transport's answer: these tests pass
// only if the page is right after every write, interrupt, config change and restore.

const page = (h: ReturnType<typeof harness>) => (h.driver.dev as PageReader).bytes;
const word = (b: Uint8Array, off: number) =>
  (b[off]! | (b[off + 1]! << 8) | (b[off + 2]! << 16) | (b[off + 3]! << 24)) >>> 0;

test('register page: a probe, a request, its interrupt and the ACK, all read from the page', () => {
  const h = harness(rngIdentity(), new RngDevice(), { registerPage: true });
  const p = page(h);
  assert.equal(word(p, REG.MAGIC), 0x7472_6976, 'filled in when attached');
  assert.equal(word(p, REG.DEVICE_ID), 4);
  const [q] = h.start({ queueSize: 8 });
  assert.equal(word(p, REG.STATUS) & STATUS_DRIVER_OK, STATUS_DRIVER_OK);
  h.driver.write(REG.QUEUE_SEL, 0);
  assert.equal(word(p, REG.QUEUE_READY), 1, 'the selected queue is ready');
  h.driver.write(REG.QUEUE_SEL, 1);
  assert.equal(word(p, REG.QUEUE_NUM_MAX), 0, 'queue 1 does not exist');
  q!.addChain([{ addr: h.alloc.alloc(32), len: 32, write: true }]);
  h.kick(0);
  assert.equal(h.interrupts(), 1);
  assert.equal(word(p, REG.INTERRUPT_STATUS), INT_USED_BUFFER, 'raised before the interrupt');
  assert.equal(h.driver.takeInterrupt(), INT_USED_BUFFER);
  assert.equal(word(p, REG.INTERRUPT_STATUS), 0, 'acknowledged');
  // A bad read still is one on the transport; the page answers with what it holds.
  assert.equal(h.driver.read(REG.QUEUE_NOTIFY), 0);
});

test('register page: config changes (with their generation), DEVICE_NEEDS_RESET and reset', () => {
  const id = { ...rngIdentity(), config: new Uint8Array([1, 2, 3, 4, 5, 6, 7, 8]) };
  const h = harness(id, new RngDevice(), { registerPage: true });
  const p = page(h);
  assert.deepEqual([...p.subarray(REG.CONFIG, REG.CONFIG + 8)], [1, 2, 3, 4, 5, 6, 7, 8]);
  h.start();
  const gen = word(p, REG.CONFIG_GENERATION);
  assert.equal(h.device.state.changeConfig(2, new Uint8Array([9, 9])), true);
  assert.deepEqual([...p.subarray(REG.CONFIG, REG.CONFIG + 8)], [1, 2, 9, 9, 5, 6, 7, 8]);
  assert.equal(word(p, REG.CONFIG_GENERATION), gen + 1);
  assert.equal(word(p, REG.INTERRUPT_STATUS), INT_CONFIG_CHANGE);
  assert.equal(h.driver.read(REG.CONFIG + 2), 0x0605_0909, 'the driver reads the new bytes');
  assert.equal(h.driver.takeInterrupt(), INT_CONFIG_CHANGE);
  assert.equal(h.device.state.markNeedsReset(h.device.state.epoch()), true);
  assert.equal(word(p, REG.STATUS) & STATUS_DEVICE_NEEDS_RESET, STATUS_DEVICE_NEEDS_RESET);
  h.driver.write(REG.STATUS, 0);
  assert.equal(word(p, REG.STATUS), 0);
  assert.equal(word(p, REG.INTERRUPT_STATUS), 0, 'reset clears InterruptStatus in the page');
});

test('register page: a restored device publishes its saved registers', () => {
  const h = harness(rngIdentity(), new RngDevice(), { registerPage: true });
  const [q] = h.start({ queueSize: 8 });
  q!.addChain([{ addr: h.alloc.alloc(16), len: 16, write: true }]);
  h.kick(0);
  const bytes = h.device.save();
  const h2 = harness(rngIdentity(), new RngDevice(), {
    registerPage: true,
    mem: h.mem,
    alloc: h.alloc,
  });
  const p2 = page(h2);
  assert.equal(word(p2, REG.STATUS), 0);
  const r = h2.device.restore(bytes);
  assert.ok(r.ok);
  assert.equal(word(p2, REG.STATUS) & STATUS_DRIVER_OK, STATUS_DRIVER_OK);
  assert.equal(word(p2, REG.INTERRUPT_STATUS), INT_USED_BUFFER, 'the pending bit');
  assert.equal(h2.driver.takeInterrupt(), INT_USED_BUFFER);
});

test('register page: random driver writes never leave the page behind the transport', () => {
  const prng = new Prng(17);
  const offsets = [
    REG.DEVICE_FEATURES_SEL,
    REG.DRIVER_FEATURES_SEL,
    REG.DRIVER_FEATURES,
    REG.QUEUE_SEL,
    REG.QUEUE_NUM,
    REG.QUEUE_READY,
    REG.QUEUE_DESC_LOW,
    REG.INTERRUPT_ACK,
    REG.STATUS,
    REG.CONFIG_GENERATION, // read-only: counted, changes nothing
  ];
  const h = harness(rngIdentity(), new RngDevice(), { registerPage: true });
  const readable = [0x0, 0x4, 0x8, 0xc, 0x10, 0x34, 0x44, 0x60, 0x70, 0xb0, 0xb4, 0xb8, 0xbc, 0xfc];
  for (let i = 0; i < 2000; i++) {
    const off = offsets[prng.u32() % offsets.length]!;
    const small = [0, 1, 2, 3, 7, 0xf, 0x80, 0xff];
    const v = prng.u32() & 1 ? small[prng.u32() % small.length]! : prng.u32();
    h.driver.write(off, v);
    if (prng.u32() % 4 === 0) h.device.state.raise(INT_USED_BUFFER);
    for (const r of readable) h.driver.read(r); // PageReader throws on a difference
  }
});

test('register page: a detached page is not opened again; a state without a mapper refuses', () => {
  const sab = VirtioMmioState.createState(rngIdentity(), 1n << 32n);
  const buf = new ArrayBuffer(REGISTER_PAGE_BYTES);
  const st = new VirtioMmioState(sab);
  assert.throws(() => st.attachPage(new ArrayBuffer(100), 0x1000n), /bad register page/);
  // The harness set a mapper that knows its own pages only: this address is none of them.
  st.attachPage(buf, 0x5000n);
  assert.equal(st.hasPage, true);
  assert.throws(() => new VirtioMmioState(sab), /no register page at 0x5000|no page mapper/);
  st.detachPage();
  assert.equal(st.hasPage, false);
  assert.equal(new VirtioMmioState(sab).hasPage, false);
});

test('acknowledgements that did not exit (ackFd) apply before the next raise and the save', () => {
  const h = harness(rngIdentity(), new RngDevice(), { registerPage: true });
  const p = page(h);
  let acks = 0; // what KVM's ioeventfd counted: InterruptACK = 1 writes
  h.device.state.setAckSource(() => {
    const n = acks;
    acks = 0;
    return n;
  });
  // No EVENT_IDX: an interrupt after every request (no used_event to keep up to date).
  const [q] = h.start({ queueSize: 8, features: (f) => f & ~(1n << 29n) });
  const request = () => {
    q!.addChain([{ addr: h.alloc.alloc(8), len: 8, write: true }]);
    h.kick(0);
  };
  request();
  assert.equal(h.interrupts(), 1);
  assert.equal(h.driver.read(REG.INTERRUPT_STATUS), INT_USED_BUFFER);
  acks++; // the handler's ACK of 1, taken by KVM: no exit, nothing changed yet
  assert.equal(word(p, REG.INTERRUPT_STATUS), INT_USED_BUFFER, 'not applied yet');
  // The next used buffer: the ACK is applied first, so this is a new interrupt, not coalesced.
  request();
  assert.equal(h.interrupts(), 2);
  assert.equal(h.device.counters.irqsCoalesced[0], 0);
  assert.equal(word(p, REG.INTERRUPT_STATUS), INT_USED_BUFFER);
  // An ACK pending when the device changes its config: the used bit goes, the config bit stays.
  acks++;
  h.device.state.changeConfig(0, new Uint8Array(0));
  assert.equal(word(p, REG.INTERRUPT_STATUS), INT_CONFIG_CHANGE);
  assert.equal(h.driver.takeInterrupt(), INT_CONFIG_CHANGE, 'an exiting ACK still applies at once');
  // A pending ACK is applied before a save: the saved state has no stale bit.
  request();
  acks++;
  assert.ok(h.device.isQuiescent());
  const h2 = harness(rngIdentity(), new RngDevice(), { mem: h.mem, alloc: h.alloc });
  assert.ok(h2.device.restore(h.device.save()).ok);
  assert.equal(h2.driver.read(REG.INTERRUPT_STATUS), 0);
});

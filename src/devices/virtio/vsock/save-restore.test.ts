import { test } from 'node:test';
import assert from 'node:assert/strict';
import { PersistError } from '../../../util/persist.js';
import { harness } from '../testing/harness.js';
import type { MockQueue } from '../testing/mock-driver.js';
import {
  EVENT_TRANSPORT_RESET,
  HOST_CID,
  OP_REQUEST,
  OP_RESPONSE,
  TYPE_STREAM,
  VSOCK_HDR_SIZE,
  readHeader,
  writeHeader,
} from './packet.js';
import {
  EVENT_QUEUE,
  RX_QUEUE,
  TX_QUEUE,
  VsockDevice,
  type VsockHost,
  vsockIdentity,
} from './vsock.js';

const CID = 3;

/** Host sockets that accept every connection and never have data (enough for save/restore). */
function quietHost(): VsockHost & { closed: Set<number> } {
  let next = 100;
  const closed = new Set<number>();
  return {
    closed,
    connect: () => next++,
    accept: () => -1,
    read: () => -1,
    write: (_fd, bufs) => bufs.reduce((a, b) => a + b.length, 0),
    shutdownWrite() {},
    after: () => () => {},
    close: (fd) => void closed.add(fd),
    watch() {},
    unwatch() {},
    watchListener() {},
  };
}

function setup() {
  const host = quietHost();
  const dev = new VsockDevice('virtio-vsock test', CID, '/tmp/v.sock', host, () => {});
  const h = harness(vsockIdentity(CID), dev);
  return { host, dev, h };
}

/** Starts the driver; returns a function that offers one event buffer and reports what came. */
function start(h: ReturnType<typeof setup>['h']) {
  const [rx, tx, ev] = h.start() as [MockQueue, MockQueue, MockQueue];
  const event = (): number[] => {
    const a = h.alloc.alloc(8);
    ev.addChain([{ addr: a, len: 8, write: true }]);
    h.kick(EVENT_QUEUE);
    return ev.takeUsed().map((u) => {
      assert.equal(u.len, 4);
      return h.mem.readU32(a);
    });
  };
  return { rx, tx, event };
}

test('vsock save/restore: host connections are dropped, the guest gets TRANSPORT_RESET', () => {
  const a = setup();
  const q = start(a.h);
  // A live guest connection at save time.
  const rxBuf = a.h.alloc.alloc(VSOCK_HDR_SIZE);
  q.rx.addChain([{ addr: rxBuf, len: VSOCK_HDR_SIZE, write: true }]);
  a.h.kick(RX_QUEUE);
  const pkt = a.h.alloc.alloc(VSOCK_HDR_SIZE);
  writeHeader(a.h.mem.view(pkt, VSOCK_HDR_SIZE), {
    srcCid: CID,
    dstCid: HOST_CID,
    srcPort: 5000,
    dstPort: 80,
    len: 0,
    type: TYPE_STREAM,
    op: OP_REQUEST,
    flags: 0,
    bufAlloc: 65536,
    fwdCnt: 0,
  });
  q.tx.addChain([{ addr: pkt, len: VSOCK_HDR_SIZE }]);
  a.h.kick(TX_QUEUE);
  assert.equal(readHeader(a.h.mem.view(rxBuf, VSOCK_HDR_SIZE)).op, OP_RESPONSE);
  assert.equal(a.dev.connectionCount, 1);
  assert.deepEqual(q.event(), [], 'no reset owed to the running driver');

  const saved = a.dev.save();
  const b = setup();
  b.dev.restore(saved);
  assert.deepEqual(b.dev.save(), saved, 'save -> restore -> save gives the same bytes');
  assert.equal(b.dev.connectionCount, 0, 'host-side connections are not saved');

  const qb = start(b.h);
  assert.deepEqual(qb.event(), [EVENT_TRANSPORT_RESET]);
  assert.deepEqual(qb.event(), [], 'sent once');
  assert.ok(b.h.interrupts() > 0);
});

test('vsock save/restore: a device whose driver never ran owes nothing; bad blobs are refused', () => {
  const a = setup();
  const saved = a.dev.save();
  const b = setup();
  b.dev.restore(saved);
  assert.deepEqual(b.dev.save(), saved);
  assert.deepEqual(start(b.h).event(), []);

  const other = new VsockDevice('other', CID + 1, '/tmp/v.sock', quietHost(), () => {});
  assert.throws(() => other.restore(saved), PersistError);
  assert.throws(() => b.dev.restore(saved.subarray(0, saved.length - 1)), PersistError);
  assert.throws(() => b.dev.restore(new Uint8Array(16)), PersistError);
});

test('vsock counters: counters() is a copy, counters.x reads live', () => {
  const { dev } = setup();
  const copy = dev.counters();
  assert.equal(copy.txPackets, 0);
  assert.equal(dev.counters.txPackets, 0);
  assert.deepEqual(Object.keys(copy).sort(), Object.keys(dev.counters).sort());
});

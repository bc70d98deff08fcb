import { test } from 'node:test';
import assert from 'node:assert/strict';
import { harness } from '../testing/harness.js';
import type { MockQueue } from '../testing/mock-driver.js';
import {
  HOST_CID,
  OP_CREDIT_REQUEST,
  OP_CREDIT_UPDATE,
  OP_REQUEST,
  OP_RESPONSE,
  OP_RST,
  OP_RW,
  OP_SHUTDOWN,
  PORT_ANY,
  SHUTDOWN_RCV,
  SHUTDOWN_SEND,
  TYPE_STREAM,
  VSOCK_HDR_SIZE,
  type VsockHeader,
  parseConnectLine,
  parsePacket,
  readHeader,
  writeHeader,
} from './packet.js';
import { BUF_ALLOC, CONNECT_TIMEOUT_MS, EVENT_QUEUE } from './vsock.js';
import { CID, hdr, setup } from '../testing/vsock.js';

test('vsock packet parsing refuses malformed headers, unknown ops, bad types and ports', () => {
  const pkt = (x: Partial<VsockHeader>, extra = 0, chainLen?: number) => {
    const b = new Uint8Array(VSOCK_HDR_SIZE + extra);
    writeHeader(b, hdr(x));
    return parsePacket([b], chainLen ?? b.length, CID);
  };
  assert.ok(pkt({}).ok);
  assert.ok(pkt({ op: OP_RW, len: 10 }, 10).ok);
  const kind = (r: ReturnType<typeof pkt>) => (r.ok ? 'ok' : `${r.error.action}:${r.error.kind}`);
  assert.equal(kind(parsePacket([new Uint8Array(20)], 20, CID)), 'drop:short');
  assert.equal(kind(pkt({ srcCid: 7 })), 'drop:bad-cid');
  assert.equal(kind(pkt({ dstCid: 1 })), 'drop:bad-cid');
  assert.equal(kind(pkt({ op: OP_RW, len: 100 }, 10)), 'rst:bad-len');
  assert.equal(kind(pkt({ op: OP_RW, len: 0x1_0000 + 1 }, 0)), 'rst:too-long');
  assert.equal(kind(pkt({ op: 0 })), 'rst:unknown-op');
  assert.equal(kind(pkt({ op: 99 })), 'rst:unknown-op');
  assert.equal(kind(pkt({ type: 2 })), 'rst:bad-type');
  assert.equal(kind(pkt({ op: OP_SHUTDOWN, len: 4 }, 4)), 'rst:bad-len');
  assert.equal(kind(pkt({ dstPort: PORT_ANY })), 'rst:bad-port');
  assert.equal(kind(pkt({ srcPort: PORT_ANY })), 'rst:bad-port');
  // Random garbage never throws.
  for (let i = 0; i < 2000; i++) {
    const b = new Uint8Array(VSOCK_HDR_SIZE + (i % 64)).map(() => (Math.random() * 256) | 0);
    if (i % 3 === 0) new DataView(b.buffer).setUint32(0, CID, true);
    parsePacket([b], b.length, CID);
  }
  assert.equal(parseConnectLine('CONNECT 52'), 52);
  assert.equal(parseConnectLine('CONNECT 4294967295'), undefined);
  assert.equal(parseConnectLine('CONNECT 99999999999'), undefined);
  assert.equal(parseConnectLine('CONNECT -1'), undefined);
  assert.equal(parseConnectLine('connect 5'), undefined);
});

test('vsock: a guest connection to a port with no host listener gets RST; garbage is counted', () => {
  const t = setup();
  t.addRx(8);
  t.send({ op: OP_REQUEST, dstPort: 1234 });
  assert.deepEqual(
    t.received().map((p) => [p.op, p.srcPort, p.dstPort]),
    [[OP_RST, 1234, 5000]],
  );
  t.send({ op: 42 });
  t.send({ srcCid: 9 });
  t.send({ op: OP_RW, len: 10, dstPort: 1 }); // no connection
  const got = t.received().map((p) => p.op);
  assert.deepEqual(got, [OP_RST, OP_RST]);
  assert.equal(t.dev.counters.malformed, 2);
  assert.equal(t.dev.counters.dropped, 1);
  assert.ok(t.h.device.state.counters().guestErrors >= 2);
});

test('vsock: guest-initiated connection, data both ways, credit, shutdown', () => {
  const t = setup();
  t.host.listeners.add('/tmp/v.sock_80');
  t.addRx(16);
  t.send({ op: OP_REQUEST });
  const [resp] = t.received();
  assert.equal(resp!.op, OP_RESPONSE);
  assert.equal(resp!.bufAlloc, BUF_ALLOC);
  const fd = [...t.host.socks.keys()][0]!;
  t.send({ op: OP_RW }, Buffer.from('hello host'));
  assert.equal(t.host.text(fd), 'hello host');
  // Host -> guest, limited by the guest's credit (buf_alloc 16, nothing forwarded yet).
  t.send({ op: OP_CREDIT_UPDATE, bufAlloc: 16 });
  t.host.socks.get(fd)!.inbox.push(...Buffer.from('0123456789abcdefXYZ'));
  t.dev.onSocket(fd, true, false, false);
  const rw = t.received();
  assert.deepEqual(
    rw.map((p) => [p.op, p.data]),
    [
      [OP_RW, '0123456789abcdef'],
      [OP_CREDIT_REQUEST, ''],
    ],
  );
  assert.equal(t.host.socks.get(fd)!.watch![0], false, 'no credit: not reading the socket');
  t.send({ op: OP_CREDIT_UPDATE, bufAlloc: 16, fwdCnt: 16 });
  assert.deepEqual(
    t.received().map((p) => p.data),
    ['XYZ'],
  );
  // EOF from the host -> SHUTDOWN(SEND) to the guest; the guest closes -> RST, socket closed.
  t.host.socks.get(fd)!.eof = true;
  t.dev.onSocket(fd, true, false, false);
  assert.deepEqual(
    t.received().map((p) => [p.op, p.flags]),
    [[OP_SHUTDOWN, SHUTDOWN_SEND]],
  );
  t.send({ op: OP_SHUTDOWN, flags: SHUTDOWN_SEND | SHUTDOWN_RCV, fwdCnt: 19 });
  assert.deepEqual(
    t.received().map((p) => p.op),
    [OP_RST],
  );
  assert.ok(t.host.socks.get(fd)!.closed);
  assert.equal(t.dev.connectionCount, 0);
});

test('vsock: a guest sending beyond its credit is reset and counted', () => {
  const t = setup();
  t.host.listeners.add('/tmp/v.sock_80');
  t.addRx(8);
  t.send({ op: OP_REQUEST });
  t.received();
  t.host.writeLimit = 0; // the host app reads nothing: everything stays buffered
  const chunk = new Uint8Array(64 * 1024);
  for (let i = 0; i < BUF_ALLOC / chunk.length; i++) t.send({ op: OP_RW }, chunk);
  assert.equal(t.dev.counters.creditViolations, 0);
  t.send({ op: OP_RW }, new Uint8Array(1));
  assert.equal(t.dev.counters.creditViolations, 1);
  assert.deepEqual(
    t.received().map((p) => p.op),
    [OP_RST],
  );
  assert.equal(t.dev.connectionCount, 0);
});

test('vsock: host-initiated CONNECT, OK <port> after the guest accepts; bad lines refused', () => {
  const t = setup();
  t.addRx(8);
  const fd = t.host.dial();
  t.host.socks.get(fd)!.inbox.push(...Buffer.from('CONNECT 52\nping'));
  t.dev.onListen();
  t.dev.onSocket(fd, true, false, false);
  const [req] = t.received();
  assert.equal(req!.op, OP_REQUEST);
  assert.equal(req!.dstPort, 52);
  assert.ok(req!.srcPort >= 1 << 30);
  t.send({ op: OP_RESPONSE, srcPort: 52, dstPort: req!.srcPort });
  assert.equal(t.host.text(fd), `OK ${req!.srcPort}\n`);
  assert.deepEqual(
    t.received().map((p) => [p.op, p.data]),
    [[OP_RW, 'ping']],
  );
  // Refused by the guest: the host socket is closed.
  const fd2 = t.host.dial();
  t.host.socks.get(fd2)!.inbox.push(...Buffer.from('CONNECT 53\n'));
  t.dev.onListen();
  t.dev.onSocket(fd2, true, false, false);
  const [req2] = t.received();
  t.send({ op: OP_RST, srcPort: 53, dstPort: req2!.srcPort });
  assert.ok(t.host.socks.get(fd2)!.closed);
  // Garbage handshakes.
  for (const line of ['CONNECT x\n', 'HELLO\n', `CONNECT ${PORT_ANY}\n`, 'A'.repeat(100)]) {
    const f = t.host.dial();
    t.host.socks.get(f)!.inbox.push(...Buffer.from(line));
    t.host.socks.get(f)!.eof = true;
    t.dev.onListen();
    t.dev.onSocket(f, true, false, false);
    assert.ok(t.host.socks.get(f)!.closed, line);
  }
  assert.equal(t.dev.counters.badHandshakes, 4);
});

test('vsock: a host-initiated connection the guest never answers is reset after the timeout', () => {
  const t = setup();
  t.addRx(8);
  const dial = (port: number) => {
    const fd = t.host.dial();
    t.host.socks.get(fd)!.inbox.push(...Buffer.from(`CONNECT ${port}\n`));
    t.dev.onListen();
    t.dev.onSocket(fd, true, false, false);
    const [req] = t.received();
    assert.equal(req!.op, OP_REQUEST);
    return { fd, local: req!.srcPort };
  };
  const silent = dial(60);
  const answered = dial(61);
  t.send({ op: OP_RESPONSE, srcPort: 61, dstPort: answered.local });
  // The answered connection's timer was cancelled: only the silent one's is left.
  assert.deepEqual(
    t.host.timers.map((x) => x.ms),
    [CONNECT_TIMEOUT_MS],
  );
  t.host.fireTimers();
  assert.ok(t.host.socks.get(silent.fd)!.closed, 'the host program sees the socket closed');
  assert.ok(!t.host.socks.get(answered.fd)!.closed, 'an answered connection is kept');
  assert.equal(t.host.text(silent.fd), '', 'no OK for the silent one');
  assert.deepEqual(
    t.received().map((p) => [p.op, p.dstPort, p.srcPort]),
    [[OP_RST, 60, silent.local]],
  );
  assert.equal(t.dev.counters.connectTimeouts, 1);
  // The guest answering late gets RST: the connection is gone.
  t.send({ op: OP_RESPONSE, srcPort: 60, dstPort: silent.local });
  assert.deepEqual(
    t.received().map((p) => p.op),
    [OP_RST],
  );
});

test('vsock: many connections at once; no RX buffers -> stop reading sockets until the kick', () => {
  const t = setup();
  t.host.listeners.add('/tmp/v.sock_80');
  t.addRx(150);
  for (let i = 0; i < 100; i++) t.send({ op: OP_REQUEST, srcPort: 6000 + i });
  assert.equal(t.received().filter((p) => p.op === OP_RESPONSE).length, 100);
  assert.equal(t.dev.connectionCount, 100);
  const fds = [...t.host.socks.keys()];
  for (const fd of fds) t.host.socks.get(fd)!.inbox.push(...Buffer.from(`data-${fd}`));
  for (const fd of fds) t.dev.onSocket(fd, true, false, false);
  const got = t.received();
  assert.equal(got.length, 50); // the ring had 50 buffers left
  assert.ok(
    fds.every((fd) => t.host.socks.get(fd)!.watch![0] === false),
    'all sockets paused',
  );
  t.addRx(60);
  const rest = t.received();
  assert.equal(got.length + rest.length, 100);
  assert.equal(new Set([...got, ...rest].map((p) => p.data)).size, 100);
});

test('vsock: after a reset the new driver gets TRANSPORT_RESET on the event queue', () => {
  const t = setup();
  t.host.listeners.add('/tmp/v.sock_80');
  t.addRx(4);
  t.send({ op: OP_REQUEST });
  const fd = [...t.host.socks.keys()][0]!;
  t.h.driver.write(0x70, 0); // reset
  assert.ok(t.host.socks.get(fd)!.closed, 'connections are closed at reset');
  const [, , ev] = t.h.start() as MockQueue[];
  const a = t.h.alloc.alloc(8);
  ev!.addChain([{ addr: a, len: 8, write: true }]);
  t.h.kick(EVENT_QUEUE);
  assert.deepEqual(ev!.takeUsed(), [{ id: 0, len: 4 }]);
  assert.equal(t.h.mem.readU32(a), 0);
});

/**
 * virtio-vsock budgets (issue 12): every cap a hostile guest or host program can reach is hit
 * here, on the mock driver and a fake host, and each test checks both the bound and its counter.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { setFlagsFromString } from 'node:v8';
import { runInNewContext } from 'node:vm';
import type { HostSys, EventOps } from '../descriptor.js';
import { vsockDevice } from './descriptor.js';
import {
  OP_CREDIT_REQUEST,
  OP_CREDIT_UPDATE,
  OP_REQUEST,
  OP_RESPONSE,
  OP_RST,
  OP_RW,
  OP_SHUTDOWN,
  SHUTDOWN_RCV,
  SHUTDOWN_SEND,
  VSOCK_HDR_SIZE,
} from './packet.js';
import { CID, setup } from '../testing/vsock.js';
import {
  ACCEPT_BACKOFF_MAX_MS,
  ACCEPT_BACKOFF_MIN_MS,
  ACCEPT_BATCH,
  BUF_ALLOC,
  ByteRing,
  CLOSE_LINGER_MS,
  HANDSHAKE_TIMEOUT_MS,
  MAX_CONNECTIONS,
  MAX_CONNECTIONS_PER_SIDE,
  MAX_PENDING_HANDSHAKES,
  FULL_RECHECK_MS,
  MAX_PENDING_RESETS,
  RX_BUDGET_PACKETS,
  RX_QUEUE,
  TX_BUDGET_BYTES,
  TX_BUDGET_PACKETS,
  TX_QUEUE,
} from './vsock.js';

/**
 * JS heap plus memory outside it (ArrayBuffers: the rings) after a full collection
 * (--expose-gc switched on for this process).
 */
function heapAfterGc(): number {
  setFlagsFromString('--expose-gc');
  const gc = runInNewContext('gc') as () => void;
  gc();
  gc();
  const m = process.memoryUsage();
  return m.heapUsed + m.external;
}

const MiB = 1024 * 1024;

test('ByteRing: wraps, grows to its capacity only, releases when empty, keeps byte order', () => {
  const ring = new ByteRing(1000);
  const model: number[] = [];
  let x = 1;
  const rand = (n: number) => {
    x = (x * 1103515245 + 12345) >>> 0;
    return x % n;
  };
  for (let step = 0; step < 5000; step++) {
    if (rand(2) === 0) {
      const n = rand(Math.min(ring.free, 300) + 1);
      const data = Array.from({ length: n }, () => rand(256));
      // As two segments, the first `from` bytes skipped (as queueToSocket does).
      const from = rand(3) === 0 ? Math.min(n, 5) : 0;
      const cut = Math.floor(n / 2);
      ring.keep([Uint8Array.from(data.slice(0, cut)), Uint8Array.from(data.slice(cut))], from, n);
      model.push(...data.slice(from));
    } else {
      const n = rand(ring.bytes + 1);
      ring.consume(n);
      model.splice(0, n);
    }
    assert.equal(ring.bytes, model.length);
    assert.ok(ring.allocated <= 1000);
    if (model.length === 0) assert.equal(ring.allocated, 0, 'empty: storage released');
    const head = ring.head();
    assert.ok(head.length <= 2);
    assert.deepEqual(
      head.flatMap((v) => [...v]),
      model,
    );
  }
  assert.throws(() => ring.keep([new Uint8Array(ring.free + 1)], 0, ring.free + 1));
});

test('vsock budget: a flood to no connection with no RX buffers queues at most MAX_PENDING_RESETS RSTs', () => {
  const t = setup();
  const N = 20_000;
  // Alternately REQUESTs to a port nobody listens on and data for no connection: each wants RST.
  t.sendMany(N, (i) => ({ op: i % 2 ? OP_REQUEST : OP_RW, srcPort: 10_000 + i, dstPort: 7 }));
  assert.equal(t.dev.counters.txPackets, N);
  assert.equal(t.dev.budgets.controlQueued, MAX_PENDING_RESETS);
  assert.equal(t.dev.counters.rstDropped, N - MAX_PENDING_RESETS);
  assert.equal(t.dev.counters.resetsSent, MAX_PENDING_RESETS);
  assert.ok(t.logs.some((m) => m.includes('RSTs wait for RX buffers')));
  // Once the guest posts buffers it gets the queued RSTs (each port pair once), then nothing.
  const got = [];
  for (let round = 0; round < 5; round++) {
    t.addRx(256, VSOCK_HDR_SIZE);
    t.host.drainYields();
    got.push(...t.received());
  }
  assert.equal(got.length, MAX_PENDING_RESETS);
  assert.ok(got.every((p) => p.op === OP_RST && p.dstPort >= 10_000 && p.srcPort === 7));
  assert.equal(new Set(got.map((p) => p.dstPort)).size, MAX_PENDING_RESETS);
  assert.equal(t.dev.budgets.controlQueued, 0);
  // Talking to a dead connection again gets an RST again: nothing is lost for good.
  t.send({ op: OP_RW, srcPort: 10_000, dstPort: 7 });
  assert.deepEqual(
    t.received().map((p) => p.op),
    [OP_RST],
  );
});

test('vsock budget: RSTs and replies to one port pair coalesce while RX is blocked', () => {
  const t = setup();
  t.sendMany(5000, () => ({ op: OP_RW, srcPort: 4242, dstPort: 7 }));
  assert.equal(t.dev.budgets.controlQueued, 1);
  assert.equal(t.dev.counters.controlCoalesced, 4999);
  // A connection's CREDIT_REQUESTs while RX is blocked: one CREDIT_UPDATE waits, not thousands.
  t.host.listeners.add('/tmp/v.sock_80');
  t.send({ op: OP_REQUEST, srcPort: 5000 });
  t.sendMany(3000, () => ({ op: OP_CREDIT_REQUEST, srcPort: 5000 }));
  assert.equal(t.dev.budgets.controlQueued, 3, 'the RST, the RESPONSE and one CREDIT_UPDATE');
  t.addRx(8, VSOCK_HDR_SIZE);
  assert.deepEqual(
    t.received().map((p) => p.op),
    [OP_RST, OP_RESPONSE, OP_CREDIT_UPDATE],
  );
});

test('vsock budget: heap stays bounded under a 200,000-packet flood with no RX buffers', () => {
  const t = setup();
  t.sendMany(2000, (i) => ({ op: OP_RW, srcPort: i, dstPort: 7 })); // warm up the code paths
  const before = heapAfterGc();
  t.sendMany(200_000, (i) => ({ op: OP_RW, srcPort: 100_000 + i, dstPort: 7 }));
  const grown = heapAfterGc() - before;
  assert.ok(t.dev.budgets.controlQueued <= MAX_PENDING_RESETS);
  // Unbounded, this grew ~34 MiB (one queued RST per packet, ~170 bytes each).
  assert.ok(grown < 4 * MiB, `heap grew ${(grown / MiB).toFixed(1)} MiB`);
});

test('vsock budget: 1-byte segments to a socket that never reads hold one ring of BUF_ALLOC bytes', () => {
  const t = setup();
  t.host.listeners.add('/tmp/v.sock_80');
  t.send({ op: OP_REQUEST });
  const fd = [...t.host.socks.keys()][0]!;
  t.host.writeLimit = 0; // the host program reads nothing
  const before = heapAfterGc();
  t.sendMany(
    BUF_ALLOC,
    () => ({ op: OP_RW }),
    1,
    (i, p) => void (p[0] = i & 0xff),
  );
  const grown = heapAfterGc() - before;
  assert.equal(t.dev.counters.creditViolations, 0);
  assert.equal(t.dev.connectionCount, 1);
  assert.deepEqual(t.dev.budgets, {
    controlQueued: 1, // the RESPONSE (no RX buffers posted)
    sockets: 1,
    handshakes: 0,
    bufferedBytes: BUF_ALLOC,
    bufferAllocated: BUF_ALLOC,
    stagedBytes: 0,
  });
  // Per segment this was ~55 MiB (one buffered object per byte).
  assert.ok(grown < 4 * MiB, `heap grew ${(grown / MiB).toFixed(1)} MiB`);
  assert.deepEqual(t.host.socks.get(fd)!.watch, [false, true], 'waiting to write, not reading');
  // The host program reads: everything arrives in order and the storage is released.
  t.host.writeLimit = Infinity;
  t.dev.onSocket(fd, false, true, false);
  const out = t.host.socks.get(fd)!.written;
  assert.equal(out.length, BUF_ALLOC);
  assert.ok(out.every((b, i) => b === (i & 0xff)));
  assert.equal(t.dev.budgets.bufferAllocated, 0);
});

test('vsock budget: a guest sending beyond the credit we gave is reset, its buffer released', () => {
  const t = setup();
  t.host.listeners.add('/tmp/v.sock_80');
  t.send({ op: OP_REQUEST });
  t.host.writeLimit = 1000; // the host takes the first 1000 bytes, then nothing
  t.sendMany(4, () => ({ op: OP_RW }), 64 * 1024);
  t.host.writeLimit = 0;
  // 1000 bytes were forwarded: the guest has exactly 1000 bytes of credit left.
  t.send({ op: OP_RW }, new Uint8Array(1000));
  assert.equal(t.dev.counters.creditViolations, 0);
  assert.equal(t.dev.budgets.bufferedBytes, BUF_ALLOC);
  t.send({ op: OP_RW }, new Uint8Array(1));
  assert.equal(t.dev.counters.creditViolations, 1);
  assert.equal(t.dev.connectionCount, 0);
  assert.deepEqual(t.dev.budgets, {
    controlQueued: 1, // the RST (the RESPONSE of a closed connection is not sent)
    sockets: 0,
    handshakes: 0,
    bufferedBytes: 0,
    bufferAllocated: 0,
    stagedBytes: 0,
  });
  t.addRx(4, VSOCK_HDR_SIZE);
  assert.deepEqual(
    t.received().map((p) => p.op),
    [OP_RST],
  );
});

/**
 * Host programs dial in `n` times, one at a time, each asking for a guest port from `port` on;
 * the guest answers every REQUEST that reaches it. Returns the sockets, in order.
 */
function hostConnects(t: ReturnType<typeof setup>, n: number, port: number): number[] {
  const fds = [];
  for (let i = 0; i < n; i++) {
    const fd = t.host.dial();
    t.host.socks.get(fd)!.inbox.push(...Buffer.from(`CONNECT ${port + i}\n`));
    t.dev.onListen();
    t.dev.onSocket(fd, true, false, false);
    // One buffer each time (the ring does not fill up), with room for data as Linux's have.
    t.addRx(1, VSOCK_HDR_SIZE + 64);
    for (const p of t.received().filter((x) => x.op === OP_REQUEST))
      t.send({ op: OP_RESPONSE, srcPort: p.dstPort, dstPort: p.srcPort });
    fds.push(fd);
  }
  return fds;
}

test('vsock budget: the guest holds at most MAX_CONNECTIONS_PER_SIDE connections; host programs keep the rest, up to MAX_CONNECTIONS', () => {
  const t = setup();
  t.host.listeners.add('/tmp/v.sock_80');
  t.sendMany(MAX_CONNECTIONS_PER_SIDE + 1, (i) => ({ op: OP_REQUEST, srcPort: 20_000 + i }));
  assert.equal(t.dev.connectionCount, MAX_CONNECTIONS_PER_SIDE);
  assert.equal(t.host.socks.size, MAX_CONNECTIONS_PER_SIDE, 'no socket for the refused one');
  assert.equal(t.dev.counters.connsRefused, 1);
  assert.ok(t.logs.some((m) => m.includes('the guest holds 896 connections')));
  // The guest's answers: RESPONSEs, and an RST for the refused one.
  // (Exactly as many header-only RX buffers as there are answers: none is left over.)
  const got = [];
  for (let need = MAX_CONNECTIONS_PER_SIDE + 1; need > 0;) {
    t.addRx(Math.min(need, 256), VSOCK_HDR_SIZE);
    t.host.drainYields();
    const r = t.received();
    assert.ok(r.length > 0);
    got.push(...r);
    need -= r.length;
  }
  assert.equal(got.filter((p) => p.op === OP_RESPONSE).length, MAX_CONNECTIONS_PER_SIDE);
  assert.deepEqual(
    got.filter((p) => p.op === OP_RST).map((p) => p.dstPort),
    [20_000 + MAX_CONNECTIONS_PER_SIDE],
  );
  // Host programs still get in, up to the table's size; the one after is closed.
  const room = MAX_CONNECTIONS - MAX_CONNECTIONS_PER_SIDE;
  const fds = hostConnects(t, room + 1, 100);
  assert.equal(t.dev.connectionCount, MAX_CONNECTIONS);
  assert.equal(fds.filter((fd) => t.host.socks.get(fd)!.closed).length, 1);
  assert.ok(t.host.socks.get(fds.at(-1)!)!.closed);
  assert.equal(t.dev.counters.connsRefused, 2);
  assert.ok(t.logs.some((m) => m.includes('connection table full')));
  // One of the guest's connections closes: the guest has room again.
  t.send({ op: OP_RST, srcPort: 20_000 });
  t.send({ op: OP_REQUEST, srcPort: 30_000 });
  assert.equal(t.dev.connectionCount, MAX_CONNECTIONS);
  assert.equal(t.dev.counters.connsRefused, 2);
});

test('vsock budget: host programs hold at most MAX_CONNECTIONS_PER_SIDE connections; the guest keeps the rest', () => {
  const t = setup();
  t.host.listeners.add('/tmp/v.sock_80');
  const fds = hostConnects(t, MAX_CONNECTIONS_PER_SIDE + 1, 100);
  assert.equal(t.dev.connectionCount, MAX_CONNECTIONS_PER_SIDE);
  assert.ok(t.host.socks.get(fds.at(-1)!)!.closed, 'the one over the cap is closed');
  assert.equal(fds.filter((fd) => t.host.socks.get(fd)!.closed).length, 1);
  assert.equal(t.dev.counters.connsRefused, 1);
  assert.ok(t.logs.some((m) => m.includes('host programs hold 896 connections')));
  // The guest still connects out.
  t.send({ op: OP_REQUEST, srcPort: 20_000 });
  assert.equal(t.dev.connectionCount, MAX_CONNECTIONS_PER_SIDE + 1);
  assert.equal(t.dev.counters.connsRefused, 1);
});

test('vsock budget: one CREDIT_REQUEST per stall (no ping-pong with a guest that has no room)', () => {
  const t = setup();
  t.host.listeners.add('/tmp/v.sock_80');
  t.addRx(64, VSOCK_HDR_SIZE + 64);
  t.send({ op: OP_REQUEST, bufAlloc: 0 });
  const fd = [...t.host.socks.keys()][0]!;
  t.host.socks.get(fd)!.inbox.push(...Buffer.from('0123456789'));
  t.dev.onSocket(fd, true, false, false);
  assert.deepEqual(
    t.received().map((p) => p.op),
    [OP_RESPONSE, OP_CREDIT_REQUEST],
  );
  // The guest answers, still with no room, again and again: we do not ask again.
  for (let i = 0; i < 50; i++) t.send({ op: OP_CREDIT_UPDATE, bufAlloc: 0 });
  assert.deepEqual(t.received(), []);
  // Room for 4 bytes: they flow; stalled again, one new CREDIT_REQUEST.
  t.send({ op: OP_CREDIT_UPDATE, bufAlloc: 4 });
  assert.deepEqual(
    t.received().map((p) => [p.op, p.data]),
    [
      [OP_RW, '0123'],
      [OP_CREDIT_REQUEST, ''],
    ],
  );
  for (let i = 0; i < 50; i++) t.send({ op: OP_CREDIT_UPDATE, bufAlloc: 4 });
  assert.deepEqual(t.received(), []);
});

test('vsock budget: a host socket that never sends its CONNECT line is closed after the timeout', () => {
  const t = setup();
  t.addRx(8);
  const silent = t.host.dial();
  const slow = t.host.dial();
  const quick = t.host.dial();
  t.host.socks.get(slow)!.inbox.push(...Buffer.from('CONN'));
  t.host.socks.get(quick)!.inbox.push(...Buffer.from('CONNECT 52\n'));
  t.dev.onListen();
  for (const fd of [silent, slow, quick]) t.dev.onSocket(fd, true, false, false);
  assert.equal(t.dev.budgets.handshakes, 2);
  assert.deepEqual(
    t.host.timers.map((x) => x.ms).sort(),
    [HANDSHAKE_TIMEOUT_MS, HANDSHAKE_TIMEOUT_MS, 10_000].sort(),
    'the finished handshake has no timer left',
  );
  t.host.fireTimers(HANDSHAKE_TIMEOUT_MS);
  assert.ok(t.host.socks.get(silent)!.closed);
  assert.ok(t.host.socks.get(slow)!.closed);
  assert.ok(!t.host.socks.get(quick)!.closed);
  assert.equal(t.dev.counters.handshakeTimeouts, 2);
  assert.equal(t.dev.budgets.handshakes, 0);
  assert.ok(t.logs.some((m) => m.includes('no complete CONNECT line')));
});

test('vsock budget: at most MAX_PENDING_HANDSHAKES handshakes, the rest wait in the backlog; ACCEPT_BATCH accepts per wake-up', () => {
  const t = setup();
  const fds = Array.from({ length: 200 }, () => t.host.dial());
  t.dev.onListen();
  assert.equal(t.host.accepts, ACCEPT_BATCH, 'one wake-up accepts a batch; the rest wait');
  t.dev.onListen();
  assert.equal(t.dev.budgets.handshakes, MAX_PENDING_HANDSHAKES);
  // Full: the listener is unwatched (back-pressure into the kernel's backlog), nobody is closed.
  assert.equal(t.host.listening, false);
  assert.equal(t.dev.counters.acceptsDeferred, 1);
  assert.equal(t.dev.counters.handshakesRefused, 0);
  assert.equal(t.host.acceptQueue.length, 200 - MAX_PENDING_HANDSHAKES);
  assert.equal(fds.filter((fd) => t.host.socks.get(fd)!.closed).length, 0);
  t.dev.onListen(); // a wake-up queued before the unwatch: nothing happens
  assert.equal(t.host.acceptQueue.length, 200 - MAX_PENDING_HANDSHAKES);
  // Handshakes that time out make room: the listener is watched again and takes the next batch.
  t.host.fireTimers(HANDSHAKE_TIMEOUT_MS);
  assert.equal(t.dev.budgets.handshakes, 0);
  assert.equal(t.host.listening, true);
  t.dev.onListen();
  assert.equal(t.dev.budgets.handshakes, MAX_PENDING_HANDSHAKES);
  assert.equal(t.host.acceptQueue.length, 200 - 2 * MAX_PENDING_HANDSHAKES);
});

test('vsock budget: at most MAX_PENDING_HANDSHAKES host connections wait for a guest that does not answer; more wait in the backlog', () => {
  const t = setup();
  const dialled = [];
  for (let i = 0; i <= MAX_PENDING_HANDSHAKES; i++) {
    const fd = t.host.dial();
    t.host.socks.get(fd)!.inbox.push(...Buffer.from(`CONNECT ${100 + i}\n`));
    t.dev.onListen();
    t.dev.onSocket(fd, true, false, false);
    dialled.push(fd);
  }
  assert.equal(t.dev.connectionCount, MAX_PENDING_HANDSHAKES);
  const last = dialled.at(-1)!;
  assert.ok(!t.host.socks.get(last)!.closed, 'the one over the cap waits, not closed');
  assert.deepEqual(t.host.acceptQueue, [last]);
  assert.equal(t.host.listening, false);
  assert.ok(t.dev.counters.acceptsDeferred >= 1);
  assert.equal(t.dev.counters.handshakesRefused, 0);
  assert.ok(t.logs.some((m) => m.includes('listen backlog')));
  // Still full: the recheck re-arms itself and the listener stays unwatched.
  t.host.fireTimers(FULL_RECHECK_MS);
  assert.equal(t.host.listening, false);
  // The guest answers one: room for the next, which is accepted once the recheck runs.
  t.addRx(MAX_PENDING_HANDSHAKES + 8, VSOCK_HDR_SIZE);
  const reqs = t.received().filter((p) => p.op === OP_REQUEST);
  t.send({ op: OP_RESPONSE, srcPort: reqs[0]!.dstPort, dstPort: reqs[0]!.srcPort });
  t.host.fireTimers(FULL_RECHECK_MS);
  assert.equal(t.host.listening, true);
  t.dev.onListen();
  t.dev.onSocket(last, true, false, false);
  assert.ok(!t.host.socks.get(last)!.closed);
  assert.equal(t.dev.connectionCount, MAX_PENDING_HANDSHAKES + 1);
});

test('vsock budget: accept failing (EMFILE) unwatches the listener and backs off', () => {
  const t = setup();
  const emfile = Object.assign(new Error('accept4: EMFILE'), { code: 'EMFILE' });
  t.host.acceptError = emfile;
  t.dev.onListen();
  assert.equal(t.host.listening, false, 'the readable listener is not watched while backing off');
  assert.deepEqual(
    t.host.timers.map((x) => x.ms),
    [ACCEPT_BACKOFF_MIN_MS],
  );
  t.dev.onListen(); // an event already queued: no accept
  assert.equal(t.host.accepts, 1);
  const delays = [];
  for (let i = 0; i < 10; i++) {
    t.host.fireTimers();
    assert.equal(t.host.listening, true, 're-armed');
    t.dev.onListen();
    delays.push(t.host.timers[0]!.ms);
  }
  assert.deepEqual(delays.slice(0, 3), [200, 400, 800]);
  assert.equal(Math.max(...delays), ACCEPT_BACKOFF_MAX_MS);
  assert.equal(t.dev.counters.acceptFails, 11);
  assert.equal(t.logs.filter((m) => m.includes('EMFILE')).length, 1, 'logged once');
  // Descriptors are back: accept works, the back-off starts over.
  t.host.acceptError = undefined;
  t.host.fireTimers();
  const fd = t.host.dial();
  t.dev.onListen();
  assert.equal(t.dev.budgets.handshakes, 1);
  assert.ok(!t.host.socks.get(fd)!.closed);
  t.host.acceptError = emfile;
  t.dev.onListen();
  assert.deepEqual(
    t.host.timers.filter((x) => x.ms !== HANDSHAKE_TIMEOUT_MS).map((x) => x.ms),
    [ACCEPT_BACKOFF_MIN_MS],
  );
});

test('vsock budget: a host socket sending data after CONNECT is not read until the guest accepts', () => {
  const t = setup();
  t.addRx(8);
  const fd = t.host.dial();
  t.host.socks.get(fd)!.inbox.push(...Buffer.from('CONNECT 52\nearly data'));
  t.dev.onListen();
  assert.deepEqual(t.host.socks.get(fd)!.watch, [true, false], 'handshake: reading');
  t.dev.onSocket(fd, true, false, false);
  assert.deepEqual(t.host.socks.get(fd)!.watch, [false, false], 'waiting for the guest');
  const [req] = t.received();
  // A wake-up meanwhile (level-triggered) reads nothing and changes nothing.
  t.dev.onSocket(fd, true, false, false);
  assert.deepEqual(t.received(), []);
  t.send({ op: OP_RESPONSE, srcPort: 52, dstPort: req!.srcPort });
  assert.deepEqual(
    t.received().map((p) => [p.op, p.data]),
    [[OP_RW, 'early data']],
  );
  assert.equal(t.host.socks.get(fd)!.watch![0], true, 'established: reading');
});

test('vsock budget: one TX kick handles at most TX_BUDGET_PACKETS packets, then yields', () => {
  const t = setup();
  for (let i = 0; i < 200; i++) {
    const a = t.h.alloc.alloc(VSOCK_HDR_SIZE);
    const b = t.h.mem.view(a, VSOCK_HDR_SIZE);
    new DataView(b.buffer, b.byteOffset).setUint32(0, CID, true); // a packet: no matter which
    t.tx.addChain([{ addr: a, len: VSOCK_HDR_SIZE }]);
  }
  t.h.kick(TX_QUEUE);
  assert.equal(t.dev.counters.txPackets, TX_BUDGET_PACKETS);
  assert.equal(t.tx.takeUsed().length, TX_BUDGET_PACKETS, 'what was handled is returned');
  assert.deepEqual(
    t.host.timers.map((x) => x.ms),
    [0],
  );
  t.h.kick(TX_QUEUE); // another kick before the timer: it does not run the queue further
  assert.equal(t.dev.counters.txPackets, TX_BUDGET_PACKETS);
  assert.equal(t.host.drainYields(), 3);
  assert.equal(t.dev.counters.txPackets, 200);
  assert.equal(t.dev.counters.txBudgetYields, 3);
  // Bytes count too: 64 KiB packets yield after TX_BUDGET_BYTES.
  t.sendMany(1, () => ({ op: OP_RW, dstPort: 9 }), 0);
  const before = t.dev.counters.txPackets;
  for (let i = 0; i < 8; i++) {
    const a = t.h.alloc.alloc(VSOCK_HDR_SIZE + 64 * 1024);
    t.tx.addChain([{ addr: a, len: VSOCK_HDR_SIZE + 64 * 1024 }]);
  }
  t.h.kick(TX_QUEUE);
  assert.equal(
    t.dev.counters.txPackets - before,
    Math.ceil(TX_BUDGET_BYTES / (64 * 1024 + VSOCK_HDR_SIZE)),
  );
});

test('vsock budget: one RX wake-up fills at most RX_BUDGET_PACKETS buffers, then yields', () => {
  const t = setup();
  t.sendMany(300, (i) => ({ op: OP_RW, srcPort: 1000 + i, dstPort: 7 }));
  for (let i = 0; i < 256; i++) {
    const a = t.h.alloc.alloc(VSOCK_HDR_SIZE);
    t.rx.addChain([{ addr: a, len: VSOCK_HDR_SIZE, write: true }]);
  }
  t.h.kick(RX_QUEUE);
  assert.equal(t.rx.takeUsed().length, RX_BUDGET_PACKETS);
  assert.equal(t.dev.counters.rxBudgetYields, 1);
  t.host.drainYields();
  assert.equal(t.rx.takeUsed().length, 256 - RX_BUDGET_PACKETS);
  assert.equal(t.dev.budgets.controlQueued, 300 - 256);
});

test('vsock budget: a closed connection whose host socket never reads is closed after CLOSE_LINGER_MS', () => {
  const t = setup();
  t.host.listeners.add('/tmp/v.sock_80');
  t.addRx(8);
  t.send({ op: OP_REQUEST });
  const fd = [...t.host.socks.keys()][0]!;
  t.host.writeLimit = 0;
  t.send({ op: OP_RW }, Buffer.from('last words'));
  t.send({ op: OP_SHUTDOWN, flags: SHUTDOWN_SEND | SHUTDOWN_RCV });
  assert.equal(t.dev.connectionCount, 0);
  assert.equal(t.dev.budgets.sockets, 1, 'lingering with its data');
  assert.ok(!t.host.socks.get(fd)!.closed);
  t.host.fireTimers(CLOSE_LINGER_MS);
  assert.ok(t.host.socks.get(fd)!.closed);
  assert.equal(t.dev.counters.connsKilled, 1);
  assert.equal(t.dev.budgets.sockets, 0);
  // One that drains in time is closed then, not killed.
  t.host.writeLimit = Infinity;
  t.send({ op: OP_REQUEST, srcPort: 5001 });
  const fd2 = [...t.host.socks.keys()].at(-1)!;
  t.host.writeLimit = 0;
  t.send({ op: OP_RW, srcPort: 5001 }, Buffer.from('bye'));
  t.send({ op: OP_SHUTDOWN, srcPort: 5001, flags: SHUTDOWN_SEND | SHUTDOWN_RCV });
  t.host.writeLimit = Infinity;
  t.dev.onSocket(fd2, false, true, false);
  assert.equal(t.host.text(fd2), 'bye');
  assert.ok(t.host.socks.get(fd2)!.closed);
  t.host.fireTimers(CLOSE_LINGER_MS);
  assert.equal(t.dev.counters.connsKilled, 1);
});

test('vsock metrics: every budget has its counter, in snake_case next to Firecracker names', () => {
  const loop: EventOps = {
    add: () => 1,
    modify() {},
    remove() {},
    setTimer: () => () => {},
  };
  const created = vsockDevice.create(
    { backend: 'unix', listenFd: 99, cid: CID, uds: '/tmp/v.sock' },
    { name: 'vsock', sys: {} as HostSys, loop, log() {} },
  );
  const m = created.metrics!();
  for (const k of [
    'conns_added',
    'conns_refused',
    'conns_killed',
    'credit_violations',
    'rst_dropped',
    'control_coalesced',
    'handshakes_refused',
    'accepts_deferred',
    'handshake_timeouts',
    'connect_timeouts',
    'accept_fails',
    'tx_budget_yields',
    'rx_budget_yields',
  ])
    assert.equal(m[k], 0, k);
});

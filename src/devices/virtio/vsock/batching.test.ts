/**
 * virtio-vsock batching (issue 17) on the mock driver and a fake host: one socket read feeds
 * many RX packets, one used-ring publication (interrupt) per wake-up, a drained socket is not
 * read again until the loop reports it, a guest with no RX buffers stops the reads (with what
 * was read ahead bounded and delivered in order on its RX kick), credit requests do not
 * ping-pong during a transfer, and CREDIT_UPDATEs for guest -> host data come per threshold.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  OP_CREDIT_REQUEST,
  OP_CREDIT_UPDATE,
  OP_REQUEST,
  OP_RESPONSE,
  OP_RST,
  OP_RW,
  VSOCK_HDR_SIZE,
  readHeader,
} from './packet.js';
import { setup } from '../testing/vsock.js';
import { BUF_ALLOC, CREDIT_UPDATE_THRESHOLD, RX_QUEUE, RX_READ_BYTES } from './vsock.js';

const KiB = 1024;

/** Bytes `from`..`from + n - 1` of a recognisable ASCII pattern (position mod 127). */
const pattern = (n: number, from = 0) =>
  Buffer.from(Array.from({ length: n }, (_, i) => (from + i) % 127));

/** Appends bytes to a fake socket's inbox (spreading 100s of KiB would overflow the stack). */
function feed(sock: { inbox: number[] }, data: Uint8Array): void {
  for (const b of data) sock.inbox.push(b);
}

/** A guest connection to host port 80 with `bufAlloc` of credit; returns its socket's fd. */
function connected(t: ReturnType<typeof setup>, bufAlloc = 256 * KiB): number {
  t.host.listeners.add('/tmp/v.sock_80');
  t.addRx(1);
  t.send({ op: OP_REQUEST, bufAlloc });
  assert.deepEqual(
    t.received().map((p) => p.op),
    [OP_RESPONSE],
  );
  return [...t.host.socks.keys()][0]!;
}

/** The payload of the OP_RW packets received, joined (the fixture decodes it as text). */
function rwBytes(pkts: Array<{ op: number; data: string }>): Buffer {
  return Buffer.concat(pkts.filter((p) => p.op === OP_RW).map((p) => Buffer.from(p.data)));
}

test('vsock RX: one socket read feeds many packets, published with one interrupt', () => {
  const t = setup();
  const fd = connected(t);
  t.addRx(40); // 4 KiB buffers, as a Linux guest posts
  const data = pattern(100 * KiB);
  feed(t.host.socks.get(fd)!, data);
  const reads = t.dev.counters.rxReads;
  const batches = t.dev.counters.rxBatches;
  const irqs = t.h.interrupts();
  t.dev.onSocket(fd, true, false, false);
  const got = t.received();
  assert.equal(got.length, 25, '100 KiB in 4 KiB packets');
  assert.ok(got.every((p) => p.op === OP_RW && p.len === 4 * KiB));
  assert.ok(rwBytes(got).equals(data), 'bytes in order');
  assert.equal(t.dev.counters.rxReads - reads, 1, 'one read for 25 packets');
  assert.equal(t.dev.counters.rxBatches - batches, 1);
  assert.equal(t.h.interrupts() - irqs, 1, 'one interrupt for the batch');
  assert.equal(t.dev.counters.rxPackets, 25 + 1);
});

test('vsock RX: a socket drained by a short read is not read again until it is reported', () => {
  const t = setup();
  const fd = connected(t);
  t.addRx(8);
  feed(t.host.socks.get(fd)!, pattern(1000));
  const reads = t.dev.counters.rxReads;
  t.dev.onSocket(fd, true, false, false);
  assert.equal(t.received().length, 1);
  assert.equal(t.dev.counters.rxReads - reads, 1, 'no second read to find it empty');
  assert.equal(t.host.timers.filter((x) => x.ms === 0).length, 0, 'nothing scheduled');
  assert.deepEqual(t.host.socks.get(fd)!.watch, [true, false], 'still watched for reading');
  // Data arriving later is found through the loop's report (level-triggered), not by polling.
  feed(t.host.socks.get(fd)!, pattern(10, 1000));
  t.dev.onSocket(fd, true, false, false);
  assert.ok(rwBytes(t.received()).equals(pattern(10, 1000)));
});

test('vsock RX back-pressure: no RX buffers stops the reads; what was read ahead is bounded and comes first on the kick', () => {
  const t = setup();
  const fd = connected(t);
  const sock = t.host.socks.get(fd)!;
  const total = 200 * KiB;
  const data = pattern(total);
  feed(sock, data);
  t.addRx(4);
  t.dev.onSocket(fd, true, false, false);
  const first = t.received();
  assert.equal(first.length, 4);
  // The guest has no buffer left: one read ahead at most, and the socket is no longer read.
  assert.equal(sock.inbox.length, total - RX_READ_BYTES, 'one read of RX_READ_BYTES, no more');
  assert.equal(t.dev.budgets.stagedBytes, RX_READ_BYTES - 4 * 4 * KiB);
  assert.deepEqual(sock.watch, [false, false], 'not watched for reading while RX is blocked');
  const reads = t.dev.counters.rxReads;
  for (let i = 0; i < 100; i++) t.dev.onSocket(fd, true, false, false);
  assert.equal(t.dev.counters.rxReads, reads, 'spurious reports read nothing');
  assert.equal(t.host.timers.filter((x) => x.ms === 0).length, 0, 'no busy loop');
  // The guest posts buffers and kicks: the rest arrives, in order, then reading resumes.
  const rest = [];
  for (let round = 0; round < 20 && rest.length < 46; round++) {
    t.addRx(16);
    t.host.drainYields();
    rest.push(...t.received());
  }
  assert.ok(rwBytes([...first, ...rest]).equals(data), 'every byte, in order');
  assert.equal(t.dev.budgets.stagedBytes, 0);
  assert.equal(sock.inbox.length, 0);
});

test('vsock RX: data read ahead for a connection the guest resets is dropped, not delivered', () => {
  const t = setup();
  const fd = connected(t);
  feed(t.host.socks.get(fd)!, pattern(64 * KiB));
  t.addRx(2);
  t.dev.onSocket(fd, true, false, false);
  assert.equal(t.received().length, 2);
  assert.ok(t.dev.budgets.stagedBytes > 0);
  t.send({ op: OP_RST });
  t.addRx(8);
  assert.deepEqual(t.received(), []);
  assert.equal(t.dev.budgets.stagedBytes, 0);
  assert.ok(t.host.socks.get(fd)!.closed);
});

test('vsock credit: one CREDIT_REQUEST per stall during a transfer (a small answer does not end it)', () => {
  const t = setup();
  const fd = connected(t, 64 * KiB);
  feed(t.host.socks.get(fd)!, pattern(140 * KiB));
  t.addRx(32);
  t.dev.onSocket(fd, true, false, false);
  let got = t.received();
  assert.equal(rwBytes(got).length, 64 * KiB, 'the credit, no more');
  assert.equal(got.filter((p) => p.op === OP_CREDIT_REQUEST).length, 1);
  // The guest answers with what it has read so far (8 KiB): that flows, and no new question.
  t.send({ op: OP_CREDIT_UPDATE, bufAlloc: 64 * KiB, fwdCnt: 8 * KiB });
  got = t.received();
  assert.equal(rwBytes(got).length, 8 * KiB);
  assert.equal(got.filter((p) => p.op === OP_CREDIT_REQUEST).length, 0, 'no ping-pong');
  // It volunteers an update once it has read most of it: the stall is over.
  t.addRx(32);
  t.send({ op: OP_CREDIT_UPDATE, bufAlloc: 64 * KiB, fwdCnt: 64 * KiB });
  got = t.received();
  assert.equal(rwBytes(got).length, 64 * KiB - 8 * KiB);
  assert.equal(got.filter((p) => p.op === OP_CREDIT_REQUEST).length, 1, 'the next stall asks');
});

test('vsock credit: guest -> host data gets one CREDIT_UPDATE per CREDIT_UPDATE_THRESHOLD forwarded', () => {
  const t = setup();
  connected(t);
  t.addRx(64);
  const total = 4 * BUF_ALLOC;
  const per = 16 * KiB;
  // Each packet keeps within the credit the guest has seen (our fwd_cnt from the updates).
  let sent = 0;
  let told = 0;
  while (sent < total) {
    if (sent - told + per > BUF_ALLOC) {
      const ups = t.received().filter((p) => p.op === OP_CREDIT_UPDATE);
      assert.ok(ups.length > 0, `stalled at ${sent}`);
      told = ups.at(-1)!.fwdCnt;
      t.addRx(ups.length);
      continue;
    }
    t.sendMany(1, () => ({ op: OP_RW, len: per }), per);
    sent += per;
  }
  assert.equal(t.dev.counters.creditUpdatesSent, Math.floor(total / CREDIT_UPDATE_THRESHOLD));
  assert.ok(t.dev.counters.creditUpdatesSent < total / per / 2, 'not one per packet');
  assert.equal(t.dev.counters.resetsSent, 0);
});

test('vsock RX: buffers split as a driver may split them (header alone, header across two, data across three) get every byte in order', () => {
  const t = setup();
  const fd = connected(t);
  // Per chain: its descriptors' lengths; 4 KiB of data room in each.
  const shapes = [
    [VSOCK_HDR_SIZE, 4 * KiB], // Linux's: the header in a buffer of its own
    [20, VSOCK_HDR_SIZE - 20 + 1000, 3096], // the header across two, data across two
    [VSOCK_HDR_SIZE + 100, 1000, 2996], // header and data in one, data across three
  ];
  const chains = new Map<number, number[][]>(); // head -> [addr, len] per descriptor
  for (let round = 0; round < 8; round++)
    for (const shape of shapes) {
      const segs = shape.map((len) => [t.h.alloc.alloc(len), len]);
      chains.set(
        t.rx.addChain(segs.map(([addr, len]) => ({ addr: addr!, len: len!, write: true }))),
        segs,
      );
    }
  t.h.kick(RX_QUEUE);
  const data = pattern(24 * 4 * KiB);
  feed(t.host.socks.get(fd)!, data);
  t.dev.onSocket(fd, true, false, false);
  t.host.drainYields();
  const got: Buffer[] = [];
  for (const u of t.rx.takeUsed()) {
    const bytes = Buffer.concat(
      chains.get(u.id)!.map(([a, len]) => Buffer.from(t.h.mem.view(a!, len!))),
    );
    const hdr = readHeader(bytes.subarray(0, VSOCK_HDR_SIZE));
    assert.equal(hdr.op, OP_RW);
    assert.equal(hdr.len, u.len - VSOCK_HDR_SIZE);
    assert.equal(hdr.dstPort, 5000);
    got.push(bytes.subarray(VSOCK_HDR_SIZE, u.len));
  }
  assert.equal(got.length, 24);
  assert.ok(Buffer.concat(got).equals(data), 'every byte, in order');
});

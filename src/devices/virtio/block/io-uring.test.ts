/**
 * The ring arithmetic of io-uring.ts over a ring laid out in plain memory, with this test in the
 * kernel's place (moving the SQ head, writing CQEs and the CQ tail). The real kernel is in
 * src/vmm/block-async.test.ts.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  CQE_SIZE,
  CompletionRing,
  IORING_OP_READV,
  IORING_SQ_CQ_OVERFLOW,
  IOSQE_IO_DRAIN,
  SQE_SIZE,
  SubmissionRing,
  parseParams,
  type CqOffsets,
  type SqOffsets,
} from './io-uring.js';

const SQ: SqOffsets = {
  head: 0,
  tail: 4,
  ringMask: 8,
  ringEntries: 12,
  flags: 16,
  dropped: 20,
  array: 64,
};
const CQ: CqOffsets = {
  head: 128,
  tail: 132,
  ringMask: 136,
  ringEntries: 140,
  overflow: 144,
  cqes: 256,
};

function rings(sqEntries: number, cqEntries: number, start = 0) {
  const ring = new ArrayBuffer(256 + cqEntries * CQE_SIZE);
  const w = new Uint32Array(ring);
  w[SQ.ringEntries / 4] = sqEntries;
  w[SQ.ringMask / 4] = sqEntries - 1;
  w[SQ.head / 4] = start;
  w[SQ.tail / 4] = start;
  w[CQ.ringEntries / 4] = cqEntries;
  w[CQ.ringMask / 4] = cqEntries - 1;
  w[CQ.head / 4] = start;
  w[CQ.tail / 4] = start;
  const sqes = new ArrayBuffer(sqEntries * SQE_SIZE);
  const sq = new SubmissionRing(ring, sqes, SQ);
  const cq = new CompletionRing(ring, CQ);
  const v = new DataView(ring);
  /** The kernel's side: consume n SQEs (returns their user_data, read through the index array). */
  const consume = (n: number): number[] => {
    const out: number[] = [];
    for (let i = 0; i < n; i++) {
      const head = w[SQ.head / 4]!;
      const idx = w[SQ.array / 4 + (head & (sqEntries - 1))]!;
      out.push(new DataView(sqes).getUint32(idx * SQE_SIZE + 32, true));
      w[SQ.head / 4] = (head + 1) >>> 0;
    }
    return out;
  };
  /** The kernel's side: post a CQE (false when the CQ is full: it would overflow). */
  const post = (userData: number, res: number): boolean => {
    const tail = w[CQ.tail / 4]!;
    if ((tail - w[CQ.head / 4]!) >>> 0 === cqEntries) return false;
    const at = CQ.cqes + (tail & (cqEntries - 1)) * CQE_SIZE;
    v.setUint32(at, userData, true);
    v.setInt32(at + 8, res, true);
    w[CQ.tail / 4] = (tail + 1) >>> 0;
    return true;
  };
  return { sq, cq, w, sqes, consume, post };
}

test('SQ: SQEs land at tail & mask with their fields; full at `entries` published', () => {
  const r = rings(4, 8);
  assert.equal(r.sq.free, 4);
  for (let i = 0; i < 4; i++)
    assert.ok(
      r.sq.push({
        opcode: IORING_OP_READV,
        flags: i === 3 ? IOSQE_IO_DRAIN : 0,
        fd: 7,
        offset: 2 ** 40 + i,
        addr: 0x7f00_1234_5000 + i,
        len: 3,
        userData: 100 + i,
      }),
    );
  assert.equal(r.sq.free, 0);
  assert.equal(r.sq.unsubmitted, 4);
  // Full: nothing written, nothing published.
  assert.equal(r.sq.push({ opcode: 0, fd: 1, userData: 999 }), false);
  assert.equal(r.w[SQ.tail / 4], 4);
  const v = new DataView(r.sqes);
  const at = 3 * SQE_SIZE;
  assert.equal(v.getUint8(at), IORING_OP_READV);
  assert.equal(v.getUint8(at + 1), IOSQE_IO_DRAIN);
  assert.equal(v.getInt32(at + 4, true), 7);
  assert.equal(v.getBigUint64(at + 8, true), BigInt(2 ** 40 + 3));
  assert.equal(v.getBigUint64(at + 16, true), BigInt(0x7f00_1234_5000 + 3));
  assert.equal(v.getUint32(at + 24, true), 3);
  assert.equal(v.getUint32(at + 32, true), 103);
  // The kernel takes two: two slots free again, the next SQE goes to entry 0 (4 & 3).
  assert.deepEqual(r.consume(2), [100, 101]);
  r.sq.consumed(2);
  assert.equal(r.sq.free, 2);
  assert.ok(r.sq.push({ opcode: 0, fd: 1, userData: 104 }));
  assert.equal(v.getUint32(0 * SQE_SIZE + 32, true), 104);
  // A reused SQE is cleared: fields of the READV it held are gone.
  assert.equal(v.getBigUint64(0 * SQE_SIZE + 16, true), 0n);
});

test('SQ and CQ indices wrap at 2^32', () => {
  const start = 0xffff_fffe;
  const r = rings(4, 8, start);
  for (let round = 0; round < 5; round++) {
    for (let i = 0; i < 3; i++)
      assert.ok(r.sq.push({ opcode: 0, fd: 1, userData: round * 10 + i }));
    assert.equal(r.sq.free, 1);
    const got = r.consume(3);
    r.sq.consumed(3);
    assert.deepEqual(got, [round * 10, round * 10 + 1, round * 10 + 2]);
    for (const u of got) assert.ok(r.post(u, u * 2));
    assert.equal(r.cq.ready, 3);
    const seen: Array<[number, number]> = [];
    assert.equal(
      r.cq.reap((u, res) => seen.push([u, res])),
      3,
    );
    assert.deepEqual(
      seen,
      got.map((u) => [u, u * 2]),
    );
    assert.equal(r.cq.ready, 0);
  }
  // 15 SQEs and 15 CQEs from 0xfffffffe: both indices passed 2^32 and stand at 13.
  assert.equal(r.w[SQ.tail / 4], (start + 15) >>> 0);
  assert.equal(r.w[CQ.head / 4], 13);
});

test('CQ: a full CQ is reaped whole; the overflow flag and counter are read from the rings', () => {
  const r = rings(4, 4);
  for (let i = 0; i < 4; i++) assert.ok(r.post(i, -5));
  assert.equal(r.post(4, 0), false); // the kernel would overflow now
  r.w[SQ.flags / 4] = IORING_SQ_CQ_OVERFLOW;
  r.w[CQ.overflow / 4] = 1;
  assert.equal(r.sq.flags & IORING_SQ_CQ_OVERFLOW, IORING_SQ_CQ_OVERFLOW);
  assert.equal(r.cq.overflow, 1);
  const res: number[] = [];
  assert.equal(
    r.cq.reap((u, x) => res.push(u, x)),
    4,
  );
  assert.deepEqual(res, [0, -5, 1, -5, 2, -5, 3, -5]);
  // The slots are free as soon as reap moved the head: the kernel can post again.
  assert.ok(r.post(4, 0));
  assert.equal(r.cq.ready, 1);
});

test('CQ: a callback that causes more completions sees them on the next reap, not lost', () => {
  const r = rings(4, 4);
  r.post(1, 0);
  const seen: number[] = [];
  r.cq.reap((u) => {
    seen.push(u);
    if (u === 1) r.post(2, 0); // posted while reaping: after the tail this reap loaded
  });
  assert.deepEqual(seen, [1]);
  r.cq.reap((u) => seen.push(u));
  assert.deepEqual(seen, [1, 2]);
});

test('bad ring geometry is refused: entries not a power of two, fields outside the mapping', () => {
  const ring = new ArrayBuffer(512);
  const w = new Uint32Array(ring);
  w[SQ.ringEntries / 4] = 6;
  w[SQ.ringMask / 4] = 5;
  assert.throws(() => new SubmissionRing(ring, new ArrayBuffer(6 * 64), SQ), /SQ of 6 entries/);
  w[SQ.ringEntries / 4] = 4;
  w[SQ.ringMask / 4] = 3;
  assert.throws(() => new SubmissionRing(ring, new ArrayBuffer(64), SQ), /SQE array/);
  assert.throws(
    () => new SubmissionRing(ring, new ArrayBuffer(256), { ...SQ, array: 510 }),
    /sq array offset 510/,
  );
  w[CQ.ringEntries / 4] = 64;
  w[CQ.ringMask / 4] = 63;
  assert.throws(() => new CompletionRing(ring, CQ), /CQE array outside/);
});

test('parseParams reads struct io_uring_params', () => {
  const b = new Uint8Array(120);
  const v = new DataView(b.buffer);
  v.setUint32(0, 128, true);
  v.setUint32(4, 256, true);
  v.setUint32(20, 3, true);
  v.setUint32(64, 0x240, true); // sq_off.array
  v.setUint32(100, 0x40, true); // cq_off.cqes
  const p = parseParams(b);
  assert.equal(p.sqEntries, 128);
  assert.equal(p.cqEntries, 256);
  assert.equal(p.features, 3);
  assert.equal(p.sq.array, 0x240);
  assert.equal(p.cq.cqes, 0x40);
  assert.throws(() => parseParams(new Uint8Array(100)), /100 bytes/);
});

/**
 * virtio-net's per-frame paths without per-frame arrays (issue 17): whatever way the driver
 * splits header and frame over its buffers, the TAP gets our header copy and then exactly the
 * frame's bytes, zero-copy, through one array reused from frame to frame that holds no guest
 * buffer once the call returned; the header parser that refills one object agrees with the
 * allocating one and with checkTxHeader.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { harness } from '../testing/harness.js';
import {
  NET_HDR_SIZE,
  VIRTIO_NET_HDR_F_NEEDS_CSUM,
  VIRTIO_NET_HDR_GSO_TCPV4,
  checkTxHeader,
  parseNetHeader,
  readNetHeader,
  txHeaderError,
  writeNetHeader,
  type NetHeader,
} from './header.js';
import { NetDevice, RX_QUEUE, TX_QUEUE, netIdentity, type TapIo } from './net.js';

/** Records the arrays it is handed, as the native shim sees them during the call. */
class RecordingTap implements TapIo {
  inbox: Uint8Array[] = [];
  sent: Uint8Array[] = [];
  /** Per call: the array object and how many buffers it held during the call. */
  calls: Array<{ arr: Uint8Array[]; n: number; bufs: Uint8Array[] }> = [];
  readv(bufs: Uint8Array[]): number {
    this.calls.push({ arr: bufs, n: bufs.length, bufs: [...bufs] });
    const f = this.inbox.shift();
    if (!f) return -1;
    let n = 0;
    for (const b of bufs) {
      const take = Math.min(b.length, f.length - n);
      b.set(f.subarray(n, n + take));
      n += take;
      if (n >= f.length) break;
    }
    return f.length;
  }
  writev(bufs: Uint8Array[]): number {
    this.calls.push({ arr: bufs, n: bufs.length, bufs: [...bufs] });
    const out = new Uint8Array(bufs.reduce((a, b) => a + b.length, 0));
    let o = 0;
    for (const b of bufs) (out.set(b, o), (o += b.length));
    this.sent.push(out);
    return out.length;
  }
  setOffload(): void {}
  setReadInterest(): void {}
}

function setup() {
  const tap = new RecordingTap();
  const dev = new NetDevice('virtio-net tx-path', tap, () => undefined, { txEarly: false });
  const h = harness(netIdentity(undefined, true), dev);
  const [rx, tx] = h.start();
  return { tap, dev, h, rx: rx!, tx: tx! };
}

/** A TSO frame's header (valid with the offered features) and `len` bytes of frame. */
function tsoFrame(len: number): Uint8Array {
  const f = new Uint8Array(NET_HDR_SIZE + len);
  for (let i = NET_HDR_SIZE; i < f.length; i++) f[i] = (i * 7 + 3) & 0xff;
  writeNetHeader(f, {
    flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
    gsoType: VIRTIO_NET_HDR_GSO_TCPV4,
    hdrLen: 54,
    gsoSize: 1448,
    csumStart: 34,
    csumOffset: 16,
    numBuffers: 0,
  });
  return f;
}

test('virtio-net TX: every split of header and frame over buffers sends exactly header + frame, zero-copy', () => {
  const { tap, dev, h, tx } = setup();
  const len = 3000;
  // Piece lengths of the chain (header + frame = 3012 bytes); 0 is a zero-length descriptor.
  const layouts = [
    [12, 3000],
    [3012],
    [5, 7, 3000],
    [10, 2002, 1000],
    [12, 0, 1500, 1500],
    [1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 3000],
    [13, 2999],
  ];
  for (const pieces of layouts) {
    const f = tsoFrame(len);
    const bufs: Array<{ addr: number; len: number }> = [];
    let at = 0;
    for (const p of pieces) {
      const a = h.alloc.alloc(Math.max(p, 1));
      h.mem.view(a, p).set(f.subarray(at, at + p));
      bufs.push({ addr: a, len: p });
      at += p;
    }
    tap.calls = [];
    tx.addChain(bufs);
    h.kick(TX_QUEUE);
    assert.equal(tx.takeUsed().length, 1, `${pieces}`);
    const sent = tap.sent.at(-1)!;
    assert.deepEqual(sent, f, `bytes sent for ${pieces}`);
    const call = tap.calls[0]!;
    // Our header copy (12 bytes, not guest RAM), then one view per piece holding frame bytes.
    assert.equal(call.bufs[0]!.length, NET_HDR_SIZE);
    assert.notEqual(call.bufs[0]!.buffer, h.mem.view(bufs[0]!.addr, 1).buffer);
    const framePieces = pieces.reduce(
      (acc, p) => {
        const end = acc.pos + p;
        if (end > NET_HDR_SIZE && p > 0) acc.n++;
        acc.pos = end;
        return acc;
      },
      { pos: 0, n: 0 },
    ).n;
    assert.equal(call.n, 1 + framePieces, `buffers per writev for ${pieces}`);
    for (const b of call.bufs.slice(1))
      assert.equal(b.buffer, h.mem.view(bufs.at(-1)!.addr, 1).buffer, 'zero-copy: guest RAM');
  }
  assert.equal(dev.counters.txFrames, layouts.length);
  assert.equal(dev.counters.txBytes, layouts.length * len);
  assert.equal(dev.counters.txBad, 0);
});

test('virtio-net TX/RX: one array per direction, reused, and empty once the TAP call returned', () => {
  const { tap, h, rx, tx } = setup();
  for (let i = 0; i < 3; i++) {
    const f = tsoFrame(100 + i);
    const a = h.alloc.alloc(f.length);
    h.mem.view(a, f.length).set(f);
    tx.addChain([{ addr: a, len: f.length }]);
  }
  h.kick(TX_QUEUE);
  assert.equal(tap.calls.length, 3);
  assert.equal(new Set(tap.calls.map((c) => c.arr)).size, 1, 'the same array each frame');
  assert.ok(tap.calls.every((c) => c.n === 2));
  assert.equal(tap.calls[0]!.arr.length, 0, 'no guest buffer kept after the writev');

  tap.calls = [];
  const r = new Uint8Array(NET_HDR_SIZE + 80).fill(0x42);
  r.fill(0, 0, NET_HDR_SIZE);
  tap.inbox.push(r, r);
  for (let i = 0; i < 2; i++)
    rx.addChain([
      { addr: h.alloc.alloc(40), len: 40, write: true },
      { addr: h.alloc.alloc(2048), len: 2048, write: true },
    ]);
  h.kick(RX_QUEUE);
  assert.deepEqual(
    rx.takeUsed().map((u) => u.len),
    [r.length, r.length],
  );
  // Two frames and the empty read that parks the next chain... there is none: 2 reads.
  assert.equal(tap.calls.length, 2);
  assert.equal(new Set(tap.calls.map((c) => c.arr)).size, 1, 'the same array each frame');
  assert.ok(
    tap.calls.every((c) => c.n === 3),
    'two guest buffers and the spill buffer',
  );
  assert.equal(tap.calls[0]!.arr.length, 0, 'no guest buffer kept after the readv');
});

/** The parser as it was (a DataView per header): the reference readNetHeader must match. */
function referenceParse(b: Uint8Array): NetHeader {
  const v = new DataView(b.buffer, b.byteOffset, NET_HDR_SIZE);
  return {
    flags: v.getUint8(0),
    gsoType: v.getUint8(1),
    hdrLen: v.getUint16(2, true),
    gsoSize: v.getUint16(4, true),
    csumStart: v.getUint16(6, true),
    csumOffset: v.getUint16(8, true),
    numBuffers: v.getUint16(10, true),
  };
}

test('readNetHeader refills one object and agrees with a DataView parse; txHeaderError with checkTxHeader', () => {
  let seed = 0x1234567;
  const rnd = () => ((seed = (Math.imul(seed, 1103515245) + 12345) >>> 0) >>> 16) & 0xff;
  const into = readNetHeader(new Uint8Array(NET_HDR_SIZE));
  const offloads = [
    { csum: true, tso4: true, tso6: true },
    { csum: true, tso4: false, tso6: true },
    { csum: false, tso4: false, tso6: false },
  ];
  let refused = 0;
  for (let i = 0; i < 3000; i++) {
    const b = new Uint8Array(NET_HDR_SIZE + 2);
    for (let k = 0; k < b.length; k++) b[k] = rnd();
    const at = b.subarray(1, 1 + NET_HDR_SIZE); // unaligned, inside a larger buffer
    // Mostly plausible headers, so that both answers are exercised.
    if (i % 3 !== 0) at[0]! &= 1;
    if (i % 3 === 1) at[1] = [0, 1, 4, 3, 0x81][rnd() % 5]!;
    if (i % 3 === 2) at[1] = 0;
    const h = readNetHeader(at, into);
    assert.equal(h, into);
    assert.deepEqual({ ...h }, referenceParse(at));
    assert.deepEqual(parseNetHeader(at), referenceParse(at));
    const frameLen = (rnd() << 4) | (rnd() & 0xf);
    for (const o of offloads) {
      const why = txHeaderError(h, frameLen, o);
      const r = checkTxHeader(h, frameLen, o);
      assert.equal(r.ok, why === undefined);
      if (!r.ok) (assert.equal(r.error, why), refused++);
    }
  }
  assert.ok(refused > 100 && refused < 9000, `both answers seen (${refused} refused)`);
  assert.throws(() => readNetHeader(new Uint8Array(11)), RangeError);
});

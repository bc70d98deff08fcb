/**
 * virtio-net's early TX completion (issue 17, off by default; TYPERVISOR_NET_TX_EARLY=1): a
 * turn's frames are copied out of guest memory, their chains are used (and the interrupt sent)
 * first, then the copies go to the TAP in the guest's order; a copy is what is sent, so the
 * guest's buffers are not read after their chains went back. Off (the default) each frame is
 * written before its chain is used, as tx-path.test.ts checks.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { harness, type Harness } from '../testing/harness.js';
import type { MockQueue } from '../testing/mock-driver.js';
import { NET_HDR_SIZE, VIRTIO_NET_HDR_F_NEEDS_CSUM, writeNetHeader } from './header.js';
import { NetDevice, TX_QUEUE, netIdentity, type TapIo } from './net.js';

/** Records each frame with the TX queue's used index and interrupt count at the time. */
class OrderTap implements TapIo {
  sent: Array<{ bytes: Uint8Array; usedIdx: number; irqs: number; guestBuffer: boolean }> = [];
  probe: () => { usedIdx: number; irqs: number; guest: ArrayBufferLike } = () => ({
    usedIdx: -1,
    irqs: -1,
    guest: new ArrayBuffer(0),
  });
  readv(): number {
    return -1;
  }
  writev(bufs: Uint8Array[]): number {
    const out = new Uint8Array(bufs.reduce((a, b) => a + b.length, 0));
    let o = 0;
    for (const b of bufs) (out.set(b, o), (o += b.length));
    const p = this.probe();
    this.sent.push({
      bytes: out,
      usedIdx: p.usedIdx,
      irqs: p.irqs,
      guestBuffer: bufs.some((b) => b.buffer === p.guest),
    });
    return out.length;
  }
  setOffload(): void {}
  setReadInterest(): void {}
}

function setup(txEarly?: boolean): { tap: OrderTap; h: Harness; tx: MockQueue } {
  const tap = new OrderTap();
  const dev = new NetDevice('virtio-net early', tap, () => undefined, { txEarly });
  const h = harness(netIdentity(undefined, true), dev);
  const [, tx] = h.start();
  const guest = h.mem.view(0x1000, 1).buffer;
  tap.probe = () => ({ usedIdx: tx!.usedIdx(), irqs: h.interrupts(), guest });
  return { tap, h, tx: tx! };
}

/** A frame: our checksum-offload header and `len` bytes marked with `tag`. */
function frame(len: number, tag: number): Uint8Array {
  const f = new Uint8Array(NET_HDR_SIZE + len);
  writeNetHeader(f, {
    flags: VIRTIO_NET_HDR_F_NEEDS_CSUM,
    gsoType: 0,
    hdrLen: 0,
    gsoSize: 0,
    csumStart: 34,
    csumOffset: 16,
    numBuffers: 0,
  });
  f.fill(tag, NET_HDR_SIZE);
  return f;
}

/** Queues `f` on TX split in two buffers; returns the guest addresses. */
function addFrame(h: Harness, tx: MockQueue, f: Uint8Array): number[] {
  const cut = 7;
  const a = h.alloc.alloc(cut);
  const b = h.alloc.alloc(f.length - cut);
  h.mem.view(a, cut).set(f.subarray(0, cut));
  h.mem.view(b, f.length - cut).set(f.subarray(cut));
  tx.addChain([
    { addr: a, len: cut },
    { addr: b, len: f.length - cut },
  ]);
  return [a, b];
}

test('early TX completion: the turn is used and interrupted first, then its copies are sent in order', () => {
  const { tap, h, tx } = setup(true);
  const frames = [frame(1500, 1), frame(60, 2), frame(9000, 3)];
  for (const f of frames) addFrame(h, tx, f);
  h.kick(TX_QUEUE);
  assert.equal(tap.sent.length, 3);
  tap.sent.forEach((s, i) => {
    assert.deepEqual(s.bytes, frames[i], `frame ${i}`);
    assert.equal(s.usedIdx, 3, `frame ${i} was written after all three chains were used`);
    assert.equal(s.irqs, 1, `frame ${i} was written after the turn's interrupt`);
    assert.equal(s.guestBuffer, false, `frame ${i} was sent from a copy, not guest memory`);
  });
  assert.equal(tx.takeUsed().length, 3);
});

test('early TX completion: a turn longer than the copies keeps the order of its frames', () => {
  const { tap, h, tx } = setup(true);
  const frames = Array.from({ length: 21 }, (_, i) => frame(100 + i, i + 1));
  for (const f of frames) addFrame(h, tx, f);
  h.kick(TX_QUEUE);
  assert.equal(tap.sent.length, frames.length);
  tap.sent.forEach((s, i) => assert.deepEqual(s.bytes, frames[i], `frame ${i}`));
  // The last group waited for the turn's used entries; the earlier groups went as they filled.
  assert.equal(tap.sent.at(-1)!.usedIdx, frames.length);
  assert.equal(tx.takeUsed().length, frames.length);
});

test('early TX completion: what the guest writes into a used buffer does not change the frame', () => {
  const { tap, h, tx } = setup(true);
  const f = frame(1000, 0x5a);
  const [, body] = addFrame(h, tx, f);
  h.kick(TX_QUEUE);
  assert.equal(tx.takeUsed().length, 1);
  h.mem.view(body!, 100).fill(0xee); // the driver reuses its buffer
  assert.deepEqual(tap.sent[0]!.bytes, f);
});

test('early TX completion off: each frame is written from guest memory before its chain is used', () => {
  const { tap, h, tx } = setup(false);
  const frames = [frame(1500, 1), frame(60, 2)];
  for (const f of frames) addFrame(h, tx, f);
  h.kick(TX_QUEUE);
  assert.equal(tap.sent.length, 2);
  tap.sent.forEach((s, i) => {
    assert.deepEqual(s.bytes, frames[i]);
    assert.equal(s.usedIdx, 0, `frame ${i} was written before any chain was used`);
    assert.equal(s.guestBuffer, true, `frame ${i} was sent from guest memory (zero-copy)`);
  });
});

test('early TX completion is off unless TYPERVISOR_NET_TX_EARLY=1', () => {
  const saved = process.env.TYPERVISOR_NET_TX_EARLY;
  try {
    for (const [env, early] of [
      [undefined, false],
      ['0', false],
      ['1', true],
    ] as const) {
      if (env === undefined) delete process.env.TYPERVISOR_NET_TX_EARLY;
      else process.env.TYPERVISOR_NET_TX_EARLY = env;
      const { tap, h, tx } = setup();
      addFrame(h, tx, frame(100, 1));
      h.kick(TX_QUEUE);
      assert.equal(tap.sent[0]!.guestBuffer, !early, `TYPERVISOR_NET_TX_EARLY=${env}`);
    }
  } finally {
    if (saved === undefined) delete process.env.TYPERVISOR_NET_TX_EARLY;
    else process.env.TYPERVISOR_NET_TX_EARLY = saved;
  }
});

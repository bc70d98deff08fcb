/**
 * virtio-net's batched TX writes (issue 17) over the real kernel: UringTxBatch on an io_uring
 * of this host, a memfd standing in for the TAP (the frames must land whole, in order, from
 * buffers split in pieces); its bounds; the switch that turns it off. NetDevice's use of a batch
 * is in src/devices/virtio/net/tx-batch.test.ts.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { native } from '../kvm/native.js';
import { IoUring } from '../devices/virtio/block/io-uring.js';
import { NET_HDR_SIZE } from '../devices/virtio/net/header.js';
import { openTxBatch } from '../devices/virtio/net/tap.js';
import {
  TX_BATCH_FRAMES,
  TX_BATCH_IOVECS,
  TX_URING_ALLOW,
  UringTxBatch,
} from '../devices/virtio/net/tx-batch.js';

const hdr = (fill: number) => new Uint8Array(NET_HDR_SIZE).fill(fill);

function uringOrSkip(): { ring: IoUring; fd: number; sys: ReturnType<typeof native> } | string {
  let sys;
  try {
    sys = native();
  } catch (e) {
    return `no native shim: ${(e as Error).message}`;
  }
  try {
    const ring = IoUring.open(sys, TX_BATCH_FRAMES, TX_URING_ALLOW);
    return { ring, fd: sys.memfdCreate('tx-batch-test', 0), sys };
  } catch (e) {
    return `no io_uring here: ${(e as Error).message}`;
  }
}

test('UringTxBatch: frames of several buffers land whole and in order with one flush', (t) => {
  const u = uringOrSkip();
  if (typeof u === 'string') return t.skip(u);
  const b = new UringTxBatch(u.ring, u.fd, (x) => u.sys.bufferAddress(x));
  try {
    // "Guest RAM": one buffer, frames as views into it, some split in several pieces.
    const ram = new Uint8Array(64 * 1024);
    for (let i = 0; i < ram.length; i++) ram[i] = (i * 13 + 7) & 0xff;
    const frames: Array<{ iov: Uint8Array[]; bytes: Uint8Array }> = [];
    let at = 0;
    for (let f = 0; f < 5; f++) {
      const pieces = [ram.subarray(at, at + 100 + f), ram.subarray(at + 200, at + 200)];
      pieces.push(ram.subarray(at + 300, at + 300 + 1000 * f));
      at += 4096;
      const iov = [hdr(f + 1), ...pieces];
      const total = pieces.reduce((a, p) => a + p.length, 0);
      const bytes = new Uint8Array(NET_HDR_SIZE + total);
      let o = 0;
      for (const p of iov) (bytes.set(p, o), (o += p.length));
      frames.push({ iov, bytes });
      assert.equal(b.add(iov, total), true);
      // The caller may reuse its header buffer at once: the batch copied it.
      iov[0]!.fill(0xee);
    }
    assert.equal(b.pending, 5);
    const done: Array<[number, number]> = [];
    b.flush((len, res) => done.push([len, res]));
    assert.equal(b.pending, 0);
    assert.deepEqual(
      done,
      frames.map((f) => [f.bytes.length - NET_HDR_SIZE, f.bytes.length]),
    );
    const file = readFileSync(`/proc/self/fd/${u.fd}`);
    let o = 0;
    for (const [i, f] of frames.entries()) {
      const want = Uint8Array.from(f.bytes);
      want.fill(i + 1, 0, NET_HDR_SIZE);
      assert.deepEqual(new Uint8Array(file.subarray(o, o + want.length)), want, `frame ${i}`);
      o += want.length;
    }
    assert.equal(file.length, o);
    assert.deepEqual(b.counters, { batches: 1, frames: 5, maxFrames: 5 });
    b.flush(() => assert.fail('nothing queued'));
    assert.equal(b.counters.batches, 1, 'an empty flush makes no system call');
  } finally {
    b.close();
    u.sys.close(u.fd);
  }
});

test('UringTxBatch: bounded (frames per flush, buffers per frame); closed refuses', (t) => {
  const u = uringOrSkip();
  if (typeof u === 'string') return t.skip(u);
  const b = new UringTxBatch(u.ring, u.fd, (x) => u.sys.bufferAddress(x));
  try {
    const body = new Uint8Array(64).fill(1);
    const tooMany = [hdr(0), ...new Array<Uint8Array>(TX_BATCH_IOVECS).fill(body)];
    assert.equal(b.add(tooMany, 64 * TX_BATCH_IOVECS), false, 'more buffers than a slot has');
    assert.equal(b.pending, 0);
    assert.throws(() => b.add([body], 64), RangeError, 'no header');
    for (let i = 0; i < TX_BATCH_FRAMES; i++) assert.equal(b.add([hdr(i), body], 64), true);
    assert.equal(b.add([hdr(0), body], 64), false, 'full');
    let n = 0;
    b.flush((len, res) => {
      assert.equal(res, NET_HDR_SIZE + 64);
      n++;
    });
    assert.equal(n, TX_BATCH_FRAMES);
    b.close();
    assert.equal(b.open, false);
    assert.equal(b.add([hdr(0), body], 64), false);
  } finally {
    b.close();
    u.sys.close(u.fd);
  }
});

test('openTxBatch: off unless TYPERVISOR_NET_TX_BATCH=1, with the reason', () => {
  for (const env of [{}, { TYPERVISOR_NET_TX_BATCH: '0' }, { TYPERVISOR_NET_TX_BATCH: 'yes' }]) {
    const r = openTxBatch(native(), -1, env);
    assert.equal(r.batch, undefined);
    assert.match(r.why!, /TYPERVISOR_NET_TX_BATCH is not 1/);
  }
});

/**
 * Batched TX (issue 17), NetDevice with a batch: frames of a turn are written at its end, before
 * the driver can see them used; order with frames a batch cannot take; a failed batch falls back
 * to writev, counted. UringTxBatch over the real kernel: src/vmm/net-tx-batch.test.ts.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { STATUS_DEVICE_NEEDS_RESET } from '../constants.js';
import { harness } from '../testing/harness.js';
import { NET_HDR_SIZE, writeNetHeader } from './header.js';
import { NetDevice, TX_QUEUE, netIdentity, type TapIo } from './net.js';
import type { TxBatch } from './tx-batch.js';

/** A TAP whose batch records when it was flushed and what the driver could see then. */
class BatchTap implements TapIo {
  log: string[] = [];
  writes = 0;
  constructor(readonly txBatch: FakeBatch) {}
  readv(): number {
    return -1;
  }
  writev(bufs: Uint8Array[]): number {
    this.writes++;
    this.log.push(`writev ${bufs[1]![0]}`);
    return bufs.reduce((a, b) => a + b.length, 0);
  }
  setOffload(): void {}
  setReadInterest(): void {}
}

class FakeBatch implements TxBatch {
  queued: Array<{ first: number; len: number }> = [];
  open = true;
  max = 4;
  failNext = false;
  /** Runs at the start of each flush (the test looks at the used ring then). */
  onFlush: (() => void) | undefined;
  constructor(private readonly log: string[]) {}
  get pending(): number {
    return this.queued.length;
  }
  add(iov: readonly Uint8Array[], frameLen: number): boolean {
    if (!this.open || this.queued.length >= this.max || iov.length > 3) return false;
    this.queued.push({ first: iov[1]![0]!, len: frameLen });
    return true;
  }
  flush(done: (frameLen: number, res: number) => void): void {
    this.onFlush?.();
    const q = this.queued;
    this.queued = [];
    if (this.failNext) {
      this.open = false;
      throw new Error('io_uring_enter: EBUSY');
    }
    this.log.push(`flush ${q.map((f) => f.first).join(',')}`);
    for (const f of q) done(f.len, f.first === 0xdd ? -5 : NET_HDR_SIZE + f.len);
  }
  close(): void {
    this.open = false;
  }
}

function setup() {
  const log: string[] = [];
  const batch = new FakeBatch(log);
  const tap = new BatchTap(batch);
  tap.log = log;
  const logs: string[] = [];
  const dev = new NetDevice('virtio-net batch', tap, (m) => logs.push(m), { txEarly: false });
  const h = harness(netIdentity(undefined, true), dev);
  const [, tx] = h.start();
  /** A TX chain whose frame's first byte is `first`, in `pieces` buffers after the header. */
  const put = (first: number, pieces = 1) => {
    const a = h.alloc.alloc(NET_HDR_SIZE + 60 * pieces);
    writeNetHeader(h.mem.view(a, NET_HDR_SIZE), {
      flags: 0,
      gsoType: 0,
      hdrLen: 0,
      gsoSize: 0,
      csumStart: 0,
      csumOffset: 0,
      numBuffers: 0,
    });
    h.mem.view(a + NET_HDR_SIZE, 60 * pieces).fill(first);
    const bufs = [{ addr: a, len: NET_HDR_SIZE }];
    for (let i = 0; i < pieces; i++) bufs.push({ addr: a + NET_HDR_SIZE + 60 * i, len: 60 });
    tx!.addChain(bufs);
  };
  return { log, batch, tap, dev, h, tx: tx!, put, logs };
}

test('virtio-net TX with a batch: one flush per turn, before the driver sees the chains used', () => {
  const { log, batch, tap, dev, h, tx, put } = setup();
  for (const f of [1, 2, 3]) put(f);
  const usedAtFlush: number[] = [];
  batch.onFlush = () => usedAtFlush.push(h.mem.readU16(tx.used + 2));
  const irqs = h.interrupts();
  h.kick(TX_QUEUE);
  assert.deepEqual(log, ['flush 1,2,3']);
  assert.deepEqual(usedAtFlush, [0], 'used.idx not yet published when the frames are written');
  assert.equal(tx.takeUsed().length, 3);
  assert.equal(h.interrupts(), irqs + 1);
  assert.equal(tap.writes, 0);
  assert.equal(dev.counters.txFrames, 3);
  assert.equal(dev.counters.txBytes, 180);
  assert.equal(batch.pending, 0, 'nothing left between turns');
});

test('virtio-net TX with a batch: full batches and frames it cannot take keep their order', () => {
  const { log, dev, h, tx, put } = setup();
  // 1..5 fit (a batch of 4, then 5); 6 has too many buffers for the batch; 7, 8 go in a new one.
  for (const f of [1, 2, 3, 4, 5]) put(f);
  put(6, 3);
  put(7);
  put(8);
  h.kick(TX_QUEUE);
  assert.deepEqual(log, ['flush 1,2,3,4', 'flush 5', 'writev 6', 'flush 7,8']);
  assert.equal(tx.takeUsed().length, 8);
  assert.equal(dev.counters.txFrames, 8);
});

test('virtio-net TX with a batch: failed frames are counted; a failed batch falls back to writev', () => {
  const { log, batch, dev, h, tx, put, logs } = setup();
  put(0xdd); // the TAP refuses it (-EIO in its completion)
  put(1);
  h.kick(TX_QUEUE);
  assert.equal(dev.counters.txErrors, 1);
  assert.equal(dev.counters.txFrames, 1);
  assert.ok(logs.some((l) => /errno 5/.test(l)));
  batch.failNext = true;
  put(2);
  put(3);
  h.kick(TX_QUEUE);
  assert.equal(dev.counters.txErrors, 3, 'the failed batch: its frames counted');
  assert.ok(logs.some((l) => /batched TAP write failed.*EBUSY/.test(l)));
  assert.equal(h.device.state.snapshot().status & STATUS_DEVICE_NEEDS_RESET, 0, 'not broken');
  put(4);
  h.kick(TX_QUEUE);
  assert.equal(log.at(-1), 'writev 4', 'one writev per frame after the failure');
  assert.equal(tx.takeUsed().length, 5);
});

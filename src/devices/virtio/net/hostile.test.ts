/**
 * virtio-net against a hostile driver (issue 12): RX chains longer than the TAP takes in one
 * read, a TX header rewritten after it was checked, TX chains of many buffers, TAP failures,
 * and the RX work budget.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { STATUS_DEVICE_NEEDS_RESET } from '../constants.js';
import { harness } from '../testing/harness.js';
import { NET_HDR_SIZE, VIRTIO_NET_HDR_F_NEEDS_CSUM, writeNetHeader } from './header.js';
import {
  NET_RX_BUDGET_FRAMES,
  NetDevice,
  RX_QUEUE,
  TAP_MAX_IOVECS,
  TX_QUEUE,
  netIdentity,
  type TapIo,
} from './net.js';
import { netDevice } from './descriptor.js';

/** A TAP with the native shim's limits: more than TAP_MAX_IOVECS buffers throw, as rw_vec does. */
class StrictTap implements TapIo {
  inbox: Uint8Array[] = [];
  sent: Uint8Array[] = [];
  interest = false;
  readCalls = 0;
  readError: Error | undefined;
  /** Runs inside writev before the bytes are taken: a racing vCPU. */
  beforeWrite: (() => void) | undefined;
  readv(bufs: Uint8Array[]): number {
    this.readCalls++;
    if (bufs.length > TAP_MAX_IOVECS) throw new RangeError('too many iovecs');
    if (this.readError) throw this.readError;
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
    if (bufs.length > TAP_MAX_IOVECS) throw new RangeError('too many iovecs');
    this.beforeWrite?.();
    const out = new Uint8Array(bufs.reduce((a, b) => a + b.length, 0));
    let o = 0;
    for (const b of bufs) (out.set(b, o), (o += b.length));
    this.sent.push(out);
    return out.length;
  }
  setOffload(): void {}
  setReadInterest(on: boolean): void {
    this.interest = on;
  }
}

function setup() {
  const tap = new StrictTap();
  const dev = new NetDevice('virtio-net hostile', tap, () => undefined);
  const h = harness(netIdentity(undefined, true), dev);
  const [rx, tx] = h.start();
  return { tap, dev, h, rx: rx!, tx: tx! };
}

const frame = (len: number, fill: number) => {
  const f = new Uint8Array(NET_HDR_SIZE + len).fill(fill);
  f.fill(0, 0, NET_HDR_SIZE);
  return f;
};

test('virtio-net RX: a chain of 1024 buffers (+ the spill) is given back unused, counted, no spin', () => {
  const { tap, dev, h, rx } = setup();
  tap.inbox.push(frame(100, 0x41), frame(100, 0x42));
  // 1024 device-writable buffers in an indirect table: legal for the ring, too many for readv.
  const bufs = Array.from({ length: 1024 }, () => ({
    addr: h.alloc.alloc(64),
    len: 64,
    write: true,
  }));
  rx.addIndirectChain(bufs, h.alloc.alloc(16 * 1024, 16));
  // Frames wait. Before: readv threw, the chain was held and the TAP watched (readable), so
  // every wake-up repeated that. Now the wake-up gives the chain back and, out of buffers,
  // stops watching the TAP.
  h.kick(RX_QUEUE);
  assert.deepEqual(rx.takeUsed(), [{ id: 0, len: 0 }]);
  assert.equal(tap.interest, false);
  dev.onTapReadable(); // a stale wake-up: nothing to do, nothing read
  assert.equal(rx.takeUsed().length, 0);
  assert.equal(tap.readCalls, 0, 'no readv with too many buffers');
  assert.equal(dev.counters.rxChainTooLong, 1);
  // Another long chain and a good one: the long one is skipped, the good one takes the frame.
  rx.addIndirectChain(bufs, h.alloc.alloc(16 * 1024, 16));
  const good = h.alloc.alloc(2048);
  rx.addChain([{ addr: good, len: 2048, write: true }]);
  h.kick(RX_QUEUE);
  assert.deepEqual(rx.takeUsed(), [
    { id: 1, len: 0 },
    { id: 2, len: NET_HDR_SIZE + 100 },
  ]);
  assert.equal(h.mem.readU8(good + NET_HDR_SIZE), 0x41);
  assert.equal(dev.counters.rxChainTooLong, 2);
  assert.equal(tap.inbox.length, 1, 'the other frame waits for a usable buffer');
  assert.equal(h.transport.state.counters().guestErrors, 2);
  assert.equal(h.driver.status() & STATUS_DEVICE_NEEDS_RESET, 0);
});

test('virtio-net TX: the header sent is the copy that was checked, whatever the guest writes after', () => {
  const { tap, dev, h, tx } = setup();
  const hdr = h.alloc.alloc(NET_HDR_SIZE);
  h.mem.fill(hdr, NET_HDR_SIZE, 0); // a plain frame: no offloads
  const body = h.alloc.alloc(60);
  h.mem.fill(body, 60, 0x5a);
  // The header split over two descriptors, as any layout allows.
  tx.addChain([
    { addr: hdr, len: 5 },
    { addr: hdr + 5, len: NET_HDR_SIZE - 5 },
    { addr: body, len: 60 },
  ]);
  // A second vCPU rewrites the header once it was checked: bad flags, GSO, offsets.
  tap.beforeWrite = () => {
    const evil = new Uint8Array(NET_HDR_SIZE);
    writeNetHeader(evil, {
      flags: VIRTIO_NET_HDR_F_NEEDS_CSUM | 0x80,
      gsoType: 3,
      hdrLen: 0xffff,
      gsoSize: 1,
      csumStart: 0xfff0,
      csumOffset: 0xff,
      numBuffers: 7,
    });
    h.mem.write(hdr, evil);
  };
  h.kick(TX_QUEUE);
  assert.equal(tap.sent.length, 1);
  const sent = tap.sent[0]!;
  assert.deepEqual([...sent.subarray(0, NET_HDR_SIZE)], new Array(NET_HDR_SIZE).fill(0));
  assert.ok(sent.subarray(NET_HDR_SIZE).every((b) => b === 0x5a));
  assert.equal(sent.length, NET_HDR_SIZE + 60);
  assert.equal(dev.counters.txFrames, 1);
});

test('virtio-net TX: a frame in more buffers than one writev takes is copied, not dropped', () => {
  const { tap, dev, h, tx } = setup();
  // 13 bytes (header + 1 byte of the frame), then 1023 buffers of 1 byte: 1025 pieces to send.
  const first = h.alloc.alloc(13);
  h.mem.fill(first, NET_HDR_SIZE, 0);
  h.mem.writeU8(first + NET_HDR_SIZE, 0);
  const bytes = h.alloc.alloc(1023);
  for (let i = 0; i < 1023; i++) h.mem.writeU8(bytes + i, (i + 1) & 0xff);
  const bufs = [{ addr: first, len: 13 }];
  for (let i = 0; i < 1023; i++) bufs.push({ addr: bytes + i, len: 1 });
  tx.addIndirectChain(bufs, h.alloc.alloc(16 * 1024, 16));
  h.kick(TX_QUEUE);
  assert.equal(tap.sent.length, 1);
  const sent = tap.sent[0]!;
  assert.equal(sent.length, NET_HDR_SIZE + 1024);
  assert.ok(sent.subarray(NET_HDR_SIZE).every((b, i) => b === (i & 0xff)));
  assert.equal(dev.counters.txCoalesced, 1);
  assert.equal(dev.counters.txBad, 0);
});

test('virtio-net RX: a failing TAP read breaks the device (no retry loop), the chain comes back', () => {
  const { tap, dev, h, rx } = setup();
  rx.addChain([{ addr: h.alloc.alloc(2048), len: 2048, write: true }]);
  h.kick(RX_QUEUE); // nothing waits: the chain is held, the TAP watched
  assert.equal(tap.interest, true);
  tap.readError = Object.assign(new Error('EBADFD: file descriptor in bad state'), {
    code: 'EBADFD',
  });
  // The device worker runs the TAP's subscriber under the device's guard.
  h.device.guard('TAP fd', () => dev.onTapReadable());
  assert.deepEqual(rx.takeUsed(), [{ id: 0, len: 0 }]);
  assert.ok(h.driver.status() & STATUS_DEVICE_NEEDS_RESET);
  assert.equal(tap.interest, false, 'the broken device no longer watches the TAP');
  assert.equal(h.device.counters.failures, 1);
});

test('virtio-net RX: at most NET_RX_BUDGET_FRAMES frames per wake-up, then the next round', () => {
  const { tap, dev, h, rx } = setup();
  for (let i = 0; i < 100; i++) {
    tap.inbox.push(frame(60, i));
    rx.addChain([{ addr: h.alloc.alloc(128), len: 128, write: true }]);
  }
  dev.onTapReadable();
  assert.equal(rx.takeUsed().length, NET_RX_BUDGET_FRAMES);
  assert.equal(tap.interest, true, 'still watching: epoll wakes it again next round');
  assert.equal(dev.counters.rxBudgetYields, 1);
  dev.onTapReadable();
  assert.equal(rx.takeUsed().length, 100 - NET_RX_BUDGET_FRAMES);
  assert.equal(dev.counters.rxFrames, 100);
});

test('virtio-net RX: a budget used up on unusable chains still leaves the TAP watched (no stall)', () => {
  const { tap, dev, h, rx } = setup();
  tap.inbox.push(frame(60, 1));
  // NET_RX_BUDGET_FRAMES chains too short for a header, then a good one, in one kick.
  for (let i = 0; i < NET_RX_BUDGET_FRAMES; i++)
    rx.addChain([{ addr: h.alloc.alloc(4), len: 4, write: true }]);
  rx.addChain([{ addr: h.alloc.alloc(128), len: 128, write: true }]);
  h.kick(RX_QUEUE);
  assert.equal(rx.takeUsed().length, NET_RX_BUDGET_FRAMES);
  assert.equal(tap.interest, true, 'the frame and the good buffer meet at the next wake-up');
  dev.onTapReadable();
  assert.deepEqual(
    rx.takeUsed().map((u) => u.len),
    [NET_HDR_SIZE + 60],
  );
});

test('virtio-net metrics name the new counters', () => {
  const loop = {
    add: () => 0,
    modify: () => undefined,
    remove: () => undefined,
    setTimer: () => () => undefined,
  };
  const created = netDevice.create(
    { tapFd: -1 },
    {
      name: 'n',
      sys: {} as never,
      loop,
      log: () => undefined,
    },
  );
  const m = created.metrics!();
  for (const k of ['rx_chain_too_long', 'tx_coalesced_frames', 'rx_budget_yields', 'rx_fails'])
    assert.equal(m[k], 0, k);
});

/**
 * virtio-net's MMDS hook (issue 16): TX frames the interceptor wants (ARP for its address,
 * TCP to it) go to it and never to the TAP, every other frame goes to the TAP as before; its
 * answers land in RX buffers (zero virtio-net header, num_buffers 1) ahead of TAP frames.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { parseArp, parseEth, TCP_SYN } from '../../../mmds/frames.js';
import { arpRequest, decodeReply, guestTcp, makeResponder } from '../../../mmds/testing.js';
import { harness } from '../testing/harness.js';
import { NET_HDR_SIZE, writeNetHeader } from './header.js';
import { NetDevice, RX_QUEUE, TX_QUEUE, netIdentity, parseMac, type TapIo } from './net.js';

class Tap implements TapIo {
  sent: Uint8Array[] = [];
  inbox: Uint8Array[] = [];
  readv(bufs: Uint8Array[]): number {
    const f = this.inbox.shift();
    if (!f) return -1;
    let n = 0;
    for (const b of bufs) {
      const take = Math.min(b.length, f.length - n);
      b.set(f.subarray(n, n + take));
      n += take;
    }
    return f.length;
  }
  writev(bufs: Uint8Array[]): number {
    this.sent.push(Buffer.concat(bufs));
    return this.sent.at(-1)!.length;
  }
  setOffload(): void {}
  setReadInterest(): void {}
}

function withHdr(f: Uint8Array): Uint8Array {
  const out = new Uint8Array(NET_HDR_SIZE + f.length);
  writeNetHeader(out, {
    flags: 0,
    gsoType: 0,
    hdrLen: 0,
    gsoSize: 0,
    csumStart: 0,
    csumOffset: 0,
    numBuffers: 0,
  });
  out.set(f, NET_HDR_SIZE);
  return out;
}

test('MMDS frames go to the responder, others to the TAP; answers come first on RX', () => {
  const tap = new Tap();
  const { r } = makeResponder();
  const dev = new NetDevice('net', tap, () => undefined, {}, r);
  const h = harness(netIdentity(parseMac('06:00:00:00:00:01'), true), dev);
  const [rx, tx] = h.start();
  const put = (bytes: Uint8Array, split = false) => {
    const a = h.alloc.alloc(bytes.length);
    h.mem.view(a, bytes.length).set(bytes);
    // Split across two buffers: the hook gathers its peek and its copy across them.
    if (split)
      tx!.addChain([
        { addr: a, len: 20 },
        { addr: a + 20, len: bytes.length - 20 },
      ]);
    else tx!.addChain([{ addr: a, len: bytes.length }]);
  };
  const other = arpRequest(Uint8Array.from([169, 254, 10, 1]));
  put(withHdr(other));
  put(withHdr(arpRequest(r.ip)), true);
  put(withHdr(guestTcp({ dstIp: r.ip, srcPort: 5555, seq: 9, ack: 0, flags: TCP_SYN })), true);
  // Nothing posted on RX yet: the answers wait in the responder's queue.
  h.kick(TX_QUEUE);
  assert.equal(tx!.takeUsed().length, 3);
  assert.equal(tap.sent.length, 1, 'only the non-MMDS frame reached the TAP');
  assert.deepEqual([...tap.sent[0]!.subarray(NET_HDR_SIZE)], [...other]);
  assert.equal(r.queued, 2);
  // A TAP frame waits too; RX serves the answers first.
  tap.inbox.push(withHdr(new Uint8Array(60).fill(0x77)));
  const bufs = [0, 1, 2].map(() => h.alloc.alloc(2048));
  for (const b of bufs) rx!.addChain([{ addr: b, len: 2048, write: true }]);
  h.kick(RX_QUEUE);
  const used = rx!.takeUsed();
  assert.equal(used.length, 3);
  const read = (i: number) => h.mem.view(bufs[i]!, used[i]!.len).slice();
  const arp = read(0);
  assert.equal(arp[10], 1, 'num_buffers');
  assert.equal(parseArp(parseEth(arp.subarray(NET_HDR_SIZE))!.payload)!.op, 2);
  const synAck = decodeReply(read(1).subarray(NET_HDR_SIZE));
  assert.equal(synAck.ack, 10);
  assert.equal(read(2)[NET_HDR_SIZE], 0x77, 'then the TAP frame');
  assert.equal(r.queued, 0);
});

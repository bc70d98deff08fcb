import { test } from 'node:test';
import assert from 'node:assert/strict';
import { VIRTIO_F_RING_EVENT_IDX, bit } from '../constants.js';
import { harness } from '../testing/harness.js';
import {
  NET_HDR_SIZE,
  VIRTIO_NET_HDR_F_NEEDS_CSUM,
  VIRTIO_NET_HDR_GSO_TCPV4,
  VIRTIO_NET_HDR_GSO_UDP,
  checkTxHeader,
  parseNetHeader,
  writeNetHeader,
} from './header.js';
import {
  NetDevice,
  RX_QUEUE,
  TUN_F_CSUM,
  TUN_F_TSO4,
  TX_QUEUE,
  VIRTIO_NET_F_CSUM,
  VIRTIO_NET_F_GUEST_CSUM,
  VIRTIO_NET_F_GUEST_TSO4,
  VIRTIO_NET_F_HOST_TSO4,
  VIRTIO_NET_F_MAC,
  VIRTIO_NET_F_MRG_RXBUF,
  netIdentity,
  parseMac,
  type TapIo,
} from './net.js';

class FakeTap implements TapIo {
  inbox: Uint8Array[] = []; // frames (with header) waiting to be read
  sent: Uint8Array[] = [];
  offload = -1;
  interest = false;
  interestChanges = 0;
  readv(bufs: Uint8Array[]): number {
    const f = this.inbox.shift();
    if (!f) return -1;
    let n = 0;
    for (const b of bufs) {
      const take = Math.min(b.length, f.length - n);
      b.set(f.subarray(n, n + take));
      n += take;
      if (n >= f.length) break;
    }
    return f.length; // tun returns the frame length (the spill buffer catches the excess)
  }
  writev(bufs: Uint8Array[]): number {
    const total = bufs.reduce((a, b) => a + b.length, 0);
    const out = new Uint8Array(total);
    let o = 0;
    for (const b of bufs) {
      out.set(b, o);
      o += b.length;
    }
    this.sent.push(out);
    return total;
  }
  setOffload(flags: number): void {
    this.offload = flags;
  }
  setReadInterest(on: boolean): void {
    this.interest = on;
    this.interestChanges++;
  }
}

const MAC = '06:00:a9:fe:00:02';

function frame(payloadLen: number, fill = 0xab, hdr = {}): Uint8Array {
  const f = new Uint8Array(NET_HDR_SIZE + payloadLen).fill(fill);
  writeNetHeader(f, {
    flags: 0,
    gsoType: 0,
    hdrLen: 0,
    gsoSize: 0,
    csumStart: 0,
    csumOffset: 0,
    numBuffers: 0,
    ...hdr,
  });
  return f;
}

function setup(offloads = true, round?: () => number, onInterrupt?: () => void) {
  const tap = new FakeTap();
  const logs: string[] = [];
  const dev = new NetDevice('virtio-net test', tap, (m) => logs.push(m));
  const h = harness(netIdentity(parseMac(MAC), offloads), dev, {
    ...(round ? { round } : {}),
    ...(onInterrupt ? { onInterrupt } : {}),
  });
  return { tap, dev, h, logs };
}

test('virtio-net offers MAC and offloads, not MRG_RXBUF; config holds the MAC', () => {
  const id = netIdentity(parseMac(MAC), true);
  assert.ok(id.features & bit(VIRTIO_NET_F_MAC));
  assert.ok(id.features & bit(VIRTIO_NET_F_HOST_TSO4));
  assert.equal(id.features & bit(VIRTIO_NET_F_MRG_RXBUF), 0n);
  assert.deepEqual([...id.config.subarray(0, 6)], [6, 0, 0xa9, 0xfe, 0, 2]);
  const plain = netIdentity(undefined, false);
  assert.equal(plain.features & bit(VIRTIO_NET_F_MAC), 0n);
  assert.equal(plain.features & bit(VIRTIO_NET_F_CSUM), 0n);
  assert.throws(() => parseMac('06:00:zz:00:00:01'));
});

test('virtio-net sets the TAP offloads from the features the driver took', () => {
  const { tap, h } = setup();
  h.start();
  assert.equal(tap.offload, TUN_F_CSUM | TUN_F_TSO4 | 0x04);
  const t2 = setup();
  t2.h.start({
    features: (f) => f & ~bit(VIRTIO_NET_F_GUEST_CSUM) & ~bit(VIRTIO_NET_F_GUEST_TSO4),
  });
  assert.equal(t2.tap.offload, 0);
  const t3 = setup();
  t3.h.start({ features: (f) => f & ~bit(8) }); // no GUEST_TSO6
  assert.equal(t3.tap.offload, TUN_F_CSUM | TUN_F_TSO4);
  assert.equal(tap.interest, false, 'no RX buffers yet: the TAP is not watched');
});

test('virtio-net TX passes good frames through zero-copy and drops garbage, counted', () => {
  const { tap, dev, h } = setup();
  const [, tx] = h.start();
  const put = (bytes: Uint8Array) => {
    const a = h.alloc.alloc(bytes.length);
    h.mem.view(a, bytes.length).set(bytes);
    tx!.addChain([{ addr: a, len: bytes.length }]);
  };
  put(frame(60)); // good
  put(new Uint8Array(8)); // no header
  put(frame(60, 0, { flags: 0x80 })); // unknown flag
  put(frame(60, 0, { flags: VIRTIO_NET_HDR_F_NEEDS_CSUM, csumStart: 58, csumOffset: 16 })); // outside
  put(frame(60, 0, { gsoType: VIRTIO_NET_HDR_GSO_UDP, gsoSize: 1400, flags: 1 })); // UFO
  put(frame(70000)); // oversized (> 65562 with header)
  put(frame(1000, 0, { gsoType: VIRTIO_NET_HDR_GSO_TCPV4, gsoSize: 0, flags: 1 })); // gso_size 0
  put(
    frame(1000, 0x11, {
      gsoType: VIRTIO_NET_HDR_GSO_TCPV4,
      gsoSize: 1448,
      flags: 1,
      hdrLen: 54,
      csumStart: 34,
      csumOffset: 16,
    }),
  ); // good TSO
  h.kick(TX_QUEUE);
  assert.equal(tx!.takeUsed().length, 8);
  assert.equal(tap.sent.length, 2);
  assert.equal(tap.sent[0]!.length, NET_HDR_SIZE + 60);
  assert.equal(tap.sent[1]![NET_HDR_SIZE + 5], 0x11);
  assert.equal(dev.counters.txBad, 6);
  assert.equal(dev.counters.txFrames, 2);
  assert.equal(h.device.state.counters().guestErrors, 6);
});

test('virtio-net TX refuses offloads the driver did not negotiate', () => {
  const { tap, dev, h } = setup(false);
  const [, tx] = h.start();
  const f = frame(100, 0, { flags: VIRTIO_NET_HDR_F_NEEDS_CSUM, csumStart: 34, csumOffset: 16 });
  const a = h.alloc.alloc(f.length);
  h.mem.view(a, f.length).set(f);
  tx!.addChain([{ addr: a, len: f.length }]);
  h.kick(TX_QUEUE);
  assert.equal(tap.sent.length, 0);
  assert.equal(dev.counters.txBad, 1);
  assert.ok(!checkTxHeader(parseNetHeader(f), 100, { csum: false, tso4: false, tso6: false }).ok);
});

test('virtio-net RX: frames land in guest buffers with num_buffers = 1 and one interrupt', () => {
  const { tap, dev, h } = setup();
  const [rx] = h.start();
  const bufs = [0, 1].map(() => h.alloc.alloc(2048));
  for (const b of bufs) rx!.addChain([{ addr: b, len: 2048, write: true }]);
  h.kick(RX_QUEUE);
  tap.inbox.push(frame(100, 0x22), frame(200, 0x33));
  const irqs = h.interrupts();
  dev.onTapReadable();
  assert.deepEqual(rx!.takeUsed(), [
    { id: 0, len: NET_HDR_SIZE + 100 },
    { id: 1, len: NET_HDR_SIZE + 200 },
  ]);
  assert.equal(h.mem.readU16(bufs[0]! + 10), 1);
  assert.equal(h.mem.view(bufs[1]! + NET_HDR_SIZE, 1)[0], 0x33);
  assert.equal(h.interrupts(), irqs + 1);
  assert.equal(dev.counters.rxFrames, 2);
});

/**
 * The host's stack answers inside our write, as it does an echo request to its own address:
 * each frame written puts an 84-byte reply (0x44) on the TAP. Returns the plain writev.
 */
function answerEachWrite(tap: FakeTap): FakeTap['writev'] {
  const writev = tap.writev.bind(tap);
  tap.writev = (bufs) => {
    const n = writev(bufs);
    tap.inbox.push(frame(84, 0x44));
    return n;
  };
  return writev;
}

test('virtio-net: a reply already on the TAP when a TX turn ends goes in with it, RX first (rxAfterTx)', () => {
  const { tap, dev, h } = setup();
  const [rx, tx] = h.start();
  const writev = answerEachWrite(tap);
  const b = h.alloc.alloc(2048);
  rx!.addChain([{ addr: b, len: 2048, write: true }]);
  h.kick(RX_QUEUE); // nothing to read yet: the chain is held and the TAP watched
  assert.equal(tap.interest, true);
  const f = frame(84, 0x55);
  const a = h.alloc.alloc(f.length);
  h.mem.view(a, f.length).set(f);
  tx!.addChain([{ addr: a, len: f.length }]);
  const irqs = h.interrupts();
  h.kick(TX_QUEUE); // no onTapReadable(): the TX turn itself served the reply
  assert.equal(tap.sent.length, 1);
  assert.deepEqual(rx!.takeUsed(), [{ id: 0, len: NET_HDR_SIZE + 84 }]);
  assert.equal(h.mem.view(b + NET_HDR_SIZE, 1)[0], 0x44);
  assert.equal(tx!.takeUsed().length, 1);
  assert.equal(h.interrupts(), irqs + 2, 'RX, then TX: back to back (no loop rounds here)');
  assert.equal(dev.counters.rxAfterTx, 1);
  // A TX turn with nothing to read looks once (the held chain stays held), and a turn that
  // wrote nothing (a bad frame) does not look at all.
  tap.writev = writev;
  rx!.addChain([{ addr: h.alloc.alloc(2048), len: 2048, write: true }]);
  h.kick(RX_QUEUE);
  tx!.addChain([{ addr: a, len: f.length }]);
  h.kick(TX_QUEUE);
  assert.equal(dev.counters.rxAfterTx, 2);
  assert.deepEqual(rx!.takeUsed(), []);
  const bad = h.alloc.alloc(8);
  tx!.addChain([{ addr: bad, len: 8 }]);
  h.kick(TX_QUEUE);
  assert.equal(dev.counters.rxAfterTx, 2);
  assert.equal(dev.counters.txBad, 1);
});

test('virtio-net RX: a lone frame is published and signalled before the read that finds the TAP empty; after a burst, a wake-up publishes once', () => {
  const { tap, dev, h } = setup(true, () => 1);
  const [rx] = h.start();
  for (let i = 0; i < 12; i++)
    rx!.addChain([{ addr: h.alloc.alloc(2048), len: 2048, write: true }]);
  h.kick(RX_QUEUE);
  // What the driver could see at each TAP read: RX used entries and interrupts so far.
  const seen: Array<[number, number]> = [];
  const readv = tap.readv.bind(tap);
  tap.readv = (bufs) => {
    seen.push([rx!.usedIdx(), h.interrupts()]);
    return readv(bufs);
  };
  const d = h.device.deviceState;
  assert.ok(d.kind === 'active');
  const publishes = () => d.queues[RX_QUEUE]!.notifyCounters.usedPublishes;
  const wake = (frames: number) => {
    for (let i = 0; i < frames; i++) tap.inbox.push(frame(84, i));
    seen.length = 0;
    const p = publishes();
    const irqs = h.interrupts();
    dev.onTapReadable();
    assert.equal(rx!.takeUsed().length, frames);
    h.driver.takeInterrupt(); // the driver's handler: acknowledged
    return { reads: [...seen].map(([u, n]) => [u, n - irqs]), publishes: publishes() - p };
  };
  // A lone frame (a ping's reply): in the guest's ring, with its interrupt, before the second
  // read, which finds nothing.
  const used = rx!.usedIdx();
  const lone = wake(1);
  assert.deepEqual(lone.reads, [
    [used, 0],
    [used + 1, 1],
  ]);
  assert.equal(lone.publishes, 1, 'the end of the wake-up had nothing more to publish');
  // A burst after a lone frame: its first frame at once, the other three together.
  assert.equal(wake(4).publishes, 2);
  // After a burst: the whole wake-up in one publish, as a stream's wake-ups go.
  assert.equal(wake(3).publishes, 1);
  assert.equal(wake(1).publishes, 1);
  // A lone frame again after it: early again.
  assert.deepEqual(wake(1).reads[1], [rx!.usedIdx(), 1]);
});

test("virtio-net: the reply a TX turn brought back is signalled before the turn's completion; a driver that acknowledged it gets TX's own", () => {
  // The driver's handler runs inside each interrupt, as a guest's vCPU on another CPU can before
  // our thread goes on: it sees the reply first, then the TX completion under an interrupt of
  // its own. (A driver that has not acknowledged yet takes both under one: the next test.)
  const driver: { take?: () => void } = {};
  const seen: Array<[number, number]> = [];
  const { tap, dev, h } = setup(
    true,
    () => 1,
    () => driver.take?.(),
  );
  const [rx, tx] = h.start();
  driver.take = () => {
    seen.push([rx!.usedIdx(), tx!.usedIdx()]);
    h.driver.takeInterrupt();
  };
  // An RX buffer posted (the TAP is empty: held), then a frame sent.
  const send = (fill: number) => {
    rx!.addChain([{ addr: h.alloc.alloc(2048), len: 2048, write: true }]);
    h.kick(RX_QUEUE);
    const f = frame(84, fill);
    const a = h.alloc.alloc(f.length);
    h.mem.view(a, f.length).set(f);
    tx!.addChain([{ addr: a, len: f.length }]);
    seen.length = 0;
    h.kick(TX_QUEUE);
  };
  answerEachWrite(tap);
  for (let ping = 1; ping <= 3; ping++) {
    send(0x55);
    assert.deepEqual(
      seen,
      [
        [ping, ping - 1],
        [ping, ping],
      ],
      `ping ${ping}: the reply's interrupt, then TX's`,
    );
    assert.equal(rx!.takeUsed().length, 1);
    assert.equal(tx!.takeUsed().length, 1);
  }
  assert.equal(dev.counters.rxAfterTx, 3);
  const m = h.device.metrics();
  assert.deepEqual([m.queue0_irqs, m.queue1_irqs, m.queue1_irqs_coalesced], [3, 3, 0]);
  // A turn with no reply (nothing on the TAP) sends its own interrupt only.
  tap.writev = (bufs) => bufs.reduce((n, b) => n + b.length, 0);
  send(0x66);
  assert.deepEqual(seen, [[3, 4]]);
  assert.equal(dev.counters.rxAfterTx, 4);
});

test('virtio-net: RX and TX interrupts of one loop round share one irqfd write until acknowledged', () => {
  let round = 1;
  const { tap, h } = setup(true, () => round);
  // Without EVENT_IDX: every used entry asks for an interrupt (none is suppressed).
  const [rx, tx] = h.start({ features: (f) => f & ~bit(VIRTIO_F_RING_EVENT_IDX) });
  answerEachWrite(tap);
  const send = () => {
    rx!.addChain([{ addr: h.alloc.alloc(2048), len: 2048, write: true }]);
    h.kick(RX_QUEUE);
    const f = frame(84, 0x55);
    const a = h.alloc.alloc(f.length);
    h.mem.view(a, f.length).set(f);
    tx!.addChain([{ addr: a, len: f.length }]);
    h.kick(TX_QUEUE);
  };
  const irqs = h.interrupts();
  send(); // the reply (RX) and the completion (TX) in one round: one write
  assert.equal(rx!.takeUsed().length, 1);
  assert.equal(tx!.takeUsed().length, 1);
  assert.equal(h.interrupts(), irqs + 1);
  const m = h.device.metrics();
  assert.deepEqual([m.queue0_irqs, m.queue1_irqs, m.queue1_irqs_coalesced], [1, 1, 1]);
  // Not acknowledged, but a new round: written again (an edge lost while masked is not final),
  // once for both queues again.
  round++;
  send();
  assert.equal(h.interrupts(), irqs + 2);
  assert.equal(h.device.metrics().queue1_irqs_coalesced, 2);
  // Acknowledged (the driver's handler), same round: the next one is written.
  assert.equal(h.driver.takeInterrupt() & 1, 1);
  tx!.addChain([{ addr: h.alloc.alloc(128), len: 8 }]); // a bad frame: used, no TAP write
  h.kick(TX_QUEUE);
  assert.equal(h.interrupts(), irqs + 3);
  assert.equal(h.device.metrics().queue1_irqs_coalesced, 2);
});

test('virtio-net RX back-pressure: no buffer -> stop watching the TAP; the kick resumes, nothing lost', () => {
  const { tap, dev, h } = setup();
  const [rx] = h.start();
  for (let i = 0; i < 3; i++) tap.inbox.push(frame(64, i));
  dev.onTapReadable(); // no buffers yet
  assert.equal(tap.interest, false);
  assert.equal(tap.inbox.length, 3, 'frames stay in the TAP');
  const a = h.alloc.alloc(2048);
  rx!.addChain([{ addr: a, len: 2048, write: true }]);
  h.kick(RX_QUEUE);
  assert.equal(rx!.takeUsed().length, 1);
  assert.equal(tap.inbox.length, 2);
  assert.equal(tap.interest, false, 'out of buffers again');
  for (let i = 0; i < 2; i++) rx!.addChain([{ addr: h.alloc.alloc(2048), len: 2048, write: true }]);
  h.kick(RX_QUEUE);
  assert.equal(rx!.takeUsed().length, 2);
  assert.equal(tap.inbox.length, 0);
  assert.equal(dev.counters.rxFrames, 3);
  // A chain taken while the TAP is empty is held, and the TAP watched, until a frame comes.
  rx!.addChain([{ addr: h.alloc.alloc(2048), len: 2048, write: true }]);
  h.kick(RX_QUEUE);
  assert.equal(tap.interest, true);
  assert.equal(rx!.takeUsed().length, 0);
  tap.inbox.push(frame(10));
  dev.onTapReadable();
  assert.deepEqual(
    rx!.takeUsed().map((u) => u.len),
    [NET_HDR_SIZE + 10],
  );
});

test('virtio-net RX: a frame bigger than the buffer is dropped and counted; tiny chains refused', () => {
  const { tap, dev, h } = setup();
  const [rx] = h.start();
  rx!.addChain([{ addr: h.alloc.alloc(8), len: 8, write: true }]); // smaller than the header
  rx!.addChain([{ addr: h.alloc.alloc(256), len: 256, write: true }]);
  rx!.addChain([{ addr: h.alloc.alloc(256), len: 256, write: true }]);
  tap.inbox.push(frame(1000), frame(100));
  h.kick(RX_QUEUE);
  assert.deepEqual(
    rx!.takeUsed().map((u) => u.len),
    [0, 0, NET_HDR_SIZE + 100],
  );
  assert.equal(dev.counters.rxTooLarge, 1);
  assert.equal(dev.counters.rxFrames, 1);
});

test('virtio-net: a reset drops the held chain and stops watching the TAP', () => {
  const { tap, h } = setup();
  const [rx] = h.start();
  rx!.addChain([{ addr: h.alloc.alloc(2048), len: 2048, write: true }]);
  h.kick(RX_QUEUE);
  assert.equal(tap.interest, true);
  h.driver.write(0x70, 0); // Status = 0: reset
  assert.equal(tap.interest, false);
  const [rx2] = h.start({ features: (f) => f & ~bit(VIRTIO_NET_F_GUEST_TSO4) });
  rx2!.addChain([{ addr: h.alloc.alloc(2048), len: 2048, write: true }]);
  tap.inbox.push(frame(50));
  h.kick(RX_QUEUE);
  assert.deepEqual(
    rx2!.takeUsed().map((u) => u.len),
    [NET_HDR_SIZE + 50],
  );
  assert.equal(tap.offload, TUN_F_CSUM | 0x04);
});

test('state round-trips with RX buffers in flight and a held chain; the restored device goes on', () => {
  const tap = new FakeTap();
  const dev = new NetDevice('virtio-net test', tap, () => undefined);
  const id = netIdentity(parseMac(MAC), true);
  const h = harness(id, dev);
  const [rx] = h.start({ queueSize: 16 });
  const heads = [0, 1, 2].map(() =>
    rx!.addChain([{ addr: h.alloc.alloc(2048), len: 2048, write: true }]),
  );
  tap.inbox.push(frame(100));
  h.kick(RX_QUEUE); // chain 0 takes the frame; chain 1 is taken and held (the TAP is empty)
  assert.deepEqual(
    rx!.takeUsed().map((u) => u.len),
    [NET_HDR_SIZE + 100],
  );
  const saved = h.device.save();

  const tap2 = new FakeTap();
  const dev2 = new NetDevice('virtio-net test', tap2, () => undefined);
  const h2 = harness(id, dev2, { mem: h.mem, alloc: h.alloc });
  const r = h2.device.restore(saved);
  assert.ok(r.ok, r.ok ? '' : r.error.message);
  assert.deepEqual(h2.device.save(), saved, 'save -> restore -> save: the same bytes');
  assert.ok(tap2.interest, 'the restored device watches its TAP');
  tap2.inbox.push(frame(200), frame(300));
  dev2.onTapReadable();
  const used = rx!.takeUsed();
  assert.deepEqual(
    used.map((u) => [u.id, u.len]),
    [
      [heads[1], NET_HDR_SIZE + 200],
      [heads[2], NET_HDR_SIZE + 300],
    ],
  );
  // Bad bytes are refused and change nothing.
  const fresh = harness(id, new NetDevice('x', new FakeTap(), () => undefined), {
    mem: h.mem,
    alloc: h.alloc,
  });
  assert.equal(fresh.device.restore(saved.subarray(0, saved.length - 1)).ok, false);
  assert.equal(fresh.device.deviceState.kind, 'inactive');
});

for (const eventIdx of [true, false]) {
  test(`virtio-net RX (${eventIdx ? 'EVENT_IDX' : 'NO_NOTIFY'}): a wake-up's first frame at once, the rest in one batch, one interrupt; RX kicks only once out of buffers`, () => {
    // One loop round (the device worker's), as every wake-up is.
    const { tap, dev, h } = setup(true, () => 1);
    const [rx] = h.start({ features: (f) => (eventIdx ? f : f & ~bit(29)) });
    const add = () => rx!.addChain([{ addr: h.alloc.alloc(2048), len: 2048, write: true }]);
    for (let i = 0; i < 8; i++) add();
    assert.equal(rx!.kickNeeded(eventIdx), true);
    h.kick(RX_QUEUE);
    for (let i = 0; i < 5; i++) tap.inbox.push(frame(100 + i));
    const irqs0 = h.interrupts();
    dev.onTapReadable();
    assert.equal(rx!.takeUsed().length, 5);
    // EVENT_IDX: the driver's used_event asks for the first only; NO_NOTIFY: the second is
    // coalesced with the first, not yet acknowledged, in the same round.
    assert.equal(h.interrupts() - irqs0, 1, 'one interrupt for the five frames');
    const d = h.device.deviceState;
    assert.ok(d.kind === 'active');
    // The first frame, then the other four (the RX chain held for the next frame was taken
    // after the fifth: 6 chains popped).
    assert.equal(d.queues[RX_QUEUE]!.notifyCounters.usedPublishes, 2);
    // Buffers left (and one held): refilling them needs no kick.
    add();
    assert.equal(rx!.kickNeeded(eventIdx), false, 'no RX kick while we have buffers');
    // Use up every buffer: the empty pop turns RX kicks on, the next refill is kicked.
    for (let i = 0; i < 10; i++) tap.inbox.push(frame(60));
    dev.onTapReadable();
    assert.equal(rx!.takeUsed().length, 4);
    assert.equal(tap.inbox.length, 6, 'frames wait in the TAP (back-pressure)');
    add();
    assert.equal(rx!.kickNeeded(eventIdx), true, 'out of buffers: the refill is kicked');
    h.kick(RX_QUEUE);
    dev.onTapReadable();
    assert.equal(rx!.takeUsed().length, 1);
  });
}

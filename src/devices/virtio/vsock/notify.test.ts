/**
 * virtio-vsock and notification suppression (issue 17): its self-served TX and RX turns batch
 * their used buffers (one used.idx store, at most one interrupt per turn) and tell the driver not
 * to kick while they take buffers, without a lost wake-up. Both with VIRTIO_F_RING_EVENT_IDX and
 * with VIRTQ_USED_F_NO_NOTIFY; the driver is MockQueue playing Linux's virtqueue_kick_prepare,
 * and a randomized test has it kick only when asked, in both directions at once.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { VIRTIO_F_RING_EVENT_IDX, bit } from '../constants.js';
import { harness } from '../testing/harness.js';
import type { MockQueue } from '../testing/mock-driver.js';
import { Prng } from '../testing/prng.js';
import { CID, FakeHost, hdr } from '../testing/vsock.js';
import {
  OP_CREDIT_REQUEST,
  OP_REQUEST,
  OP_RESPONSE,
  OP_RW,
  VSOCK_HDR_SIZE,
  readHeader,
  writeHeader,
} from './packet.js';
import { RX_QUEUE, TX_QUEUE, VsockDevice, vsockIdentity } from './vsock.js';

const MODES = [
  { name: 'EVENT_IDX', eventIdx: true },
  { name: 'NO_NOTIFY', eventIdx: false },
] as const;
/** The guest's receive buffer: large, so that host -> guest data never wait for its credit. */
const GUEST_BUF_ALLOC = 64 * 1024 * 1024;
const RX_BUF = 4096 + VSOCK_HDR_SIZE;
const TX_BUF = VSOCK_HDR_SIZE + 256;

/**
 * A vsock device on the mock driver with `queueSize` entries per queue, EVENT_IDX negotiated
 * or not, and one established guest connection (guest port 5000 -> host port 80). One buffer
 * per descriptor slot (single-descriptor chains take the slots in order).
 */
function connected(eventIdx: boolean, queueSize = 16) {
  const host = new FakeHost();
  const logs: string[] = [];
  const dev = new VsockDevice('virtio-vsock test', CID, '/tmp/v.sock', host, (m) => logs.push(m));
  const h = harness(vsockIdentity(CID), dev);
  const features = (f: bigint) => (eventIdx ? f : f & ~bit(VIRTIO_F_RING_EVENT_IDX));
  const [rx, tx] = h.start({ features, queueSize }) as [MockQueue, MockQueue, MockQueue];
  const rxBufs = Array.from({ length: queueSize }, () => h.alloc.alloc(RX_BUF));
  const txBufs = Array.from({ length: queueSize }, () => h.alloc.alloc(TX_BUF));
  let rxAdded = 0;
  let rxTaken = 0;
  let txAdded = 0;
  let txTaken = 0;
  /** Posts an RX buffer if a slot is free; true if it did. No kick. */
  const postRx = () => {
    if (rxAdded - rxTaken >= queueSize) return false;
    rx.addChain([{ addr: rxBufs[rxAdded++ % queueSize]!, len: RX_BUF, write: true }]);
    return true;
  };
  /** Queues one TX packet if a slot is free; true if it did. No kick. */
  const postTx = (op: number, payload = new Uint8Array(0)) => {
    if (txAdded - txTaken >= queueSize) return false;
    const a = txBufs[txAdded++ % queueSize]!;
    writeHeader(
      h.mem.view(a, VSOCK_HDR_SIZE),
      hdr({ op, len: payload.length, bufAlloc: GUEST_BUF_ALLOC }),
    );
    h.mem.view(a + VSOCK_HDR_SIZE, payload.length).set(payload);
    tx.addChain([{ addr: a, len: VSOCK_HDR_SIZE + payload.length }]);
    return true;
  };
  /** The driver takes used RX buffers: the packets in them. */
  const takeRx = () =>
    rx.takeUsed().map((u) => {
      rxTaken++;
      const a = rxBufs[u.id]!;
      return {
        ...readHeader(h.mem.view(a, VSOCK_HDR_SIZE)),
        data: Buffer.from(h.mem.view(a + VSOCK_HDR_SIZE, u.len - VSOCK_HDR_SIZE)),
      };
    });
  const takeTx = () => {
    const n = tx.takeUsed().length;
    txTaken += n;
    return n;
  };
  host.listeners.add('/tmp/v.sock_80');
  postRx();
  h.kick(RX_QUEUE);
  postTx(OP_REQUEST);
  h.kick(TX_QUEUE);
  assert.deepEqual(
    takeRx().map((p) => p.op),
    [OP_RESPONSE],
  );
  takeTx();
  const fd = [...host.socks.keys()][0]!;
  const queue = (i: number) => {
    const d = h.device.deviceState;
    assert.ok(d.kind === 'active');
    return d.queues[i]!;
  };
  return { host, dev, h, rx, tx, fd, postRx, postTx, takeRx, takeTx, queue, logs };
}

const bytes = (n: number, from = 0) =>
  Uint8Array.from({ length: n }, (_, i) => ((from + i) * 7) & 0xff);

for (const { name, eventIdx } of MODES) {
  test(`vsock ${name}: a TX turn publishes once, interrupts once, and is not kicked while it drains`, () => {
    const t = connected(eventIdx);
    for (let i = 0; i < 10; i++) t.postTx(OP_RW, bytes(100, 100 * i));
    assert.equal(t.tx.kickNeeded(eventIdx), true, 'the first packets are kicked');
    // The driver adds a packet while the device writes the third one to the socket.
    const seen: boolean[] = [];
    const write = t.host.write.bind(t.host);
    let writes = 0;
    t.host.write = (fd, bufs) => {
      if (++writes === 3) {
        t.postTx(OP_RW, bytes(100, 1000));
        seen.push(t.tx.kickNeeded(eventIdx));
      }
      return write(fd, bufs);
    };
    const irqs = t.h.interrupts();
    const publishes = t.queue(TX_QUEUE).notifyCounters.usedPublishes;
    t.h.kick(TX_QUEUE);
    assert.deepEqual(seen, [false], 'no kick for a packet added during the turn');
    assert.equal(t.takeTx(), 11, 'the packet added meanwhile was served in the same turn');
    assert.deepEqual(Buffer.from(t.host.socks.get(t.fd)!.written), Buffer.from(bytes(1100)));
    assert.equal(t.queue(TX_QUEUE).notifyCounters.usedPublishes - publishes, 1, 'one used.idx');
    assert.equal(t.h.interrupts() - irqs, 1, 'one interrupt');
    t.postTx(OP_RW, bytes(1, 1100));
    assert.equal(t.tx.kickNeeded(eventIdx), true, 'drained: the next packet is kicked');
  });

  test(`vsock ${name}: RX takes buffers without kicks while it has data, and asks for a kick once it runs out`, () => {
    const t = connected(eventIdx);
    const sock = t.host.socks.get(t.fd)!;
    for (let i = 0; i < 4; i++) t.postRx();
    if (t.rx.kickNeeded(eventIdx)) t.h.kick(RX_QUEUE);
    // Host data for 6 buffers; 4 are posted, and the driver adds 1 more mid-turn.
    for (const b of bytes(6 * 4096)) sock.inbox.push(b);
    const read = t.host.read.bind(t.host);
    const seen: boolean[] = [];
    t.host.read = (fd, bufs) => {
      const n = read(fd, bufs);
      if (seen.length === 0) {
        t.postRx();
        seen.push(t.rx.kickNeeded(eventIdx));
      }
      return n;
    };
    const irqs = t.h.interrupts();
    t.dev.onSocket(t.fd, true, false, false);
    assert.deepEqual(seen, [false], 'no kick for a buffer added while RX fills buffers');
    const got = t.takeRx();
    assert.equal(got.length, 5, 'every posted buffer filled, the one added meanwhile too');
    assert.equal(t.h.interrupts() - irqs, 1, 'one interrupt for the turn');
    // Out of buffers: kicks are back on (race-free), and the next buffer is kicked.
    assert.equal(t.queue(RX_QUEUE).kicksSuppressed, false);
    t.postRx();
    assert.equal(t.rx.kickNeeded(eventIdx), true, 'the device waits for buffers: kick');
    t.h.kick(RX_QUEUE);
    const rest = t.takeRx();
    assert.equal(rest.length, 1);
    assert.deepEqual(
      Buffer.concat([...got, ...rest].map((p) => p.data)),
      Buffer.from(bytes(6 * 4096)),
    );
  });

  test(`vsock ${name}: an RX turn that only completes buffers with used.len 0 interrupts too`, () => {
    const t = connected(eventIdx);
    // An RX buffer too short for a header (the last one of this test: the fixture's slots no
    // longer match after it), then a credit request: the device owes the guest an answer.
    const short = t.h.alloc.alloc(16);
    t.rx.addChain([{ addr: short, len: 16, write: true }]);
    t.h.kick(RX_QUEUE);
    const irqs = t.h.interrupts();
    t.postTx(OP_CREDIT_REQUEST);
    t.h.kick(TX_QUEUE);
    assert.equal(t.takeTx(), 1);
    assert.deepEqual(
      t.rx.takeUsed().map((u) => u.len),
      [0],
      'the short buffer is given back empty',
    );
    assert.equal(t.h.interrupts() - irqs, 2, 'one for TX, one for the RX buffer used empty');
  });
}

for (const { name, eventIdx } of MODES) {
  test(`vsock ${name}: a driver that kicks only when asked never hangs (random interleavings, both directions)`, () => {
    for (const seed of [1, 2, 3, 4, 5, 6]) {
      const rng = new Prng(seed * 104729);
      const size = [4, 16, 256][seed % 3]!;
      const t = connected(eventIdx, size);
      const sock = t.host.socks.get(t.fd)!;
      const toHost = bytes(128 * 1024, 11);
      const toGuest = bytes(96 * 1024, 5);
      let sent = 0; // bytes of toHost queued on TX
      let fed = 0; // bytes of toGuest put in the socket
      const got: Buffer[] = [];
      let pending = { rx: false, tx: false };
      /** The driver's side of a kick decision; a kick it owes is delivered by the loop later. */
      const decide = (q: 'rx' | 'tx') => {
        if ((q === 'rx' ? t.rx : t.tx).kickNeeded(eventIdx)) pending[q] = true;
      };
      const sendSome = () => {
        const k = 1 + rng.below(size);
        for (let i = 0; i < k && sent < toHost.length; i++) {
          const n = Math.min(1 + rng.below(256), toHost.length - sent);
          if (!t.postTx(OP_RW, toHost.subarray(sent, sent + n))) break;
          sent += n;
        }
      };
      const postSome = () => {
        const k = 1 + rng.below(size);
        for (let i = 0; i < k && t.postRx(); i++);
      };
      // The driver on another CPU: sometimes it adds buffers in the middle of a device turn.
      const read = t.host.read.bind(t.host);
      const write = t.host.write.bind(t.host);
      const meanwhile = () => {
        if (!rng.chance(0.1)) return;
        if (rng.chance(0.5)) (postSome(), decide('rx'));
        else (sendSome(), decide('tx'));
      };
      t.host.read = (fd, bufs) => (meanwhile(), read(fd, bufs));
      t.host.write = (fd, bufs) => (meanwhile(), write(fd, bufs));
      const deliverKicks = () => {
        const p = pending;
        pending = { rx: false, tx: false };
        if (p.rx) t.h.kick(RX_QUEUE);
        if (p.tx) t.h.kick(TX_QUEUE);
      };
      const takeRx = () => {
        for (const p of t.takeRx()) if (p.op === OP_RW) got.push(p.data);
      };
      /** The loop reports the socket while it is watched for reading and has data. */
      const loopReports = () => {
        if (sock.watch?.[0] && sock.inbox.length > 0) t.dev.onSocket(t.fd, true, false, false);
      };
      for (let step = 0; step < 600; step++) {
        const r = rng.below(12);
        if (r < 3) (sendSome(), decide('tx'));
        else if (r < 6) (postSome(), decide('rx'));
        else if (r < 7) t.takeTx();
        else if (r < 8) takeRx();
        else if (r < 10 && fed < toGuest.length) {
          const n = Math.min(1 + rng.below(8192), toGuest.length - fed);
          for (const b of toGuest.subarray(fed, fed + n)) sock.inbox.push(b);
          fed += n;
        } else t.host.fireTimers(0);
        deliverKicks();
        loopReports();
      }
      // Quiet: the rest of the data goes in, the driver keeps taking and posting as Linux
      // does (refill after receiving, kick only when asked), the loop runs its timers.
      for (const b of toGuest.subarray(fed)) sock.inbox.push(b);
      fed = toGuest.length;
      for (let round = 0; round < 2000; round++) {
        if (sent < toHost.length) (sendSome(), decide('tx'));
        t.takeTx();
        takeRx();
        postSome();
        decide('rx');
        deliverKicks();
        loopReports();
        t.host.drainYields();
      }
      const total = (bs: Buffer[]) => bs.reduce((a, b) => a + b.length, 0);
      assert.equal(
        Buffer.from(sock.written).length,
        toHost.length,
        `seed ${seed} (queue size ${size}): guest -> host bytes`,
      );
      assert.deepEqual(Buffer.from(sock.written), Buffer.from(toHost), `seed ${seed}: in order`);
      assert.equal(total(got), toGuest.length, `seed ${seed} (queue size ${size}): host -> guest`);
      assert.deepEqual(Buffer.concat(got), Buffer.from(toGuest), `seed ${seed}: in order`);
      assert.deepEqual(t.logs, [], `seed ${seed}: nothing logged`);
    }
  });
}

/**
 * Child process of vsock-peers.test.ts: a real virtio-vsock device (the registry descriptor,
 * the native shim's Unix sockets, the device worker's epoll loop) driven by a scripted guest on
 * the mock driver, so host programs can be hostile to it over real sockets, under a low
 * RLIMIT_NOFILE when started with `prlimit`. Usage: node vsock-peers-child.js <uds path>.
 *
 * The guest accepts every host-initiated connection and echoes what it receives (port 53: drops
 * it, within the credit it gives); on command it
 * dials host ports itself. Commands, one per line on stdin (read on the same epoll loop, so the
 * process does nothing between events); answers, one JSON line each on stdout (a pipe: written
 * synchronously):
 *   measure <ms>          CPU time used over the next <ms> of wall time, and the stats
 *   stats                 counters and budgets now
 *   connect <port> <text> the guest dials host port <port> and sends <text>; the reply is
 *                         reported as {"guestGot": ...}
 *   flood <port>          the guest dials <port> and sends as much as the host's credit allows,
 *                         for as long as it allows
 *   mute                  the guest stops answering host-initiated connections (they time out)
 *   quit
 */
import { readdirSync } from 'node:fs';
import { getHeapStatistics } from 'node:v8';
import { EventLoop } from '../../src/events/event-loop.js';
import { native } from '../../src/kvm/native.js';
import { vsockDevice } from '../../src/devices/virtio/vsock/descriptor.js';
import { harness } from '../../src/devices/virtio/testing/harness.js';
import type { MockQueue } from '../../src/devices/virtio/testing/mock-driver.js';
import {
  HOST_CID,
  OP_CREDIT_REQUEST,
  OP_CREDIT_UPDATE,
  OP_REQUEST,
  OP_RESPONSE,
  OP_RST,
  OP_RW,
  OP_SHUTDOWN,
  TYPE_STREAM,
  VSOCK_HDR_SIZE,
  type VsockHeader,
  readHeader,
  writeHeader,
} from '../../src/devices/virtio/vsock/packet.js';
import {
  RX_QUEUE,
  TX_QUEUE,
  type VsockDevice,
  vsockIdentity,
} from '../../src/devices/virtio/vsock/vsock.js';

const CID = 3;
const GUEST_BUF = 1024 * 1024;
const PKT = 4096;
/** Host-initiated connections to this guest port are read and dropped (not echoed). */
const SINK_PORT = 53;
const uds = process.argv[2]!;
const n = native();
const out = (o: unknown) => process.stdout.write(`${JSON.stringify(o)}\n`);
const logs: string[] = [];
const loop = new EventLoop((e) => logs.push(`loop error: ${String(e)}`));

const opened = vsockDevice.open(
  { kind: 'vsock', id: 'v', cid: CID, uds },
  {
    sys: n,
    claim: () => undefined,
  },
);
const created = vsockDevice.create(opened.host, {
  name: 'vsock',
  sys: n,
  loop,
  log: (m) => logs.push(m),
});
const dev = created.backend as VsockDevice;
const h = harness(vsockIdentity(CID), dev);
const [rx, tx] = h.start() as [MockQueue, MockQueue, MockQueue];

// ---- the guest ----

const rxAddr = new Map<number, number>();
for (let i = 0; i < 64; i++) {
  const a = h.alloc.alloc(VSOCK_HDR_SIZE + PKT);
  rxAddr.set(rx.addChain([{ addr: a, len: VSOCK_HDR_SIZE + PKT, write: true }]), a);
}
h.kick(RX_QUEUE);
const txFree: number[] = [];
for (let i = 0; i < 128; i++) txFree.push(h.alloc.alloc(VSOCK_HDR_SIZE + PKT));
const txBusy = new Map<number, number>();
/** Packets waiting for a free TX buffer. */
const txWait: Array<{ hdr: VsockHeader; data: Uint8Array }> = [];

interface GuestConn {
  hostPort: number;
  guestPort: number;
  role: 'echo' | 'sink' | 'dial' | 'flood';
  text?: string;
  received: number;
  sent: number;
  peerBufAlloc: number;
  peerFwdCnt: number;
  established: boolean;
}
const conns = new Map<string, GuestConn>();
const key = (hostPort: number, guestPort: number) => `${hostPort}:${guestPort}`;
let nextGuestPort = 40_000;

function header(c: GuestConn, op: number, len = 0): VsockHeader {
  return {
    srcCid: CID,
    dstCid: HOST_CID,
    srcPort: c.guestPort,
    dstPort: c.hostPort,
    len,
    type: TYPE_STREAM,
    op,
    flags: 0,
    bufAlloc: GUEST_BUF,
    fwdCnt: c.received,
  };
}

function send(hdr: VsockHeader, data = new Uint8Array(0)): void {
  txWait.push({ hdr, data });
}

function flushTx(): void {
  let added = 0;
  while (txWait.length > 0 && txFree.length > 0) {
    const { hdr, data } = txWait.shift()!;
    const a = txFree.pop()!;
    writeHeader(h.mem.view(a, VSOCK_HDR_SIZE), { ...hdr, len: data.length });
    h.mem.view(a + VSOCK_HDR_SIZE, data.length).set(data);
    txBusy.set(tx.addChain([{ addr: a, len: VSOCK_HDR_SIZE + data.length }]), a);
    added++;
  }
  if (added > 0) h.kick(TX_QUEUE);
}

function flood(c: GuestConn): void {
  const chunk = new Uint8Array(PKT).fill(0x61);
  // Credit the host gave: its buf_alloc minus what it has not forwarded yet.
  while (c.peerBufAlloc - (c.sent - c.peerFwdCnt) >= PKT && txWait.length < 64) {
    c.sent += PKT;
    send(header(c, OP_RW, PKT), chunk);
  }
}

function onPacket(p: VsockHeader, data: Uint8Array): void {
  let c = conns.get(key(p.srcPort, p.dstPort));
  if (p.op === OP_REQUEST && !c && muted) return;
  if (p.op === OP_REQUEST && !c) {
    c = {
      hostPort: p.srcPort,
      guestPort: p.dstPort,
      role: p.dstPort === SINK_PORT ? 'sink' : 'echo',
      received: 0,
      sent: 0,
      peerBufAlloc: 0,
      peerFwdCnt: 0,
      established: true,
    };
    conns.set(key(c.hostPort, c.guestPort), c);
    c.peerBufAlloc = p.bufAlloc;
    send(header(c, OP_RESPONSE));
    return;
  }
  if (!c) return;
  c.peerBufAlloc = p.bufAlloc;
  c.peerFwdCnt = p.fwdCnt;
  switch (p.op) {
    case OP_RESPONSE:
      c.established = true;
      if (c.role === 'dial') {
        const text = new TextEncoder().encode(c.text ?? '');
        c.sent += text.length;
        send(header(c, OP_RW, text.length), text);
      }
      break;
    case OP_RW:
      c.received += data.length;
      if (c.role === 'echo') {
        c.sent += data.length;
        send(header(c, OP_RW, data.length), data.slice());
      } else if (c.role === 'dial') out({ guestGot: Buffer.from(data).toString() });
      break;
    case OP_CREDIT_REQUEST:
      send(header(c, OP_CREDIT_UPDATE));
      break;
    case OP_SHUTDOWN:
      send(header(c, OP_RST));
      conns.delete(key(c.hostPort, c.guestPort));
      break;
    case OP_RST:
      conns.delete(key(c.hostPort, c.guestPort));
      break;
  }
  if (c.role === 'flood' && c.established) flood(c);
}

/**
 * What the guest does after every batch of events: read RX, repost, send; again while that
 * made the device fill more RX buffers (a real guest would get an interrupt for those).
 */
function guestPoll(): void {
  for (let i = 0; i < 1000 && guestStep(); i++);
}

function guestStep(): boolean {
  const before = rx.usedIdx();
  let reposted = 0;
  for (const u of rx.takeUsed()) {
    const a = rxAddr.get(u.id)!;
    const p = readHeader(h.mem.view(a, VSOCK_HDR_SIZE));
    onPacket(p, h.mem.view(a + VSOCK_HDR_SIZE, u.len - VSOCK_HDR_SIZE));
    rxAddr.delete(u.id);
    rxAddr.set(rx.addChain([{ addr: a, len: VSOCK_HDR_SIZE + PKT, write: true }]), a);
    reposted++;
  }
  if (reposted > 0) h.kick(RX_QUEUE);
  for (const u of tx.takeUsed()) {
    txFree.push(txBusy.get(u.id)!);
    txBusy.delete(u.id);
  }
  for (const c of conns.values()) if (c.role === 'flood' && c.established) flood(c);
  flushTx();
  return reposted > 0 || rx.usedIdx() !== before;
}

// ---- commands ----

function stats() {
  let fds = -1;
  try {
    fds = readdirSync('/proc/self/fd').length;
  } catch {
    // out of descriptors
  }
  return {
    counters: dev.counters(),
    metrics: created.metrics?.(),
    budgets: dev.budgets,
    fds,
    // (process.memoryUsage() opens /proc/self/stat: it fails with EMFILE)
    heapUsed: getHeapStatistics().used_heap_size,
    logs,
  };
}

let done = false;
let muted = false;
function command(line: string): void {
  const [cmd, a, ...rest] = line.trim().split(' ');
  if (cmd === 'quit') done = true;
  else if (cmd === 'mute') muted = true;
  else if (cmd === 'stats') out({ stats: stats() });
  else if (cmd === 'measure') {
    const cpu = process.cpuUsage();
    const t0 = performance.now();
    loop.setTimer(Number(a), () => {
      const used = process.cpuUsage(cpu);
      out({
        cpuMs: (used.user + used.system) / 1000,
        wallMs: performance.now() - t0,
        stats: stats(),
      });
    });
  } else if (cmd === 'connect' || cmd === 'flood') {
    const c: GuestConn = {
      hostPort: Number(a),
      guestPort: nextGuestPort++,
      role: cmd === 'connect' ? 'dial' : 'flood',
      text: rest.join(' '),
      received: 0,
      sent: 0,
      peerBufAlloc: 0,
      peerFwdCnt: 0,
      established: false,
    };
    conns.set(key(c.hostPort, c.guestPort), c);
    send(header(c, OP_REQUEST));
  }
}

let pending = '';
const buf = new Uint8Array(4096);
loop.add(0, {
  process() {
    const k = n.read(0, buf);
    if (k === 0) done = true; // the parent is gone
    if (k <= 0) return;
    pending += Buffer.from(buf.subarray(0, k)).toString();
    for (let i = pending.indexOf('\n'); i >= 0; i = pending.indexOf('\n')) {
      command(pending.slice(0, i));
      pending = pending.slice(i + 1);
    }
  },
});

out({ ready: true, pid: process.pid });
while (!done) {
  loop.runOnce(1000);
  guestPoll();
}
opened.close();
process.exit(0);

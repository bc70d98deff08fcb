/**
 * virtio-vsock (device ID 19, virtio 1.2 §5.10) with Firecracker's host side: the guest's
 * stream connections to host port P go to the Unix socket `${uds}_${P}`; host programs dial
 * `${uds}` (we listen there), write "CONNECT <port>\n" and get "OK <hostport>\n" once the
 * guest accepted (or a closed socket if it refused).
 *
 * Queues: 0 = rx (device -> guest), 1 = tx, 2 = event. RX and event are self-served: packets
 * go to the guest when host data or control packets are ready, not when the guest kicks.
 *
 * Flow control (§5.10.6.3): every packet we send carries buf_alloc = BUF_ALLOC and fwd_cnt =
 * the bytes we have written to the Unix socket; the guest may have at most BUF_ALLOC bytes in
 * flight towards us, so what we buffer per connection (socket full) is bounded by BUF_ALLOC
 * and a guest sending more is reset (counted). We send the guest at most its advertised
 * credit (peer buf_alloc - (tx_cnt - peer fwd_cnt)); with no credit we stop reading that
 * socket and ask with CREDIT_REQUEST. With no RX buffer at all, we stop reading every socket
 * until the guest kicks the RX queue (back-pressure, as virtio-net does).
 *
 * Errors: packets with no header or the wrong addresses are dropped; malformed ones, unknown
 * ops, non-stream types, VMADDR_PORT_ANY ports, packets for no connection and credit
 * violations are answered with RST; all are counted and logged once per kind.
 */
import type { DescriptorChain } from '../chain.js';
import { scatter, sliceSegments } from '../chain.js';
import { QUEUE_SIZE_MAX, bit, VIRTIO_F_RING_INDIRECT_DESC } from '../constants.js';
import type { QueueIo, VirtioBackend } from '../device.js';
import type { VirtioDeviceIdentity } from '../mmio-state.js';
import {
  EVENT_TRANSPORT_RESET,
  HOST_CID,
  MAX_PKT_PAYLOAD,
  OP_CREDIT_REQUEST,
  OP_CREDIT_UPDATE,
  OP_REQUEST,
  OP_RESPONSE,
  OP_RST,
  OP_RW,
  OP_SHUTDOWN,
  SHUTDOWN_RCV,
  SHUTDOWN_SEND,
  TYPE_STREAM,
  VSOCK_HDR_SIZE,
  type VsockHeader,
  parseConnectLine,
  parsePacket,
  writeHeader,
} from './packet.js';

export const DEVICE_ID_VSOCK = 19;
export const RX_QUEUE = 0;
export const TX_QUEUE = 1;
export const EVENT_QUEUE = 2;
/** What each connection may have in flight towards the host. */
export const BUF_ALLOC = 256 * 1024;
/** Host-initiated connections get local ports from here up (as Firecracker does). */
const FIRST_LOCAL_PORT = 1 << 30;
const MAX_CONNECT_LINE = 32;
/**
 * A host-initiated connection the guest has not answered by then is reset. Firecracker waits
 * 2 s; we wait longer because a guest under nested emulation (our lab, loaded) was seen taking
 * more than 2 s to answer, and a longer wait costs nothing but an fd held a little longer.
 */
export const CONNECT_TIMEOUT_MS = 10_000;
const RX_BATCH = 256;

/** The host's Unix sockets (the device worker's syscalls; tests inject a fake). */
export interface VsockHost {
  /** Connects to a listening Unix socket: the fd, or throws (ENOENT, ECONNREFUSED...). */
  connect(path: string): number;
  /** Accepts on the listening socket: an fd, or -1 when none is pending. */
  accept(): number;
  /** Reads into buffers: bytes, 0 at EOF, -1 when it would block. Throws on errors. */
  read(fd: number, buffers: Uint8Array[]): number;
  /** Writes: bytes, or -1 when it would block. Throws on errors (EPIPE...). */
  write(fd: number, buffers: Uint8Array[]): number;
  shutdownWrite(fd: number): void;
  /** Calls `fn` once after `ms` on the device's thread. */
  after(ms: number, fn: () => void): void;
  /** Stops watching the fd and closes it. */
  close(fd: number): void;
  /** Sets what the fd is watched for; events come back through VsockDevice.onSocket. */
  watch(fd: number, read: boolean, write: boolean): void;
  unwatch(fd: number): void;
}

export interface VsockCounters {
  connectionsGuest: number;
  connectionsHost: number;
  rxPackets: number;
  txPackets: number;
  rxBytes: number;
  txBytes: number;
  /** Packets dropped unanswered (no header, wrong CIDs). */
  dropped: number;
  /** Malformed packets, unknown ops, bad types or ports (answered with RST). */
  malformed: number;
  creditViolations: number;
  resetsSent: number;
  connectFailures: number;
  /** Host-initiated connections the guest did not answer within CONNECT_TIMEOUT_MS. */
  connectTimeouts: number;
  badHandshakes: number;
}

type ConnState = 'host-connecting' | 'established' | 'closing';

interface Conn {
  fd: number;
  /** Host side port (our src_port towards the guest). */
  local: number;
  /** Guest side port. */
  peer: number;
  state: ConnState;
  peerBufAlloc: number;
  peerFwdCnt: number;
  /** Payload bytes sent to the guest (mod 2^32, as the spec counts). */
  txCnt: number;
  /** Payload bytes written to the socket. */
  fwdCnt: number;
  lastFwdCntSent: number;
  /** Guest data not yet written to the socket (<= BUF_ALLOC bytes). */
  pending: Uint8Array[];
  pendingBytes: number;
  /** The guest will send no more (SHUTDOWN SEND): shut the socket's write side once flushed. */
  guestDone: boolean;
  /** The socket reached EOF; SHUTDOWN SEND was queued for the guest. */
  hostEof: boolean;
  creditRequested: boolean;
  watchingRead: boolean;
  watchingWrite: boolean;
  /** Unwatched after a hang-up while nothing was wanted (see onSocket). */
  parked: boolean;
  hupSent: boolean;
}

interface Handshake {
  fd: number;
  line: string;
}

type Control = { conn?: Conn; hdr: VsockHeader };

export function vsockIdentity(cid: number): VirtioDeviceIdentity {
  const config = new Uint8Array(8);
  new DataView(config.buffer).setBigUint64(0, BigInt(cid), true);
  return {
    deviceId: DEVICE_ID_VSOCK,
    features: bit(VIRTIO_F_RING_INDIRECT_DESC),
    queueSizes: [QUEUE_SIZE_MAX, QUEUE_SIZE_MAX, QUEUE_SIZE_MAX],
    config,
  };
}

const key = (local: number, peer: number) => `${local}:${peer}`;

export class VsockDevice implements VirtioBackend {
  readonly selfServed = [RX_QUEUE, EVENT_QUEUE] as const;
  readonly counters: VsockCounters = {
    connectionsGuest: 0,
    connectionsHost: 0,
    rxPackets: 0,
    txPackets: 0,
    rxBytes: 0,
    txBytes: 0,
    dropped: 0,
    malformed: 0,
    creditViolations: 0,
    resetsSent: 0,
    connectFailures: 0,
    connectTimeouts: 0,
    badHandshakes: 0,
  };
  private io: QueueIo | undefined;
  private readonly conns = new Map<string, Conn>();
  private readonly byFd = new Map<number, Conn>();
  private readonly handshakes = new Map<number, Handshake>();
  private readonly control: Control[] = [];
  /** Connections whose socket may have data for the guest. */
  private readonly ready = new Set<Conn>();
  private held: DescriptorChain | undefined;
  private rxBlocked = false;
  private nextLocal = FIRST_LOCAL_PORT;
  private resetEventPending = false;
  private hadConnections = false;
  private readonly logged = new Set<string>();

  constructor(
    readonly name: string,
    readonly cid: number,
    /** `${uds}_${port}` is dialled for guest connections to host port `port`. */
    private readonly uds: string,
    private readonly host: VsockHost,
    private readonly log: (m: string) => void,
  ) {}

  get connectionCount(): number {
    return this.conns.size;
  }

  activate(_features: bigint, io: QueueIo): void {
    this.io = io;
    this.rxBlocked = false;
    // Connections of an earlier driver instance were dropped at its reset; tell the new one.
    if (this.hadConnections) this.resetEventPending = true;
    this.hadConnections = false;
  }

  deactivate(): void {
    this.io = undefined;
    this.held = undefined;
    this.control.length = 0;
    this.ready.clear();
    for (const c of [...this.byFd.values()]) this.closeConn(c);
    for (const hs of this.handshakes.values()) this.host.close(hs.fd);
    this.handshakes.clear();
  }

  /** The listening socket is readable: take new host connections. */
  onListen(): void {
    for (;;) {
      let fd: number;
      try {
        fd = this.host.accept();
      } catch (e) {
        this.logOnce('accept', `accept failed: ${(e as Error).message}`);
        return;
      }
      if (fd < 0) return;
      if (!this.io) {
        this.host.close(fd); // no driver: nobody could accept
        continue;
      }
      this.handshakes.set(fd, { fd, line: '' });
      this.host.watch(fd, true, false);
    }
  }

  /** A connection's socket (or a handshake's) has events. */
  onSocket(fd: number, readable: boolean, writable: boolean, hangup: boolean): void {
    const hs = this.handshakes.get(fd);
    if (hs) {
      this.onHandshake(hs);
      this.processRx();
      return;
    }
    const c = this.byFd.get(fd);
    if (!c) return;
    if (hangup && c.hostEof && c.state === 'established' && !c.hupSent) {
      // The host side is gone both ways: tell the guest (it answers RST once it has read all).
      c.hupSent = true;
      this.sendControl(c, OP_SHUTDOWN, SHUTDOWN_SEND | SHUTDOWN_RCV);
    }
    if (hangup && !c.watchingRead && !c.watchingWrite) {
      // Hang-ups are always reported: stop watching until there is something to do.
      this.host.unwatch(fd);
      c.parked = true;
    }
    if (writable || hangup) this.flush(c);
    if (this.byFd.get(fd) !== c) return;
    if (readable || hangup) this.ready.add(c);
    this.processRx();
  }

  kick(queue: number): void {
    if (queue === RX_QUEUE) {
      this.rxBlocked = false;
      for (const c of this.conns.values()) this.updateWatch(c);
      this.processRx();
    } else if (queue === EVENT_QUEUE) this.deliverEvents();
  }

  /** TX packets from the guest. */
  handle(queue: number, chain: DescriptorChain): number {
    if (queue !== TX_QUEUE) return 0;
    this.counters.txPackets++;
    const p = parsePacket(chain.readable, chain.readableLength, this.cid);
    if (!p.ok) {
      const e = p.error;
      if (e.action === 'drop') this.counters.dropped++;
      else this.counters.malformed++;
      this.guestError(e.kind, `bad packet (${e.kind}): ${e.message}`);
      if (e.action === 'rst' && e.hdr) {
        const c = this.conns.get(key(e.hdr.dstPort, e.hdr.srcPort));
        if (c) this.resetConn(c);
        else if (e.hdr.op !== OP_RST) this.sendRst(e.hdr.dstPort, e.hdr.srcPort);
      }
      this.processRx();
      return 0;
    }
    const { hdr, payload } = p.value;
    const c = this.conns.get(key(hdr.dstPort, hdr.srcPort));
    if (c) {
      c.peerBufAlloc = hdr.bufAlloc;
      c.peerFwdCnt = hdr.fwdCnt;
    }
    switch (hdr.op) {
      case OP_REQUEST:
        if (c) this.resetConn(c);
        else this.guestConnect(hdr);
        break;
      case OP_RESPONSE:
        if (c?.state === 'host-connecting') {
          c.state = 'established';
          // A fresh socket takes a short line whole; a socket that does not is reset.
          const ok = new TextEncoder().encode(`OK ${c.local}\n`);
          const n = this.writeSocket(c, [ok]);
          if (n >= 0 && n < ok.length) this.resetConn(c);
          else if (n >= 0) this.ready.add(c);
        } else if (c) this.resetConn(c);
        else this.sendRst(hdr.dstPort, hdr.srcPort);
        break;
      case OP_RST:
        if (c) this.closeConn(c);
        break;
      case OP_SHUTDOWN:
        if (!c) this.sendRst(hdr.dstPort, hdr.srcPort);
        else this.guestShutdown(c, hdr.flags);
        break;
      case OP_RW:
        if (!c || c.state !== 'established' || c.guestDone) {
          if (c) this.resetConn(c);
          else this.sendRst(hdr.dstPort, hdr.srcPort);
        } else if (c.pendingBytes + hdr.len > BUF_ALLOC) {
          this.counters.creditViolations++;
          this.guestError(
            'credit',
            `credit violation on ${c.peer}->${c.local}: ${hdr.len} bytes with ${BUF_ALLOC - c.pendingBytes} of credit`,
          );
          this.resetConn(c);
        } else {
          this.counters.txBytes += hdr.len;
          this.queueToSocket(c, payload);
        }
        break;
      case OP_CREDIT_UPDATE:
        if (!c) this.sendRst(hdr.dstPort, hdr.srcPort);
        else {
          c.creditRequested = false;
          this.ready.add(c);
        }
        break;
      case OP_CREDIT_REQUEST:
        if (!c) this.sendRst(hdr.dstPort, hdr.srcPort);
        else this.sendControl(c, OP_CREDIT_UPDATE, 0);
        break;
    }
    if (c && this.conns.get(key(c.local, c.peer)) === c) this.updateWatch(c);
    this.processRx();
    return 0;
  }

  // ---- connections ----

  private guestConnect(hdr: VsockHeader): void {
    let fd: number;
    try {
      fd = this.host.connect(`${this.uds}_${hdr.dstPort}`);
    } catch (e) {
      this.counters.connectFailures++;
      this.logOnce('connect', `no host listener for port ${hdr.dstPort}: ${(e as Error).message}`);
      this.sendRst(hdr.dstPort, hdr.srcPort);
      return;
    }
    const c = this.newConn(fd, hdr.dstPort, hdr.srcPort, 'established');
    c.peerBufAlloc = hdr.bufAlloc;
    c.peerFwdCnt = hdr.fwdCnt;
    this.counters.connectionsGuest++;
    this.sendControl(c, OP_RESPONSE, 0);
    this.updateWatch(c);
  }

  private onHandshake(hs: Handshake): void {
    const b = new Uint8Array(1);
    for (;;) {
      let n: number;
      try {
        n = this.host.read(hs.fd, [b]);
      } catch {
        n = 0;
      }
      if (n < 0) return;
      if (n === 0 || hs.line.length >= MAX_CONNECT_LINE) return this.refuseHandshake(hs, 'EOF');
      if (b[0] === 0x0a) break;
      hs.line += String.fromCharCode(b[0]!);
    }
    this.handshakes.delete(hs.fd);
    const port = parseConnectLine(hs.line.replace(/\r$/, ''));
    if (port === undefined || !this.io) return this.refuseHandshake(hs, hs.line);
    let local = this.nextLocal;
    while (this.conns.has(key(local, port)))
      local = local >= 0xffff_fffe ? FIRST_LOCAL_PORT : local + 1;
    this.nextLocal = local >= 0xffff_fffe ? FIRST_LOCAL_PORT : local + 1;
    const c = this.newConn(hs.fd, local, port, 'host-connecting');
    this.counters.connectionsHost++;
    this.sendControl(c, OP_REQUEST, 0);
    this.updateWatch(c);
    this.host.after(CONNECT_TIMEOUT_MS, () => {
      if (c.state !== 'host-connecting' || this.byFd.get(c.fd) !== c) return;
      this.counters.connectTimeouts++;
      this.logOnce('timeout', `guest port ${port} did not answer within ${CONNECT_TIMEOUT_MS} ms`);
      this.resetConn(c); // RST tells the guest, closing the socket tells the host program
      this.processRx();
    });
  }

  private refuseHandshake(hs: Handshake, line: string): void {
    this.counters.badHandshakes++;
    this.logOnce('handshake', `bad host handshake ${JSON.stringify(line.slice(0, 40))}`);
    this.handshakes.delete(hs.fd);
    this.host.close(hs.fd);
  }

  private newConn(fd: number, local: number, peer: number, state: ConnState): Conn {
    const c: Conn = {
      fd,
      local,
      peer,
      state,
      peerBufAlloc: 0,
      peerFwdCnt: 0,
      txCnt: 0,
      fwdCnt: 0,
      lastFwdCntSent: 0,
      pending: [],
      pendingBytes: 0,
      guestDone: false,
      hostEof: false,
      creditRequested: false,
      watchingRead: false,
      watchingWrite: false,
      parked: false,
      hupSent: false,
    };
    this.conns.set(key(local, peer), c);
    this.byFd.set(fd, c);
    this.hadConnections = true;
    return c;
  }

  private guestShutdown(c: Conn, flags: number): void {
    if (flags & SHUTDOWN_SEND) c.guestDone = true;
    if ((flags & (SHUTDOWN_SEND | SHUTDOWN_RCV)) === (SHUTDOWN_SEND | SHUTDOWN_RCV)) {
      // Both directions closed: answer RST (as Linux expects), flush what is left, then close.
      this.sendRst(c.local, c.peer);
      this.forget(c);
      c.state = 'closing';
      this.flush(c);
      return;
    }
    this.flush(c);
  }

  /** Sends RST and drops the connection. */
  private resetConn(c: Conn): void {
    this.sendRst(c.local, c.peer);
    this.closeConn(c);
  }

  private forget(c: Conn): void {
    if (this.conns.get(key(c.local, c.peer)) === c) this.conns.delete(key(c.local, c.peer));
    this.ready.delete(c);
  }

  private closeConn(c: Conn): void {
    this.forget(c);
    if (this.byFd.get(c.fd) === c) {
      this.byFd.delete(c.fd);
      this.host.close(c.fd);
    }
  }

  /** Guest data for the socket: written now if possible, the rest copied and kept. */
  private queueToSocket(c: Conn, data: Uint8Array[]): void {
    const len = data.reduce((a, b) => a + b.length, 0);
    if (len === 0) return;
    if (c.pendingBytes === 0) {
      const n = this.writeSocket(c, data);
      if (n < 0) return; // reset
      this.forwarded(c, Math.min(n, len));
      if (n >= len) return;
      for (const s of sliceSegments(data, n, len - n)) c.pending.push(s.slice());
      c.pendingBytes += len - n;
    } else {
      for (const s of data) c.pending.push(s.slice());
      c.pendingBytes += len;
    }
    this.updateWatch(c);
  }

  /** Writes to the socket; -1 after an error (the connection was reset), else bytes (>= 0). */
  private writeSocket(c: Conn, data: Uint8Array[]): number {
    try {
      const n = this.host.write(c.fd, data);
      return n < 0 ? 0 : n;
    } catch (e) {
      this.logOnce('write', `socket write failed: ${(e as Error).message}`);
      if (c.state === 'closing') this.closeConn(c);
      else this.resetConn(c);
      return -1;
    }
  }

  /** Writes pending data; shuts or closes the socket when the guest is done and all is out. */
  private flush(c: Conn): void {
    while (c.pendingBytes > 0) {
      const n = this.writeSocket(c, c.pending.slice(0, 64));
      if (n < 0) return;
      if (n === 0) break;
      c.pendingBytes -= n;
      this.forwarded(c, n);
      let left = n;
      while (left > 0) {
        const head = c.pending[0]!;
        if (head.length <= left) {
          left -= head.length;
          c.pending.shift();
        } else {
          c.pending[0] = head.subarray(left);
          left = 0;
        }
      }
    }
    if (c.pendingBytes === 0 && c.state === 'closing') {
      this.closeConn(c);
      return;
    }
    if (c.pendingBytes === 0 && c.guestDone) {
      try {
        this.host.shutdownWrite(c.fd);
      } catch {
        // the peer is gone already
      }
    }
    this.updateWatch(c);
  }

  /** Counts bytes forwarded to the socket; tells the guest its credit when it has used a lot. */
  private forwarded(c: Conn, n: number): void {
    c.fwdCnt = (c.fwdCnt + n) >>> 0;
    if (c.state === 'established' && (c.fwdCnt - c.lastFwdCntSent) >>> 0 >= BUF_ALLOC / 4)
      this.sendControl(c, OP_CREDIT_UPDATE, 0);
  }

  private peerCredit(c: Conn): number {
    return Math.max(0, c.peerBufAlloc - ((c.txCnt - c.peerFwdCnt) >>> 0));
  }

  private updateWatch(c: Conn): void {
    if (this.byFd.get(c.fd) !== c) return;
    const read =
      c.state === 'established' && !c.hostEof && !this.rxBlocked && this.peerCredit(c) > 0;
    const write = c.pendingBytes > 0;
    if (c.parked) {
      if (!read && !write) return;
      c.parked = false;
    } else if (read === c.watchingRead && write === c.watchingWrite) return;
    c.watchingRead = read;
    c.watchingWrite = write;
    this.host.watch(c.fd, read, write);
  }

  // ---- packets to the guest ----

  private hdrFor(c: { local: number; peer: number; fwdCnt?: number }, op: number, flags: number) {
    return {
      srcCid: HOST_CID,
      dstCid: this.cid,
      srcPort: c.local,
      dstPort: c.peer,
      len: 0,
      type: TYPE_STREAM,
      op,
      flags,
      bufAlloc: BUF_ALLOC,
      fwdCnt: c.fwdCnt ?? 0,
    };
  }

  private sendControl(c: Conn, op: number, flags: number): void {
    this.control.push({ conn: c, hdr: this.hdrFor(c, op, flags) });
  }

  private sendRst(local: number, peer: number): void {
    this.counters.resetsSent++;
    this.control.push({ hdr: this.hdrFor({ local, peer }, OP_RST, 0) });
  }

  private processRx(): void {
    const io = this.io;
    if (!io) return;
    let used = 0;
    for (let i = 0; i < RX_BATCH && (this.control.length > 0 || this.ready.size > 0); i++) {
      const chain = this.held ?? io.pop(RX_QUEUE);
      this.held = undefined;
      if (!chain) {
        if (!this.rxBlocked) {
          this.rxBlocked = true;
          for (const c of this.conns.values()) this.updateWatch(c);
        }
        break;
      }
      if (chain.writableLength < VSOCK_HDR_SIZE) {
        io.guestError('rx-short', `RX buffer of ${chain.writableLength} bytes`);
        io.pushUsed(RX_QUEUE, chain.head, 0);
        continue;
      }
      const ctl = this.control.shift();
      if (ctl) {
        if (ctl.conn) {
          ctl.hdr.fwdCnt = ctl.conn.fwdCnt;
          ctl.conn.lastFwdCntSent = ctl.conn.fwdCnt;
        }
        this.putHeader(chain, ctl.hdr);
        io.pushUsed(RX_QUEUE, chain.head, VSOCK_HDR_SIZE);
        this.counters.rxPackets++;
        used++;
        continue;
      }
      const c = this.ready.values().next().value as Conn;
      this.ready.delete(c);
      const room = Math.min(chain.writableLength - VSOCK_HDR_SIZE, MAX_PKT_PAYLOAD);
      const credit = this.peerCredit(c);
      if (c.state !== 'established' || c.hostEof || credit === 0 || room === 0) {
        if (c.state === 'established' && credit === 0 && !c.creditRequested) {
          c.creditRequested = true;
          this.sendControl(c, OP_CREDIT_REQUEST, 0);
        }
        this.updateWatch(c);
        this.held = chain;
        continue;
      }
      let n: number;
      try {
        n = this.host.read(
          c.fd,
          sliceSegments(chain.writable, VSOCK_HDR_SIZE, Math.min(room, credit)),
        );
      } catch (e) {
        this.logOnce('read', `socket read failed: ${(e as Error).message}`);
        this.held = chain;
        this.resetConn(c);
        continue;
      }
      if (n < 0) {
        this.held = chain; // nothing there after all
        continue;
      }
      if (n === 0) {
        c.hostEof = true;
        this.sendControl(c, OP_SHUTDOWN, SHUTDOWN_SEND);
        this.updateWatch(c);
        this.held = chain;
        continue;
      }
      const hdr = this.hdrFor(c, OP_RW, 0);
      hdr.len = n;
      c.lastFwdCntSent = c.fwdCnt;
      c.txCnt = (c.txCnt + n) >>> 0;
      this.putHeader(chain, hdr);
      io.pushUsed(RX_QUEUE, chain.head, VSOCK_HDR_SIZE + n);
      this.counters.rxPackets++;
      this.counters.rxBytes += n;
      used++;
      this.ready.add(c); // maybe more: read until it would block
      this.updateWatch(c);
    }
    if (used > 0) io.notify(RX_QUEUE);
  }

  private putHeader(chain: DescriptorChain, h: VsockHeader): void {
    const b = new Uint8Array(VSOCK_HDR_SIZE);
    writeHeader(b, h);
    scatter(chain.writable, b);
  }

  private deliverEvents(): void {
    const io = this.io;
    if (!io || !this.resetEventPending) return;
    const chain = io.pop(EVENT_QUEUE);
    if (!chain) return;
    this.resetEventPending = false;
    const ev = new Uint8Array(4);
    new DataView(ev.buffer).setUint32(0, EVENT_TRANSPORT_RESET, true);
    io.pushUsed(EVENT_QUEUE, chain.head, scatter(chain.writable, ev));
    io.notify(EVENT_QUEUE);
  }

  private guestError(kind: string, message: string): void {
    if (this.io) this.io.guestError(`vsock-${kind}`, `${this.name}: ${message}`);
    else this.logOnce(kind, message);
  }

  private logOnce(kind: string, m: string): void {
    if (this.logged.has(kind)) return;
    this.logged.add(kind);
    this.log(`${this.name}: ${m} (logged once)`);
  }
}

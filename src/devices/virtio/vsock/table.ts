/**
 * The connections of one vsock device and their host sockets: lookup by (host port, guest port)
 * and by fd, the control packets and resets queued for the guest, guest data written to the
 * sockets, what each socket is watched for, and closing. The muxer (muxer.ts) decides what guest
 * packets and socket events mean; this carries it out.
 *
 * Back-pressure: with no RX buffer at all (blockRx) we stop reading every socket until the guest
 * kicks the RX queue (unblockRx), as virtio-net does.
 *
 * Budgets (issue 12: a guest that posts no RX buffers must not grow us): control packets are
 * coalesced (one pending packet per op and connection, one pending RST per port pair, a later
 * one replacing and re-queueing an earlier one), so the per-connection ones are bounded by the
 * connection cap; pending RSTs are capped at MAX_PENDING_RESETS, beyond which they are dropped
 * and counted (a guest that never reads its RSTs does not need them all; one that keeps talking
 * to a dead connection gets another). Connections are capped at MAX_CONNECTIONS open sockets.
 */
import { scatter } from '../chain.js';
import { BUF_ALLOC, Connection, type ConnectionState } from './connection.js';
import type { VsockCounters, VsockHost, VsockReport } from './host.js';
import {
  HOST_CID,
  OP_CREDIT_REQUEST,
  OP_CREDIT_UPDATE,
  OP_REQUEST,
  OP_RESPONSE,
  OP_RST,
  OP_SHUTDOWN,
  TYPE_STREAM,
  VSOCK_HDR_SIZE,
  type VsockHeader,
  writeHeaderAt,
} from './packet.js';

/** A control packet for the guest; with `conn`, its fwd_cnt is filled in when it is sent. */
type Control = { conn?: Connection; hdr: VsockHeader };

const key = (local: number, peer: number) => `${local}:${peer}`;
/** The queue key of a control packet: at most one per (op, port pair) waits for the guest. */
const controlKey = (op: number, local: number, peer: number) => `${op}:${local}:${peer}`;
/** The ops of control packets tied to a live connection (dropped when it closes). */
const CONNECTION_OPS = [OP_REQUEST, OP_RESPONSE, OP_SHUTDOWN, OP_CREDIT_UPDATE, OP_CREDIT_REQUEST];

/**
 * Open sockets of guest connections (closing ones included) per device. Firecracker allows
 * 1023; beyond it a guest REQUEST gets RST and a host connection is closed, both counted.
 */
export const MAX_CONNECTIONS = 1024;
/**
 * Of those, each side's own connections (the guest's REQUESTs, host programs' CONNECTs) hold at
 * most this many sockets, so that the other side always has 128: a guest opening connections
 * to a host listener cannot shut host programs out of the guest, nor the reverse.
 */
export const MAX_CONNECTIONS_PER_SIDE = MAX_CONNECTIONS - 128;
/** RSTs waiting for the guest to post RX buffers; more are dropped and counted. */
export const MAX_PENDING_RESETS = 1024;
/**
 * A connection the guest closed both ways gets this long for the host program to take what is
 * still buffered for it (Firecracker: CONN_SHUTDOWN_TIMEOUT_MS, 2 s); then it is closed
 * anyway (counted), so a host program that never reads cannot hold a descriptor forever.
 */
export const CLOSE_LINGER_MS = 2_000;

export class ConnectionTable {
  private readonly conns = new Map<string, Connection>();
  /** Every connection with an open socket, including closing ones (no longer in `conns`). */
  private readonly byFd = new Map<number, Connection>();
  /** Control packets for the guest, in order; keys from controlKey (see the budgets above). */
  private readonly control = new Map<string, Control>();
  private resetsQueued = 0;
  /** Sockets held by connections host programs made (the rest: the guest's). */
  private hostSockets = 0;
  /** Connections whose socket may have data for the guest. */
  readonly ready = new Set<Connection>();
  private rxBlocked = false;

  constructor(
    private readonly cid: number,
    private readonly host: VsockHost,
    private readonly counters: VsockCounters,
    private readonly report: VsockReport,
  ) {}

  get size(): number {
    return this.conns.size;
  }

  /** Connections in the table for which `pred` holds. */
  count(pred: (c: Connection) => boolean): number {
    let n = 0;
    for (const c of this.conns.values()) if (pred(c)) n++;
    return n;
  }

  /** Sockets held by connections, closing ones included (what MAX_CONNECTIONS caps). */
  get sockets(): number {
    return this.byFd.size;
  }

  /** Control packets waiting for RX buffers. */
  get controlQueued(): number {
    return this.control.size;
  }

  /**
   * Is there room for one more connection made by a host program (`fromHost`) or the guest?
   * If not, counts the refusal and logs it once.
   */
  roomForConnection(who: string, fromHost: boolean): boolean {
    const side = fromHost ? this.hostSockets : this.byFd.size - this.hostSockets;
    if (this.byFd.size < MAX_CONNECTIONS && side < MAX_CONNECTIONS_PER_SIDE) return true;
    this.counters.connsRefused++;
    if (this.byFd.size >= MAX_CONNECTIONS) {
      const m = `connection table full (${MAX_CONNECTIONS} connections): ${who} refused`;
      this.report.logOnce('conn-cap', m);
    } else {
      const whose = fromHost ? 'host programs hold' : 'the guest holds';
      const m = `${whose} ${MAX_CONNECTIONS_PER_SIDE} connections, the most one side may: ${who} refused`;
      this.report.logOnce(fromHost ? 'conn-cap-host' : 'conn-cap-guest', m);
    }
    return false;
  }

  /** Guest data held for host sockets, and the storage it takes (bytes). */
  buffered(): { bytes: number; allocated: number } {
    let bytes = 0;
    let allocated = 0;
    for (const c of this.byFd.values()) {
      bytes += c.pending.bytes;
      allocated += c.pending.allocated;
    }
    return { bytes, allocated };
  }

  find(local: number, peer: number): Connection | undefined {
    return this.conns.get(key(local, peer));
  }

  /** The connection owning socket `fd` (closing ones included). */
  withFd(fd: number): Connection | undefined {
    return this.byFd.get(fd);
  }

  /**
   * Is the connection still in the table (not closed, not closing)? Asked for every RX packet,
   * so it is a flag kept by add() and forget(), not a look-up by a key string.
   */
  listed(c: Connection): boolean {
    return c.inTable;
  }

  /** Is the connection's socket still open? */
  open(c: Connection): boolean {
    return this.byFd.get(c.fd) === c;
  }

  add(
    fd: number,
    local: number,
    peer: number,
    state: ConnectionState,
    /** A host program made it (its socket is then watched for reading: its handshake was). */
    fromHost = false,
  ): Connection {
    const c = new Connection(fd, local, peer, state, fromHost);
    if (fromHost) this.hostSockets++;
    const k = key(local, peer);
    const before = this.conns.get(k);
    if (before) before.inTable = false; // callers look first: not expected
    this.conns.set(k, c);
    c.inTable = true;
    this.byFd.set(fd, c);
    return c;
  }

  /** Takes the connection out of the table; its socket stays open (closing). */
  forget(c: Connection): void {
    if (c.inTable) {
      this.conns.delete(key(c.local, c.peer));
      c.inTable = false;
    }
    this.ready.delete(c);
  }

  close(c: Connection): void {
    this.forget(c);
    for (const op of CONNECTION_OPS) {
      const k = controlKey(op, c.local, c.peer);
      if (this.control.get(k)?.conn === c) this.control.delete(k);
    }
    c.pending.clear();
    c.clearDeadline();
    if (this.open(c)) {
      this.byFd.delete(c.fd);
      if (c.fromHost) this.hostSockets--;
      this.host.close(c.fd);
    }
  }

  /** Sends RST and drops the connection. */
  reset(c: Connection): void {
    this.sendRst(c.local, c.peer);
    this.close(c);
  }

  /** The driver is gone: every socket is closed, queued packets dropped. */
  closeAll(): void {
    this.control.clear();
    this.resetsQueued = 0;
    this.ready.clear();
    for (const c of [...this.byFd.values()]) this.close(c);
  }

  // ---- control packets for the guest ----

  header(c: { local: number; peer: number; fwdCnt?: number }, op: number, flags: number) {
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

  /**
   * Queues a control packet of connection `c` for the guest. One of the same op already waiting
   * is replaced (and moves to the back); SHUTDOWN flags accumulate.
   */
  sendControl(c: Connection, op: number, flags: number): void {
    const k = controlKey(op, c.local, c.peer);
    const before = this.control.get(k);
    if (before) {
      this.control.delete(k);
      if (op === OP_SHUTDOWN) flags |= before.hdr.flags;
      this.counters.controlCoalesced++;
    }
    this.control.set(k, { conn: c, hdr: this.header(c, op, flags) });
  }

  /** Queues an RST for the port pair: coalesced with one already waiting; dropped when full. */
  sendRst(local: number, peer: number): void {
    const k = controlKey(OP_RST, local, peer);
    if (this.control.delete(k)) {
      this.counters.controlCoalesced++;
      this.resetsQueued--;
    } else if (this.resetsQueued >= MAX_PENDING_RESETS) {
      this.counters.rstDropped++;
      this.report.logOnce(
        'rst-cap',
        `${MAX_PENDING_RESETS} RSTs wait for RX buffers the guest does not post: more are dropped`,
      );
      return;
    }
    this.counters.resetsSent++;
    this.resetsQueued++;
    this.control.set(k, { hdr: this.header({ local, peer }, OP_RST, 0) });
  }

  hasRxWork(): boolean {
    return this.control.size > 0 || this.ready.size > 0;
  }

  /** Puts the next control packet in an RX buffer: its length, or 0 when none is queued. */
  takeControl(buffers: readonly Uint8Array[]): number {
    if (this.control.size === 0) return 0; // the common case: no iterator made
    const first = this.control.entries().next();
    if (first.done) return 0;
    const [k, ctl] = first.value;
    this.control.delete(k);
    if (ctl.hdr.op === OP_RST) this.resetsQueued--;
    else if (ctl.hdr.op === OP_CREDIT_UPDATE) this.counters.creditUpdatesSent++;
    if (ctl.conn) {
      ctl.hdr.fwdCnt = ctl.conn.fwdCnt;
      ctl.conn.fwdCntTold();
    }
    putHeader(buffers, ctl.hdr);
    return VSOCK_HDR_SIZE;
  }

  // ---- sockets ----

  /** Guest data for the socket: written now if possible, the rest copied and kept. */
  queueToSocket(c: Connection, data: Uint8Array[]): void {
    const len = data.reduce((a, b) => a + b.length, 0);
    if (len === 0) return;
    if (c.pending.bytes === 0) {
      const n = this.writeSocket(c, data);
      if (n < 0) return; // reset
      this.forwarded(c, Math.min(n, len));
      if (n >= len) return;
      c.pending.keep(data, n, len);
    } else c.pending.keep(data, 0, len);
    this.updateWatch(c);
  }

  /** Writes to the socket; -1 after an error (the connection was dropped), else bytes (>= 0). */
  writeSocket(c: Connection, data: Uint8Array[]): number {
    try {
      const n = this.host.write(c.fd, data);
      return n < 0 ? 0 : n;
    } catch (e) {
      this.report.logOnce('write', `socket write failed: ${(e as Error).message}`);
      if (c.state.kind === 'closing') this.close(c);
      else this.reset(c);
      return -1;
    }
  }

  /**
   * The guest closed both directions: the connection leaves the table and lingers until its
   * pending data is out, for at most CLOSE_LINGER_MS.
   */
  linger(c: Connection): void {
    this.forget(c);
    c.state = { kind: 'closing' };
    this.flush(c);
    if (!this.open(c)) return;
    c.deadline = this.host.after(CLOSE_LINGER_MS, () => {
      c.deadline = undefined;
      if (!this.open(c)) return;
      this.counters.connsKilled++;
      const m = `a host socket took less than the guest sent within ${CLOSE_LINGER_MS} ms of its close`;
      this.report.logOnce('linger', `${m}: closed with ${c.pending.bytes} bytes unsent`);
      this.close(c);
    });
  }

  /** Writes pending data; shuts or closes the socket when the guest is done and all is out. */
  flush(c: Connection): void {
    while (c.pending.bytes > 0) {
      const n = this.writeSocket(c, c.pending.head());
      if (n < 0) return;
      if (n === 0) break;
      c.pending.consume(n);
      this.forwarded(c, n);
    }
    if (c.pending.bytes === 0 && c.state.kind === 'closing') {
      this.close(c);
      return;
    }
    if (c.pending.bytes === 0 && c.guestSendShut) {
      try {
        this.host.shutdownWrite(c.fd);
      } catch {
        // the peer is gone already
      }
    }
    this.updateWatch(c);
  }

  private forwarded(c: Connection, n: number): void {
    if (c.forwarded(n)) this.sendControl(c, OP_CREDIT_UPDATE, 0);
  }

  updateWatch(c: Connection): void {
    if (!this.open(c)) return;
    const w = c.rewatch(this.rxBlocked);
    if (w) this.host.watch(c.fd, w.read, w.write);
  }

  /** The guest gave no RX buffer: stop reading sockets. */
  blockRx(): void {
    if (this.rxBlocked) return;
    this.rxBlocked = true;
    for (const c of this.conns.values()) this.updateWatch(c);
  }

  /** The guest kicked the RX queue: read sockets again (nothing to do if they were read). */
  unblockRx(): void {
    if (!this.rxBlocked) return;
    this.rxBlocked = false;
    for (const c of this.conns.values()) this.updateWatch(c);
  }
}

export function putHeader(buffers: readonly Uint8Array[], h: VsockHeader): void {
  writeHeaderAt(headerView, h);
  const first = buffers[0];
  // Linux puts the header in a buffer of its own or at the start of one (no slicing then).
  if (first !== undefined && first.length >= VSOCK_HDR_SIZE) first.set(headerBytes);
  else scatter(buffers, headerBytes);
}

/** putHeader's scratch: one header at a time, copied out before it returns. */
const headerBytes = new Uint8Array(VSOCK_HDR_SIZE);
const headerView = new DataView(headerBytes.buffer);

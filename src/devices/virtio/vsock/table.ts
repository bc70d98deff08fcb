/**
 * The connections of one vsock device and their host sockets: lookup by (host port, guest port)
 * and by fd, the control packets and resets queued for the guest, guest data written to the
 * sockets, what each socket is watched for, and closing. The muxer (muxer.ts) decides what guest
 * packets and socket events mean; this carries it out.
 *
 * Back-pressure: with no RX buffer at all (blockRx) we stop reading every socket until the guest
 * kicks the RX queue (unblockRx), as virtio-net does.
 */
import { scatter } from '../chain.js';
import { BUF_ALLOC, Connection, type ConnectionState } from './connection.js';
import type { VsockCounters, VsockHost, VsockReport } from './host.js';
import {
  HOST_CID,
  OP_CREDIT_UPDATE,
  OP_RST,
  TYPE_STREAM,
  VSOCK_HDR_SIZE,
  type VsockHeader,
  writeHeader,
} from './packet.js';

/** A control packet for the guest; with `conn`, its fwd_cnt is filled in when it is sent. */
type Control = { conn?: Connection; hdr: VsockHeader };

const key = (local: number, peer: number) => `${local}:${peer}`;

export class ConnectionTable {
  private readonly conns = new Map<string, Connection>();
  /** Every connection with an open socket, including closing ones (no longer in `conns`). */
  private readonly byFd = new Map<number, Connection>();
  private readonly control: Control[] = [];
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

  find(local: number, peer: number): Connection | undefined {
    return this.conns.get(key(local, peer));
  }

  /** The connection owning socket `fd` (closing ones included). */
  withFd(fd: number): Connection | undefined {
    return this.byFd.get(fd);
  }

  /** Is the connection still in the table (not closed, not closing)? */
  listed(c: Connection): boolean {
    return this.conns.get(key(c.local, c.peer)) === c;
  }

  /** Is the connection's socket still open? */
  open(c: Connection): boolean {
    return this.byFd.get(c.fd) === c;
  }

  add(fd: number, local: number, peer: number, state: ConnectionState): Connection {
    const c = new Connection(fd, local, peer, state);
    this.conns.set(key(local, peer), c);
    this.byFd.set(fd, c);
    return c;
  }

  /** Takes the connection out of the table; its socket stays open (closing). */
  forget(c: Connection): void {
    if (this.listed(c)) this.conns.delete(key(c.local, c.peer));
    this.ready.delete(c);
  }

  close(c: Connection): void {
    this.forget(c);
    if (this.open(c)) {
      this.byFd.delete(c.fd);
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
    this.control.length = 0;
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

  sendControl(c: Connection, op: number, flags: number): void {
    this.control.push({ conn: c, hdr: this.header(c, op, flags) });
  }

  sendRst(local: number, peer: number): void {
    this.counters.resetsSent++;
    this.control.push({ hdr: this.header({ local, peer }, OP_RST, 0) });
  }

  hasRxWork(): boolean {
    return this.control.length > 0 || this.ready.size > 0;
  }

  /** Puts the next control packet in an RX buffer: its length, or 0 when none is queued. */
  takeControl(buffers: readonly Uint8Array[]): number {
    const ctl = this.control.shift();
    if (!ctl) return 0;
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

  /** The guest kicked the RX queue: read sockets again. */
  unblockRx(): void {
    this.rxBlocked = false;
    for (const c of this.conns.values()) this.updateWatch(c);
  }
}

export function putHeader(buffers: readonly Uint8Array[], h: VsockHeader): void {
  const b = new Uint8Array(VSOCK_HDR_SIZE);
  writeHeader(b, h);
  scatter(buffers, b);
}

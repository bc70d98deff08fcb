/**
 * The connection side of virtio-vsock: what each guest packet does to the connection table
 * (virtio 1.2 §5.10.6.4), host programs dialling in through the listener, local port allocation
 * for them and the time the guest has to answer, and filling RX buffers: queued control
 * packets and resets first, then data read from the sockets, within the guest's credit. The
 * device hands it parsed TX packets and RX buffers; it never sees a virtqueue.
 *
 * With no credit from the guest we stop reading that socket and ask with CREDIT_REQUEST, once
 * per stall: a CREDIT_UPDATE that still gives no credit is not asked again (the guest sends
 * one by itself when it frees space), so a stuck connection does not ping-pong. Nor does a
 * busy one: the stall ends only when the guest gives back at least half its buffer
 * (Connection.stallOver). A Linux guest volunteers CREDIT_UPDATE once it has consumed all but
 * 64 KiB of what it last told; asking each time the credit ran out would draw an answer with
 * the little it had read so far, then a few packets, then another question: two packets and two
 * notifications per few KiB of a bulk transfer.
 *
 * Host reads are large (issue 17): one readv takes up to RX_READ_BYTES (within the guest's
 * credit) into the RX buffer at hand and, past it, into a staging buffer of the device; the
 * next RX buffers are filled from there by copying, one packet each, before any socket is read
 * again. So one syscall feeds many packets (a Linux guest posts 4 KiB buffers). There is one
 * staging buffer per device, filled only when empty: what is read ahead is bounded by
 * RX_READ_BYTES whatever the number of connections, and it is never more than the guest's
 * credit allowed when it was read. A read shorter than asked means the socket is drained: it is
 * not read again until the loop reports it readable (level-triggered), so an idle socket is
 * never polled.
 */
import { sliceSegments } from '../chain.js';
import { type Connection, type GuestSend } from './connection.js';
import { type VsockHost, type VsockReport, zeroCounters } from './host.js';
import { HostListener, MAX_PENDING_HANDSHAKES } from './listener.js';
import {
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
  VSOCK_HDR_SIZE,
  type VsockHeader,
} from './packet.js';
import { ConnectionTable, putHeader } from './table.js';

/** Host-initiated connections get local ports from here up (as Firecracker does). */
const FIRST_LOCAL_PORT = 1 << 30;
const LAST_LOCAL_PORT = 0xffff_fffe;
/**
 * A host-initiated connection the guest has not answered by then is reset. Firecracker waits
 * 2 s; we wait longer because a guest under nested emulation (our lab, loaded) was seen taking
 * more than 2 s to answer, and a longer wait costs nothing but an fd held a little longer.
 */
export const CONNECT_TIMEOUT_MS = 10_000;

const nextPort = (p: number) => (p >= LAST_LOCAL_PORT ? FIRST_LOCAL_PORT : p + 1);

/** The most one socket read takes for the guest (the RX buffer at hand plus the stage). */
export const RX_READ_BYTES = 128 * 1024;

/** Bytes read from a connection's socket ahead of the guest's RX buffers (see above). */
interface Staged {
  conn: Connection;
  /** The bytes not yet in an RX buffer are stage[at, end). */
  at: number;
  end: number;
  /** The read filled all it asked for: the socket may have more (read it once this is out). */
  more: boolean;
}

export class VsockMuxer {
  readonly counters = zeroCounters();
  private readonly table: ConnectionTable;
  private readonly listener: HostListener;
  /** A driver is there (between start() and stop()). */
  private running = false;
  private nextLocal = FIRST_LOCAL_PORT;
  private connectedSinceStart = false;
  /** The staging buffer (allocated on first use, released at stop()) and what it holds. */
  private stage: Buffer | undefined;
  /** rwHeader's header, reused. */
  private rw: VsockHeader | undefined;
  private staged: Staged | undefined;

  constructor(
    cid: number,
    /** `${uds}_${port}` is dialled for guest connections to host port `port`. */
    private readonly uds: string,
    private readonly host: VsockHost,
    private readonly report: VsockReport,
    /** Asks the device to fill RX buffers (after a timer fired). */
    private readonly wake: () => void,
  ) {
    this.table = new ConnectionTable(cid, host, this.counters, report);
    this.listener = new HostListener(
      host,
      this.counters,
      report,
      (fd, port) => this.hostConnect(fd, port),
      () => this.table.count((c) => c.state.kind === 'host-connecting'),
    );
  }

  get connectionCount(): number {
    return this.table.size;
  }

  budgets() {
    const b = this.table.buffered();
    return {
      controlQueued: this.table.controlQueued,
      sockets: this.table.sockets,
      handshakes: this.listener.pendingHandshakes,
      bufferedBytes: b.bytes,
      bufferAllocated: b.allocated,
      stagedBytes: this.stagedBytes,
    };
  }

  /** Were connections made since the last start()? (The driver that had them must be told.) */
  get hadConnections(): boolean {
    return this.connectedSinceStart;
  }

  /** A driver is there; returns whether connections were made since the previous start(). */
  start(): boolean {
    const had = this.connectedSinceStart;
    this.running = true;
    this.table.unblockRx();
    this.connectedSinceStart = false;
    return had;
  }

  /** The driver is gone: every connection and handshake is closed, queued packets dropped. */
  stop(): void {
    this.running = false;
    this.staged = undefined;
    this.stage = undefined;
    this.table.closeAll();
    this.listener.closeAll();
  }

  onListen(): void {
    this.listener.accept(this.running);
  }

  /** Socket events; returns whether there may be RX work now. */
  onSocket(fd: number, readable: boolean, writable: boolean, hangup: boolean): boolean {
    if (this.listener.handles(fd)) {
      this.listener.onReadable(fd, this.running);
      return true;
    }
    const c = this.table.withFd(fd);
    if (!c) return false;
    const s = c.state;
    if (hangup && s.kind === 'established' && s.hostSend === 'eof') {
      // The host side is gone both ways: tell the guest (it answers RST once it has read all).
      s.hostSend = 'hung-up';
      this.table.sendControl(c, OP_SHUTDOWN, SHUTDOWN_SEND | SHUTDOWN_RCV);
    }
    if (hangup && c.parkOnHangup()) this.host.unwatch(fd);
    if (writable || hangup) this.table.flush(c);
    if (!this.table.open(c)) return false;
    if (readable || hangup) this.table.ready.add(c);
    return true;
  }

  /** A TX packet that failed parsing but can be answered: reset what it names. */
  refuse(hdr: VsockHeader): void {
    const c = this.table.find(hdr.dstPort, hdr.srcPort);
    if (c) this.table.reset(c);
    else if (hdr.op !== OP_RST) this.table.sendRst(hdr.dstPort, hdr.srcPort);
  }

  /** A well-formed TX packet. */
  fromGuest(hdr: VsockHeader, payload: Uint8Array[]): void {
    const t = this.table;
    const c = t.find(hdr.dstPort, hdr.srcPort);
    if (!c) {
      if (hdr.op === OP_REQUEST) this.guestConnect(hdr);
      else if (hdr.op !== OP_RST) t.sendRst(hdr.dstPort, hdr.srcPort);
      return;
    }
    c.notePeerCredit(hdr);
    const s = c.state;
    if (s.kind === 'established' && c.stallOver()) s.creditRequested = false;
    switch (hdr.op) {
      case OP_REQUEST:
        t.reset(c);
        break;
      case OP_RESPONSE:
        if (s.kind === 'host-connecting') this.guestAccepted(c, s.guestSend);
        else t.reset(c);
        break;
      case OP_RST:
        t.close(c);
        break;
      case OP_SHUTDOWN:
        this.guestShutdown(c, hdr.flags);
        break;
      case OP_RW:
        if (s.kind !== 'established' || s.guestSend === 'shut') t.reset(c);
        else if (hdr.len > c.pending.free) {
          this.counters.creditViolations++;
          const credit = c.pending.free;
          const m = `credit violation on ${c.peer}->${c.local}: ${hdr.len} bytes with ${credit} of credit`;
          this.report.guestError('credit', m);
          t.reset(c);
        } else {
          this.counters.txBytes += hdr.len;
          t.queueToSocket(c, payload);
        }
        break;
      case OP_CREDIT_UPDATE:
        t.ready.add(c);
        break;
      case OP_CREDIT_REQUEST:
        t.sendControl(c, OP_CREDIT_UPDATE, 0);
        break;
    }
    if (t.listed(c)) t.updateWatch(c);
  }

  private guestConnect(hdr: VsockHeader): void {
    const who = `guest port ${hdr.srcPort} -> host port ${hdr.dstPort}`;
    if (!this.table.roomForConnection(who, false)) {
      this.table.sendRst(hdr.dstPort, hdr.srcPort);
      return;
    }
    let fd: number;
    try {
      fd = this.host.connect(`${this.uds}_${hdr.dstPort}`);
    } catch (e) {
      this.counters.connectFailures++;
      const m = `no host listener for port ${hdr.dstPort}: ${(e as Error).message}`;
      this.report.logOnce('connect', m);
      this.table.sendRst(hdr.dstPort, hdr.srcPort);
      return;
    }
    const c = this.table.add(fd, hdr.dstPort, hdr.srcPort, {
      kind: 'established',
      guestSend: 'open',
      hostSend: 'open',
      creditRequested: false,
    });
    this.connectedSinceStart = true;
    c.notePeerCredit(hdr);
    this.counters.connectionsGuest++;
    this.table.sendControl(c, OP_RESPONSE, 0);
    this.table.updateWatch(c);
  }

  /** A host program asked for guest port `port`: offer it to the guest, for a while. */
  private hostConnect(fd: number, port: number): void {
    if (!this.table.roomForConnection(`a host connection to guest port ${port}`, true)) {
      this.host.close(fd);
      return;
    }
    // Host programs may not fill the table with connections the guest does not answer.
    if (this.table.count((c) => c.state.kind === 'host-connecting') >= MAX_PENDING_HANDSHAKES) {
      this.counters.handshakesRefused++;
      const m = `${MAX_PENDING_HANDSHAKES} host connections wait for the guest: one more closed`;
      this.report.logOnce('host-connect-cap', m);
      this.host.close(fd);
      return;
    }
    let local = this.nextLocal;
    while (this.table.find(local, port)) local = nextPort(local);
    this.nextLocal = nextPort(local);
    // Its handshake watched the socket for reading: updateWatch turns that off until the guest
    // accepts, so bytes sent after the CONNECT line do not keep the loop busy meanwhile.
    const c = this.table.add(fd, local, port, { kind: 'host-connecting', guestSend: 'open' }, true);
    this.connectedSinceStart = true;
    this.counters.connectionsHost++;
    this.table.sendControl(c, OP_REQUEST, 0);
    this.table.updateWatch(c);
    c.deadline = this.host.after(CONNECT_TIMEOUT_MS, () => {
      c.deadline = undefined;
      if (c.state.kind !== 'host-connecting' || !this.table.open(c)) return;
      this.counters.connectTimeouts++;
      const m = `guest port ${port} did not answer within ${CONNECT_TIMEOUT_MS} ms`;
      this.report.logOnce('timeout', m);
      this.table.reset(c); // RST tells the guest, closing the socket tells the host program
      this.wake();
    });
  }

  /** The guest accepted a host-initiated connection: "OK <port>\n" to the host program. */
  private guestAccepted(c: Connection, guestSend: GuestSend): void {
    c.clearDeadline();
    c.state = { kind: 'established', guestSend, hostSend: 'open', creditRequested: false };
    // A fresh socket takes a short line whole; a socket that does not is reset.
    const ok = new TextEncoder().encode(`OK ${c.local}\n`);
    const n = this.table.writeSocket(c, [ok]);
    if (n >= 0 && n < ok.length) this.table.reset(c);
    else if (n >= 0) this.table.ready.add(c);
  }

  private guestShutdown(c: Connection, flags: number): void {
    if (flags & SHUTDOWN_SEND && c.state.kind !== 'closing') c.state.guestSend = 'shut';
    if ((flags & (SHUTDOWN_SEND | SHUTDOWN_RCV)) === (SHUTDOWN_SEND | SHUTDOWN_RCV)) {
      // Both directions closed: answer RST (as Linux expects), flush what is left, then close.
      this.table.sendRst(c.local, c.peer);
      this.table.linger(c);
      return;
    }
    this.table.flush(c);
  }

  // ---- packets to the guest ----

  hasRxWork(): boolean {
    return this.staged !== undefined || this.table.hasRxWork();
  }

  /** Bytes read from a socket and not yet in an RX buffer (at most RX_READ_BYTES). */
  get stagedBytes(): number {
    return this.staged ? this.staged.end - this.staged.at : 0;
  }

  blockRx(): void {
    this.table.blockRx();
  }

  unblockRx(): void {
    this.table.unblockRx();
  }

  /**
   * Fills one RX buffer of `length` >= VSOCK_HDR_SIZE bytes with the next packet: its length,
   * or 0 when nothing was put in (the caller keeps the buffer for the next packet), or -1 when
   * the buffer has room for a header only and the next packet is data: the caller returns it
   * unused (holding it would leave the socket readable and watched, with every wake-up failing
   * the same way: a busy loop), and the data waits for the next buffer.
   */
  fillRx(buffers: readonly Uint8Array[], length: number): number {
    const t = this.table;
    const sent = t.takeControl(buffers);
    if (sent > 0) return sent;
    const room = Math.min(length - VSOCK_HDR_SIZE, MAX_PKT_PAYLOAD);
    if (this.staged) return this.fillFromStage(buffers, room);
    const c = t.ready.values().next().value as Connection;
    t.ready.delete(c);
    const credit = c.peerCredit();
    const s = c.state;
    if (s.kind === 'established' && s.hostSend === 'open' && credit > 0 && room === 0) {
      t.ready.add(c);
      return -1;
    }
    if (s.kind !== 'established' || s.hostSend !== 'open' || credit === 0 || room === 0) {
      if (s.kind === 'established' && credit === 0 && !s.creditRequested) {
        s.creditRequested = true;
        t.sendControl(c, OP_CREDIT_REQUEST, 0);
      }
      t.updateWatch(c);
      return 0;
    }
    // One read: into this buffer first, the rest (up to RX_READ_BYTES, within credit) staged.
    const want = Math.min(credit, RX_READ_BYTES);
    const direct = Math.min(room, want);
    const iov = sliceSegments(buffers, VSOCK_HDR_SIZE, direct);
    if (want > direct)
      iov.push((this.stage ??= Buffer.allocUnsafeSlow(RX_READ_BYTES)).subarray(0, want - direct));
    let n: number;
    try {
      n = this.host.read(c.fd, iov);
    } catch (e) {
      this.report.logOnce('read', `socket read failed: ${(e as Error).message}`);
      t.reset(c);
      return 0;
    }
    this.counters.rxReads++;
    if (n < 0) return 0; // nothing there after all
    if (n === 0) {
      s.hostSend = 'eof';
      t.sendControl(c, OP_SHUTDOWN, SHUTDOWN_SEND);
      t.updateWatch(c);
      return 0;
    }
    const k = Math.min(n, direct);
    if (n > k) this.staged = { conn: c, at: 0, end: n - k, more: n === want };
    else if (n === want) t.ready.add(c); // it filled the read: maybe more there
    // else: the socket is drained; the loop tells us when it is readable again.
    this.rwHeader(buffers, c, k);
    t.updateWatch(c);
    return VSOCK_HDR_SIZE + k;
  }

  /** The next packet from the stage (its connection's data go out before any other read). */
  private fillFromStage(buffers: readonly Uint8Array[], room: number): number {
    const st = this.staged!;
    const c = st.conn;
    const t = this.table;
    // Reset, closed or shut by the guest meanwhile: what was read for it is dropped.
    if (!t.listed(c) || c.state.kind !== 'established') {
      this.staged = undefined;
      return 0;
    }
    if (room === 0) return -1;
    const k = Math.min(room, st.end - st.at);
    copyAfterHeader(this.stage!, st.at, k, buffers);
    st.at += k;
    if (st.at === st.end) {
      this.staged = undefined;
      if (st.more) t.ready.add(c);
    }
    this.rwHeader(buffers, c, k);
    return VSOCK_HDR_SIZE + k;
  }

  /** The OP_RW header of `n` payload bytes of `c` (its credit accounting follows). */
  private rwHeader(buffers: readonly Uint8Array[], c: Connection, n: number): void {
    // One header object for every RW packet (putHeader copies it out at once); what is not the
    // connection's (CIDs, type, op, buf_alloc) is the table's, which this muxer keeps for life.
    const hdr = (this.rw ??= this.table.header(c, OP_RW, 0));
    hdr.srcPort = c.local;
    hdr.dstPort = c.peer;
    hdr.fwdCnt = c.fwdCnt;
    hdr.len = n;
    c.sentToGuest(n);
    putHeader(buffers, hdr);
  }
}

/**
 * Copies `n` bytes of `src` from `at` into `buffers` after the packet header (the RX buffer's
 * data), without the views a slice per segment would make: Buffer.copy takes offsets.
 */
function copyAfterHeader(src: Buffer, at: number, n: number, buffers: readonly Uint8Array[]): void {
  let pos = 0; // of the segment's start, in the chain's writable bytes
  let from = at;
  const end = at + n;
  for (const seg of buffers) {
    if (from >= end) break;
    const segEnd = pos + seg.length;
    if (segEnd > VSOCK_HDR_SIZE) {
      const into = Math.max(0, VSOCK_HDR_SIZE - pos);
      from += src.copy(seg, into, from, Math.min(end, from + seg.length - into));
    }
    pos = segEnd;
  }
}

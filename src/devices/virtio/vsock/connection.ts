/**
 * One virtio-vsock stream connection between a guest port and a host Unix socket: where it is in
 * its life (a discriminated union, so facts that only hold in one state live in that variant),
 * the credit accounting of virtio 1.2 §5.10.6.3 and the guest data waiting for the socket.
 * No I/O here: the muxer reads, writes and watches the socket and acts on what this says.
 *
 * Flow control: every packet we send carries buf_alloc = BUF_ALLOC and fwd_cnt = the bytes we
 * have written to the socket, so the guest may have at most BUF_ALLOC bytes in flight towards us
 * and `pending` never holds more (a guest sending more is reset by the muxer). We send the guest
 * at most its advertised credit: peer buf_alloc - (tx_cnt - peer fwd_cnt), counted mod 2^32.
 */
import { sliceSegments } from '../chain.js';
import type { VsockHeader } from './packet.js';

/** What each connection may have in flight towards the host. */
export const BUF_ALLOC = 256 * 1024;
/**
 * A CREDIT_UPDATE is volunteered once this much was forwarded since the guest last heard (our
 * OP_RW headers tell it too). A quarter of BUF_ALLOC: a sender that used all its credit hears
 * again well before the rest is gone. (Half of it was tried for issue 17: in one lab run guest ->
 * host fell to 3.1 MB/s beside 4.7 for the base, the guest waiting for credit; an update per
 * 64 KiB costs an RX packet and an interrupt, but a stalled sender costs more.)
 */
export const CREDIT_UPDATE_THRESHOLD = BUF_ALLOC / 4;

/** The guest's sending direction: 'shut' after it sent SHUTDOWN with the SEND flag. */
export type GuestSend = 'open' | 'shut';

/**
 * The socket's direction towards the guest: 'open' (we read it), 'eof' (it reached EOF and
 * SHUTDOWN(SEND) was queued for the guest), 'hung-up' (it then hung up too and SHUTDOWN(SEND|RCV)
 * was queued; the guest answers RST once it has read everything).
 */
export type HostSend = 'open' | 'eof' | 'hung-up';

export type ConnectionState =
  /**
   * A host program dialled in ("CONNECT <port>"); we sent REQUEST and wait for RESPONSE (or the
   * timeout). The guest may already have shut its sending side (a protocol oddity we tolerate).
   */
  | { kind: 'host-connecting'; guestSend: GuestSend }
  /** Data flows both ways. `creditRequested`: a CREDIT_REQUEST is out, not yet answered. */
  | { kind: 'established'; guestSend: GuestSend; hostSend: HostSend; creditRequested: boolean }
  /**
   * The guest closed both directions; we answered RST and left the connection table. What is
   * still pending goes to the socket, then it is closed. No data flows towards the guest.
   */
  | { kind: 'closing' };

/**
 * What the socket's fd is watched for, as last told to VsockHost.watch; or parked: unwatched
 * after a hang-up while nothing was wanted, since hang-ups are reported whatever we ask for.
 */
export type Watch = { kind: 'watching'; read: boolean; write: boolean } | { kind: 'parked' };

/** The smallest storage a ByteRing allocates; it doubles up to its capacity as data waits. */
const RING_MIN = 4096;

/**
 * Guest data not yet taken by the socket: one byte ring whose capacity is the credit we
 * advertise (BUF_ALLOC), so what a connection holds is bounded by what it allowed the guest to
 * send, however the guest cuts it into packets (1-byte segments cost 1 byte each). Storage
 * grows by doubling from RING_MIN as data waits and is released once the ring is empty, so an
 * idle connection holds none. Bytes are copied in: guest memory views are never kept.
 */
export class ByteRing {
  private buf: Uint8Array | undefined;
  /** Index of the first byte in `buf`. */
  private start = 0;
  private count = 0;

  constructor(readonly capacity: number) {}

  get bytes(): number {
    return this.count;
  }

  /** Room left before the ring is full. */
  get free(): number {
    return this.capacity - this.count;
  }

  /** Bytes of storage allocated now (<= capacity). */
  get allocated(): number {
    return this.buf?.length ?? 0;
  }

  /**
   * Copies bytes [from, total) of `data` (`total` bytes long) in. The caller checked that they
   * fit (free >= total - from); more is a bug of ours, so it throws.
   */
  keep(data: readonly Uint8Array[], from: number, total: number): void {
    const n = total - from;
    if (n <= 0) return;
    if (n > this.free) throw new Error(`ByteRing: ${n} bytes with ${this.free} free`);
    this.reserve(this.count + n);
    const buf = this.buf!;
    for (const s of sliceSegments(data, from, n)) {
      let off = 0;
      while (off < s.length) {
        const end = (this.start + this.count) % buf.length;
        const k = Math.min(s.length - off, buf.length - end);
        buf.set(s.subarray(off, off + k), end);
        off += k;
        this.count += k;
      }
    }
  }

  /** The waiting bytes as at most two views (the ring may wrap), for one write. */
  head(): Uint8Array[] {
    const buf = this.buf;
    if (!buf || this.count === 0) return [];
    const first = Math.min(this.count, buf.length - this.start);
    const out = [buf.subarray(this.start, this.start + first)];
    if (first < this.count) out.push(buf.subarray(0, this.count - first));
    return out;
  }

  /** Drops the first `n` bytes (the socket took them). */
  consume(n: number): void {
    const buf = this.buf;
    if (!buf) return;
    const k = Math.min(n, this.count);
    this.start = (this.start + k) % buf.length;
    this.count -= k;
    if (this.count === 0) this.clear();
  }

  /** Drops everything and releases the storage. */
  clear(): void {
    this.buf = undefined;
    this.start = 0;
    this.count = 0;
  }

  /** Makes room for `need` bytes: storage doubles (linearized) up to the capacity. */
  private reserve(need: number): void {
    const old = this.buf;
    if (old && old.length >= need) return;
    let size = Math.max(old?.length ?? 0, RING_MIN);
    while (size < need) size *= 2;
    const next = new Uint8Array(Math.min(size, this.capacity));
    if (old) {
      let at = 0;
      for (const v of this.head()) {
        next.set(v, at);
        at += v.length;
      }
    }
    this.buf = next;
    this.start = 0;
  }
}

export class Connection {
  /** Peer's (the guest's) receive buffer and what it has consumed, from its latest header. */
  private peerBufAlloc = 0;
  private peerFwdCnt = 0;
  /** Payload bytes sent to the guest (mod 2^32, as the spec counts). */
  private txCnt = 0;
  /** Payload bytes written to the socket (mod 2^32): our fwd_cnt. */
  private forwardedBytes = 0;
  /** The fwd_cnt the guest last got from us. */
  private fwdCntSent = 0;
  readonly pending = new ByteRing(BUF_ALLOC);
  /**
   * What the fd is watched for now: nothing for a socket we connected; for a host-initiated one,
   * reading (its handshake watched it), which the first updateWatch turns off until the guest
   * has accepted (so bytes sent after the CONNECT line cannot keep the loop busy).
   */
  watch: Watch;
  /** Cancels the timer that ends this connection's current wait (the guest's answer, linger). */
  deadline: (() => void) | undefined;
  /** In its ConnectionTable's look-up (set and cleared by the table only). */
  inTable = false;

  constructor(
    readonly fd: number,
    /** Host side port (our src_port towards the guest). */
    readonly local: number,
    /** Guest side port. */
    readonly peer: number,
    public state: ConnectionState,
    /**
     * A host program made it (through the listener); its socket is then already watched for
     * reading (its handshake was).
     */
    readonly fromHost = false,
  ) {
    this.watch = { kind: 'watching', read: fromHost, write: false };
  }

  clearDeadline(): void {
    this.deadline?.();
    this.deadline = undefined;
  }

  get fwdCnt(): number {
    return this.forwardedBytes;
  }

  /** Has the guest shut its sending side? (Closing connections no longer care.) */
  get guestSendShut(): boolean {
    return this.state.kind !== 'closing' && this.state.guestSend === 'shut';
  }

  /** Every packet from the guest restates its credit. */
  notePeerCredit(hdr: VsockHeader): void {
    this.peerBufAlloc = hdr.bufAlloc;
    this.peerFwdCnt = hdr.fwdCnt;
  }

  /** Bytes the guest can take now. */
  peerCredit(): number {
    return Math.max(0, this.peerBufAlloc - ((this.txCnt - this.peerFwdCnt) >>> 0));
  }

  /**
   * Does the guest's credit end a stall (see the muxer)? At least half of its buffer (a Linux
   * guest volunteers its CREDIT_UPDATE when it has consumed all but 64 KiB of it), or all of a
   * buffer too small to halve.
   */
  stallOver(): boolean {
    const credit = this.peerCredit();
    return credit > 0 && credit >= this.peerBufAlloc >>> 1;
  }

  /** A header carrying our fwd_cnt went to the guest. */
  fwdCntTold(): void {
    this.fwdCntSent = this.forwardedBytes;
  }

  /** `n` payload bytes went to the guest in an OP_RW (whose header carried our fwd_cnt). */
  sentToGuest(n: number): void {
    this.fwdCntTold();
    this.txCnt = (this.txCnt + n) >>> 0;
  }

  /**
   * `n` bytes were written to the socket. True when the guest should be told its new credit:
   * an established connection that forwarded CREDIT_UPDATE_THRESHOLD bytes since it last told.
   */
  forwarded(n: number): boolean {
    this.forwardedBytes = (this.forwardedBytes + n) >>> 0;
    return (
      this.state.kind === 'established' &&
      (this.forwardedBytes - this.fwdCntSent) >>> 0 >= CREDIT_UPDATE_THRESHOLD
    );
  }

  /** The socket has something for the guest that we may read now. */
  wantsRead(rxBlocked: boolean): boolean {
    return (
      this.state.kind === 'established' &&
      this.state.hostSend === 'open' &&
      !rxBlocked &&
      this.peerCredit() > 0
    );
  }

  /**
   * What the fd should be watched for now, when that differs from what it is (the new interest
   * is recorded); undefined when nothing changes. A parked fd stays parked until it is wanted.
   */
  rewatch(rxBlocked: boolean): { read: boolean; write: boolean } | undefined {
    const read = this.wantsRead(rxBlocked);
    const write = this.pending.bytes > 0;
    const w = this.watch;
    if (w.kind === 'parked' ? !read && !write : read === w.read && write === w.write)
      return undefined;
    this.watch = { kind: 'watching', read, write };
    return { read, write };
  }

  /**
   * The socket hung up. True when it should be unwatched (parked): nothing is wanted from it,
   * and a level-triggered hang-up would otherwise be reported again and again.
   */
  parkOnHangup(): boolean {
    const w = this.watch;
    if (w.kind === 'watching' && (w.read || w.write)) return false;
    this.watch = { kind: 'parked' };
    return true;
  }
}

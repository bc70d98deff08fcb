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
/** A CREDIT_UPDATE is volunteered once this much was forwarded since the guest last heard. */
const CREDIT_UPDATE_THRESHOLD = BUF_ALLOC / 4;
/** At most this many pending chunks go into one write. */
const WRITE_CHUNKS = 64;

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

/** Guest data not yet taken by the socket. Chunks are copies: guest memory views are not kept. */
export class PendingBytes {
  private readonly chunks: Uint8Array[] = [];
  private count = 0;

  get bytes(): number {
    return this.count;
  }

  /** Copies bytes [from, total) of `data` (`total` bytes long). */
  keep(data: readonly Uint8Array[], from: number, total: number): void {
    for (const s of sliceSegments(data, from, total - from)) this.chunks.push(s.slice());
    this.count += total - from;
  }

  /** The first chunks, for one write. */
  head(): Uint8Array[] {
    return this.chunks.slice(0, WRITE_CHUNKS);
  }

  /** Drops the first `n` bytes (the socket took them). */
  consume(n: number): void {
    this.count -= n;
    let left = n;
    while (left > 0) {
      const head = this.chunks[0]!;
      if (head.length <= left) {
        left -= head.length;
        this.chunks.shift();
      } else {
        this.chunks[0] = head.subarray(left);
        left = 0;
      }
    }
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
  readonly pending = new PendingBytes();
  /**
   * Starts as "nothing". Known issue, kept as it was: a host-initiated socket is in fact still
   * watched for reading by its handshake, so bytes the host program sent after its CONNECT line
   * keep a level-triggered event loop busy until the guest answers (or the connect times out).
   */
  watch: Watch = { kind: 'watching', read: false, write: false };

  constructor(
    readonly fd: number,
    /** Host side port (our src_port towards the guest). */
    readonly local: number,
    /** Guest side port. */
    readonly peer: number,
    public state: ConnectionState,
  ) {}

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
   * an established connection that forwarded a quarter of BUF_ALLOC since it last told.
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

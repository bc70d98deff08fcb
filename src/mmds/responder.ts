/**
 * The MMDS responder of one network interface: the guest's frames to the MMDS address (ARP for
 * it, IPv4/TCP to it) come here instead of the TAP (net.ts hands them over), and the answers go
 * into a bounded queue that net.ts serves to the guest's RX ahead of TAP frames.
 *
 * A minimal TCP (RFC 9293) on port 80: passive open (SYN -> SYN-ACK with an MSS option), data
 * in order only (an out-of-order segment is dropped and answered with the ACK we expect), a
 * receive window no larger than the connection's free buffer, our data sent within the guest's
 * window and MSS, retransmitted from the first unacknowledged byte after RTO_MS, FIN both ways,
 * RST for anything that does not belong. Over it HTTP/1.1 (http.ts), keep-alive or not.
 *
 * Everything the guest sends is hostile: lengths and checksums are checked before use (the TCP
 * checksum is not when the guest left it to the device, VIRTIO_NET_HDR_F_NEEDS_CSUM); a frame
 * that fails a check is dropped and counted; nothing throws out of handleFrame (an internal
 * error is caught and counted). Memory is bounded: MAX_CONNECTIONS connections, each holding at
 * most RX_BUFFER bytes of request and MAX_OUT bytes of answers (beyond which requests wait),
 * and at most MAX_QUEUED_FRAMES frames queued for the guest. Connections die after IDLE_MS
 * without progress, or after MAX_RETRIES retransmissions.
 */
import { MAX_BODY, MAX_HEAD, answer, parseRequest, response, type MmdsView } from './http.js';
import {
  ETHERTYPE_ARP,
  ETHERTYPE_IPV4,
  ETH_HLEN,
  IPPROTO_TCP,
  TCP_ACK,
  TCP_FIN,
  TCP_PSH,
  TCP_RST,
  TCP_SYN,
  buildArpReply,
  buildTcp,
  parseArp,
  parseEth,
  parseIpv4,
  parseTcp,
  sameBytes,
  seqDiff,
  type TcpSegment,
} from './frames.js';
import { parseLinkLocal, type MmdsVersion } from './store.js';
import { TokenAuthority } from './token.js';
import { monoMs } from '../util/clock.js';

export const MMDS_PORT = 80;
export const MAX_CONNECTIONS = 32;
export const RX_BUFFER = MAX_HEAD + MAX_BODY;
/** Answers waiting for the guest's ACKs per connection before further requests wait. */
export const MAX_OUT = 1 << 20;
export const MAX_QUEUED_FRAMES = 256;
export const OUR_MSS = 1460;
export const RTO_MS = 200;
export const MAX_RETRIES = 8;
export const IDLE_MS = 30_000;
const TICK_MS = 100;

export interface ResponderConfig {
  version: MmdsVersion;
  ipv4: string;
  imdsCompat: boolean;
  /** The V2 token key (random per VM, from the main thread). */
  tokenKey: Uint8Array;
}

export interface ResponderEnv {
  /** Runs `fn` once after `ms` (the device worker's timers); returns a cancel function. */
  setTimer(ms: number, fn: () => void): () => void;
  /** Frames were queued for the guest: serve the RX queue. */
  onReply(): void;
  /** Monotonic milliseconds (tests pass their own clock). */
  now?: () => number;
}

/** Firecracker's mmds metrics, plus ours for the caps. */
export interface MmdsCounters {
  rx_accepted: number;
  rx_accepted_err: number;
  rx_accepted_unusual: number;
  rx_bad_eth: number;
  rx_invalid_token: number;
  rx_no_token: number;
  rx_count: number;
  tx_bytes: number;
  tx_count: number;
  tx_errors: number;
  tx_frames: number;
  connections_created: number;
  connections_destroyed: number;
  /** Ours: SYNs refused at MAX_CONNECTIONS, frames dropped at MAX_QUEUED_FRAMES, bad checksums, segments past our window, connections timed out, internal errors. */
  conn_cap_refused: number;
  reply_queue_full: number;
  rx_bad_checksum: number;
  rx_outside_window: number;
  conn_timeouts: number;
  internal_errors: number;
}

interface Conn {
  key: string;
  mac: Uint8Array;
  ip: Uint8Array;
  port: number;
  state: 'syn-rcvd' | 'established';
  irs: number;
  rcvNxt: number;
  iss: number;
  sndUna: number;
  /** Bytes from sndUna on: [0, sent) sent and unacknowledged, [sent, length) not sent yet. */
  out: Buffer;
  sent: number;
  peerWindow: number;
  mss: number;
  rx: Buffer;
  peerFin: boolean;
  /** Close once `out` is sent: our FIN follows the data. */
  closing: boolean;
  finSent: boolean;
  finAcked: boolean;
  lastProgress: number;
  lastSend: number;
  retries: number;
}

export class MmdsResponder {
  readonly counters: MmdsCounters = {
    rx_accepted: 0,
    rx_accepted_err: 0,
    rx_accepted_unusual: 0,
    rx_bad_eth: 0,
    rx_invalid_token: 0,
    rx_no_token: 0,
    rx_count: 0,
    tx_bytes: 0,
    tx_count: 0,
    tx_errors: 0,
    tx_frames: 0,
    connections_created: 0,
    connections_destroyed: 0,
    conn_cap_refused: 0,
    reply_queue_full: 0,
    rx_bad_checksum: 0,
    rx_outside_window: 0,
    conn_timeouts: 0,
    internal_errors: 0,
  };
  readonly ip: Uint8Array;
  private readonly conns = new Map<string, Conn>();
  private readonly queue: Uint8Array[] = [];
  private data: unknown = {};
  private readonly view: MmdsView;
  private readonly now: () => number;
  private cancelTick: (() => void) | undefined;
  private blocked = false;

  constructor(
    cfg: ResponderConfig,
    private readonly env: ResponderEnv,
  ) {
    const ip = parseLinkLocal(cfg.ipv4);
    if (!ip) throw new Error(`MMDS address ${cfg.ipv4} is not a valid link-local address`);
    this.ip = Uint8Array.from(ip);
    this.now = env.now ?? (() => monoMs());
    this.view = {
      version: cfg.version,
      imdsCompat: cfg.imdsCompat,
      data: () => this.data,
      tokens: new TokenAuthority(cfg.tokenKey, this.now),
    };
  }

  /** The data store's new content (PUT/PATCH /mmds), as JSON text from the main thread. */
  setData(json: string): void {
    this.data = JSON.parse(json) as unknown;
  }

  get connections(): number {
    return this.conns.size;
  }

  /** Bytes held for connections (requests received, answers not yet acknowledged). */
  get buffered(): number {
    let n = 0;
    for (const c of this.conns.values()) n += c.rx.length + c.out.length;
    return n;
  }

  get queued(): number {
    return this.queue.length;
  }

  /**
   * Whether a TX frame is the responder's, from its first bytes (at least 42, when the frame is
   * that long): an ARP packet asking for our address, or an IPv4/TCP packet to it.
   */
  wants(head: Uint8Array): boolean {
    if (head.length < ETH_HLEN + 20) return false;
    const type = (head[12]! << 8) | head[13]!;
    if (type === ETHERTYPE_ARP)
      return head.length >= ETH_HLEN + 28 && sameBytes(head.subarray(38, 42), this.ip);
    return (
      type === ETHERTYPE_IPV4 &&
      head[ETH_HLEN + 9] === IPPROTO_TCP &&
      sameBytes(head.subarray(30, 34), this.ip)
    );
  }

  /** The next frame for the guest's RX (without a virtio-net header). */
  takeReply(): Uint8Array | undefined {
    const f = this.queue.shift();
    if (this.blocked && this.queue.length === 0) {
      // Room again: connections that stopped at a full queue continue.
      this.blocked = false;
      for (const c of [...this.conns.values()]) this.pump(c);
    }
    return f;
  }

  /**
   * One TX frame the guest sent (wants() said yes). `csumPartial`: the guest left the TCP
   * checksum to the device. Never throws.
   */
  handleFrame(frame: Uint8Array, csumPartial: boolean): void {
    const before = this.queue.length;
    try {
      this.frame(frame, csumPartial);
    } catch {
      this.counters.internal_errors++;
    }
    if (this.queue.length > before) this.env.onReply();
  }

  private frame(frame: Uint8Array, csumPartial: boolean): void {
    const eth = parseEth(frame);
    if (!eth) {
      this.counters.rx_bad_eth++;
      return;
    }
    if (eth.type === ETHERTYPE_ARP) {
      const arp = parseArp(eth.payload);
      if (!arp || arp.op !== 1 || !sameBytes(arp.targetIp, this.ip)) {
        this.counters.rx_accepted_unusual++;
        return;
      }
      this.counters.rx_accepted++;
      this.emit(buildArpReply(this.ip, arp));
      return;
    }
    const ip = eth.type === ETHERTYPE_IPV4 ? parseIpv4(eth.payload) : undefined;
    if (
      !ip ||
      !ip.headerOk ||
      ip.fragment ||
      ip.proto !== IPPROTO_TCP ||
      !sameBytes(ip.dst, this.ip)
    ) {
      this.counters.rx_accepted_unusual++;
      return;
    }
    const seg = parseTcp(ip.payload, ip.src, ip.dst, !csumPartial);
    if (seg === 'bad-checksum') {
      this.counters.rx_bad_checksum++;
      return;
    }
    if (!seg) {
      this.counters.rx_accepted_err++;
      return;
    }
    this.counters.rx_accepted++;
    this.segment(eth.src, ip.src, seg);
  }

  private segment(mac: Uint8Array, src: Uint8Array, s: TcpSegment): void {
    const key = `${src.join('.')}:${s.srcPort}`;
    const c = this.conns.get(key);
    if (!c) {
      if (s.flags & TCP_RST) return;
      if (s.flags & TCP_SYN && !(s.flags & TCP_ACK) && s.dstPort === MMDS_PORT) {
        this.open(key, mac, src, s);
        return;
      }
      this.resetFor(mac, src, s);
      return;
    }
    if (s.flags & TCP_RST) {
      // Acceptable only in the window (RFC 5961 §3 simplified: exactly rcvNxt or inside it).
      const d = seqDiff(s.seq, c.rcvNxt);
      if (d >= 0 && d <= this.window(c)) this.drop(c);
      return;
    }
    if (s.flags & TCP_SYN) {
      // A retransmitted SYN: answer again; any other SYN in a connection gets our ACK.
      if (c.state === 'syn-rcvd' && s.seq === c.irs) this.sendSynAck(c);
      else this.sendAck(c);
      return;
    }
    if (!(s.flags & TCP_ACK)) return;
    if (c.state === 'syn-rcvd') {
      if (s.ack !== (c.iss + 1) >>> 0) {
        this.resetFor(mac, src, s);
        return;
      }
      c.state = 'established';
    }
    this.onAck(c, s);
    if (!this.conns.has(key)) return;
    let mustAck = false;
    if (s.payload.length > 0 || s.flags & TCP_FIN) mustAck = this.receive(c, s);
    if (!this.conns.has(key)) return;
    this.serveRequests(c);
    if (!this.pump(c) && mustAck) this.sendAck(c);
    if (c.finAcked && c.peerFin) this.drop(c);
  }

  private open(key: string, mac: Uint8Array, src: Uint8Array, s: TcpSegment): void {
    if (this.conns.size >= MAX_CONNECTIONS) {
      this.counters.conn_cap_refused++;
      this.resetFor(mac, src, s);
      return;
    }
    const iss = (Math.random() * 0x1_0000_0000) >>> 0;
    const now = this.now();
    const c: Conn = {
      key,
      mac: Uint8Array.from(mac),
      ip: Uint8Array.from(src),
      port: s.srcPort,
      state: 'syn-rcvd',
      irs: s.seq,
      rcvNxt: (s.seq + 1) >>> 0,
      iss,
      sndUna: (iss + 1) >>> 0,
      out: Buffer.alloc(0),
      sent: 0,
      peerWindow: s.window,
      mss: Math.max(64, Math.min(s.mss ?? 536, OUR_MSS)),
      rx: Buffer.alloc(0),
      peerFin: false,
      closing: false,
      finSent: false,
      finAcked: false,
      lastProgress: now,
      lastSend: now,
      retries: 0,
    };
    this.conns.set(key, c);
    this.counters.connections_created++;
    this.sendSynAck(c);
    this.arm();
  }

  private finSeq(c: Conn): number {
    return (c.sndUna + c.out.length) >>> 0;
  }

  /** The guest's ACK: drops acknowledged bytes; an ACK of data never sent is ignored. */
  private onAck(c: Conn, s: TcpSegment): void {
    // The window opens after a probe: the probe's byte was not taken; send from sndUna again.
    if (c.peerWindow === 0 && s.window > 0 && s.ack === c.sndUna && !c.finSent) c.sent = 0;
    c.peerWindow = s.window;
    const acked = seqDiff(s.ack, c.sndUna);
    const inFlight = c.sent + (c.finSent ? 1 : 0);
    if (acked <= 0 || acked > inFlight) return;
    const bytes = Math.min(acked, c.sent);
    c.out = c.out.subarray(bytes);
    c.sent -= bytes;
    c.sndUna = (c.sndUna + acked) >>> 0;
    if (c.finSent && acked === inFlight) c.finAcked = true;
    c.retries = 0;
    c.lastProgress = this.now();
  }

  /** In-order data and FIN; returns whether an ACK is owed. */
  private receive(c: Conn, s: TcpSegment): boolean {
    let data = s.payload;
    let seq = s.seq;
    const behind = seqDiff(c.rcvNxt, seq);
    if (behind > 0) {
      // Starts before what we have: keep the new part (none when all of it is old).
      if (behind > data.length) return true;
      data = data.subarray(behind);
      seq = c.rcvNxt;
    }
    if (seq !== c.rcvNxt) return true; // out of order: dropped, our ACK says what we expect
    const room = RX_BUFFER - c.rx.length;
    if (data.length > room) {
      this.counters.rx_outside_window++;
      data = data.subarray(0, room);
    }
    if (data.length > 0) {
      c.rx = Buffer.concat([c.rx, data]);
      c.rcvNxt = (c.rcvNxt + data.length) >>> 0;
      c.lastProgress = this.now();
    }
    if (s.flags & TCP_FIN && data.length === s.payload.length - Math.max(0, behind) && !c.peerFin) {
      c.peerFin = true;
      c.rcvNxt = (c.rcvNxt + 1) >>> 0;
    }
    return true;
  }

  private serveRequests(c: Conn): void {
    while (!c.closing && c.out.length < MAX_OUT) {
      const p = parseRequest(c.rx);
      if (p.kind === 'incomplete') {
        if (c.rx.length >= RX_BUFFER) this.queueAnswer(c, 413, 'Payload too large.', false, true);
        // The guest has sent all it will: answered, we close too.
        else if (c.peerFin) c.closing = true;
        return;
      }
      this.counters.rx_count++;
      if (p.kind === 'error') {
        this.queueAnswer(c, p.status, p.message, false, true);
        return;
      }
      c.rx = c.rx.subarray(p.consumed);
      const a = answer(p.request, this.view, this.tokenCounts());
      this.queueAnswer(c, a.status, a.body, a.json === true, p.request.close, a.extra);
    }
  }

  private tokenCounts() {
    const k = this.counters;
    return {
      get rxNoToken() {
        return k.rx_no_token;
      },
      set rxNoToken(v: number) {
        k.rx_no_token = v;
      },
      get rxInvalidToken() {
        return k.rx_invalid_token;
      },
      set rxInvalidToken(v: number) {
        k.rx_invalid_token = v;
      },
    };
  }

  private queueAnswer(
    c: Conn,
    status: number,
    body: string,
    json: boolean,
    close: boolean,
    extra?: string,
  ): void {
    const r = response(status, body, { json, close, ...(extra ? { extra } : {}) });
    c.out = Buffer.concat([c.out, r]);
    this.counters.tx_count++;
    if (close) {
      c.closing = true;
      c.rx = Buffer.alloc(0);
    }
  }

  /**
   * Sends what the guest's window and MSS allow, then our FIN once everything is out and the
   * connection is closing. Returns whether a segment was sent (each one carries our ACK).
   */
  private pump(c: Conn): boolean {
    let any = false;
    const window = Math.min(c.peerWindow, 65_535);
    while (c.sent < c.out.length) {
      const room = window - c.sent;
      if (room <= 0) break;
      if (this.queue.length >= MAX_QUEUED_FRAMES) {
        this.blocked = true;
        break;
      }
      const n = Math.min(room, c.mss, c.out.length - c.sent);
      const seq = (c.sndUna + c.sent) >>> 0;
      this.emitTcp(c, seq, TCP_ACK | TCP_PSH, c.out.subarray(c.sent, c.sent + n));
      this.counters.tx_bytes += n;
      c.sent += n;
      c.lastSend = this.now();
      any = true;
    }
    if (c.closing && !c.finSent && c.sent === c.out.length) {
      if (this.queue.length < MAX_QUEUED_FRAMES) {
        this.emitTcp(c, this.finSeq(c), TCP_ACK | TCP_FIN);
        c.finSent = true;
        c.lastSend = this.now();
        any = true;
      } else this.blocked = true;
    }
    return any;
  }

  private sendSynAck(c: Conn): void {
    this.emit(
      buildTcp({
        dstMac: c.mac,
        srcIp: this.ip,
        dstIp: c.ip,
        srcPort: MMDS_PORT,
        dstPort: c.port,
        seq: c.iss,
        ack: c.rcvNxt,
        flags: TCP_SYN | TCP_ACK,
        window: this.window(c),
        mss: OUR_MSS,
      }),
    );
    c.lastSend = this.now();
  }

  private sendAck(c: Conn): void {
    this.emitTcp(c, (c.sndUna + c.sent) >>> 0, TCP_ACK);
  }

  private window(c: Conn): number {
    return Math.min(RX_BUFFER - c.rx.length, 65_535);
  }

  private emitTcp(c: Conn, seq: number, flags: number, payload?: Uint8Array): void {
    this.emit(
      buildTcp({
        dstMac: c.mac,
        srcIp: this.ip,
        dstIp: c.ip,
        srcPort: MMDS_PORT,
        dstPort: c.port,
        seq,
        ack: c.rcvNxt,
        flags,
        window: this.window(c),
        ...(payload ? { payload } : {}),
      }),
    );
  }

  /** RST for a segment that belongs to no connection (RFC 9293 §3.10.7.1). */
  private resetFor(mac: Uint8Array, src: Uint8Array, s: TcpSegment): void {
    const len = s.payload.length + (s.flags & TCP_SYN ? 1 : 0) + (s.flags & TCP_FIN ? 1 : 0);
    this.emit(
      buildTcp({
        dstMac: mac,
        srcIp: this.ip,
        dstIp: src,
        srcPort: s.dstPort,
        dstPort: s.srcPort,
        seq: s.flags & TCP_ACK ? s.ack : 0,
        ack: (s.seq + len) >>> 0,
        flags: s.flags & TCP_ACK ? TCP_RST : TCP_RST | TCP_ACK,
        window: 0,
      }),
    );
  }

  private emit(f: Uint8Array): void {
    if (this.queue.length >= MAX_QUEUED_FRAMES) {
      this.counters.reply_queue_full++;
      this.counters.tx_errors++;
      return;
    }
    this.queue.push(f);
    this.counters.tx_frames++;
  }

  private drop(c: Conn): void {
    if (this.conns.delete(c.key)) this.counters.connections_destroyed++;
    if (this.conns.size === 0) {
      this.cancelTick?.();
      this.cancelTick = undefined;
    }
  }

  private arm(): void {
    if (this.cancelTick || this.conns.size === 0) return;
    this.cancelTick = this.env.setTimer(TICK_MS, () => {
      this.cancelTick = undefined;
      const before = this.queue.length;
      try {
        this.tick();
      } catch {
        this.counters.internal_errors++;
      }
      if (this.queue.length > before) this.env.onReply();
      this.arm();
    });
  }

  /** Retransmissions and timeouts. */
  private tick(): void {
    const now = this.now();
    for (const c of [...this.conns.values()]) {
      if (now - c.lastProgress > IDLE_MS) {
        this.counters.conn_timeouts++;
        this.emitTcp(c, (c.sndUna + c.sent) >>> 0, TCP_RST);
        this.drop(c);
        continue;
      }
      const unacked = c.state === 'syn-rcvd' || c.sent > 0 || (c.finSent && !c.finAcked);
      // A zero window with data waiting: probe it with one byte (RFC 9293 §3.8.6.1), or a lost
      // window update would leave the connection silent until IDLE_MS.
      const probe = !unacked && c.out.length > 0 && c.peerWindow === 0;
      if ((!unacked && !probe) || now - c.lastSend < RTO_MS << Math.min(c.retries, 5)) continue;
      if (++c.retries > MAX_RETRIES) {
        this.counters.conn_timeouts++;
        this.drop(c);
        continue;
      }
      if (c.state === 'syn-rcvd') {
        this.sendSynAck(c);
        continue;
      }
      if (probe) {
        this.emitTcp(c, c.sndUna, TCP_ACK, c.out.subarray(0, 1));
        c.sent = 1;
        c.lastSend = now;
        continue;
      }
      // Go back to the first unacknowledged byte (and FIN) and send again.
      c.sent = 0;
      c.finSent = false;
      this.pump(c);
    }
  }

  /** The counters, as the metrics lines take them (monotonic: written as deltas). */
  metrics(): Record<string, number> {
    return { ...this.counters };
  }
}

/**
 * A guest's side of an MMDS conversation, for tests and the fuzz target: builds the frames a
 * guest would send (Ethernet from GUEST_MAC, IPv4 from GUEST_IP) and reads the responder's
 * answers back, checking every checksum the responder computed.
 */
import {
  ETHERTYPE_ARP,
  MMDS_MAC,
  TCP_ACK,
  TCP_FIN,
  TCP_SYN,
  buildTcp,
  parseEth,
  parseIpv4,
  parseTcp,
  type TcpSegment,
} from './frames.js';
import { MmdsResponder, type ResponderConfig } from './responder.js';

export const GUEST_MAC = Uint8Array.from([0x06, 0, 0xac, 0x10, 0, 2]);
export const GUEST_IP = Uint8Array.from([172, 16, 0, 2]);

/** A frame from the guest (src MAC GUEST_MAC): buildTcp writes MMDS_MAC as the source. */
export function guestTcp(o: {
  dstIp: Uint8Array;
  srcPort: number;
  seq: number;
  ack: number;
  flags: number;
  window?: number;
  mss?: number;
  payload?: Uint8Array;
}): Uint8Array {
  const f = buildTcp({
    dstMac: MMDS_MAC,
    srcIp: GUEST_IP,
    dstIp: o.dstIp,
    srcPort: o.srcPort,
    dstPort: 80,
    seq: o.seq,
    ack: o.ack,
    flags: o.flags,
    window: o.window ?? 65_535,
    ...(o.mss !== undefined ? { mss: o.mss } : {}),
    ...(o.payload ? { payload: o.payload } : {}),
  });
  f.set(GUEST_MAC, 6);
  return f;
}

export function arpRequest(targetIp: Uint8Array): Uint8Array {
  const f = new Uint8Array(42);
  f.fill(0xff, 0, 6);
  f.set(GUEST_MAC, 6);
  f[12] = ETHERTYPE_ARP >> 8;
  f[13] = ETHERTYPE_ARP & 0xff;
  f.set([0, 1, 8, 0, 6, 4, 0, 1], 14);
  f.set(GUEST_MAC, 22);
  f.set(GUEST_IP, 28);
  f.set(targetIp, 38);
  return f;
}

/** A reply frame decoded, with its checksums verified (throws when one is wrong). */
export function decodeReply(f: Uint8Array): TcpSegment {
  const eth = parseEth(f);
  if (!eth) throw new Error('reply: short Ethernet frame');
  const ip = parseIpv4(eth.payload);
  if (!ip || !ip.headerOk) throw new Error('reply: bad IPv4 header');
  const t = parseTcp(ip.payload, ip.src, ip.dst, true);
  if (t === undefined || t === 'bad-checksum') throw new Error(`reply: bad TCP (${String(t)})`);
  return t;
}

/** A fake timer wheel: fire() runs what is due at the fake clock. */
export class FakeTimers {
  now = 0;
  private timers: Array<{ at: number; fn: () => void; live: boolean }> = [];
  setTimer = (ms: number, fn: () => void) => {
    const t = { at: this.now + ms, fn, live: true };
    this.timers.push(t);
    return () => {
      t.live = false;
    };
  };
  advance(ms: number): void {
    const end = this.now + ms;
    for (;;) {
      const due = this.timers.filter((t) => t.live && t.at <= end).sort((a, b) => a.at - b.at)[0];
      if (!due) break;
      this.now = Math.max(this.now, due.at);
      due.live = false;
      due.fn();
    }
    this.now = end;
    this.timers = this.timers.filter((t) => t.live);
  }
  get pending(): number {
    return this.timers.filter((t) => t.live).length;
  }
}

export const TEST_KEY = new Uint8Array(32).fill(7);

export function makeResponder(
  cfg: Partial<ResponderConfig> = {},
  timers = new FakeTimers(),
): { r: MmdsResponder; timers: FakeTimers } {
  const r = new MmdsResponder(
    { version: 'V1', ipv4: '169.254.169.254', imdsCompat: false, tokenKey: TEST_KEY, ...cfg },
    { setTimer: timers.setTimer, onReply: () => undefined, now: () => timers.now },
  );
  return { r, timers };
}

/**
 * One guest TCP connection to the responder: connect, send bytes, collect the answer bytes in
 * order (ACKing them), close. Frames the responder queues are drained after each step.
 */
export class GuestConn {
  seq: number;
  ack = 0;
  received = Buffer.alloc(0);
  gotFin = false;
  gotRst = false;
  segments: TcpSegment[] = [];

  constructor(
    readonly r: MmdsResponder,
    readonly port: number,
    readonly ip = r.ip,
    isn = 1000,
    readonly window = 65_535,
  ) {
    this.seq = isn;
  }

  private send(flags: number, payload?: Uint8Array, mss?: number): void {
    this.r.handleFrame(
      guestTcp({
        dstIp: this.ip,
        srcPort: this.port,
        seq: this.seq,
        ack: this.ack,
        flags,
        window: this.window,
        ...(mss !== undefined ? { mss } : {}),
        ...(payload ? { payload } : {}),
      }),
      false,
    );
  }

  /** Reads every queued reply for this connection; ACKs data when `ackData`. */
  drain(ackData = true): void {
    for (let f = this.r.takeReply(); f; f = this.r.takeReply()) {
      const s = decodeReply(f);
      if (s.dstPort !== this.port) continue;
      this.segments.push(s);
      if (s.flags & 0x04) {
        this.gotRst = true;
        continue;
      }
      if (s.flags & TCP_SYN) {
        this.ack = (s.seq + 1) >>> 0;
        continue;
      }
      if (s.payload.length > 0 && s.seq === this.ack) {
        this.received = Buffer.concat([this.received, s.payload]);
        this.ack = (this.ack + s.payload.length) >>> 0;
      }
      if (s.flags & TCP_FIN && (s.seq + s.payload.length) >>> 0 === this.ack) {
        this.gotFin = true;
        this.ack = (this.ack + 1) >>> 0;
      }
    }
    if (ackData && this.ack !== 0 && !this.gotRst) this.send(TCP_ACK);
  }

  connect(mss = 1460): void {
    this.send(TCP_SYN, undefined, mss);
    this.seq = (this.seq + 1) >>> 0;
    this.drain(false);
    this.send(TCP_ACK);
  }

  write(data: string | Uint8Array): void {
    const b = typeof data === 'string' ? Buffer.from(data) : data;
    this.send(TCP_ACK, b);
    this.seq = (this.seq + b.length) >>> 0;
    // Drain until quiet (the responder sends within our window, ACKs pull the rest).
    for (let i = 0; i < 1000 && this.r.queued > 0; i++) this.drain();
  }

  close(): void {
    this.send(TCP_ACK | TCP_FIN);
    this.seq = (this.seq + 1) >>> 0;
    for (let i = 0; i < 1000 && this.r.queued > 0; i++) this.drain();
  }

  /** One HTTP request on this connection; the raw answer bytes it added. */
  request(text: string): string {
    const before = this.received.length;
    this.write(text);
    return this.received.subarray(before).toString();
  }
}

/** An HTTP answer split up: status, headers (lower case), body. */
export function parseAnswer(raw: string): {
  status: number;
  headers: Map<string, string>;
  body: string;
} {
  const end = raw.indexOf('\r\n\r\n');
  const lines = raw.slice(0, end).split('\r\n');
  const headers = new Map<string, string>();
  for (const l of lines.slice(1)) {
    const c = l.indexOf(':');
    headers.set(l.slice(0, c).toLowerCase(), l.slice(c + 1).trim());
  }
  return { status: Number(lines[0]!.split(' ')[1]), headers, body: raw.slice(end + 4) };
}

/**
 * Ethernet II, ARP (RFC 826), IPv4 (RFC 791) and TCP (RFC 9293) headers as the MMDS responder
 * reads and writes them. Every parser takes guest bytes and checks each length against the
 * frame before reading (a value, never an exception); every builder computes the checksums of
 * what it writes.
 */

export const ETH_HLEN = 14;
export const ETHERTYPE_IPV4 = 0x0800;
export const ETHERTYPE_ARP = 0x0806;
export const IPPROTO_TCP = 6;

export const TCP_FIN = 0x01;
export const TCP_SYN = 0x02;
export const TCP_RST = 0x04;
export const TCP_PSH = 0x08;
export const TCP_ACK = 0x10;

/** The responder's own MAC (locally administered), as the ARP replies give it. */
export const MMDS_MAC = Uint8Array.from([0x06, 0x01, 0x23, 0x45, 0x67, 0x01]);

const u16 = (b: Uint8Array, o: number) => (b[o]! << 8) | b[o + 1]!;
const u32 = (b: Uint8Array, o: number) =>
  ((b[o]! << 24) | (b[o + 1]! << 16) | (b[o + 2]! << 8) | b[o + 3]!) >>> 0;
const put16 = (b: Uint8Array, o: number, v: number) => {
  b[o] = (v >>> 8) & 0xff;
  b[o + 1] = v & 0xff;
};
const put32 = (b: Uint8Array, o: number, v: number) => {
  put16(b, o, (v >>> 16) & 0xffff);
  put16(b, o + 2, v & 0xffff);
};

/** One's-complement sum of `b[off, off+len)` added to `sum` (not folded). */
function sum16(b: Uint8Array, off: number, len: number, sum = 0): number {
  let i = off;
  const end = off + len;
  for (; i + 1 < end; i += 2) sum += (b[i]! << 8) | b[i + 1]!;
  if (i < end) sum += b[i]! << 8;
  return sum;
}

function fold(sum: number): number {
  while (sum > 0xffff) sum = (sum & 0xffff) + Math.floor(sum / 0x10000);
  return sum;
}

/** The Internet checksum (RFC 1071) of a range: 0 when a range holding its checksum is valid. */
export function checksum(b: Uint8Array, off: number, len: number, initial = 0): number {
  return ~fold(sum16(b, off, len, initial)) & 0xffff;
}

function pseudoSum(src: Uint8Array, dst: Uint8Array, proto: number, len: number): number {
  return sum16(src, 0, 4) + sum16(dst, 0, 4) + proto + len;
}

export interface EthFrame {
  dst: Uint8Array;
  src: Uint8Array;
  type: number;
  payload: Uint8Array;
}

export function parseEth(f: Uint8Array): EthFrame | undefined {
  if (f.length < ETH_HLEN) return undefined;
  return {
    dst: f.subarray(0, 6),
    src: f.subarray(6, 12),
    type: u16(f, 12),
    payload: f.subarray(ETH_HLEN),
  };
}

export interface ArpPacket {
  op: number;
  senderMac: Uint8Array;
  senderIp: Uint8Array;
  targetIp: Uint8Array;
}

/** Ethernet/IPv4 ARP only (htype 1, ptype 0x0800, hlen 6, plen 4). */
export function parseArp(p: Uint8Array): ArpPacket | undefined {
  if (p.length < 28) return undefined;
  if (u16(p, 0) !== 1 || u16(p, 2) !== ETHERTYPE_IPV4 || p[4] !== 6 || p[5] !== 4) return undefined;
  return {
    op: u16(p, 6),
    senderMac: p.subarray(8, 14),
    senderIp: p.subarray(14, 18),
    targetIp: p.subarray(24, 28),
  };
}

export interface Ipv4Packet {
  src: Uint8Array;
  dst: Uint8Array;
  proto: number;
  /** A fragment (MF set or an offset): the responder takes none. */
  fragment: boolean;
  headerOk: boolean;
  payload: Uint8Array;
}

/** An IPv4 header checked against the frame: version, IHL, total length; the header checksum. */
export function parseIpv4(p: Uint8Array): Ipv4Packet | undefined {
  if (p.length < 20) return undefined;
  const ihl = (p[0]! & 0x0f) * 4;
  if (p[0]! >> 4 !== 4 || ihl < 20 || ihl > p.length) return undefined;
  const total = u16(p, 2);
  if (total < ihl || total > p.length) return undefined;
  const frag = u16(p, 6);
  return {
    src: p.subarray(12, 16),
    dst: p.subarray(16, 20),
    proto: p[9]!,
    fragment: (frag & 0x2000) !== 0 || (frag & 0x1fff) !== 0,
    headerOk: checksum(p, 0, ihl) === 0,
    payload: p.subarray(ihl, total),
  };
}

export interface TcpSegment {
  srcPort: number;
  dstPort: number;
  seq: number;
  ack: number;
  flags: number;
  window: number;
  /** The MSS option, when the segment carries one. */
  mss?: number;
  payload: Uint8Array;
}

/**
 * A TCP header checked against the segment (data offset in range, options walked with their
 * lengths checked). `checkSum`: verify the checksum against the pseudo-header (false when the
 * guest left it to the device: VIRTIO_NET_HDR_F_NEEDS_CSUM).
 */
export function parseTcp(
  s: Uint8Array,
  src: Uint8Array,
  dst: Uint8Array,
  checkSum: boolean,
): TcpSegment | 'bad-checksum' | undefined {
  if (s.length < 20) return undefined;
  const off = (s[12]! >> 4) * 4;
  if (off < 20 || off > s.length) return undefined;
  if (checkSum && checksum(s, 0, s.length, pseudoSum(src, dst, IPPROTO_TCP, s.length)) !== 0)
    return 'bad-checksum';
  let mss: number | undefined;
  for (let i = 20; i < off;) {
    const kind = s[i]!;
    if (kind === 0) break;
    if (kind === 1) {
      i++;
      continue;
    }
    if (i + 1 >= off) return undefined;
    const len = s[i + 1]!;
    if (len < 2 || i + len > off) return undefined;
    if (kind === 2 && len === 4) mss = u16(s, i + 2);
    i += len;
  }
  return {
    srcPort: u16(s, 0),
    dstPort: u16(s, 2),
    seq: u32(s, 4),
    ack: u32(s, 8),
    flags: s[13]! & 0x3f,
    window: u16(s, 14),
    ...(mss !== undefined ? { mss } : {}),
    payload: s.subarray(off),
  };
}

/** An ARP reply from (MMDS_MAC, ourIp) to the requester. */
export function buildArpReply(ourIp: Uint8Array, req: ArpPacket): Uint8Array {
  const f = new Uint8Array(ETH_HLEN + 28);
  f.set(req.senderMac, 0);
  f.set(MMDS_MAC, 6);
  put16(f, 12, ETHERTYPE_ARP);
  const p = f.subarray(ETH_HLEN);
  put16(p, 0, 1);
  put16(p, 2, ETHERTYPE_IPV4);
  p[4] = 6;
  p[5] = 4;
  put16(p, 6, 2);
  p.set(MMDS_MAC, 8);
  p.set(ourIp, 14);
  p.set(req.senderMac, 18);
  p.set(req.senderIp, 24);
  return f;
}

export interface TcpOut {
  dstMac: Uint8Array;
  srcIp: Uint8Array;
  dstIp: Uint8Array;
  srcPort: number;
  dstPort: number;
  seq: number;
  ack: number;
  flags: number;
  window: number;
  /** Sent as an MSS option (SYN-ACK only). */
  mss?: number;
  payload?: Uint8Array;
}

/** A whole Ethernet + IPv4 + TCP frame with both checksums computed. */
export function buildTcp(o: TcpOut): Uint8Array {
  const optLen = o.mss !== undefined ? 4 : 0;
  const payload = o.payload ?? new Uint8Array(0);
  const tcpLen = 20 + optLen + payload.length;
  const f = new Uint8Array(ETH_HLEN + 20 + tcpLen);
  f.set(o.dstMac, 0);
  f.set(MMDS_MAC, 6);
  put16(f, 12, ETHERTYPE_IPV4);
  const ip = f.subarray(ETH_HLEN, ETH_HLEN + 20);
  ip[0] = 0x45;
  put16(ip, 2, 20 + tcpLen);
  put16(ip, 6, 0x4000); // DF
  ip[8] = 64;
  ip[9] = IPPROTO_TCP;
  ip.set(o.srcIp, 12);
  ip.set(o.dstIp, 16);
  put16(ip, 10, checksum(ip, 0, 20));
  const t = f.subarray(ETH_HLEN + 20);
  put16(t, 0, o.srcPort);
  put16(t, 2, o.dstPort);
  put32(t, 4, o.seq >>> 0);
  put32(t, 8, o.ack >>> 0);
  t[12] = ((20 + optLen) / 4) << 4;
  t[13] = o.flags;
  put16(t, 14, o.window);
  if (o.mss !== undefined) {
    t[20] = 2;
    t[21] = 4;
    put16(t, 22, o.mss);
  }
  t.set(payload, 20 + optLen);
  put16(t, 16, checksum(t, 0, tcpLen, pseudoSum(o.srcIp, o.dstIp, IPPROTO_TCP, tcpLen)));
  return f;
}

export const sameBytes = (a: Uint8Array, b: Uint8Array) =>
  a.length === b.length && a.every((x, i) => x === b[i]);

/** Sequence-space comparison (RFC 9293 §3.4): a - b as a signed 32-bit distance. */
export const seqDiff = (a: number, b: number) => (a - b) | 0;

/**
 * struct virtio_net_hdr_v1 (virtio 1.2 §5.1.6): the 12 bytes in front of every frame on both
 * queues, and (with TUNSETVNETHDRSZ 12) in front of every frame the TAP gives or takes, so the
 * header passes between guest and TAP unchanged. What the guest sends is checked here before
 * the kernel sees it: only the offloads that were negotiated, and offsets inside the frame.
 */
import { type Result, err, ok } from '../../../util/result.js';

export const NET_HDR_SIZE = 12;
/** The largest frame with its header (Firecracker's MAX_BUFFER_SIZE: 65535 + 14 + 4 + 12, rounded). */
export const MAX_FRAME_WITH_HDR = 65562;
export const ETH_HLEN = 14;

export const VIRTIO_NET_HDR_F_NEEDS_CSUM = 1;
export const VIRTIO_NET_HDR_F_DATA_VALID = 2;
export const VIRTIO_NET_HDR_GSO_NONE = 0;
export const VIRTIO_NET_HDR_GSO_TCPV4 = 1;
export const VIRTIO_NET_HDR_GSO_UDP = 3;
export const VIRTIO_NET_HDR_GSO_TCPV6 = 4;
export const VIRTIO_NET_HDR_GSO_ECN = 0x80;

export interface NetHeader {
  flags: number;
  gsoType: number;
  hdrLen: number;
  gsoSize: number;
  csumStart: number;
  csumOffset: number;
  numBuffers: number;
}

/** What the driver may ask of the device on TX (from the negotiated features). */
export interface TxOffloads {
  csum: boolean; // VIRTIO_NET_F_CSUM
  tso4: boolean; // VIRTIO_NET_F_HOST_TSO4
  tso6: boolean; // VIRTIO_NET_F_HOST_TSO6
}

export function parseNetHeader(b: Uint8Array): NetHeader {
  return readNetHeader(b);
}

/**
 * The header's fields from the first NET_HDR_SIZE bytes of `b` (little-endian), into `into`
 * when given (the TX path refills one object per frame instead of allocating one).
 */
export function readNetHeader(b: Uint8Array, into?: NetHeader): NetHeader {
  if (b.length < NET_HDR_SIZE) throw new RangeError(`a virtio-net header is ${NET_HDR_SIZE} bytes`);
  const h = into ?? {
    flags: 0,
    gsoType: 0,
    hdrLen: 0,
    gsoSize: 0,
    csumStart: 0,
    csumOffset: 0,
    numBuffers: 0,
  };
  h.flags = b[0]!;
  h.gsoType = b[1]!;
  h.hdrLen = b[2]! | (b[3]! << 8);
  h.gsoSize = b[4]! | (b[5]! << 8);
  h.csumStart = b[6]! | (b[7]! << 8);
  h.csumOffset = b[8]! | (b[9]! << 8);
  h.numBuffers = b[10]! | (b[11]! << 8);
  return h;
}

export function writeNetHeader(b: Uint8Array, h: NetHeader): void {
  const v = new DataView(b.buffer, b.byteOffset, NET_HDR_SIZE);
  v.setUint8(0, h.flags);
  v.setUint8(1, h.gsoType);
  v.setUint16(2, h.hdrLen, true);
  v.setUint16(4, h.gsoSize, true);
  v.setUint16(6, h.csumStart, true);
  v.setUint16(8, h.csumOffset, true);
  v.setUint16(10, h.numBuffers, true);
}

/**
 * Checks a TX header for a frame of `frameLen` bytes (after the header). Refused: unknown flag
 * bits, DATA_VALID (RX only), checksum offload without VIRTIO_NET_F_CSUM or with the checksum
 * field outside the frame, GSO types that were not negotiated (UDP/UFO is never offered), GSO
 * without a segment size or without NEEDS_CSUM, frames shorter than an Ethernet header.
 */
export function checkTxHeader(h: NetHeader, frameLen: number, o: TxOffloads): Result<void, string> {
  const why = txHeaderError(h, frameLen, o);
  return why === undefined ? ok(undefined) : err(why);
}

/** checkTxHeader's answer without a Result object: why the header is refused, or undefined. */
export function txHeaderError(h: NetHeader, frameLen: number, o: TxOffloads): string | undefined {
  if (frameLen < ETH_HLEN) return `frame of ${frameLen} bytes is shorter than an Ethernet header`;
  if (h.flags & ~VIRTIO_NET_HDR_F_NEEDS_CSUM) return `bad header flags 0x${h.flags.toString(16)}`;
  if (h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) {
    if (!o.csum) return 'checksum offload without VIRTIO_NET_F_CSUM';
    if (h.csumStart + h.csumOffset + 2 > frameLen)
      return `checksum at ${h.csumStart}+${h.csumOffset} outside a ${frameLen}-byte frame`;
  }
  const gso = h.gsoType & ~VIRTIO_NET_HDR_GSO_ECN;
  if (h.gsoType & VIRTIO_NET_HDR_GSO_ECN) return 'GSO with ECN was not negotiated';
  switch (gso) {
    case VIRTIO_NET_HDR_GSO_NONE:
      return undefined;
    case VIRTIO_NET_HDR_GSO_TCPV4:
      if (!o.tso4) return 'TCPv4 segmentation offload was not negotiated';
      break;
    case VIRTIO_NET_HDR_GSO_TCPV6:
      if (!o.tso6) return 'TCPv6 segmentation offload was not negotiated';
      break;
    default:
      return `unknown GSO type ${h.gsoType}`;
  }
  if (h.gsoSize === 0) return 'GSO with a segment size of 0';
  if (!(h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM)) return 'GSO without NEEDS_CSUM';
  if (h.hdrLen > frameLen) return `hdr_len ${h.hdrLen} beyond the ${frameLen}-byte frame`;
  return undefined;
}

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
  const v = new DataView(b.buffer, b.byteOffset, NET_HDR_SIZE);
  return {
    flags: v.getUint8(0),
    gsoType: v.getUint8(1),
    hdrLen: v.getUint16(2, true),
    gsoSize: v.getUint16(4, true),
    csumStart: v.getUint16(6, true),
    csumOffset: v.getUint16(8, true),
    numBuffers: v.getUint16(10, true),
  };
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
  if (frameLen < ETH_HLEN)
    return err(`frame of ${frameLen} bytes is shorter than an Ethernet header`);
  if (h.flags & ~VIRTIO_NET_HDR_F_NEEDS_CSUM)
    return err(`bad header flags 0x${h.flags.toString(16)}`);
  if (h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) {
    if (!o.csum) return err('checksum offload without VIRTIO_NET_F_CSUM');
    if (h.csumStart + h.csumOffset + 2 > frameLen)
      return err(`checksum at ${h.csumStart}+${h.csumOffset} outside a ${frameLen}-byte frame`);
  }
  const gso = h.gsoType & ~VIRTIO_NET_HDR_GSO_ECN;
  if (h.gsoType & VIRTIO_NET_HDR_GSO_ECN) return err('GSO with ECN was not negotiated');
  switch (gso) {
    case VIRTIO_NET_HDR_GSO_NONE:
      return ok(undefined);
    case VIRTIO_NET_HDR_GSO_TCPV4:
      if (!o.tso4) return err('TCPv4 segmentation offload was not negotiated');
      break;
    case VIRTIO_NET_HDR_GSO_TCPV6:
      if (!o.tso6) return err('TCPv6 segmentation offload was not negotiated');
      break;
    default:
      return err(`unknown GSO type ${h.gsoType}`);
  }
  if (h.gsoSize === 0) return err('GSO with a segment size of 0');
  if (!(h.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM)) return err('GSO without NEEDS_CSUM');
  if (h.hdrLen > frameLen) return err(`hdr_len ${h.hdrLen} beyond the ${frameLen}-byte frame`);
  return ok(undefined);
}

/**
 * virtio-vsock packets (virtio 1.2 §5.10.6): struct virtio_vsock_hdr (44 bytes, little-endian)
 * followed by `len` bytes of payload (OP_RW only). Parsing checks what the guest controls:
 * header present, payload inside the chain and within MAX_PKT_PAYLOAD, addresses (source = the
 * guest's CID, destination = the host), stream type, a known op, no payload on control ops,
 * and ports other than VMADDR_PORT_ANY.
 */
import { type Result, err, ok } from '../../../util/result.js';
import { gather, sliceSegments } from '../chain.js';

export const VSOCK_HDR_SIZE = 44;
export const HOST_CID = 2;
/** The largest payload we accept in one packet (Linux sends at most 64 KiB). */
export const MAX_PKT_PAYLOAD = 64 * 1024;
/** VMADDR_PORT_ANY: never a real port. */
export const PORT_ANY = 0xffff_ffff;

export const TYPE_STREAM = 1;

export const OP_REQUEST = 1;
export const OP_RESPONSE = 2;
export const OP_RST = 3;
export const OP_SHUTDOWN = 4;
export const OP_RW = 5;
export const OP_CREDIT_UPDATE = 6;
export const OP_CREDIT_REQUEST = 7;

export const SHUTDOWN_RCV = 1;
export const SHUTDOWN_SEND = 2;

export const EVENT_TRANSPORT_RESET = 0;

export interface VsockHeader {
  srcCid: number;
  dstCid: number;
  srcPort: number;
  dstPort: number;
  len: number;
  type: number;
  op: number;
  flags: number;
  bufAlloc: number;
  fwdCnt: number;
}

export interface VsockPacket {
  hdr: VsockHeader;
  /** Zero-copy views of the payload in guest memory. */
  payload: Uint8Array[];
}

/**
 * Why a packet was refused. 'drop': cannot be answered (no header, wrong addresses: we do not
 * know whom to reset); 'rst': answer with OP_RST to the packet's source.
 */
export interface PacketError {
  action: 'drop' | 'rst';
  kind: 'short' | 'too-long' | 'bad-len' | 'bad-cid' | 'bad-type' | 'unknown-op' | 'bad-port';
  message: string;
}

const u64 = (v: DataView, o: number): number => {
  const lo = v.getUint32(o, true);
  const hi = v.getUint32(o + 4, true);
  return hi >= 0x20_0000 ? -1 : hi * 0x1_0000_0000 + lo;
};

export function readHeader(b: Uint8Array): VsockHeader {
  const v = new DataView(b.buffer, b.byteOffset, VSOCK_HDR_SIZE);
  return {
    srcCid: u64(v, 0),
    dstCid: u64(v, 8),
    srcPort: v.getUint32(16, true),
    dstPort: v.getUint32(20, true),
    len: v.getUint32(24, true),
    type: v.getUint16(28, true),
    op: v.getUint16(30, true),
    flags: v.getUint32(32, true),
    bufAlloc: v.getUint32(36, true),
    fwdCnt: v.getUint32(40, true),
  };
}

export function writeHeader(b: Uint8Array, h: VsockHeader): void {
  writeHeaderAt(new DataView(b.buffer, b.byteOffset, VSOCK_HDR_SIZE), h);
}

/**
 * writeHeader into a view the caller keeps (no allocation: the RX path writes one header per 4
 * KiB packet). A CID is written as two 32-bit halves: our CIDs are exact JS numbers (< 2^53).
 */
export function writeHeaderAt(v: DataView, h: VsockHeader): void {
  v.setUint32(0, h.srcCid >>> 0, true);
  v.setUint32(4, Math.floor(h.srcCid / 0x1_0000_0000) >>> 0, true);
  v.setUint32(8, h.dstCid >>> 0, true);
  v.setUint32(12, Math.floor(h.dstCid / 0x1_0000_0000) >>> 0, true);
  v.setUint32(16, h.srcPort >>> 0, true);
  v.setUint32(20, h.dstPort >>> 0, true);
  v.setUint32(24, h.len >>> 0, true);
  v.setUint16(28, h.type, true);
  v.setUint16(30, h.op, true);
  v.setUint32(32, h.flags >>> 0, true);
  v.setUint32(36, h.bufAlloc >>> 0, true);
  v.setUint32(40, h.fwdCnt >>> 0, true);
}

const fail = (
  action: PacketError['action'],
  kind: PacketError['kind'],
  message: string,
): Result<never, PacketError & { hdr?: VsockHeader }> => err({ action, kind, message });

/** Parses a TX chain's readable part from a guest with CID `guestCid`. */
export function parsePacket(
  readable: readonly Uint8Array[],
  readableLength: number,
  guestCid: number,
): Result<VsockPacket, PacketError & { hdr?: VsockHeader }> {
  if (readableLength < VSOCK_HDR_SIZE)
    return fail('drop', 'short', `packet of ${readableLength} bytes has no header`);
  const raw = new Uint8Array(VSOCK_HDR_SIZE);
  gather(readable, raw);
  const hdr = readHeader(raw);
  const withHdr = (e: PacketError) => err({ ...e, hdr });
  if (hdr.srcCid !== guestCid || hdr.dstCid !== HOST_CID)
    return withHdr({
      action: 'drop',
      kind: 'bad-cid',
      message: `packet from CID ${hdr.srcCid} to CID ${hdr.dstCid} (guest is ${guestCid}, host ${HOST_CID})`,
    });
  if (hdr.len > MAX_PKT_PAYLOAD)
    return withHdr({ action: 'rst', kind: 'too-long', message: `payload of ${hdr.len} bytes` });
  if (hdr.len > readableLength - VSOCK_HDR_SIZE)
    return withHdr({
      action: 'rst',
      kind: 'bad-len',
      message: `len ${hdr.len} beyond the ${readableLength - VSOCK_HDR_SIZE} bytes in the chain`,
    });
  if (hdr.type !== TYPE_STREAM)
    return withHdr({ action: 'rst', kind: 'bad-type', message: `socket type ${hdr.type}` });
  if (hdr.op < OP_REQUEST || hdr.op > OP_CREDIT_REQUEST)
    return withHdr({ action: 'rst', kind: 'unknown-op', message: `op ${hdr.op}` });
  if (hdr.op !== OP_RW && hdr.len !== 0)
    return withHdr({
      action: 'rst',
      kind: 'bad-len',
      message: `op ${hdr.op} with ${hdr.len} bytes`,
    });
  if (hdr.srcPort === PORT_ANY || hdr.dstPort === PORT_ANY)
    return withHdr({
      action: 'rst',
      kind: 'bad-port',
      message: `port ${hdr.srcPort} -> ${hdr.dstPort} (VMADDR_PORT_ANY)`,
    });
  return ok({ hdr, payload: sliceSegments(readable, VSOCK_HDR_SIZE, hdr.len) });
}

/** Parses the host-side handshake line "CONNECT <port>": the port, or undefined. */
export function parseConnectLine(line: string): number | undefined {
  const m = /^CONNECT (\d{1,10})$/.exec(line);
  if (!m) return undefined;
  const port = Number(m[1]);
  return port < PORT_ANY ? port : undefined;
}

/**
 * virtio-blk requests (virtio 1.2 §5.2.6): a 16-byte header (type u32, reserved u32, sector u64)
 * in device-readable memory, then the data (readable for writes, writable for reads and
 * GET_ID), then one device-writable status byte at the very end. No assumption about how the
 * driver split this into descriptors (§2.7.4.1, VIRTIO_F_ANY_LAYOUT is implied by VERSION_1).
 */
import { type DescriptorChain, gather, sliceSegments } from '../chain.js';

export const SECTOR_SIZE = 512;
export const BLK_HEADER_SIZE = 16;
/** Bytes of a GET_ID answer (VIRTIO_BLK_ID_BYTES). */
export const BLK_ID_BYTES = 20;

export const VIRTIO_BLK_T_IN = 0;
export const VIRTIO_BLK_T_OUT = 1;
export const VIRTIO_BLK_T_FLUSH = 4;
export const VIRTIO_BLK_T_GET_ID = 8;

export const VIRTIO_BLK_S_OK = 0;
export const VIRTIO_BLK_S_IOERR = 1;
export const VIRTIO_BLK_S_UNSUPP = 2;

export type BlockRequest =
  | { type: 'read'; offset: number; data: Uint8Array[]; length: number }
  | { type: 'write'; offset: number; data: Uint8Array[]; length: number }
  | { type: 'flush' }
  | { type: 'get-id'; data: Uint8Array[] }
  | { type: 'unsupported'; code: number };

export type ParsedRequest =
  /** Carry it out, then write the status byte. */
  | { ok: true; request: BlockRequest; status: Uint8Array }
  /**
   * Malformed: answer `code` in the status byte (when there is one) without doing any I/O.
   * `oversized`: refused for its size (RequestLimits), not its form.
   */
  | { ok: false; status: Uint8Array | undefined; code: number; reason: string; oversized?: true };

/** What one read or write may ask for (block.ts: seg_max, size_max and their product). */
export interface RequestLimits {
  /** Data segments (the data's views: a descriptor, or its part after the header). */
  maxSegments: number;
  /** Bytes per data segment (undefined: not negotiated, not checked). */
  maxSegmentBytes: number | undefined;
  /** Data bytes. */
  maxBytes: number;
}

function overLimits(data: Uint8Array[], length: number, l: RequestLimits): string | undefined {
  if (data.length > l.maxSegments)
    return `${data.length} data segments (seg_max is ${l.maxSegments})`;
  if (length > l.maxBytes) return `${length} bytes of data (at most ${l.maxBytes} per request)`;
  if (l.maxSegmentBytes !== undefined) {
    const big = data.find((d) => d.length > l.maxSegmentBytes!);
    if (big) return `a data segment of ${big.length} bytes (size_max is ${l.maxSegmentBytes})`;
  }
  return undefined;
}

/**
 * Parses and bounds-checks one request against a disk of `capacity` sectors and the `limits`.
 * Reads only the header from guest memory (copied once); data stays as views of guest RAM.
 */
export function parseBlockRequest(
  chain: DescriptorChain,
  capacity: number,
  limits: RequestLimits,
): ParsedRequest {
  const last = chain.writable[chain.writable.length - 1];
  const status = last ? last.subarray(last.length - 1) : undefined;
  const bad = (reason: string, code = VIRTIO_BLK_S_IOERR): ParsedRequest & { ok: false } => ({
    ok: false,
    status,
    code,
    reason,
  });
  if (!status) return bad('no device-writable status byte');
  if (chain.readableLength < BLK_HEADER_SIZE) return bad(`header of ${chain.readableLength} bytes`);
  const hdr = new Uint8Array(BLK_HEADER_SIZE);
  gather(chain.readable, hdr);
  const hv = new DataView(hdr.buffer);
  const type = hv.getUint32(0, true);
  const sector = hv.getBigUint64(8, true);
  const extraReadable = chain.readableLength - BLK_HEADER_SIZE;
  const writableData = chain.writableLength - 1;

  const range = (length: number): number | string => {
    if (length % SECTOR_SIZE !== 0)
      return `data length ${length} is not a multiple of ${SECTOR_SIZE}`;
    if (sector > BigInt(capacity) || BigInt(length / SECTOR_SIZE) > BigInt(capacity) - sector) {
      return `sectors [${sector}, +${length / SECTOR_SIZE}) beyond the disk's ${capacity}`;
    }
    return Number(sector) * SECTOR_SIZE;
  };

  switch (type) {
    case VIRTIO_BLK_T_IN: {
      if (extraReadable !== 0) return bad('read request with device-readable data');
      const data = sliceSegments(chain.writable, 0, writableData);
      const over = overLimits(data, writableData, limits);
      if (over) return { ...bad(over), oversized: true };
      const offset = range(writableData);
      if (typeof offset === 'string') return bad(offset);
      return { ok: true, status, request: { type: 'read', offset, data, length: writableData } };
    }
    case VIRTIO_BLK_T_OUT: {
      if (writableData !== 0) return bad('write request with device-writable data');
      const data = sliceSegments(chain.readable, BLK_HEADER_SIZE, extraReadable);
      const over = overLimits(data, extraReadable, limits);
      if (over) return { ...bad(over), oversized: true };
      const offset = range(extraReadable);
      if (typeof offset === 'string') return bad(offset);
      return { ok: true, status, request: { type: 'write', offset, data, length: extraReadable } };
    }
    case VIRTIO_BLK_T_FLUSH:
      if (extraReadable !== 0 || writableData !== 0) return bad('flush request with data');
      return { ok: true, status, request: { type: 'flush' } };
    case VIRTIO_BLK_T_GET_ID:
      if (extraReadable !== 0) return bad('get-id request with device-readable data');
      return {
        ok: true,
        status,
        request: { type: 'get-id', data: sliceSegments(chain.writable, 0, writableData) },
      };
    default:
      return { ok: true, status, request: { type: 'unsupported', code: type } };
  }
}

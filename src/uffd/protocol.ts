/**
 * The Uffd memory backend's handshake, as Firecracker defines it
 * (docs/snapshotting/handling-page-faults-on-snapshot-resume.md, src/vmm/src/persist.rs
 * `GuestRegionUffdMapping` and `send_uffd_handshake`), shared by the VMM (src/vmm/snapshot-uffd.ts)
 * and our page-fault handler (handler.ts):
 *
 *   - the handler listens on a Unix stream socket; the VMM connects, and in ONE sendmsg sends
 *     the JSON array of regions with the userfaultfd attached as SCM_RIGHTS; nothing else is
 *     ever sent on the socket, which the VMM keeps open (the handler may find the VMM's pid with
 *     SO_PEERCRED on it, and sees the VMM go away when it closes);
 *   - one entry per guest memory region, in serde's field order:
 *       {"base_host_virt_addr":u64,"size":usize,"offset":u64,"page_size":usize,"page_size_kib":usize}
 *     `offset` is the region's offset in the memory file (regions back to back), `page_size`
 *     the page size in bytes, and `page_size_kib` -- despite its name -- the same value in
 *     BYTES (Firecracker's struct says so: the name is wrong and kept for compatibility,
 *     deprecated). Older Firecracker versions sent only page_size_kib (also bytes) or neither.
 *
 * The userfaultfd ABI (<linux/userfaultfd.h>, x86_64) is here too: the ioctl numbers and the
 * 32-byte `uffd_msg`.
 */

export const UFFD_API = 0xaan;
/** _IOWR(0xAA, 0x3F, struct uffdio_api {u64 api, features, ioctls}) */
export const UFFDIO_API = 0xc018aa3f;
/** _IOWR(0xAA, 0x00, struct uffdio_register {u64 start, len, mode, ioctls}) */
export const UFFDIO_REGISTER = 0xc020aa00;
/** _IOWR(0xAA, 0x03, struct uffdio_copy {u64 dst, src, len, mode; s64 copy}) */
export const UFFDIO_COPY = 0xc028aa03;
/** _IOWR(0xAA, 0x04, struct uffdio_zeropage {u64 start, len, mode; s64 zeropage}) */
export const UFFDIO_ZEROPAGE = 0xc020aa04;
export const UFFDIO_REGISTER_MODE_MISSING = 1n;
/** Bits of uffdio_register.ioctls: the ioctls a registered range supports. */
export const UFFDIO_COPY_BIT = 1n << 3n;
/** The feature Firecracker requires (balloon deflation madvises guest memory away). */
export const UFFD_FEATURE_EVENT_REMOVE = 1n << 3n;

export const UFFD_EVENT_PAGEFAULT = 0x12;
export const UFFD_EVENT_FORK = 0x13;
export const UFFD_EVENT_REMAP = 0x14;
export const UFFD_EVENT_REMOVE = 0x15;
export const UFFD_EVENT_UNMAP = 0x16;
/** sizeof(struct uffd_msg) */
export const UFFD_MSG_SIZE = 32;

/** A decoded uffd_msg: the events the handler acts on, or the raw event number. */
export type UffdEvent =
  | { kind: 'pagefault'; address: bigint; flags: bigint }
  | { kind: 'remove'; start: bigint; end: bigint }
  | { kind: 'other'; event: number };

/** Decodes one 32-byte uffd_msg at `off` of `buf`. */
export function decodeUffdMsg(buf: Uint8Array, off = 0): UffdEvent {
  const dv = new DataView(buf.buffer, buf.byteOffset + off, UFFD_MSG_SIZE);
  const event = dv.getUint8(0);
  if (event === UFFD_EVENT_PAGEFAULT)
    return {
      kind: 'pagefault',
      flags: dv.getBigUint64(8, true),
      address: dv.getBigUint64(16, true),
    };
  if (event === UFFD_EVENT_REMOVE)
    return { kind: 'remove', start: dv.getBigUint64(8, true), end: dv.getBigUint64(16, true) };
  return { kind: 'other', event };
}

/** One guest memory region as the handshake describes it (all values in bytes). */
export interface UffdRegion {
  baseHostVirtAddr: number;
  size: number;
  offset: number;
  pageSize: number;
}

/**
 * The handshake's JSON, byte for byte what Firecracker's serde_json writes: no spaces, fields
 * in declaration order, integers as plain decimals, page_size_kib = page_size (bytes).
 */
export function encodeUffdRegions(regions: readonly UffdRegion[]): string {
  const fields = (r: UffdRegion) => {
    for (const [k, v] of Object.entries(r))
      if (!Number.isSafeInteger(v) || v < 0) throw new RangeError(`uffd region ${k}: ${v}`);
    return (
      `{"base_host_virt_addr":${r.baseHostVirtAddr},"size":${r.size},"offset":${r.offset},` +
      `"page_size":${r.pageSize},"page_size_kib":${r.pageSize}}`
    );
  };
  return `[${regions.map(fields).join(',')}]`;
}

/** Bounds on what a handler accepts from its peer (the VMM is not trusted to be sane). */
export const MAX_HANDSHAKE_BYTES = 64 * 1024;
export const MAX_UFFD_REGIONS = 64;
export const MIN_PAGE_SIZE = 4096;
/** 2 MiB: Firecracker's largest (hugetlbfs 2M). */
export const MAX_PAGE_SIZE = 2 * 1024 * 1024;
/** x86_64 user space ends at 2^47 (Linux maps above only when asked to, with 5-level paging). */
const MAX_USER_ADDR = 2 ** 47;

export class HandshakeError extends Error {}

const isPow2 = (n: number) => n > 0 && (n & (n - 1)) === 0;

/**
 * Parses and checks the handshake's JSON against a memory file of `fileBytes`: an array of 1 to
 * MAX_UFFD_REGIONS objects, each with base_host_virt_addr, size and offset (non-negative safe
 * integers) and page_size and/or page_size_kib (bytes; equal when both, 4096 when neither, as
 * the first Firecracker versions sent); unknown fields are ignored (serde's default). Every
 * region is page-aligned, non-empty, inside the file and disjoint from the others in the VMM's
 * address space, and all use one page size. Throws HandshakeError naming the problem.
 */
export function parseUffdRegions(text: string, fileBytes: number): UffdRegion[] {
  if (text.length > MAX_HANDSHAKE_BYTES)
    throw new HandshakeError(`the message is over ${MAX_HANDSHAKE_BYTES} bytes`);
  let v: unknown;
  try {
    v = JSON.parse(text);
  } catch (e) {
    throw new HandshakeError(`the message is not JSON: ${(e as Error).message}`);
  }
  if (!Array.isArray(v)) throw new HandshakeError('the message is not a JSON array of regions');
  if (v.length === 0) throw new HandshakeError('the message lists no memory regions');
  if (v.length > MAX_UFFD_REGIONS)
    throw new HandshakeError(`the message lists ${v.length} regions (at most ${MAX_UFFD_REGIONS})`);
  const regions = v.map((x: unknown, i): UffdRegion => {
    if (typeof x !== 'object' || x === null || Array.isArray(x))
      throw new HandshakeError(`region ${i} is not an object`);
    const o = x as Record<string, unknown>;
    const int = (k: string, required: boolean): number | undefined => {
      const n = o[k];
      if (n === undefined && !required) return undefined;
      if (typeof n !== 'number' || !Number.isSafeInteger(n) || n < 0)
        throw new HandshakeError(
          `region ${i}: \`${k}\` must be a non-negative integer below 2^53 (got ${JSON.stringify(n) ?? 'nothing'})`,
        );
      return n;
    };
    const base = int('base_host_virt_addr', true)!;
    const size = int('size', true)!;
    const offset = int('offset', true)!;
    const ps = int('page_size', false);
    const psk = int('page_size_kib', false);
    if (ps !== undefined && psk !== undefined && ps !== psk)
      throw new HandshakeError(
        `region ${i}: page_size ${ps} and page_size_kib ${psk} differ (both are bytes)`,
      );
    const pageSize = ps ?? psk ?? MIN_PAGE_SIZE;
    if (!isPow2(pageSize) || pageSize < MIN_PAGE_SIZE || pageSize > MAX_PAGE_SIZE)
      throw new HandshakeError(
        `region ${i}: page size ${pageSize} is not a power of two from ${MIN_PAGE_SIZE} to ${MAX_PAGE_SIZE}`,
      );
    if (size === 0) throw new HandshakeError(`region ${i} is empty`);
    if (base % pageSize !== 0 || size % pageSize !== 0 || offset % pageSize !== 0)
      throw new HandshakeError(
        `region ${i}: base_host_virt_addr, size and offset must be multiples of the page size ${pageSize}`,
      );
    if (base + size > MAX_USER_ADDR)
      throw new HandshakeError(`region ${i} is not in user address space`);
    if (offset + size > fileBytes)
      throw new HandshakeError(
        `region ${i} (offset ${offset}, ${size} bytes) is outside the ${fileBytes}-byte memory file`,
      );
    return { baseHostVirtAddr: base, size, offset, pageSize };
  });
  if (regions.some((r) => r.pageSize !== regions[0]!.pageSize))
    throw new HandshakeError('the regions use different page sizes');
  const sorted = [...regions].sort((a, b) => a.baseHostVirtAddr - b.baseHostVirtAddr);
  for (let i = 1; i < sorted.length; i++)
    if (sorted[i]!.baseHostVirtAddr < sorted[i - 1]!.baseHostVirtAddr + sorted[i - 1]!.size)
      throw new HandshakeError('two regions overlap in the VMM address space');
  return regions;
}

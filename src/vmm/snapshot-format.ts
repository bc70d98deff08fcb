/**
 * The snapshot state file: a fixed header, one 'typervisor-snapshot' persist record, a SHA-256
 * trailer. All integers little-endian.
 *
 *   0     8  magic "TYPVSNAP"
 *   8     4  u32 container version (1; bumped only if the header or trailer changes)
 *   12    4  u32 flags (0; anything else is refused)
 *   16    8  u64 payload length N (at most MAX_SNAPSHOT_PAYLOAD)
 *   24    N  SnapshotV1.encode(...)
 *   24+N 32  SHA-256 of bytes [0, 24+N)
 *
 * The file is hostile input: its size must be exactly 24+N+32, the checksum is verified before
 * anything is decoded, and the decoded record is checked for internal consistency (regions laid
 * back to back, counts that agree). The memory file (snapshot-memory.ts) has no checksum: it is
 * too big, and its exact size stands in for one (as in Firecracker).
 */
import { createHash } from 'node:crypto';
import {
  closeSync,
  fstatSync,
  fsyncSync,
  openSync,
  readSync,
  renameSync,
  unlinkSync,
  writeSync,
} from 'node:fs';
import { dirname } from 'node:path';
import { MAX_VCPUS } from '../arch/x86_64/layout.js';
import { VIRTIO_DEVICE_TYPES, type VirtioKind } from '../devices/virtio/registry.js';
import { ConfigError, keepName } from '../util/errors.js';
import {
  array,
  bytes,
  oneOf,
  optional,
  PersistError,
  string,
  struct,
  u16,
  u32,
  u53,
  versioned,
  type Codec,
  type Infer,
} from '../util/persist.js';
import { err, ok, type Result } from '../util/result.js';
import { LegacyStateV1 } from './legacy-state.js';
import { VcpuStateV1, VmStateV1 } from './vcpu-state.js';
import { MAX_VIRTIO_DEVICES } from './virtio-plan.js';

/** A snapshot file that cannot be read or used; reaches the user as one line (API: 400). */
export class SnapshotFileError extends ConfigError {}
keepName(SnapshotFileError, 'SnapshotFileError');

export const SNAPSHOT_MAGIC = 'TYPVSNAP';
export const SNAPSHOT_CONTAINER_VERSION = 1;
export const SNAPSHOT_HEADER_BYTES = 24;
export const SNAPSHOT_TRAILER_BYTES = 32;
/** Bound on the payload, checked before anything is allocated (a real one is ~100 KB). */
export const MAX_SNAPSHOT_PAYLOAD = 64 * 1024 * 1024;
/** The memory file's page size (and the granularity of its regions). */
export const SNAPSHOT_PAGE_SIZE = 4096;
/** At most this many guest RAM regions (x86 has 1 or 2). */
export const MAX_RAM_REGIONS = 8;

const MiB = 1024 * 1024;

/** A virtio kind this build knows, stored by name (so adding a kind keeps old files readable). */
const virtioKind: Codec<VirtioKind> = {
  kind: 'virtio-kind',
  write(w, v, path) {
    string(16).write(w, v, path);
  },
  read(r, path) {
    const v = string(16).read(r, path);
    if (!Object.hasOwn(VIRTIO_DEVICE_TYPES, v))
      throw new PersistError(`${path}: unknown virtio device kind "${v}"`);
    return v as VirtioKind;
  },
};

/** The legacy devices' state ('legacy-devices' v1, src/vmm/legacy-state.ts). */
const legacyField = LegacyStateV1.asField;

export const RamRegionLayout = struct({ base: u53, size: u53, fileOffset: u53 });

export const SnapshotV1 = versioned(
  'typervisor-snapshot',
  1,
  struct({
    /** For messages and the TSC check. */
    producer: struct({
      version: string(64),
      createdUnixMs: u53,
      hostTscKhz: optional(u32),
    }),
    machine: struct({ vcpus: u16, memMib: u32 }),
    /** The memory file: the regions back to back, fileBytes = the sum of their sizes. */
    memory: struct({
      type: oneOf(['Full', 'Diff'] as const),
      pageSize: u32,
      regions: array(RamRegionLayout, MAX_RAM_REGIONS),
      fileBytes: u53,
    }),
    /** JSON of the VmConfig (Firecracker shape), load-time overrides applied. Hostile: validate. */
    config: string(MiB),
    /** SavedDevice[] in slot order; state is VirtioDeviceStateV1 bytes. */
    devices: array(
      struct({ kind: virtioKind, id: string(64), state: bytes(16 * MiB) }),
      MAX_VIRTIO_DEVICES,
    ),
    legacy: legacyField,
    vm: VmStateV1.asField,
    vcpus: array(VcpuStateV1.asField, MAX_VCPUS),
  }),
);
export type SnapshotData = Infer<typeof SnapshotV1.codec>;
export type SnapshotRegion = Infer<typeof RamRegionLayout>;

/** Why a decoded record cannot describe a VM, or undefined when it is consistent. */
export function snapshotInconsistency(d: SnapshotData): string | undefined {
  const m = d.memory;
  if (m.pageSize !== SNAPSHOT_PAGE_SIZE)
    return `memory page size ${m.pageSize}; this build uses ${SNAPSHOT_PAGE_SIZE}`;
  const regionProblem = regionsInconsistency(m.regions, m.fileBytes);
  if (regionProblem) return regionProblem;
  if (m.fileBytes !== d.machine.memMib * MiB)
    return `memory file size ${m.fileBytes} does not match mem_size_mib ${d.machine.memMib}`;
  if (d.machine.vcpus < 1) return 'no vCPUs';
  if (d.vcpus.length !== d.machine.vcpus)
    return `${d.vcpus.length} saved vCPU states for ${d.machine.vcpus} vCPUs`;
  return undefined;
}

/**
 * Why a list of RAM regions is not a valid memory-file layout (page-aligned, non-empty,
 * ascending and non-overlapping in guest space, back to back in the file from offset 0, summing
 * to fileBytes), or undefined.
 */
export function regionsInconsistency(
  regions: readonly SnapshotRegion[],
  fileBytes: number,
): string | undefined {
  if (regions.length === 0) return 'no memory regions';
  let off = 0;
  let prevEnd = 0;
  for (const [i, r] of regions.entries()) {
    const at = `memory region ${i}`;
    if (r.size <= 0 || r.size % SNAPSHOT_PAGE_SIZE !== 0 || r.base % SNAPSHOT_PAGE_SIZE !== 0)
      return `${at}: base ${r.base} size ${r.size} are not whole pages`;
    if (r.base < prevEnd) return `${at}: overlaps or precedes the region before it`;
    if (r.fileOffset !== off) return `${at}: file offset ${r.fileOffset}, expected ${off}`;
    if (!Number.isSafeInteger(r.base + r.size)) return `${at}: out of range`;
    prevEnd = r.base + r.size;
    off += r.size;
  }
  if (off !== fileBytes)
    return `memory regions add up to ${off} bytes, file size says ${fileBytes}`;
  return undefined;
}

function sha256(bytes: Uint8Array): Uint8Array {
  return createHash('sha256').update(bytes).digest();
}

export function encodeSnapshotFile(d: SnapshotData): Uint8Array {
  const payload = SnapshotV1.encode(d);
  if (payload.length > MAX_SNAPSHOT_PAYLOAD)
    throw new SnapshotFileError(
      `snapshot state is ${payload.length} bytes, more than ${MAX_SNAPSHOT_PAYLOAD}`,
    );
  const out = new Uint8Array(SNAPSHOT_HEADER_BYTES + payload.length + SNAPSHOT_TRAILER_BYTES);
  const view = new DataView(out.buffer);
  out.set(new TextEncoder().encode(SNAPSHOT_MAGIC), 0);
  view.setUint32(8, SNAPSHOT_CONTAINER_VERSION, true);
  view.setUint32(12, 0, true);
  view.setBigUint64(16, BigInt(payload.length), true);
  out.set(payload, SNAPSHOT_HEADER_BYTES);
  const end = SNAPSHOT_HEADER_BYTES + payload.length;
  out.set(sha256(out.subarray(0, end)), end);
  return out;
}

const fail = (m: string) => err(new SnapshotFileError(m));

/** Checks a header (the file's first 24 bytes and its total size); the payload length, or why not. */
function checkHeader(b: Uint8Array, fileSize: number): Result<number, SnapshotFileError> {
  const magic = new TextEncoder().encode(SNAPSHOT_MAGIC);
  const n = Math.min(b.length, magic.length);
  for (let i = 0; i < n; i++) if (b[i] !== magic[i]) return fail('not a Typervisor snapshot');
  if (b.length < SNAPSHOT_HEADER_BYTES)
    return fail(
      `truncated: ${b.length} bytes, shorter than the ${SNAPSHOT_HEADER_BYTES}-byte header`,
    );
  const view = new DataView(b.buffer, b.byteOffset, SNAPSHOT_HEADER_BYTES);
  const version = view.getUint32(8, true);
  if (version !== SNAPSHOT_CONTAINER_VERSION)
    return fail(`container version ${version}; this build reads ${SNAPSHOT_CONTAINER_VERSION}`);
  const flags = view.getUint32(12, true);
  if (flags !== 0) return fail(`unknown header flags 0x${flags.toString(16)}`);
  const len = view.getBigUint64(16, true);
  if (len > BigInt(MAX_SNAPSHOT_PAYLOAD))
    return fail(`payload length ${len} is more than ${MAX_SNAPSHOT_PAYLOAD} bytes`);
  const want = SNAPSHOT_HEADER_BYTES + Number(len) + SNAPSHOT_TRAILER_BYTES;
  if (fileSize !== want)
    return fail(
      `file is ${fileSize} bytes, the header says ${want} (file ${fileSize < want ? 'truncated' : 'has trailing bytes'})`,
    );
  return ok(Number(len));
}

export function decodeSnapshotFile(
  bytes: Uint8Array,
  trace?: (step: string) => void,
): Result<SnapshotData, SnapshotFileError> {
  const head = checkHeader(bytes.subarray(0, SNAPSHOT_HEADER_BYTES), bytes.length);
  if (!head.ok) return head;
  const end = SNAPSHOT_HEADER_BYTES + head.value;
  const want = sha256(bytes.subarray(0, end));
  const got = bytes.subarray(end);
  if (!want.every((x, i) => x === got[i]))
    return fail('checksum mismatch (file corrupted or truncated)');
  trace?.('state file checksum');
  const d = SnapshotV1.decode(bytes.subarray(SNAPSHOT_HEADER_BYTES, end));
  if (!d.ok) return fail(d.error.message);
  trace?.('state file decoded');
  const bad = snapshotInconsistency(d.value);
  if (bad) return fail(bad);
  return ok(d.value);
}

/** Reads and decodes a state file; its size is bounded before anything is read. */
export function readSnapshotFile(
  path: string,
  trace?: (step: string) => void,
): Result<SnapshotData, SnapshotFileError> {
  let fd: number;
  try {
    fd = openSync(path, 'r');
  } catch (e) {
    return fail(`cannot open the snapshot file: ${(e as Error).message}`);
  }
  try {
    const st = fstatSync(fd);
    if (!st.isFile()) return fail('the snapshot path is not a regular file');
    const max = SNAPSHOT_HEADER_BYTES + MAX_SNAPSHOT_PAYLOAD + SNAPSHOT_TRAILER_BYTES;
    if (st.size > max) {
      // Say what the header says when it is not a snapshot at all, else the size.
      const head = new Uint8Array(SNAPSHOT_HEADER_BYTES);
      readSync(fd, head, 0, head.length, 0);
      const h = checkHeader(head, st.size);
      return h.ok ? fail(`file is ${st.size} bytes, more than ${max}`) : h;
    }
    const buf = new Uint8Array(st.size);
    let got = 0;
    while (got < buf.length) {
      const n = readSync(fd, buf, got, buf.length - got, got);
      if (n === 0) break;
      got += n;
    }
    trace?.('state file read');
    return decodeSnapshotFile(buf.subarray(0, got), trace);
  } catch (e) {
    return fail(`cannot read the snapshot file: ${(e as Error).message}`);
  } finally {
    closeSync(fd);
  }
}

/** The temporary name a file is written under before it is renamed into place. */
export function tempPathFor(path: string): string {
  return `${path}.tmp-${process.pid}`;
}

/** fsync of a directory, best-effort (makes a rename durable; some filesystems refuse it). */
export function fsyncDir(dir: string): void {
  try {
    const fd = openSync(dir, 'r');
    try {
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
  } catch {
    // best-effort
  }
}

/**
 * Writes `bytes` to `path + '.tmp-<pid>'`, fsyncs it and renames it over `path`: the old file is
 * untouched unless the new one is complete. Throws the I/O error (after removing the temp file).
 */
export function writeFileAtomic(path: string, bytes: Uint8Array): void {
  const tmp = tempPathFor(path);
  try {
    const fd = openSync(tmp, 'w', 0o644);
    try {
      let off = 0;
      while (off < bytes.length) off += writeSync(fd, bytes, off, bytes.length - off, off);
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
    renameSync(tmp, path);
  } catch (e) {
    try {
      unlinkSync(tmp);
    } catch {
      // not created, or already renamed
    }
    throw e;
  }
  fsyncDir(dirname(path));
}

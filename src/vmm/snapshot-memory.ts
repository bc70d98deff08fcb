/**
 * The snapshot memory file: guest RAM regions back to back (Firecracker's layout, and the
 * memfd's), size = the sum of the region sizes, no header.
 *
 *   writeMemoryFile(path, ram, regions)   all-zero pages are skipped, so the file is sparse (and
 *                                         with the memfd, its holes are not even read);
 *                                         written under a temporary name, then renamed. With
 *                                         `dirty` (a Diff): only the dirty pages, zero or not
 *   rebaseMemoryFile(base, diff)          copies a Diff memory file's data extents onto a full
 *                                         one (SEEK_DATA/SEEK_HOLE), so it can be loaded
 *   checkMemoryFile(path, regions)        opens it read-only; a regular file of exactly the
 *                                         right size, or an error (before anything is created)
 *   mapMemoryFile(fd, regions)            one MAP_PRIVATE mapping per region on the main thread:
 *                                         the file's pages are shared (page cache) until written;
 *                                         the workers wrap the same addresses (guest-ram.ts)
 */
import {
  closeSync,
  fstatSync,
  fsyncSync,
  ftruncateSync,
  openSync,
  readSync,
  renameSync,
  statSync,
  writeSync,
} from 'node:fs';
import { dirname } from 'node:path';
import {
  MAP_NORESERVE,
  MAP_PRIVATE,
  native,
  PROT_READ,
  PROT_WRITE,
  SEEK_DATA,
  SEEK_HOLE,
} from '../kvm/native.js';
import { isDirty } from '../memory/dirty-pages.js';
import { unlinkQuietly } from '../util/fs.js';
import { err, ok, type Result } from '../util/result.js';
import {
  guestRamOver,
  residentRuns,
  type GuestRamLayout,
  type MappedGuestRam,
} from './guest-ram.js';
import {
  fsyncDir,
  regionsInconsistency,
  SNAPSHOT_PAGE_SIZE,
  SnapshotFileError,
  tempPathFor,
  type SnapshotRegion,
} from './snapshot-format.js';

/** A file's identity: a restored VM's backing memory file, to refuse overwriting it. */
export interface FileId {
  dev: number;
  ino: number;
}

/** The memory file's size: the sum of the region sizes. */
export function memoryFileBytes(regions: readonly SnapshotRegion[]): number {
  return regions.reduce((s, r) => s + r.size, 0);
}

/** A written file not yet in place (writeMemoryFile with deferRename). */
export interface PendingFile {
  readonly path: string;
  readonly tmpPath: string;
  /** Renames the temporary file over `path` (no-op once done). */
  commit(): void;
  /** Removes the temporary file (no-op once committed). */
  discard(): void;
}

/** True when page p (of `words` 32-bit words each) is all zero. */
function zeroPage(words: Uint32Array, p: number, pageWords: number): boolean {
  // Uint32 rather than BigUint64: no BigInt per element, so a 256 MiB scan stays ~0.1 s.
  for (let i = p * pageWords, end = i + pageWords; i < end; i++) if (words[i] !== 0) return false;
  return true;
}

/**
 * The page ranges [first, last) of a region worth scanning: all of it, or with `sourceFd` (the
 * memfd the RAM is mapped from) only its data extents. Reading a memfd hole allocates a page, so
 * without this a snapshot would allocate all of a guest's RAM, touched or not.
 */
function pagesToScan(r: SnapshotRegion, sourceFd: number | undefined): Array<[number, number]> {
  const pages = r.size / SNAPSHOT_PAGE_SIZE;
  if (sourceFd === undefined || sourceFd < 0) return [[0, pages]];
  const n = native();
  const out: Array<[number, number]> = [];
  const end = r.fileOffset + r.size;
  let pos = r.fileOffset;
  while (pos < end) {
    const data = n.lseek(sourceFd, pos, SEEK_DATA);
    if (data < 0 || data >= end) break;
    let hole = n.lseek(sourceFd, data, SEEK_HOLE);
    if (hole < 0 || hole > end) hole = end;
    out.push([
      Math.floor((data - r.fileOffset) / SNAPSHOT_PAGE_SIZE),
      Math.ceil((hole - r.fileOffset) / SNAPSHOT_PAGE_SIZE),
    ]);
    pos = hole;
  }
  return out;
}

/**
 * Writes guest RAM to `path`: each region at its fileOffset, runs of non-zero pages with one
 * write each, all-zero pages skipped (holes); then ftruncate to the exact size and fsync. The
 * data goes to `path + '.tmp-<pid>'` first; it is renamed into place at the end, or (with
 * `deferRename`) when the caller commits, so that a state file and its memory file can both be
 * complete before either replaces an old one. Throws an I/O error after removing the temp file.
 *
 * `backingFile`: the file a restored VM's RAM is mapped from. Writing a snapshot onto it is
 * refused (SnapshotFileError).
 * `sourceFd`: the memfd a VM's RAM is mapped from (by default `ram.memfd`: hugetlbfs RAM; -1 or
 * absent for a restored VM): only its data extents are read, so untouched guest RAM stays
 * unallocated (reading a memfd hole allocates a page: 256 MiB with 16 MiB touched is 67 ms and
 * 16 MiB this way, 0.8 s and all 256 MiB allocated scanning everything). Anonymous RAM (a booted
 * VM's, `ram.anonymous`) is read only where its pages exist (guest-ram.ts residentRuns).
 * `dirty` (a Diff snapshot): one bitmap per region (memory/dirty-pages.ts layout); exactly the
 * pages set are written, all-zero ones too (a page the guest zeroed must reach the base when
 * the diff is merged: a hole would mean "unchanged"), everything else is a hole.
 */
export function writeMemoryFile(
  path: string,
  ram: MappedGuestRam,
  regions: readonly SnapshotRegion[],
  opts: {
    backingFile?: FileId;
    deferRename?: boolean;
    sourceFd?: number;
    dirty?: readonly Uint8Array[];
  } = {},
): PendingFile {
  const bad = regionsInconsistency(regions, memoryFileBytes(regions));
  if (bad) throw new SnapshotFileError(bad);
  if (ram.buffers.length !== regions.length)
    throw new SnapshotFileError('guest RAM and memory regions do not match');
  const dirty = opts.dirty;
  if (
    dirty &&
    (dirty.length !== regions.length ||
      dirty.some((b, i) => b.length * 8 < regions[i]!.size / SNAPSHOT_PAGE_SIZE))
  )
    throw new SnapshotFileError('the dirty bitmaps do not match the memory regions');
  if (opts.backingFile && sameFile(path, opts.backingFile))
    throw new SnapshotFileError(
      `${path} is the memory file this microVM was restored from; write the snapshot elsewhere`,
    );
  const tmp = tempPathFor(path);
  const pageWords = SNAPSHOT_PAGE_SIZE / 4;
  try {
    const fd = openSync(tmp, 'w', 0o600);
    try {
      regions.forEach((r, i) => {
        const buf = ram.buffers[i]!;
        if (buf.byteLength !== r.size)
          throw new SnapshotFileError(`memory region ${i}: size changed`);
        const bytes = new Uint8Array(buf);
        const writeRun = (start: number, end: number) => {
          const off = start * SNAPSHOT_PAGE_SIZE;
          const len = (end - start) * SNAPSHOT_PAGE_SIZE;
          let done = 0;
          while (done < len)
            done += writeSync(fd, bytes, off + done, len - done, r.fileOffset + off + done);
        };
        const bits = dirty?.[i];
        if (bits) {
          forEachRun(bits, r.size / SNAPSHOT_PAGE_SIZE, writeRun);
          return;
        }
        const words = new Uint32Array(buf);
        const runs = ram.anonymous ? residentRuns(buf) : pagesToScan(r, opts.sourceFd ?? ram.memfd);
        for (const [first, last] of runs) {
          let p = first;
          while (p < last) {
            // Skip zero pages, then write the run of non-zero ones.
            while (p < last && zeroPage(words, p, pageWords)) p++;
            const start = p;
            while (p < last && !zeroPage(words, p, pageWords)) p++;
            if (p > start) writeRun(start, p);
          }
        }
      });
      ftruncateSync(fd, memoryFileBytes(regions));
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
  } catch (e) {
    unlinkQuietly(tmp);
    throw e;
  }
  let state: 'pending' | 'committed' | 'discarded' = 'pending';
  const pending: PendingFile = {
    path,
    tmpPath: tmp,
    commit() {
      if (state !== 'pending') return;
      renameSync(tmp, path);
      state = 'committed';
      fsyncDir(dirname(path));
    },
    discard() {
      if (state !== 'pending') return;
      unlinkQuietly(tmp);
      state = 'discarded';
    },
  };
  if (!opts.deferRename) {
    try {
      pending.commit();
    } catch (e) {
      pending.discard();
      throw e;
    }
  }
  return pending;
}

/** Calls `f(first, end)` for each run of set bits among the first `pages` bits of `bits`. */
export function forEachRun(
  bits: Uint8Array,
  pages: number,
  f: (first: number, end: number) => void,
): void {
  let p = 0;
  while (p < pages) {
    // Whole clear bytes are skipped eight pages at a time.
    if ((p & 7) === 0 && bits[p >>> 3] === 0) {
      p += 8;
      continue;
    }
    if (!isDirty(bits, p)) {
      p++;
      continue;
    }
    const start = p;
    while (p < pages && isDirty(bits, p)) p++;
    f(start, p);
  }
}

function sameFile(path: string, id: FileId): boolean {
  try {
    const st = statSync(path);
    return st.dev === id.dev && st.ino === id.ino;
  } catch {
    return false; // does not exist yet
  }
}

/** An opened memory file: the caller owns `fd` (close it after mapMemoryFile, or on failure). */
export interface CheckedMemoryFile {
  fd: number;
  size: number;
  backing: FileId;
}

/**
 * Opens a memory file read-only and checks it is a regular file of exactly the regions' total
 * size (Firecracker only refuses one that is too small; a wrong size means a wrong file).
 */
export function checkMemoryFile(
  path: string,
  regions: readonly SnapshotRegion[],
  /** Device memory after RAM (the virtio-mem region: appendDeviceMemory). */
  extraBytes = 0,
): Result<CheckedMemoryFile, SnapshotFileError> {
  const ramBytes = memoryFileBytes(regions);
  const bad = regionsInconsistency(regions, ramBytes);
  const want = ramBytes + extraBytes;
  if (bad) return err(new SnapshotFileError(bad));
  let fd: number;
  try {
    fd = openSync(path, 'r');
  } catch (e) {
    return err(new SnapshotFileError(`cannot open the memory file: ${(e as Error).message}`));
  }
  try {
    const st = fstatSync(fd);
    if (!st.isFile()) throw new SnapshotFileError('the memory file is not a regular file');
    if (st.size !== want)
      throw new SnapshotFileError(
        `the memory file is ${st.size} bytes; this snapshot's is ${want} (${st.size < want ? 'truncated' : 'too long'}, or not this snapshot's memory file)`,
      );
    return ok({ fd, size: st.size, backing: { dev: st.dev, ino: st.ino } });
  } catch (e) {
    closeSync(fd);
    if (e instanceof SnapshotFileError) return err(e);
    return err(new SnapshotFileError(`cannot read the memory file: ${(e as Error).message}`));
  }
}

export interface MappedMemoryFile {
  /** For the workers: memfd -1 and the main thread's host addresses (see guest-ram.ts). */
  layout: GuestRamLayout;
  /** The main thread's mapping; its unmap() munmaps (after every worker has ended). */
  ram: MappedGuestRam;
  backing: FileId;
}

/**
 * Maps each region of the memory file privately (copy-on-write), readable and writable, on the
 * calling (main) thread. The mapping holds the file: `fd` may be closed afterwards (by the caller,
 * who still owns it). Nothing stays mapped when it throws.
 */
export function mapMemoryFile(fd: number, regions: readonly SnapshotRegion[]): MappedMemoryFile {
  const bad = regionsInconsistency(regions, memoryFileBytes(regions));
  if (bad) throw new SnapshotFileError(bad);
  const n = native();
  const st = fstatSync(fd);
  const buffers: ArrayBuffer[] = [];
  try {
    for (const r of regions)
      buffers.push(
        n.mmap(r.size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_NORESERVE, fd, r.fileOffset),
      );
  } catch (e) {
    buffers.forEach((b) => n.munmap(b));
    throw e;
  }
  const copy = regions.map((r) => ({ base: r.base, size: r.size, fileOffset: r.fileOffset }));
  const ram = guestRamOver(copy, buffers, (b) => n.munmap(b));
  return {
    layout: { memfd: -1, regions: copy, hostAddrs: buffers.map((b) => n.bufferAddress(b)) },
    ram,
    backing: { dev: st.dev, ino: st.ino },
  };
}

/** What a rebase copied. */
export interface RebaseResult {
  /** Data extents of the diff copied onto the base. */
  extents: number;
  bytes: number;
}

const REBASE_CHUNK = 1024 * 1024;

/**
 * Merges a Diff memory file into a full one: every data extent of `diffPath` (found with
 * SEEK_DATA/SEEK_HOLE, so a Firecracker-made diff works too) is copied to the same offset of
 * `basePath`, which is changed in place and fsynced; the diff's holes leave the base as it was.
 * Checked first, nothing written otherwise: both regular files, the same size, not the same file.
 * Throws SnapshotFileError (a bad pair) or an I/O error (the base may then be partly merged).
 *
 * The diff must come from a file system that keeps holes (ext4, xfs, btrfs, tmpfs...): on one
 * that does not, the whole diff reads as data and its unchanged pages (zeros) would overwrite
 * the base; that cannot be told apart from a diff whose every page changed.
 */
export function rebaseMemoryFile(basePath: string, diffPath: string): RebaseResult {
  let diffFd: number;
  try {
    diffFd = openSync(diffPath, 'r');
  } catch (e) {
    throw new SnapshotFileError(`cannot open the diff ${diffPath}: ${(e as Error).message}`);
  }
  try {
    const ds = fstatSync(diffFd);
    if (!ds.isFile()) throw new SnapshotFileError(`the diff ${diffPath} is not a regular file`);
    let baseFd: number;
    try {
      baseFd = openSync(basePath, 'r+');
    } catch (e) {
      throw new SnapshotFileError(
        `cannot open the base ${basePath} for writing: ${(e as Error).message}`,
      );
    }
    try {
      const bs = fstatSync(baseFd);
      if (!bs.isFile()) throw new SnapshotFileError(`the base ${basePath} is not a regular file`);
      if (bs.dev === ds.dev && bs.ino === ds.ino)
        throw new SnapshotFileError('the base and the diff are the same file');
      if (bs.size !== ds.size)
        throw new SnapshotFileError(
          `the base is ${bs.size} bytes and the diff ${ds.size}: a diff and its base have the same size (not the same VM's memory files?)`,
        );
      const r = copyExtents(diffFd, baseFd, ds.size);
      fsyncSync(baseFd);
      return r;
    } finally {
      closeSync(baseFd);
    }
  } finally {
    closeSync(diffFd);
  }
}

/**
 * Copies the data extents of `from` [fromOff, fromOff + size) to `to` at the same distance
 * from `toOff`; holes are not written (they stay holes in a new file).
 */
function copyExtents(from: number, to: number, size: number, fromOff = 0, toOff = 0): RebaseResult {
  const n = native();
  const buf = new Uint8Array(Math.min(REBASE_CHUNK, Math.max(size, 1)));
  const end = fromOff + size;
  let extents = 0;
  let bytes = 0;
  let pos = fromOff;
  while (pos < end) {
    const data = n.lseek(from, pos, SEEK_DATA);
    if (data < 0 || data >= end) break;
    let hole = n.lseek(from, data, SEEK_HOLE);
    if (hole < 0 || hole > end) hole = end;
    extents++;
    for (let off = data; off < hole;) {
      const want = Math.min(buf.length, hole - off);
      const got = readSync(from, buf, 0, want, off);
      if (got <= 0) throw new Error(`the file ended at ${off} bytes while being read`);
      const at = off - fromOff + toOff;
      let done = 0;
      while (done < got) done += writeSync(to, buf, done, got - done, at + done);
      off += got;
      bytes += got;
    }
    pos = hole;
  }
  return { extents, bytes };
}

/*
 * Device memory in the memory file (issue 16): the virtio-mem region follows RAM, whole
 * (region_size bytes), as in Firecracker's memory file. Only its data extents are copied: blocks
 * never plugged, or unplugged (punched out of the region's memfd), are holes in the file, and
 * holes in the file stay holes in the memfd at load.
 */

/**
 * Appends `size` bytes of device memory (the data extents of `sourceFd` [0, size)) at `at` of
 * the pending memory file `tmpPath` (writeMemoryFile with deferRename, before its commit);
 * the file is extended to `at + size` and fsynced. Throws an I/O error (the caller discards).
 */
export function appendDeviceMemory(
  tmpPath: string,
  at: number,
  sourceFd: number,
  size: number,
): RebaseResult {
  const fd = openSync(tmpPath, 'r+');
  try {
    if (fstatSync(fd).size !== at)
      throw new SnapshotFileError(`the memory file is not ${at} bytes long before device memory`);
    ftruncateSync(fd, at + size);
    const r = copyExtents(sourceFd, fd, size, 0, at);
    fsyncSync(fd);
    return r;
  } finally {
    closeSync(fd);
  }
}

/**
 * Fills device memory (`targetFd` [0, size), a fresh, empty memfd) from the memory file's
 * [at, at + size): only the file's data extents are copied, so unplugged ranges stay unallocated.
 */
export function loadDeviceMemory(
  fileFd: number,
  at: number,
  targetFd: number,
  size: number,
): RebaseResult {
  return copyExtents(fileFd, targetFd, size, at, 0);
}

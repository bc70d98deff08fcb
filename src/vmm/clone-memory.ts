/**
 * Memory per clone: what one restored VM process costs on top of the others restored from the
 * same snapshot. A restored VM maps its memory file MAP_PRIVATE (snapshot-memory.ts), so the
 * guest pages it only reads are the page cache's, shared by every clone; a page the guest
 * writes becomes the clone's own anonymous copy.
 *
 * Read from /proc/PID/smaps (smaps_rollup has only the totals, and the memory file's mapping
 * must be told apart from the rest):
 *   ownedKiB          Private_Dirty over every mapping: the clone's own memory (guest pages
 *                     it wrote since the restore, the VMM's heap and stacks, ...). Nothing
 *                     another clone could share; what is freed when the clone ends.
 *   guestCopiedKiB    the part of ownedKiB in the memory file's mappings (guest writes)
 *   guestFile         the memory file's mappings: Rss (page-cache pages this clone maps),
 *                     Pss (its share of them), Shared_* and Private_Clean
 *   nonGuestRssKiB    Rss outside the memory file's mappings (Firecracker's "VMM memory" rule)
 *   rssKiB, pssKiB    the totals
 */
import { readFileSync, realpathSync, statSync } from 'node:fs';

export interface FileMappingMemory {
  /** Mappings of the file found. */
  mappings: number;
  rssKiB: number;
  pssKiB: number;
  sharedKiB: number;
  privateCleanKiB: number;
  privateDirtyKiB: number;
}

export interface CloneMemory {
  pid: number;
  rssKiB: number;
  pssKiB: number;
  ownedKiB: number;
  guestCopiedKiB: number;
  nonGuestRssKiB: number;
  guestFile: FileMappingMemory;
}

/** The largest smaps text read (a Node process has a few hundred mappings, ~100 KiB). */
export const MAX_SMAPS_BYTES = 16 * 1024 * 1024;

/** Identifies the memory file's mappings in smaps: its resolved path or its inode. */
export interface FileMatch {
  path: string;
  ino: number;
}

export function fileMatch(memFile: string): FileMatch {
  const path = realpathSync(memFile);
  return { path, ino: statSync(path).ino };
}

const HEADER = /^[0-9a-f]+-[0-9a-f]+ \S+ [0-9a-f]+ [0-9a-f]+:[0-9a-f]+ (\d+)\s*(.*)$/;
const FIELD = /^(\w+):\s+(\d+) kB$/;

/**
 * Sums an smaps text (the format of /proc/PID/smaps). `file`: the memory file whose mappings
 * are the guest's; without it every mapping counts as the VMM's (e.g. QEMU's anonymous RAM).
 */
export function summariseCloneSmaps(text: string, pid: number, file?: FileMatch): CloneMemory {
  const out: CloneMemory = {
    pid,
    rssKiB: 0,
    pssKiB: 0,
    ownedKiB: 0,
    guestCopiedKiB: 0,
    nonGuestRssKiB: 0,
    guestFile: {
      mappings: 0,
      rssKiB: 0,
      pssKiB: 0,
      sharedKiB: 0,
      privateCleanKiB: 0,
      privateDirtyKiB: 0,
    },
  };
  let guest = false;
  for (const line of text.split('\n')) {
    const h = HEADER.exec(line);
    if (h) {
      const ino = Number(h[1]);
      const path = h[2]!.replace(/ \(deleted\)$/, '');
      guest = file !== undefined && ino !== 0 && (path === file.path || ino === file.ino);
      if (guest) out.guestFile.mappings++;
      continue;
    }
    const f = FIELD.exec(line);
    if (!f) continue;
    const kib = Number(f[2]);
    const g = out.guestFile;
    switch (f[1]) {
      case 'Rss':
        out.rssKiB += kib;
        if (guest) g.rssKiB += kib;
        else out.nonGuestRssKiB += kib;
        break;
      case 'Pss':
        out.pssKiB += kib;
        if (guest) g.pssKiB += kib;
        break;
      case 'Shared_Clean':
      case 'Shared_Dirty':
        if (guest) g.sharedKiB += kib;
        break;
      case 'Private_Clean':
        if (guest) g.privateCleanKiB += kib;
        break;
      case 'Private_Dirty':
        out.ownedKiB += kib;
        if (guest) {
          g.privateDirtyKiB += kib;
          out.guestCopiedKiB += kib;
        }
        break;
    }
  }
  return out;
}

/** Reads /proc/PID/smaps (bounded) and sums it; throws if the process is gone. */
export function cloneMemory(pid: number, memFile?: string | FileMatch): CloneMemory {
  if (!Number.isInteger(pid) || pid <= 0) throw new Error(`not a process id: ${pid}`);
  const file = typeof memFile === 'string' ? fileMatch(memFile) : memFile;
  const text = readFileSync(`/proc/${pid}/smaps`, 'utf8');
  if (text.length > MAX_SMAPS_BYTES)
    throw new Error(`/proc/${pid}/smaps is larger than ${MAX_SMAPS_BYTES} bytes`);
  return summariseCloneSmaps(text, pid, file);
}

const mib = (kib: number) => (kib / 1024).toFixed(kib < 10 * 1024 ? 2 : 1);

/** One line per clone and a total, for `typervisor clone`. */
export function formatCloneMemory(clones: CloneMemory[], guestMib?: number): string[] {
  const lines = clones.map(
    (c, i) =>
      `clone ${i} (pid ${c.pid}): owns ${mib(c.ownedKiB)} MiB (guest pages written ${mib(c.guestCopiedKiB)} MiB, ` +
      `VMM ${mib(c.ownedKiB - c.guestCopiedKiB)} MiB); memory file mapped ${mib(c.guestFile.rssKiB)} MiB, ` +
      `its share (Pss) ${mib(c.guestFile.pssKiB)} MiB; Rss ${mib(c.rssKiB)} MiB, Pss ${mib(c.pssKiB)} MiB`,
  );
  if (clones.length > 0) {
    const owned = clones.reduce((s, c) => s + c.ownedKiB, 0);
    const pss = clones.reduce((s, c) => s + c.pssKiB, 0);
    const rss = clones.reduce((s, c) => s + c.rssKiB, 0);
    lines.push(
      `total over ${clones.length} clone(s): owned ${mib(owned)} MiB (${mib(owned / clones.length)} MiB per clone), ` +
        `Pss ${mib(pss)} MiB (${mib(pss / clones.length)} MiB per clone), Rss summed ${mib(rss)} MiB` +
        (guestMib !== undefined ? `; guest size ${guestMib} MiB each` : ''),
    );
  }
  return lines;
}

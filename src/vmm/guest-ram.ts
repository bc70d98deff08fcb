/**
 * Guest RAM: every region mapped once by the main thread, or back to back in one file that each
 * thread maps.
 *
 * A booted VM's RAM is anonymous private memory (allocateGuestRam), as QEMU's is: the main thread
 * maps it, and the other threads wrap its host addresses (`hostAddrs`, below). Anonymous memory
 * gets transparent huge pages under the host's THP policy (`enabled`: Debian's default is
 * `always`), where a memfd would need the shmem policy (`shmem_enabled`: Debian's default is
 * `never`): KVM then maps the guest with 2 MiB entries and a guest's first touch of a region
 * costs one fault instead of 512 (docs/architecture.md "Huge pages under guest RAM").
 * MAP_NORESERVE: pages are allocated when the guest touches them. MADV_DONTFORK: a child process
 * the VMM spawns does not copy-on-write share the guest's pages.
 *
 * RAM of 2 MiB hugetlbfs pages (machine-config huge_pages "2M") is a memfd instead (createGuestRam):
 * every thread (main, device worker) mmaps it MAP_SHARED itself, so all see the same pages. The
 * same back-to-back layout is the snapshot memory file's (snapshot-memory.ts).
 *
 * A restored VM maps its memory file MAP_PRIVATE (copy-on-write over the file). Separate private
 * mappings would be separate copies, so the main thread maps once and the layout carries the
 * host addresses (`hostAddrs`): the other threads wrap those addresses (viewAddress) instead of
 * mapping, and their unmap only drops the view (release). Such a layout has no memfd (-1).
 *
 * With dirty page tracking (Diff snapshots) the layout also carries the device-dirty bitmap
 * (memory/dirty-pages.ts), a SharedArrayBuffer: every thread's GuestMemory marks the VMM's own
 * writes there (the device worker's virtqueues do), and a snapshot reads and clears it.
 *
 * Device memory (pmem files, the virtio-mem region: device-memory.ts) is mapped once, MAP_SHARED,
 * by the main thread, which gives it to KVM. The device worker's GuestMemory covers it too (a
 * guest may put any virtio buffer there): mapGuestRam's `device` views wrap the main thread's
 * addresses as restored RAM's `hostAddrs` are, dropped with the RAM's views. Device writes there
 * are not marked dirty: a snapshot saves the virtio-mem region whole from its memfd, and a pmem
 * file is its own backing.
 */
import { closeSync, ftruncateSync, openSync, readFileSync, readSync } from 'node:fs';
import {
  native,
  MADV_DONTFORK,
  MADV_HUGEPAGE,
  MADV_NOHUGEPAGE,
  MAP_ANONYMOUS,
  MAP_NORESERVE,
  MAP_PRIVATE,
  MAP_SHARED,
  PROT_READ,
  PROT_WRITE,
} from '../kvm/native.js';
import { DirtyPages } from '../memory/dirty-pages.js';
import { GuestMemory, type GuestRegion } from '../memory/guest-memory.js';
import { ConfigError, HostError } from '../util/errors.js';

export interface GuestRamRegion {
  base: number;
  size: number;
  fileOffset: number;
}

/** Everything a thread needs to map guest RAM itself (structured-clone friendly). */
export interface GuestRamLayout {
  /** The memfd every thread maps; -1 when the RAM is already mapped (see hostAddrs). */
  memfd: number;
  regions: GuestRamRegion[];
  /**
   * Host addresses of a mapping the main thread owns, one per region: threads wrap them instead
   * of mapping. Valid until the owner unmaps, which must come after every thread has dropped its
   * view (the device worker and vCPU workers end before the RAM is unmapped).
   */
  hostAddrs?: bigint[];
  /** The device-dirty bitmap (dirty page tracking on), shared by every thread. */
  deviceDirty?: SharedArrayBuffer;
  /**
   * The RAM is anonymous private memory (allocateGuestRam; `hostAddrs` set, memfd -1): zeroed by
   * MADV_DONTNEED, where a restored VM's private file mapping would go back to the file's bytes.
   */
  anonymous?: boolean;
  /**
   * The memfd is hugetlbfs (machine-config huge_pages "2M"): mapped without MAP_NORESERVE, so
   * that the first mapping reserves every page or fails (ENOMEM) instead of a later fault
   * killing the process with SIGBUS.
   */
  hugetlb?: boolean;
}

/**
 * Device memory as a thread other than its owner sees it: `size` bytes at guest-physical
 * `guestAddr`, mapped by the main thread at `hostAddr` (valid until the plan's closers run, after
 * the device worker has ended).
 */
export interface DeviceMemoryView {
  guestAddr: number;
  size: number;
  hostAddr: bigint;
  /** Mapped PROT_READ (a read-only pmem file): device writes are refused. */
  readOnly: boolean;
  /** Which guest-physical ranges the device worker may touch now (virtio-mem: plugged blocks). */
  allows?: (addr: number, len: number) => boolean;
}

/** V8 caps a typed array at 4 GiB: device memory is wrapped in views of at most this much. */
export const DEVICE_VIEW_MAX = 2 ** 32;

export interface MappedGuestRam {
  memory: GuestMemory;
  buffers: ArrayBuffer[]; // one per region, in layout order
  unmap(): void;
  /** The memfd mapped (hugetlbfs RAM): the snapshot writer reads only its data extents. */
  memfd?: number;
  /**
   * The owner's mapping of anonymous RAM (allocateGuestRam): the snapshot writer reads only the
   * pages that exist (residentRuns), and emptying it is MADV_DONTNEED.
   */
  anonymous?: boolean;
}

/** Gives a layout its device-dirty bitmap (before any thread maps it). */
export function trackDeviceWrites(layout: GuestRamLayout): void {
  layout.deviceDirty ??= DirtyPages.allocate(layout.regions);
}

/** The main thread's handle on the layout's device-dirty bitmap, if pages are tracked. */
export function deviceDirtyPages(layout: GuestRamLayout): DirtyPages | undefined {
  return layout.deviceDirty ? new DirtyPages(layout.deviceDirty, layout.regions) : undefined;
}

/** memfd_create flags: a hugetlbfs file of 2 MiB pages. */
const MFD_HUGETLB = 0x4;
const MFD_HUGE_2MB = 21 << 26;
export const HUGE_PAGE_SIZE = 2 * 1024 * 1024;

/**
 * A memfd for guest RAM, every range back to back. `hugetlb`: 2 MiB hugetlbfs pages (each
 * range's size a multiple of 2 MiB); refused with a HostError where the kernel has none.
 */
export function createGuestRam(
  ranges: Array<{ base: number; size: number }>,
  opts: { hugetlb?: boolean } = {},
): GuestRamLayout {
  const n = native();
  const hugetlb = opts.hugetlb === true;
  if (hugetlb && ranges.some((r) => r.size % HUGE_PAGE_SIZE !== 0))
    throw new ConfigError('huge_pages "2M": guest memory must be a multiple of 2 MiB');
  let memfd: number;
  try {
    memfd = n.memfdCreate('typervisor-guest-ram', hugetlb ? MFD_HUGETLB | MFD_HUGE_2MB : 0);
  } catch (e) {
    if (!hugetlb) throw e;
    throw new HostError(
      `huge_pages "2M": this host cannot make a hugetlbfs memfd of 2 MiB pages (${(e as Error).message})`,
    );
  }
  const regions = backToBack(ranges);
  const last = regions[regions.length - 1];
  try {
    ftruncateSync(memfd, last ? last.fileOffset + last.size : 0);
  } catch (e) {
    n.close(memfd);
    throw e;
  }
  return hugetlb ? { memfd, regions, hugetlb } : { memfd, regions };
}

/**
 * Anonymous guest RAM, one private mapping per range made by the calling (main) thread, which
 * owns it: its `ram.unmap()` munmaps, after every other thread has dropped its view (the device
 * worker wraps `layout.hostAddrs`, as for a restored VM). Each mapping starts at a multiple of
 * 2 MiB and is advised MADV_HUGEPAGE
 * (2 MiB pages where the host's THP policy is `madvise` as well as `always`) and MADV_DONTFORK;
 * both are best effort. `trackDirty`: the layout gets its device-dirty bitmap and the mapping
 * marks the VMM's writes there, as mapGuestRam does.
 */
export function allocateGuestRam(
  ranges: Array<{ base: number; size: number }>,
  opts: { trackDirty?: boolean } = {},
): { layout: GuestRamLayout; ram: MappedGuestRam } {
  const n = native();
  const buffers: ArrayBuffer[] = [];
  try {
    for (const r of ranges) {
      // 2 MiB-aligned, so that each 2 MiB of guest-physical RAM can be one huge page under one
      // 2 MiB KVM mapping (a kernel before 6.7 does not align a large anonymous mapping itself).
      const b = n.mmapAligned(
        r.size,
        HUGE_PAGE_SIZE,
        PROT_READ | PROT_WRITE,
        MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
        -1,
        0,
      );
      buffers.push(b);
      adviseHugePages(b);
      // The first 2 MiB hold what the boot loader writes (zero page, command line, page tables,
      // MP and ACPI tables, below 1 MiB) and a tiny guest's whole footprint: on 4 KiB pages they
      // cost the host what is written, not 2 MiB (issue 18's peak RSS of the micro guest).
      if (r.base === 0 && r.size >= HUGE_PAGE_SIZE)
        adviseBestEffort(b, HUGE_PAGE_SIZE, MADV_NOHUGEPAGE);
      // Refused: a forked child shares the pages copy-on-write until it execs.
      adviseBestEffort(b, b.byteLength, MADV_DONTFORK);
    }
  } catch (e) {
    buffers.forEach((b) => n.munmap(b));
    throw e;
  }
  const regions = backToBack(ranges);
  const layout: GuestRamLayout = {
    memfd: -1,
    regions,
    hostAddrs: buffers.map((b) => n.bufferAddress(b)),
    anonymous: true,
  };
  if (opts.trackDirty) trackDeviceWrites(layout);
  const ram = markDeviceWrites(
    layout,
    guestRamOver(regions, buffers, (b) => n.munmap(b)),
  );
  return { layout, ram: { ...ram, anonymous: true } };
}

const PAGEMAP_PRESENT = 0x80000000; // bit 63 of an entry (in its high word)
const PAGEMAP_SWAPPED = 0x40000000; // bit 62
const PAGEMAP_CHUNK = 8192; // entries read at a time: 64 KiB covering 32 MiB

/**
 * The runs of 4 KiB pages of `buffer` (an anonymous private mapping) that exist, in memory or in
 * swap, as [first, end) page indices, from /proc/self/pagemap; a page never touched is not in any
 * run (it reads as zeros). Where pagemap cannot be read (no /proc, e.g. in a jail) every page is
 * one run: reading an untouched page maps the shared zero page, so a full scan costs time, not
 * memory.
 */
export function residentRuns(buffer: ArrayBuffer): Array<[number, number]> {
  const pages = Math.floor(buffer.byteLength / 4096);
  let fd: number;
  try {
    fd = openSync('/proc/self/pagemap', 'r');
  } catch {
    return pages > 0 ? [[0, pages]] : [];
  }
  const out: Array<[number, number]> = [];
  try {
    const first = native().bufferAddress(buffer) / 4096n;
    const chunk = new Uint32Array(PAGEMAP_CHUNK * 2);
    const bytes = new Uint8Array(chunk.buffer);
    let start = -1;
    for (let p = 0; p < pages; p += PAGEMAP_CHUNK) {
      const count = Math.min(PAGEMAP_CHUNK, pages - p);
      const want = count * 8;
      let got = 0;
      while (got < want) {
        const r = readSync(fd, bytes, got, want - got, (first + BigInt(p)) * 8n + BigInt(got));
        if (r <= 0) throw new Error('pagemap: short read');
        got += r;
      }
      for (let i = 0; i < count; i++) {
        const there = (chunk[i * 2 + 1]! & (PAGEMAP_PRESENT | PAGEMAP_SWAPPED)) !== 0;
        if (there && start < 0) start = p + i;
        else if (!there && start >= 0) {
          out.push([start, p + i]);
          start = -1;
        }
      }
    }
    if (start >= 0) out.push([start, pages]);
  } catch {
    return pages > 0 ? [[0, pages]] : [];
  } finally {
    closeSync(fd);
  }
  return out;
}

/** The host's pool of 2 MiB pages (/proc/meminfo), in pages; NaN for a field it lacks. */
export function hugePagePool(): { total: number; free: number; reserved: number } {
  const info = readFileSync('/proc/meminfo', 'latin1');
  const field = (k: string) => Number(new RegExp(`^${k}:\\s+(\\d+)`, 'm').exec(info)?.[1] ?? NaN);
  return {
    total: field('HugePages_Total'),
    free: field('HugePages_Free'),
    reserved: field('HugePages_Rsvd'),
  };
}

/** The pool's counts for an error message. */
function hugePagesNote(): string {
  try {
    const p = hugePagePool();
    return `HugePages_Total ${p.total}, HugePages_Free ${p.free}, HugePages_Rsvd ${p.reserved}`;
  } catch {
    return 'see /proc/meminfo';
  }
}

/**
 * A MappedGuestRam over buffers already made, one per region; `drop` releases one buffer.
 * `device`: device memory regions (their views are released with viewRelease at unmap).
 */
export function guestRamOver(
  regions: readonly GuestRamRegion[],
  buffers: ArrayBuffer[],
  drop: (b: ArrayBuffer) => void,
  device?: { regions: GuestRegion[]; release: () => void },
): MappedGuestRam {
  const memory = new GuestMemory(
    regions.map((r, i) => ({
      base: r.base,
      size: r.size,
      bytes: new Uint8Array(buffers[i]!),
    })),
    device?.regions,
  );
  return {
    memory,
    buffers,
    // A detached buffer has length 0: unmap twice is harmless.
    unmap: () => {
      buffers.forEach((b) => b.byteLength > 0 && drop(b));
      device?.release();
    },
  };
}

/**
 * Device memory as GuestMemory regions over views of the owner's mappings (no mmap), each at
 * most `maxView` bytes (DEVICE_VIEW_MAX; tests take less); `release` detaches the views (never
 * unmaps).
 */
export function viewDeviceMemory(
  device: readonly DeviceMemoryView[],
  maxView = DEVICE_VIEW_MAX,
): {
  regions: GuestRegion[];
  release: () => void;
} {
  const n = native();
  const views: ArrayBuffer[] = [];
  const regions: GuestRegion[] = [];
  const release = () => views.forEach((b) => b.byteLength > 0 && n.release(b));
  try {
    for (const d of device) {
      if (!Number.isSafeInteger(d.guestAddr) || !Number.isSafeInteger(d.size) || d.size <= 0)
        throw new Error('device memory: bad region');
      for (let off = 0; off < d.size; off += maxView) {
        const size = Math.min(maxView, d.size - off);
        const b = n.viewAddress(d.hostAddr + BigInt(off), size);
        views.push(b);
        regions.push({
          base: d.guestAddr + off,
          size,
          bytes: new Uint8Array(b),
          ...(d.readOnly ? { readOnly: true } : {}),
          ...(d.allows ? { allows: d.allows } : {}),
        });
      }
    }
  } catch (e) {
    release();
    throw e;
  }
  return { regions, release };
}

/**
 * Maps the layout's RAM on this thread, and wraps `device` memory (the device worker). With a
 * device-dirty bitmap, the memory marks the VMM's writes to RAM there (GuestMemory.deviceWrites).
 */
export function mapGuestRam(
  layout: GuestRamLayout,
  device: readonly DeviceMemoryView[] = [],
): MappedGuestRam {
  return markDeviceWrites(
    layout,
    mapRegions(layout, device.length ? viewDeviceMemory(device) : undefined),
  );
}

/** With a device-dirty bitmap, `ram`'s memory marks the VMM's writes there; returns `ram`. */
function markDeviceWrites(layout: GuestRamLayout, ram: MappedGuestRam): MappedGuestRam {
  if (layout.deviceDirty)
    ram.memory.deviceWrites = new DirtyPages(
      layout.deviceDirty,
      layout.regions,
      ram.buffers.map((b) => new Uint8Array(b)),
    );
  return ram;
}

/** The ranges back to back, as in a memfd: the offsets a snapshot's memory file gives them. */
function backToBack(ranges: ReadonlyArray<{ base: number; size: number }>): GuestRamRegion[] {
  let off = 0;
  return ranges.map((r) => {
    const region = { base: r.base, size: r.size, fileOffset: off };
    off += r.size;
    return region;
  });
}

/**
 * Asks for 2 MiB pages under guest RAM (MADV_HUGEPAGE), as QEMU does for its RAM. For a memfd
 * the kernel grants them only where the host's shmem THP policy lets it
 * (/sys/kernel/mm/transparent_hugepage/shmem_enabled `advise`, `within_size` or `always`;
 * Debian's default is `never`, which makes this a no-op): then KVM maps the guest with 2 MiB
 * entries, and a guest's first touch of a region costs one fault instead of 512 (a Linux boot in
 * the lab 23% faster, docs/architecture.md "Huge pages under guest RAM"). Best effort: a kernel
 * without THP refuses (EINVAL), and the RAM works the same with 4 KiB pages.
 */
function adviseHugePages(b: ArrayBuffer): void {
  adviseBestEffort(b, b.byteLength, MADV_HUGEPAGE); // refused: 4 KiB pages, as before
}

/** madvise of the first `length` bytes of `b`, whose refusal changes nothing that must hold. */
function adviseBestEffort(b: ArrayBuffer, length: number, advice: number): void {
  try {
    native().madvise(b, 0, length, advice);
  } catch {
    // the mapping works the same without the advice
  }
}

function mapRegions(
  layout: GuestRamLayout,
  device?: { regions: GuestRegion[]; release: () => void },
): MappedGuestRam {
  const n = native();
  const addrs = layout.hostAddrs;
  const buffers: ArrayBuffer[] = [];
  let drop: (b: ArrayBuffer) => void;
  try {
    if (addrs) {
      if (addrs.length !== layout.regions.length)
        throw new Error('guest RAM layout: one host address per region expected');
      drop = (b) => n.release(b);
      layout.regions.forEach((r, i) => buffers.push(n.viewAddress(addrs[i]!, r.size)));
    } else {
      drop = (b) => n.munmap(b);
      for (const r of layout.regions) {
        let b: ArrayBuffer;
        try {
          b = n.mmap(
            r.size,
            PROT_READ | PROT_WRITE,
            layout.hugetlb ? MAP_SHARED : MAP_SHARED | MAP_NORESERVE,
            layout.memfd,
            r.fileOffset,
          );
        } catch (e) {
          if (!layout.hugetlb || (e as NodeJS.ErrnoException).code !== 'ENOMEM') throw e;
          throw new HostError(
            `huge_pages "2M": the host has too few free 2 MiB pages for ${layout.regions.reduce((a, x) => a + x.size, 0) / HUGE_PAGE_SIZE} of them (${hugePagesNote()}; raise vm.nr_hugepages)`,
          );
        }
        buffers.push(b);
        if (!layout.hugetlb) adviseHugePages(b);
      }
    }
    const ram = guestRamOver(layout.regions, buffers, drop, device);
    return addrs ? ram : { ...ram, memfd: layout.memfd };
  } catch (e) {
    // Nothing half-made stays mapped (GuestMemory refuses overlapping regions, for one).
    for (const b of buffers) if (b.byteLength > 0) addrs ? n.release(b) : n.munmap(b);
    device?.release();
    throw e;
  }
}

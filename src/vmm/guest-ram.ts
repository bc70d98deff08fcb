/**
 * Guest RAM: every region back to back in one file, mapped by each thread.
 *
 * A booted VM's file is a memfd: every thread (main, vCPU workers, device worker) mmaps it
 * MAP_SHARED itself, so all see the same pages. MAP_NORESERVE: pages are allocated when the guest
 * touches them. The same back-to-back layout is the snapshot memory file's (snapshot-memory.ts).
 *
 * A restored VM maps its memory file MAP_PRIVATE (copy-on-write over the file). Separate private
 * mappings would be separate copies, so the main thread maps once and the layout carries the
 * host addresses (`hostAddrs`): the other threads wrap those addresses (viewAddress) instead of
 * mapping, and their unmap only drops the view (release). Such a layout has no memfd (-1).
 *
 * With dirty page tracking (Diff snapshots) the layout also carries the device-dirty bitmap
 * (memory/dirty-pages.ts), a SharedArrayBuffer: every thread's GuestMemory marks the VMM's own
 * writes there (the device worker's virtqueues do), and a snapshot reads and clears it.
 */
import { ftruncateSync } from 'node:fs';
import { native, MAP_NORESERVE, MAP_SHARED, PROT_READ, PROT_WRITE } from '../kvm/native.js';
import { DirtyPages } from '../memory/dirty-pages.js';
import { GuestMemory } from '../memory/guest-memory.js';

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
}

export interface MappedGuestRam {
  memory: GuestMemory;
  buffers: ArrayBuffer[]; // one per region, in layout order
  unmap(): void;
  /** The memfd mapped (a booted VM's RAM): the snapshot writer reads only its data extents. */
  memfd?: number;
}

/** Gives a layout its device-dirty bitmap (before any thread maps it). */
export function trackDeviceWrites(layout: GuestRamLayout): void {
  layout.deviceDirty ??= DirtyPages.allocate(layout.regions);
}

/** The main thread's handle on the layout's device-dirty bitmap, if pages are tracked. */
export function deviceDirtyPages(layout: GuestRamLayout): DirtyPages | undefined {
  return layout.deviceDirty ? new DirtyPages(layout.deviceDirty, layout.regions) : undefined;
}

export function createGuestRam(ranges: Array<{ base: number; size: number }>): GuestRamLayout {
  const n = native();
  const memfd = n.memfdCreate('typervisor-guest-ram', 0);
  let off = 0;
  const regions = ranges.map((r) => {
    const region = { base: r.base, size: r.size, fileOffset: off };
    off += r.size;
    return region;
  });
  ftruncateSync(memfd, off);
  return { memfd, regions };
}

/** A MappedGuestRam over buffers already made, one per region; `drop` releases one buffer. */
export function guestRamOver(
  regions: readonly GuestRamRegion[],
  buffers: ArrayBuffer[],
  drop: (b: ArrayBuffer) => void,
): MappedGuestRam {
  const memory = new GuestMemory(
    regions.map((r, i) => ({
      base: r.base,
      size: r.size,
      bytes: new Uint8Array(buffers[i]!),
    })),
  );
  return {
    memory,
    buffers,
    // A detached buffer has length 0: unmap twice is harmless.
    unmap: () => buffers.forEach((b) => b.byteLength > 0 && drop(b)),
  };
}

/**
 * Maps the layout's RAM on this thread. With a device-dirty bitmap, the memory marks the VMM's
 * writes there (GuestMemory.deviceWrites).
 */
export function mapGuestRam(layout: GuestRamLayout): MappedGuestRam {
  const ram = mapRegions(layout);
  if (layout.deviceDirty)
    ram.memory.deviceWrites = new DirtyPages(
      layout.deviceDirty,
      layout.regions,
      ram.buffers.map((b) => new Uint8Array(b)),
    );
  return ram;
}

function mapRegions(layout: GuestRamLayout): MappedGuestRam {
  const n = native();
  const addrs = layout.hostAddrs;
  if (addrs) {
    if (addrs.length !== layout.regions.length)
      throw new Error('guest RAM layout: one host address per region expected');
    const views = layout.regions.map((r, i) => n.viewAddress(addrs[i]!, r.size));
    return guestRamOver(layout.regions, views, (b) => n.release(b));
  }
  const buffers = layout.regions.map((r) =>
    n.mmap(r.size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, layout.memfd, r.fileOffset),
  );
  return { ...guestRamOver(layout.regions, buffers, (b) => n.munmap(b)), memfd: layout.memfd };
}

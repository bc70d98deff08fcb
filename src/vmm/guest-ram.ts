/**
 * Guest RAM: one memfd holding every region back to back, mapped once per thread.
 * The memfd lets every worker map the same pages without sharing raw pointers (and is what
 * snapshots will save later). MAP_NORESERVE: pages are allocated when the guest touches them.
 */
import { ftruncateSync } from 'node:fs';
import { native, MAP_NORESERVE, MAP_SHARED, PROT_READ, PROT_WRITE } from '../kvm/native.js';
import { GuestMemory } from '../memory/guest-memory.js';

/** Everything a thread needs to map guest RAM itself (structured-clone friendly). */
export interface GuestRamLayout {
  memfd: number;
  regions: Array<{ base: number; size: number; fileOffset: number }>;
}

export interface MappedGuestRam {
  memory: GuestMemory;
  buffers: ArrayBuffer[]; // one per region, in layout order
  unmap(): void;
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

export function mapGuestRam(layout: GuestRamLayout): MappedGuestRam {
  const n = native();
  const buffers = layout.regions.map((r) =>
    n.mmap(r.size, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, layout.memfd, r.fileOffset),
  );
  const memory = new GuestMemory(
    layout.regions.map((r, i) => ({
      base: r.base,
      size: r.size,
      bytes: new Uint8Array(buffers[i]!),
    })),
  );
  return {
    memory,
    buffers,
    unmap: () => buffers.forEach((b) => b.byteLength > 0 && n.munmap(b)),
  };
}

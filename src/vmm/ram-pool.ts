/**
 * Guest RAM kept between VMs (the library's warm path, src/lib/): a VM's RAM (the main thread's
 * anonymous mapping, or a memfd and the main thread's mapping of it) is handed back when the VM
 * is gone, emptied, and given to the next VM of the same size. A fresh mapping costs the main thread ~5-10 ms even though mmap itself is
 * cheap: V8 counts a >= 64 MiB external ArrayBuffer as memory pressure and runs a mark-compact
 * (issue 18); a kept one costs nothing.
 *
 * Emptied means zero: madvise(MADV_DONTNEED) frees every page of anonymous RAM, and
 * madvise(MADV_REMOVE) every page of a memfd (as a punch-hole), so the next guest reads zeros and
 * nothing of the last one. A restored VM's private file mapping is never kept (emptied, it would
 * read the file's bytes). If that fails, the RAM is not kept.
 * Only RAM that no thread uses any more comes back: the VM's vCPUs and device worker have ended
 * (builder.ts gives it back at the VM's release).
 */
import { native } from '../kvm/native.js';
import type { GuestRamLayout, MappedGuestRam } from './guest-ram.js';

const MADV_DONTNEED = 4;
const MADV_REMOVE = 9;

export interface KeptRam {
  layout: GuestRamLayout;
  ram: MappedGuestRam;
}

/** Where a build takes its RAM from and gives it back to (BuildOptions.guestRam). */
export interface GuestRamSource {
  /** Zeroed RAM with exactly these regions, or undefined (the build makes new RAM). */
  take(regions: ReadonlyArray<{ base: number; size: number }>): KeptRam | undefined;
  /** The VM that used it is gone: keep it (emptied) or release it. */
  give(kept: KeptRam): void;
}

const keyOf = (regions: ReadonlyArray<{ base: number; size: number }>) =>
  regions.map((r) => `${r.base}+${r.size}`).join(',');

export class GuestRamPool implements GuestRamSource {
  private readonly idle = new Map<string, KeptRam[]>();
  private count = 0;
  private closed = false;
  /** RAMs handed back and kept; RAMs released because the pool was full or emptying failed. */
  readonly stats = { reused: 0, kept: 0, released: 0, emptyFailures: 0 };

  /** `maxIdle`: RAMs kept at most (all sizes together); more are released. */
  constructor(private readonly maxIdle: number) {}

  get idleCount(): number {
    return this.count;
  }

  take(regions: ReadonlyArray<{ base: number; size: number }>): KeptRam | undefined {
    const list = this.idle.get(keyOf(regions));
    const k = list?.pop();
    if (!k) return undefined;
    this.count--;
    this.stats.reused++;
    return k;
  }

  give(k: KeptRam): void {
    if (
      this.closed ||
      this.count >= this.maxIdle ||
      (k.layout.memfd < 0 && !k.layout.anonymous) ||
      k.layout.deviceDirty ||
      k.layout.hugetlb
    )
      return this.release(k);
    try {
      const n = native();
      // Anonymous private memory reads as zeros after MADV_DONTNEED; a shared memfd's pages
      // would stay in the file (MADV_REMOVE punches them out).
      const advice = k.layout.anonymous ? MADV_DONTNEED : MADV_REMOVE;
      for (const b of k.ram.buffers) n.madvise(b, 0, b.byteLength, advice);
    } catch {
      this.stats.emptyFailures++;
      return this.release(k);
    }
    const key = keyOf(k.layout.regions);
    const list = this.idle.get(key) ?? [];
    list.push(k);
    this.idle.set(key, list);
    this.count++;
    this.stats.kept++;
  }

  private release(k: KeptRam): void {
    this.stats.released++;
    k.ram.unmap();
    if (k.layout.memfd >= 0) {
      try {
        native().close(k.layout.memfd);
      } catch {
        // already closed
      }
    }
  }

  /** Releases every kept RAM; RAM given back later is released too. */
  close(): void {
    this.closed = true;
    for (const list of this.idle.values()) for (const k of list) this.release(k);
    this.idle.clear();
    this.count = 0;
  }
}

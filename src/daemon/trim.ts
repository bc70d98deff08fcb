/**
 * The shared-mode daemon's idle memory return (docs/daemon.md "Memory"). When it goes idle (no
 * VM has ended or been deleted for TRIM_IDLE_MS) it does, once:
 *  1. a full garbage collection of its V8 heaps, its own and every idle vCPU worker's
 *     (VmHost.collectGarbage; the daemon runs with --expose-gc, src/daemon/heap.ts). Left to
 *     V8, an idle daemon's RSS settled wherever the last collections had left each isolate's
 *     heap: after the same churn, 99-107 MiB from one idle moment to the next; collected, 95.5-
 *     96.8 (docs/daemon.md);
 *  2. glibc's malloc_trim(0) (src/vmm/malloc-trim.ts): glibc's main arena grows with the churn
 *     (its brk heap 14.3 -> 20.2 MiB over 6,000 VMs) and glibc gives back only what is free at
 *     its very top; the trim also gives back the free pages inside every arena (madvise
 *     MADV_DONTNEED), those the collection just freed among them.
 * Never on the path of a create: a busy daemon does neither (glibc reuses its free chunks).
 */
import type { Collected } from './backend.js';
import { monoMs } from '../util/clock.js';

/** How long after the last VM end or delete the daemon trims. */
export const TRIM_IDLE_MS = 1000;

export interface TrimStats {
  /** malloc_trim calls so far. */
  runs: number;
  /** How many of them gave memory back. */
  released: number;
  /** Their total time, ms. */
  ms: number;
  /**
   * Garbage collections before them: how many; the main thread's time in them, ms in all (it
   * serves nothing meanwhile) and the longest; and how many idle vCPU workers collected theirs
   * in the last one (on their own threads).
   */
  gc_runs: number;
  gc_ms: number;
  gc_max_ms: number;
  gc_workers: number;
}

export class IdleTrim {
  private timer: NodeJS.Timeout | undefined;
  private closed = false;
  readonly stats: TrimStats = {
    runs: 0,
    released: 0,
    ms: 0,
    gc_runs: 0,
    gc_ms: 0,
    gc_max_ms: 0,
    gc_workers: 0,
  };

  /**
   * `trim`: malloc_trim(0) (src/vmm/malloc-trim.ts), true when memory went back. `collect`:
   * the garbage collection that goes first (none if not given).
   */
  constructor(
    private readonly trim: () => boolean,
    private readonly idleMs = TRIM_IDLE_MS,
    private readonly collect?: () => Promise<Collected>,
  ) {}

  /** A VM ended or its record was deleted: trims once nothing more has happened for idleMs. */
  note(): void {
    if (this.closed) return;
    if (this.timer) {
      this.timer.refresh();
      return;
    }
    this.timer = setTimeout(() => {
      this.timer = undefined;
      void this.run();
    }, this.idleMs);
    this.timer.unref();
  }

  private async run(): Promise<void> {
    if (this.collect) {
      const c = await this.collect().catch(() => undefined);
      if (c?.main) {
        this.stats.gc_ms += c.mainMs;
        this.stats.gc_max_ms = Math.max(this.stats.gc_max_ms, c.mainMs);
        this.stats.gc_runs++;
        this.stats.gc_workers = c.workers;
      }
      // Closed meanwhile, or busy again (a note while collecting): the trim waits for the
      // next idle moment.
      if (this.closed || this.timer) return;
    }
    const t0 = monoMs();
    const released = this.trim();
    this.stats.ms += monoMs() - t0;
    this.stats.runs++;
    if (released) this.stats.released++;
  }

  close(): void {
    this.closed = true;
    clearTimeout(this.timer);
    this.timer = undefined;
  }
}

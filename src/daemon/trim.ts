/**
 * The shared-mode daemon's malloc trim (docs/daemon.md "Memory"). glibc's main arena grows with
 * the daemon's churn (its brk heap 14.3 -> 20.2 MiB over 6,000 VMs) and glibc gives back only
 * what is free at its very top; malloc_trim(0) (src/vmm/malloc-trim.ts) also gives back the free
 * pages inside every arena (madvise MADV_DONTNEED). The daemon calls it when it goes idle: once
 * no VM has ended or been deleted for TRIM_IDLE_MS. Never on the path of a create: a busy daemon
 * does not trim (glibc reuses its free chunks), an idle one does, once (~1-1.5 ms here).
 */

/** How long after the last VM end or delete the daemon trims. */
export const TRIM_IDLE_MS = 1000;

export interface TrimStats {
  /** malloc_trim calls so far. */
  runs: number;
  /** How many of them gave memory back. */
  released: number;
  /** Their total time, ms. */
  ms: number;
}

export class IdleTrim {
  private timer: NodeJS.Timeout | undefined;
  private closed = false;
  readonly stats: TrimStats = { runs: 0, released: 0, ms: 0 };

  /** `trim`: malloc_trim(0) (src/vmm/malloc-trim.ts), true when memory went back. */
  constructor(
    private readonly trim: () => boolean,
    private readonly idleMs = TRIM_IDLE_MS,
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
      const t0 = performance.now();
      const released = this.trim();
      this.stats.ms += performance.now() - t0;
      this.stats.runs++;
      if (released) this.stats.released++;
    }, this.idleMs);
    this.timer.unref();
  }

  close(): void {
    this.closed = true;
    clearTimeout(this.timer);
    this.timer = undefined;
  }
}

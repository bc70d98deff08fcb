/**
 * The metrics system, as Firecracker's: once a metrics path is set (PUT /metrics or
 * --metrics-path), one JSON object per line goes there every 60 s and on FlushMetrics, and once
 * more when the process exits. Counters are reported as deltas since the last line that was
 * written (Firecracker's SharedIncMetric); a line that could not be written (a full pipe) is
 * counted in `metrics.missed_metrics_count` and its deltas carry over into the next line, so
 * nothing is lost but the timing.
 *
 * Sources are functions returning { group: { counter: number } }, or a promise of it (the
 * virtio devices' counters come from the device worker's mailbox); the controller registers the
 * VM's devices and vCPUs when the VM starts. A source that fails or does not answer within
 * SOURCE_TIMEOUT_MS contributes what it last reported, so a stuck source never holds a line.
 */
import { closeSync, writeSync } from 'node:fs';
import { ConfigError } from '../util/errors.js';
import type { MetricsConfig } from '../vmm/index.js';
import { openOutputFile } from './output-file.js';

export const METRICS_PERIOD_MS = 60_000;
export const SOURCE_TIMEOUT_MS = 2_000;

export type MetricGroups = Record<string, Record<string, number>>;
export type MetricSource = () => MetricGroups | Promise<MetricGroups>;

export class Counters {
  private readonly groups: MetricGroups = {};
  inc(group: string, name: string, by = 1): void {
    const g = (this.groups[group] ??= {});
    g[name] = (g[name] ?? 0) + by;
  }
  snapshot(): MetricGroups {
    const out: MetricGroups = {};
    for (const [g, c] of Object.entries(this.groups)) out[g] = { ...c };
    return out;
  }
}

export class MetricsSystem {
  /** API request counters and the metrics system's own. */
  readonly counters = new Counters();
  private readonly sources: MetricSource[] = [() => this.counters.snapshot()];
  /**
   * Stored values (Firecracker's SharedStoreMetric, e.g. `latencies_us.load_snapshot`): each line
   * carries the last value set, not a delta.
   */
  private readonly stored: MetricGroups = {};
  /** What each source last reported. */
  private readonly reported = new Map<MetricSource, MetricGroups>();
  /** Lines are written one at a time, in order. */
  private writing: Promise<unknown> = Promise.resolve();
  private fd: number | undefined;
  private config: MetricsConfig | undefined;
  private last: Map<string, number> = new Map();
  private timer: NodeJS.Timeout | undefined;

  constructor(private readonly instanceId: string) {}

  get initialized(): boolean {
    return this.fd !== undefined;
  }

  get configuration(): MetricsConfig | undefined {
    return this.config;
  }

  /** Opens the metrics path (created 0600 if missing; non-blocking, so a FIFO never stalls us). */
  init(cfg: MetricsConfig): void {
    if (this.fd !== undefined) throw new ConfigError('Reinitialization of metrics not allowed.');
    // No symlink, created 0600, a regular file or FIFO only (see output-file.ts).
    this.fd = openOutputFile('metrics_path', cfg.metrics_path);
    this.config = { ...cfg };
    this.timer = setInterval(() => void this.flush(), METRICS_PERIOD_MS);
    this.timer.unref();
  }

  /** Sets a stored value (reported as is on every line until set again). */
  store(group: string, name: string, value: number): void {
    (this.stored[group] ??= {})[name] = value;
  }

  addSource(s: MetricSource): void {
    this.sources.push(s);
  }

  private async collect(src: MetricSource): Promise<MetricGroups> {
    try {
      const r = src();
      const groups =
        r instanceof Promise
          ? await Promise.race([
              r,
              new Promise<undefined>((resolve) => {
                const t: NodeJS.Timeout = setTimeout(() => resolve(undefined), SOURCE_TIMEOUT_MS);
                t.unref();
              }),
            ])
          : r;
      if (groups) this.reported.set(src, groups);
    } catch {
      // a source whose VM is gone: what it reported last stands
    }
    return this.reported.get(src) ?? {};
  }

  /** Writes one line. Resolves false when metrics are not configured or the write failed. */
  flush(): Promise<boolean> {
    const next = this.writing.then(() => this.writeLine());
    this.writing = next;
    return next;
  }

  private async writeLine(): Promise<boolean> {
    if (this.fd === undefined) return false;
    const totals = new Map<string, number>();
    const all = await Promise.all(this.sources.map((s) => this.collect(s)));
    if (this.fd === undefined) return false;
    for (const groups of all) {
      for (const [g, c] of Object.entries(groups))
        for (const [n, v] of Object.entries(c)) totals.set(`${g}\0${n}`, v);
    }
    const body: Record<string, unknown> = { utc_timestamp_ms: Date.now() };
    if (this.config?.emit_id) body.id = this.instanceId;
    if (this.config?.properties) body.properties = this.config.properties;
    for (const [key, v] of totals) {
      const [g, n] = key.split('\0') as [string, string];
      ((body[g] ??= {}) as Record<string, number>)[n] = v - (this.last.get(key) ?? 0);
    }
    for (const [g, c] of Object.entries(this.stored))
      for (const [n, v] of Object.entries(c)) ((body[g] ??= {}) as Record<string, number>)[n] = v;
    const line = Buffer.from(JSON.stringify(body) + '\n');
    try {
      const n = writeSync(this.fd, line);
      if (n !== line.length) throw new Error('short write');
    } catch {
      this.counters.inc('metrics', 'missed_metrics_count');
      return false;
    }
    this.last = totals;
    return true;
  }

  /** Writes the last line and closes the metrics file. */
  async close(): Promise<void> {
    if (this.timer) clearInterval(this.timer);
    if (this.fd !== undefined) {
      await this.flush();
      if (this.fd === undefined) return;
      try {
        closeSync(this.fd);
      } catch {
        // already closed
      }
      this.fd = undefined;
    }
  }
}

/**
 * The metrics system, as Firecracker's: once a metrics path is set (PUT /metrics or
 * --metrics-path), one JSON object per line goes there every 60 s and on FlushMetrics, and once
 * more when the process exits. Counters are reported as deltas since the last line that was
 * written (Firecracker's SharedIncMetric); a line that could not be written (a full pipe) is
 * counted in `metrics.missed_metrics_count` and its deltas carry over into the next line, so
 * nothing is lost but the timing.
 *
 * Sources are plain functions returning { group: { counter: number } }; the controller
 * registers the VM's devices and vCPUs when the VM starts.
 */
import { closeSync, constants, openSync, writeSync } from 'node:fs';
import { ConfigError } from '../util/errors.js';
import type { MetricsConfig } from '../vmm/resources.js';

export const METRICS_PERIOD_MS = 60_000;

export type MetricGroups = Record<string, Record<string, number>>;
export type MetricSource = () => MetricGroups;

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

  /** Opens the metrics path (created if missing; non-blocking, so a FIFO never stalls us). */
  init(cfg: MetricsConfig): void {
    if (this.fd !== undefined) throw new ConfigError('Reinitialization of metrics not allowed.');
    let fd: number;
    try {
      fd = openSync(
        cfg.metrics_path,
        constants.O_RDWR | constants.O_CREAT | constants.O_NONBLOCK | constants.O_APPEND,
        0o600,
      );
    } catch (e) {
      throw new ConfigError(
        `Cannot initialize the metrics system due to bad user input: ${(e as Error).message}`,
      );
    }
    this.fd = fd;
    this.config = { ...cfg };
    this.timer = setInterval(() => this.flush(), METRICS_PERIOD_MS);
    this.timer.unref();
  }

  addSource(s: MetricSource): void {
    this.sources.push(s);
  }

  /** Writes one line. Returns false when metrics are not configured or the write failed. */
  flush(): boolean {
    if (this.fd === undefined) return false;
    const totals = new Map<string, number>();
    for (const src of this.sources) {
      let groups: MetricGroups;
      try {
        groups = src();
      } catch {
        continue; // a source whose VM is gone: skip it
      }
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

  close(): void {
    if (this.timer) clearInterval(this.timer);
    if (this.fd !== undefined) {
      this.flush();
      try {
        closeSync(this.fd);
      } catch {
        // already closed
      }
      this.fd = undefined;
    }
  }
}

/**
 * The metrics system, as Firecracker's: once a metrics path is set (PUT /metrics or
 * --metrics-path), one JSON object per line goes there every 60 s and on FlushMetrics, and once
 * more when the process exits. Counters are reported as deltas since the last line that was
 * written (Firecracker's SharedIncMetric); a line that could not be written (a full pipe) is
 * counted in `logger.missed_metrics_count` and its deltas carry over into the next line, so
 * nothing is lost but the timing.
 *
 * Sources are functions returning { group: { counter: number } }, or a promise of it (the
 * virtio devices' counters come from the device worker's mailbox); the controller registers the
 * VM's devices and vCPUs when the VM starts. A source that fails or does not answer within
 * SOURCE_TIMEOUT_MS contributes what it last reported, so a stuck source never holds a line.
 *
 * Every line has Firecracker's shape (FC_METRICS_SCHEMA, from its src/vmm/src/logger/metrics.rs
 * and per-device metrics files): every group and field on every line, 0 when nothing happened
 * or the feature is missing here, plus one `block_<drive_id>` / `net_<iface_id>` group per
 * device as Firecracker writes them. Firecracker's validator refuses any other name, so a
 * counter of ours that Firecracker has no field for is not written (ALIASES maps the ones that
 * mean the same under another name).
 *
 * Notifications (issue 17): every virtio device reports its kicks under Firecracker's
 * queue-event names (block `queue_event_count`, net/vsock `rx_queue_event_count` and
 * `tx_queue_event_count`, entropy `entropy_event_count`, pmem and memory_hotplug
 * `queue_event_count`), and per queue, under our own names (in the `typervisor` group):
 * `queue<i>_kicks`, `queue<i>_irqs` (used-buffer interrupts raised), `queue<i>_irqs_suppressed`
 * (the driver's used_event / NO_INTERRUPT said no), `queue<i>_used` (chains returned), and
 * `queue<i>_turns` / `queue<i>_turn_us` (drained turns that returned a chain, their time,
 * estimated from one turn in 8). For
 * virtio-net queue 0 is RX and 1 is TX: TX frames per kick = tx_packets_count / queue1_kicks,
 * interrupts per MB = queue<i>_irqs / (rx_bytes_count or tx_bytes_count / 2^20).
 */
import { closeSync, writeSync } from 'node:fs';
import { ConfigError } from '../util/errors.js';
import type { MetricsConfig } from '../vmm/index.js';
import { openOutputFile } from './output-file.js';

export const METRICS_PERIOD_MS = 60_000;
export const SOURCE_TIMEOUT_MS = 2_000;

export type MetricGroups = Record<string, Record<string, number>>;

/** A field, or a latency aggregate (`{ read_agg: ['min_us', 'max_us', 'sum_us'] }`). */
export type SchemaField = string | { readonly [agg: string]: readonly string[] };

const AGG = ['min_us', 'max_us', 'sum_us'] as const;

const BLOCK_FIELDS: readonly SchemaField[] = [
  'activate_fails',
  'cfg_fails',
  'no_avail_buffer',
  'event_fails',
  'execute_fails',
  'invalid_reqs_count',
  'flush_count',
  'queue_event_count',
  'rate_limiter_event_count',
  'update_count',
  'update_fails',
  'read_bytes',
  'write_bytes',
  'read_count',
  'write_count',
  'rate_limiter_throttled_events',
  'io_engine_throttled_events',
  'remaining_reqs_count',
  { read_agg: AGG },
  { write_agg: AGG },
];

const NET_FIELDS: readonly SchemaField[] = [
  'activate_fails',
  'cfg_fails',
  'no_rx_avail_buffer',
  'no_tx_avail_buffer',
  'event_fails',
  'rx_queue_event_count',
  'rx_event_rate_limiter_count',
  'rx_rate_limiter_throttled',
  'rx_tap_event_count',
  'rx_bytes_count',
  'rx_packets_count',
  'rx_fails',
  'rx_count',
  'tap_read_fails',
  'tap_write_fails',
  'tx_bytes_count',
  'tx_malformed_frames',
  'tx_fails',
  'tx_count',
  'tx_packets_count',
  'tx_queue_event_count',
  'tx_rate_limiter_event_count',
  'tx_rate_limiter_throttled',
  'tx_spoofed_mac_count',
  'tx_remaining_reqs_count',
  { tap_write_agg: AGG },
];

/** Firecracker's metrics line on x86_64 (no `rtc`: that group is aarch64's), group by group. */
export const FC_METRICS_SCHEMA: Readonly<Record<string, readonly SchemaField[]>> = {
  api_server: ['process_startup_time_us', 'process_startup_time_cpu_us'],
  balloon: [
    'activate_fails',
    'inflate_count',
    'stats_updates_count',
    'stats_update_fails',
    'deflate_count',
    'event_fails',
    'free_page_report_count',
    'free_page_report_freed',
    'free_page_report_fails',
    'free_page_hint_count',
    'free_page_hint_freed',
    'free_page_hint_fails',
  ],
  block: BLOCK_FIELDS,
  deprecated_api: ['deprecated_http_api_calls'],
  get_api_requests: [
    'instance_info_count',
    'machine_cfg_count',
    'mmds_count',
    'vmm_version_count',
    'hotplug_memory_count',
  ],
  i8042: [
    'error_count',
    'missed_read_count',
    'missed_write_count',
    'read_count',
    'reset_count',
    'write_count',
  ],
  latencies_us: [
    'full_create_snapshot',
    'diff_create_snapshot',
    'load_snapshot',
    'pause_vm',
    'resume_vm',
    'vmm_full_create_snapshot',
    'vmm_diff_create_snapshot',
    'vmm_load_snapshot',
    'vmm_pause_vm',
    'vmm_resume_vm',
  ],
  logger: ['missed_metrics_count', 'metrics_fails', 'missed_log_count', 'rate_limited_log_count'],
  mmds: [
    'rx_accepted',
    'rx_accepted_err',
    'rx_accepted_unusual',
    'rx_bad_eth',
    'rx_invalid_token',
    'rx_no_token',
    'rx_count',
    'tx_bytes',
    'tx_count',
    'tx_errors',
    'tx_frames',
    'connections_created',
    'connections_destroyed',
  ],
  net: NET_FIELDS,
  patch_api_requests: [
    'drive_count',
    'drive_fails',
    'network_count',
    'network_fails',
    'machine_cfg_count',
    'machine_cfg_fails',
    'mmds_count',
    'mmds_fails',
    'hotplug_memory_count',
    'hotplug_memory_fails',
    'pmem_count',
    'pmem_fails',
  ],
  put_api_requests: [
    'actions_count',
    'actions_fails',
    'boot_source_count',
    'boot_source_fails',
    'drive_count',
    'drive_fails',
    'logger_count',
    'logger_fails',
    'machine_cfg_count',
    'machine_cfg_fails',
    'cpu_cfg_count',
    'cpu_cfg_fails',
    'metrics_count',
    'metrics_fails',
    'network_count',
    'network_fails',
    'mmds_count',
    'mmds_fails',
    'vsock_count',
    'vsock_fails',
    'pmem_count',
    'pmem_fails',
    'serial_count',
    'serial_fails',
    'hotplug_memory_count',
    'hotplug_memory_fails',
  ],
  seccomp: ['num_faults'],
  vcpu: [
    'exit_io_in',
    'exit_io_out',
    'exit_mmio_read',
    'exit_mmio_write',
    'failures',
    'kvmclock_ctrl_fails',
    { exit_io_in_agg: AGG },
    { exit_io_out_agg: AGG },
    { exit_mmio_read_agg: AGG },
    { exit_mmio_write_agg: AGG },
  ],
  vmm: ['panic_count'],
  uart: [
    'error_count',
    'flush_count',
    'missed_read_count',
    'missed_write_count',
    'read_count',
    'write_count',
    'rate_limiter_dropped_bytes',
  ],
  signals: ['sigbus', 'sigsegv', 'sigxfsz', 'sigxcpu', 'sigpipe', 'sighup', 'sigill'],
  vsock: [
    'activate_fails',
    'cfg_fails',
    'rx_queue_event_fails',
    'tx_queue_event_fails',
    'ev_queue_event_fails',
    'muxer_event_fails',
    'conn_event_fails',
    'rx_queue_event_count',
    'tx_queue_event_count',
    'rx_bytes_count',
    'tx_bytes_count',
    'rx_packets_count',
    'tx_packets_count',
    'conns_added',
    'conns_killed',
    'conns_removed',
    'killq_resync',
    'tx_flush_fails',
    'tx_write_fails',
    'rx_read_fails',
  ],
  entropy: [
    'activate_fails',
    'entropy_event_fails',
    'entropy_event_count',
    'entropy_bytes',
    'host_rng_fails',
    'entropy_rate_limiter_throttled',
    'rate_limiter_event_count',
  ],
  interrupts: ['triggers', 'config_updates'],
  pmem: [
    'activate_fails',
    'cfg_fails',
    'event_fails',
    'queue_event_count',
    'rate_limiter_throttled_events',
    'rate_limiter_event_count',
  ],
  memory_hotplug: [
    'activate_fails',
    'queue_event_fails',
    'queue_event_count',
    'plug_count',
    'plug_bytes',
    'plug_fails',
    { plug_agg: AGG },
    'unplug_count',
    'unplug_bytes',
    'unplug_fails',
    'unplug_discard_fails',
    { unplug_agg: AGG },
    'state_count',
    'state_fails',
    { state_agg: AGG },
    'unplug_all_count',
    'unplug_all_fails',
    { unplug_all_agg: AGG },
  ],
};

/** The fields of a group, per-device groups (`block_<id>`, `net_<id>`) included. */
export function schemaFields(group: string): readonly SchemaField[] | undefined {
  if (Object.hasOwn(FC_METRICS_SCHEMA, group)) return FC_METRICS_SCHEMA[group];
  if (group.startsWith('block_')) return BLOCK_FIELDS;
  if (group.startsWith('net_')) return NET_FIELDS;
  return undefined;
}

/**
 * Our counters that are Firecracker's under another name: group -> our name -> its name.
 * (The UART's bytes in and out are its read_count/write_count: Firecracker counts one per byte.)
 */
export const ALIASES: Readonly<Record<string, Readonly<Record<string, string>>>> = {
  uart: {
    bytesOut: 'write_count',
    bytesIn: 'read_count',
    rateLimiterDroppedBytes: 'rate_limiter_dropped_bytes',
  },
  i8042: { resets: 'reset_count' },
};

/** The value of `group.name` in a source's report, by its own name or an alias. */
function canonical(group: string, name: string): string {
  return ALIASES[group]?.[name] ?? name;
}
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

  /**
   * `extras`: also write our counters that Firecracker has no name for (the caps counted when
   * hit, the transports' guest errors...) in one more group, `typervisor`, as
   * `"<group>.<name>": delta`. Off by default: Firecracker's validator refuses any group it does
   * not know. The Firecracker entry turns it on with TYPERVISOR_METRICS_EXTRAS=1.
   */
  constructor(
    private readonly instanceId: string,
    private readonly opts: { extras?: boolean } = {},
  ) {}

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
        for (const [n, v] of Object.entries(c)) totals.set(`${g}\0${canonical(g, n)}`, v);
    }
    const body: Record<string, unknown> = { utc_timestamp_ms: Date.now() };
    if (this.config?.emit_id) body.id = this.instanceId;
    if (this.config?.properties) body.properties = this.config.properties;
    // Firecracker's groups first, then the per-device ones the sources reported.
    const groups = new Set(Object.keys(FC_METRICS_SCHEMA));
    for (const key of totals.keys()) {
      const g = key.slice(0, key.indexOf('\0'));
      if (schemaFields(g)) groups.add(g);
    }
    for (const g of groups) {
      const out: Record<string, number | Record<string, number>> = {};
      const value = (n: string): number => {
        const stored = this.stored[g]?.[n];
        if (stored !== undefined) return stored;
        const key = `${g}\0${n}`;
        const v = totals.get(key);
        return v === undefined ? 0 : v - (this.last.get(key) ?? 0);
      };
      for (const f of schemaFields(g)!) {
        if (typeof f === 'string') out[f] = value(f);
        else
          for (const [agg, subs] of Object.entries(f)) {
            const a: Record<string, number> = {};
            for (const sub of subs) a[sub] = value(`${agg}.${sub}`);
            out[agg] = a;
          }
      }
      body[g] = out;
    }
    if (this.opts.extras) {
      const extra: Record<string, number> = {};
      for (const [key, v] of totals) {
        const [g, n] = key.split('\0') as [string, string];
        const fields = schemaFields(g);
        if (fields && fields.includes(n)) continue;
        extra[`${g}.${n}`] = v - (this.last.get(key) ?? 0);
      }
      body.typervisor = extra;
    }
    const line = Buffer.from(JSON.stringify(body) + '\n');
    try {
      const n = writeSync(this.fd, line);
      if (n !== line.length) throw new Error('short write');
    } catch {
      this.counters.inc('logger', 'missed_metrics_count');
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

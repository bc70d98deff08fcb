/**
 * Firecracker's metrics validator (its tests/host_tools/fcmetrics.py, validate_fc_metrics),
 * reconstructed for our tests: the same JSON schema (every group and field required, numbers
 * only, nothing else allowed; `id` and `properties` optional; `block_*`/`net_*` groups with the
 * block/net fields) and the same timestamp check (within 1 s of now). Written from that file
 * independently of metrics.ts's table, so a name wrong in one is caught by the other.
 * Returns the problems found, [] for a valid line.
 */
type Spec = (string | Record<string, Spec>)[];

const AGG: Spec = ['min_us', 'max_us', 'sum_us'];
const BLOCK: Spec = [
  ...'activate_fails cfg_fails no_avail_buffer event_fails execute_fails invalid_reqs_count'.split(
    ' ',
  ),
  ...'flush_count queue_event_count rate_limiter_event_count update_count update_fails'.split(' '),
  ...'read_bytes write_bytes read_count write_count rate_limiter_throttled_events'.split(' '),
  'io_engine_throttled_events',
  'remaining_reqs_count',
  { read_agg: AGG },
  { write_agg: AGG },
];
const NET: Spec = [
  ...'activate_fails cfg_fails no_rx_avail_buffer no_tx_avail_buffer event_fails'.split(' '),
  ...'rx_queue_event_count rx_event_rate_limiter_count rx_rate_limiter_throttled'.split(' '),
  ...'rx_tap_event_count rx_bytes_count rx_packets_count rx_fails rx_count'.split(' '),
  ...'tap_read_fails tap_write_fails tx_bytes_count tx_malformed_frames tx_fails'.split(' '),
  ...'tx_count tx_packets_count tx_queue_event_count tx_rate_limiter_event_count'.split(' '),
  ...'tx_rate_limiter_throttled tx_spoofed_mac_count tx_remaining_reqs_count'.split(' '),
  { tap_write_agg: AGG },
];
const w = (s: string): Spec => s.split(/\s+/).filter(Boolean);

const FIRECRACKER: Record<string, Spec> = {
  api_server: w('process_startup_time_us process_startup_time_cpu_us'),
  balloon: w(`activate_fails inflate_count stats_updates_count stats_update_fails deflate_count
    event_fails free_page_report_count free_page_report_freed free_page_report_fails
    free_page_hint_count free_page_hint_freed free_page_hint_fails`),
  block: BLOCK,
  deprecated_api: w('deprecated_http_api_calls'),
  get_api_requests: w(
    'instance_info_count machine_cfg_count mmds_count vmm_version_count hotplug_memory_count',
  ),
  i8042: w('error_count missed_read_count missed_write_count read_count reset_count write_count'),
  latencies_us: w(`full_create_snapshot diff_create_snapshot load_snapshot pause_vm resume_vm
    vmm_full_create_snapshot vmm_diff_create_snapshot vmm_load_snapshot vmm_pause_vm
    vmm_resume_vm`),
  logger: w('missed_metrics_count metrics_fails missed_log_count rate_limited_log_count'),
  mmds: w(`rx_accepted rx_accepted_err rx_accepted_unusual rx_bad_eth rx_invalid_token
    rx_no_token rx_count tx_bytes tx_count tx_errors tx_frames connections_created
    connections_destroyed`),
  net: NET,
  patch_api_requests: w(`drive_count drive_fails network_count network_fails machine_cfg_count
    machine_cfg_fails mmds_count mmds_fails hotplug_memory_count hotplug_memory_fails pmem_count
    pmem_fails`),
  put_api_requests: w(`actions_count actions_fails boot_source_count boot_source_fails
    drive_count drive_fails logger_count logger_fails machine_cfg_count machine_cfg_fails
    cpu_cfg_count cpu_cfg_fails metrics_count metrics_fails network_count network_fails
    mmds_count mmds_fails vsock_count vsock_fails pmem_count pmem_fails serial_count
    serial_fails hotplug_memory_count hotplug_memory_fails`),
  seccomp: w('num_faults'),
  vcpu: [
    ...w('exit_io_in exit_io_out exit_mmio_read exit_mmio_write failures kvmclock_ctrl_fails'),
    { exit_io_in_agg: AGG },
    { exit_io_out_agg: AGG },
    { exit_mmio_read_agg: AGG },
    { exit_mmio_write_agg: AGG },
  ],
  vmm: w('panic_count'),
  uart: w(`error_count flush_count missed_read_count missed_write_count read_count write_count
    rate_limiter_dropped_bytes`),
  signals: w('sigbus sigsegv sigxfsz sigxcpu sigpipe sighup sigill'),
  vsock: w(`activate_fails cfg_fails rx_queue_event_fails tx_queue_event_fails
    ev_queue_event_fails muxer_event_fails conn_event_fails rx_queue_event_count
    tx_queue_event_count rx_bytes_count tx_bytes_count rx_packets_count tx_packets_count
    conns_added conns_killed conns_removed killq_resync tx_flush_fails tx_write_fails
    rx_read_fails`),
  entropy: w(`activate_fails entropy_event_fails entropy_event_count entropy_bytes
    host_rng_fails entropy_rate_limiter_throttled rate_limiter_event_count`),
  interrupts: w('triggers config_updates'),
  pmem: w(`activate_fails cfg_fails event_fails queue_event_count rate_limiter_throttled_events
    rate_limiter_event_count`),
  memory_hotplug: [
    ...w('activate_fails queue_event_fails queue_event_count plug_count plug_bytes plug_fails'),
    { plug_agg: AGG },
    ...w('unplug_count unplug_bytes unplug_fails unplug_discard_fails'),
    { unplug_agg: AGG },
    ...w('state_count state_fails'),
    { state_agg: AGG },
    ...w('unplug_all_count unplug_all_fails'),
    { unplug_all_agg: AGG },
  ],
};

function checkObject(where: string, value: unknown, spec: Spec, errors: string[]): void {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    errors.push(`${where}: expected an object`);
    return;
  }
  const v = value as Record<string, unknown>;
  const allowed = new Set<string>();
  for (const f of spec) {
    if (typeof f === 'string') {
      allowed.add(f);
      if (!(f in v)) errors.push(`${where}: '${f}' is a required property`);
      else if (typeof v[f] !== 'number') errors.push(`${where}.${f}: expected a number`);
    } else
      for (const [name, sub] of Object.entries(f)) {
        allowed.add(name);
        if (!(name in v)) errors.push(`${where}: '${name}' is a required property`);
        else checkObject(`${where}.${name}`, v[name], sub, errors);
      }
  }
  for (const k of Object.keys(v))
    if (!allowed.has(k)) errors.push(`${where}: additional property '${k}' is not allowed`);
}

export function validateFcMetrics(line: unknown, nowMs = Date.now()): string[] {
  const errors: string[] = [];
  if (typeof line !== 'object' || line === null) return ['the line is not a JSON object'];
  const m = line as Record<string, unknown>;
  const ts = m.utc_timestamp_ms;
  if (typeof ts !== 'number') errors.push("'utc_timestamp_ms' is a required property (a number)");
  else if (Math.abs(ts - nowMs) >= 1000)
    errors.push(`utc_timestamp_ms ${ts} is not now (${nowMs})`);
  const spec: Record<string, Spec> = { ...FIRECRACKER };
  for (const k of Object.keys(m)) {
    if (k.startsWith('block_')) spec[k] = BLOCK;
    if (k.startsWith('net_')) spec[k] = NET;
  }
  for (const [g, s] of Object.entries(spec)) {
    if (!(g in m)) errors.push(`'${g}' is a required property`);
    else checkObject(g, m[g], s, errors);
  }
  if ('id' in m && typeof m.id !== 'string') errors.push('id: expected a string');
  if ('properties' in m) {
    const p = m.properties;
    if (typeof p !== 'object' || p === null || Object.values(p).some((x) => typeof x !== 'string'))
      errors.push('properties: expected an object of strings');
  }
  for (const k of Object.keys(m))
    if (!(k in spec) && !['utc_timestamp_ms', 'id', 'properties'].includes(k))
      errors.push(`additional property '${k}' is not allowed`);
  return errors;
}

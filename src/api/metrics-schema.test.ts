/**
 * The metrics lines against Firecracker's own validator (fcmetrics.py, reconstructed in
 * fc-metrics-validator.ts): every group on every line, Firecracker's names only, per-device
 * groups as Firecracker writes them, deltas and stored values as before.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { validateFcMetrics } from './fc-metrics-validator.js';
import { FC_METRICS_SCHEMA, MetricsSystem, type MetricGroups } from './metrics.js';

async function lines(
  setup: (m: MetricsSystem) => void | Promise<void>,
  flushes: number,
  between?: () => void,
): Promise<Record<string, any>[]> {
  const dir = mkdtempSync(join(tmpdir(), 'tv-metrics-'));
  try {
    const m = new MetricsSystem('vm-1');
    const path = join(dir, 'metrics.json');
    m.init({ metrics_path: path, emit_id: true, properties: { host: 'h1' } });
    await setup(m);
    for (let i = 0; i < flushes; i++) {
      assert.ok(await m.flush());
      between?.();
    }
    await m.close();
    return readFileSync(path, 'utf8')
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

test("a line with nothing counted yet passes Firecracker's validator: every group, all zero", async () => {
  const [l] = await lines(() => undefined, 1);
  assert.deepEqual(validateFcMetrics(l), []);
  assert.equal(l!.id, 'vm-1');
  assert.deepEqual(l!.properties, { host: 'h1' });
  assert.equal(l!.block.read_agg.max_us, 0);
  assert.equal(l!.put_api_requests.actions_count, 0);
  // The last line, written on close, is complete too.
});

test('device sources: per-device groups kept, our own names left out, aliases mapped', async () => {
  let reads = 10;
  const src = (): MetricGroups => ({
    block: { read_count: reads, read_bytes: reads * 512, oversized_reqs_count: 1 },
    block_rootfs: { read_count: reads, guest_errors: 2 },
    net_eth0: { rx_bytes_count: 1500, rx_chain_too_long: 3 },
    uart: { bytesOut: 42, bytesIn: 3, missed_write_count: 1, interrupts: 9 },
    i8042: { resets: 1, unknownAccesses: 4 },
    vcpu: { exits_total: 100 },
    unhandled: { port_reads: 5 },
  });
  const all = await lines(
    (m) => {
      m.addSource(src);
      m.counters.inc('put_api_requests', 'actions_count');
      m.counters.inc('api_server', 'requests'); // ours: not Firecracker's, not written
      m.store('latencies_us', 'pause_vm', 1234);
    },
    2,
    () => (reads += 5),
  );
  for (const l of all) assert.deepEqual(validateFcMetrics(l), [], JSON.stringify(l));
  const [a, b] = all;
  assert.equal(a!.block.read_count, 10);
  assert.equal(a!.block.read_bytes, 5120);
  assert.equal(a!.block_rootfs.read_count, 10);
  assert.equal(a!.net_eth0.rx_bytes_count, 1500);
  assert.equal(a!.uart.write_count, 42);
  assert.equal(a!.uart.read_count, 3);
  assert.equal(a!.uart.missed_write_count, 1);
  assert.equal(a!.i8042.reset_count, 1);
  assert.equal(a!.put_api_requests.actions_count, 1);
  assert.equal(a!.latencies_us.pause_vm, 1234);
  assert.equal('unhandled' in a!, false);
  // Deltas: the second line has what happened since the first; stored values stay.
  assert.equal(b!.block.read_count, 5);
  assert.equal(b!.block_rootfs.read_count, 5);
  assert.equal(b!.uart.write_count, 0);
  assert.equal(b!.put_api_requests.actions_count, 0);
  assert.equal(b!.latencies_us.pause_vm, 1234);
  // Groups present on every line, unchanged or not.
  assert.deepEqual(Object.keys(b!).sort(), Object.keys(a!).sort());
});

test('a line that cannot be written is counted in logger.missed_metrics_count', async () => {
  const m = new MetricsSystem('t');
  const dir = mkdtempSync(join(tmpdir(), 'tv-metrics-'));
  try {
    m.init({ metrics_path: join(dir, 'm') });
    // Close the descriptor under it: the write fails.
    const { closeSync } = await import('node:fs');
    closeSync((m as unknown as { fd: number }).fd);
    assert.equal(await m.flush(), false);
    assert.equal(m.counters.snapshot().logger?.missed_metrics_count, 1);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test("the validator is strict as Firecracker's: a missing field, a stray name, an old timestamp", async () => {
  const [l] = await lines(() => undefined, 1);
  const missing = structuredClone(l!);
  delete missing.api_server.process_startup_time_us;
  assert.deepEqual(validateFcMetrics(missing), [
    "api_server: 'process_startup_time_us' is a required property",
  ]);
  const stray = structuredClone(l!);
  stray.uart.bytesOut = 1;
  assert.match(validateFcMetrics(stray).join(), /additional property 'bytesOut'/);
  const group = structuredClone(l!);
  delete group.seccomp;
  assert.match(validateFcMetrics(group).join(), /'seccomp' is a required property/);
  assert.match(validateFcMetrics(l, l!.utc_timestamp_ms + 5000).join(), /is not now/);
  const agg = structuredClone(l!);
  agg.vcpu.exit_io_in_agg = 3;
  assert.match(validateFcMetrics(agg).join(), /exit_io_in_agg: expected an object/);
});

test('the table in metrics.ts and the reconstructed validator agree group by group', () => {
  // Each group of ours alone, all zero, with the rest from the table: the validator accepts it
  // only if the names match exactly (the two are written independently).
  const line: Record<string, unknown> = { utc_timestamp_ms: Date.now() };
  for (const [g, fields] of Object.entries(FC_METRICS_SCHEMA)) {
    const o: Record<string, unknown> = {};
    for (const f of fields)
      if (typeof f === 'string') o[f] = 0;
      else
        for (const [agg, subs] of Object.entries(f))
          o[agg] = Object.fromEntries(subs.map((s) => [s, 0]));
    line[g] = o;
  }
  assert.deepEqual(validateFcMetrics(line), []);
});

test('extras (off by default): our counters Firecracker has no name for, in one group', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'tv-metrics-'));
  try {
    const m = new MetricsSystem('x', { extras: true });
    const path = join(dir, 'm');
    m.init({ metrics_path: path });
    let n = 3;
    m.addSource(() => ({
      block_rootfs: { read_count: n, oversized_reqs_count: n },
      unhandled: { port_reads: 2 * n },
    }));
    await m.flush();
    n = 5;
    await m.flush();
    await m.close();
    const [a, b] = readFileSync(path, 'utf8')
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l));
    assert.deepEqual(a.typervisor, {
      'block_rootfs.oversized_reqs_count': 3,
      'unhandled.port_reads': 6,
    });
    assert.deepEqual(b.typervisor, {
      'block_rootfs.oversized_reqs_count': 2,
      'unhandled.port_reads': 4,
    });
    assert.equal(b.block_rootfs.read_count, 2);
    // Everything else is Firecracker's line: only the extra group is refused.
    assert.deepEqual(validateFcMetrics(b, b.utc_timestamp_ms), [
      "additional property 'typervisor' is not allowed",
    ]);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

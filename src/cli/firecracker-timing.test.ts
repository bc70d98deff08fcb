/** The jailer's timing flags: parsed as Firecracker parses them, reported in the metrics. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { MetricsSystem } from '../api/metrics.js';
import { parseFirecrackerArgs, reportStartupTime } from './firecracker.js';

test('--start-time-us, --start-time-cpu-us, --parent-cpu-time-us: u64 decimals or refused', () => {
  const a = parseFirecrackerArgs(['--start-time-us', '12', '--start-time-cpu-us', '0']);
  assert.equal(a.startTimeUs, 12n);
  assert.equal(a.startTimeCpuUs, 0n);
  assert.equal(a.parentCpuTimeUs, undefined);
  for (const bad of ['1.5', 'soon', '18446744073709551616', ''])
    assert.throws(() => parseFirecrackerArgs(['--start-time-us', bad]), /--start-time-us must be/);
  assert.throws(() => parseFirecrackerArgs(['--start-time-us', '-1']), /--start-time-us/);
  assert.throws(
    () => parseFirecrackerArgs(['--no-seccomp', '--seccomp-filter', 'f.json']),
    /cannot be used together/,
  );
});

test('the start-up times land in the metrics as Firecracker names them', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'fc-timing-'));
  try {
    const metrics = new MetricsSystem('t');
    const path = join(dir, 'metrics.json');
    metrics.init({ metrics_path: path });
    const nowUs = process.hrtime.bigint() / 1000n;
    const cpu = process.cpuUsage();
    const args = parseFirecrackerArgs([
      '--start-time-us',
      String(nowUs - 250_000n),
      '--start-time-cpu-us',
      String(cpu.user + cpu.system),
      '--parent-cpu-time-us',
      '7000',
    ]);
    const lines = reportStartupTime(args, metrics);
    assert.equal(lines.length, 2);
    assert.ok(await metrics.flush());
    const m = JSON.parse(readFileSync(path, 'utf8').trim().split('\n').pop()!);
    assert.ok(m.api_server.process_startup_time_us >= 250_000, JSON.stringify(m.api_server));
    assert.ok(m.api_server.process_startup_time_us < 250_000 + 60_000_000);
    assert.ok(m.api_server.process_startup_time_cpu_us >= 7000, 'the parent CPU time is added');
    await metrics.close();
  } finally {
    rmSync(dir, { recursive: true });
  }
});

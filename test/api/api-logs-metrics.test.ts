/**
 * A running API process's log and metrics files, as Firecracker's clients read them: the log in
 * Firecracker's format with "API server started.", each request and its outcome, and the exit
 * line; the metrics lines valid for Firecracker's validator, every group on every line.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { validateFcMetrics } from '../../src/api/fc-metrics-validator.js';
import { call, startServer, tempDir } from './client.js';

const T = { timeout: 60_000 };
const PREFIX = '\\d{4}-\\d\\d-\\d\\dT\\d\\d:\\d\\d:\\d\\d\\.\\d{9} \\[api-logs';

test("log and metrics files of a running API process, in Firecracker's format", T, async () => {
  const dir = tempDir();
  const logPath = join(dir, 'fc.log');
  const metricsPath = join(dir, 'metrics.json');
  const srv = await startServer(
    [
      '--id',
      'api-logs',
      '--log-path',
      logPath,
      '--show-level',
      '--metrics-path',
      metricsPath,
      '--start-time-us',
      String(process.hrtime.bigint() / 1000n - 1000n),
    ],
    dir,
  );
  try {
    assert.equal((await call(srv.sock, 'GET', '/machine-config')).status, 200);
    assert.equal(
      (await call(srv.sock, 'PUT', '/boot-source', { kernel_image_path: '/nonexistent' })).status,
      400,
    );
    assert.equal(
      (await call(srv.sock, 'PUT', '/machine-config', { vcpu_count: 1, mem_size_mib: 128 })).status,
      204,
    );
    // Before boot Firecracker refuses FlushMetrics too: the line is written on exit.
    assert.equal(
      (await call(srv.sock, 'PUT', '/actions', { action_type: 'FlushMetrics' })).status,
      400,
    );
    // SIGHUP: a clean stop here (Firecracker exits with a code of its own), counted in
    // signals.sighup as Firecracker counts it.
    srv.child.kill('SIGHUP');
    const { code } = await srv.exited;
    assert.equal(code, 0, srv.stderr());

    const log = readFileSync(logPath, 'utf8');
    const lines = log.trimEnd().split('\n');
    for (const l of lines) assert.match(l, new RegExp(`^${PREFIX}:[^:\\]]+:[A-Z]+\\] `), l);
    const has = (re: string) =>
      assert.ok(
        lines.some((l) => new RegExp(`^${PREFIX}:${re}$`).test(l)),
        `no line ${re} in:\n${log}`,
      );
    has('fc_api:INFO\\] API server started\\.');
    has('fc_api:INFO\\] The API server received a Get request on "/machine-config"\\.');
    has('fc_api:INFO\\] The request was executed successfully\\. Status code: 200 OK\\.');
    has(
      'fc_api:INFO\\] The API server received a Put request on "/machine-config" with body "\\{\\\\"vcpu_count\\\\":1,\\\\"mem_size_mib\\\\":128\\}"\\.',
    );
    has('fc_api:INFO\\] The request was executed successfully\\. Status code: 204 No Content\\.');
    has('fc_api:ERROR\\] Received Error\\. Status code: 400 Bad Request\\. Message: .+');
    has('main:INFO\\] Process start-up time: \\d+ us');
    assert.match(lines[lines.length - 1]!, /\] Firecracker exiting successfully\. exit_code=0$/);

    const metrics = readFileSync(metricsPath, 'utf8')
      .trimEnd()
      .split('\n')
      .map((l) => JSON.parse(l));
    assert.equal(metrics.length, 1, 'the line written on exit');
    const m = metrics[0];
    // The timestamp check is against the time the line was written, not now.
    assert.deepEqual(validateFcMetrics(m, m.utc_timestamp_ms), [], JSON.stringify(m));
    assert.ok(Math.abs(m.utc_timestamp_ms - Date.now()) < 60_000);
    assert.equal(m.get_api_requests.machine_cfg_count, 1);
    assert.equal(m.put_api_requests.machine_cfg_count, 1);
    assert.equal(m.put_api_requests.machine_cfg_fails, 0);
    assert.equal(m.put_api_requests.boot_source_count, 1);
    assert.equal(m.put_api_requests.boot_source_fails, 1);
    assert.equal(m.put_api_requests.actions_count, 1);
    assert.equal(m.put_api_requests.actions_fails, 1);
    assert.equal(m.signals.sighup, 1);
    assert.ok(m.api_server.process_startup_time_us >= 1000, JSON.stringify(m.api_server));
  } finally {
    await srv.kill();
  }
});

test(
  'a bad argument: exit 153, and an error exit code is logged as Firecracker words it',
  T,
  async () => {
    const dir = tempDir();
    const logPath = join(dir, 'fc.log');
    // A metrics path in a missing directory: refused after the logger is set up.
    const { spawnSync } = await import('node:child_process');
    const { CLI } = await import('./client.js');
    const r = spawnSync(
      process.execPath,
      [
        CLI,
        '--api-sock',
        join(dir, 's'),
        '--log-path',
        logPath,
        '--metrics-path',
        join(dir, 'no/m'),
      ],
      { encoding: 'utf8', timeout: 20_000 },
    );
    assert.notEqual(r.status, 0);
    const last = readFileSync(logPath, 'utf8').trimEnd().split('\n').pop()!;
    assert.match(last, new RegExp(`\\] Firecracker exiting with error\\. exit_code=${r.status}$`));
  },
);

/**
 * Firecracker's log format and lines: timestamp, [id:thread(:LEVEL)(:origin)], the request and
 * outcome lines, the boot timer's line; LoggerControl formatting our lines and the workers'.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { log } from '../util/log.js';
import { bootTimeLine, fcTimestamp } from '../vmm/index.js';
import { formatFcLine, latencyLine, LoggerControl, outcomeLine, requestLine } from './logger.js';
import { Counters } from './metrics.js';

const FC_TS = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}$/;

test('the timestamp is local time to the nanosecond, as utils::time::LocalTime prints it', () => {
  const ms = new Date(2026, 0, 2, 3, 4, 5, 678).getTime() + 0.25;
  assert.equal(fcTimestamp(ms), '2026-01-02T03:04:05.678250000');
  assert.match(fcTimestamp(Date.now()), FC_TS);
});

test('the line: [id:thread] by default, :LEVEL with show_level, :file:line with the origin', () => {
  const t = new Date(2026, 10, 30, 17, 0, 0, 5).getTime();
  const f = { instanceId: 'vm-7', showLevel: false, showOrigin: false };
  assert.equal(
    formatFcLine(f, 'info', 'API server started.', 'fc_api', t),
    '2026-11-30T17:00:00.005000000 [vm-7:fc_api] API server started.',
  );
  f.showLevel = true;
  assert.equal(
    formatFcLine(f, 'warn', 'x', 'main', t),
    '2026-11-30T17:00:00.005000000 [vm-7:main:WARN] x',
  );
  f.showOrigin = true;
  // The origin is this test file's line (the first frame outside the logger).
  assert.match(
    formatFcLine(f, 'error', 'y', 'main', t),
    /^\S+ \[vm-7:main:ERROR:src\/api\/logger\.test\.js:\d+\] y$/,
  );
});

test("the boot timer's line, with Firecracker's widths", () => {
  assert.equal(
    bootTimeLine(123456, 7890),
    'Guest-boot-time = 123456 us 123 ms,   7890 CPU us 7 CPU ms',
  );
  assert.equal(
    bootTimeLine(2_500_000.7, 999),
    'Guest-boot-time = 2500000 us 2500 ms,    999 CPU us 0 CPU ms',
  );
});

test('request and outcome lines as the API server words them', () => {
  assert.equal(
    requestLine('GET', '/machine-config', undefined, false),
    'The API server received a Get request on "/machine-config".',
  );
  assert.equal(
    requestLine('PUT', '/actions?x=1', '{"action_type": "InstanceStart"}', false),
    'The API server received a Put request on "/actions" with body "{\\"action_type\\": \\"InstanceStart\\"}".',
  );
  assert.equal(
    requestLine('PUT', '/mmds', '{"a":1}', false),
    'The API server received a Put request on "/mmds".',
  );
  assert.match(requestLine('PUT', '/cpu-config', '{}', false), /configure log-level to DEBUG\.$/);
  assert.match(requestLine('PUT', '/cpu-config', '{}', true), /with body "\{\}"\.$/);
  assert.equal(
    outcomeLine(204, undefined),
    'The request was executed successfully. Status code: 204 No Content.',
  );
  assert.equal(
    outcomeLine(200, undefined),
    'The request was executed successfully. Status code: 200 OK.',
  );
  assert.equal(
    outcomeLine(400, 'Invalid kernel path.'),
    'Received Error. Status code: 400 Bad Request. Message: Invalid kernel path.',
  );
});

test("the timed actions' lines, by their latencies_us name", () => {
  assert.equal(latencyLine('pause_vm', 1234), "'pause vm' API request took 1234 us.");
  assert.equal(
    latencyLine('full_create_snapshot', 5),
    "'create full snapshot' API request took 5 us.",
  );
  assert.equal(latencyLine('load_snapshot', 7), "'load snapshot' API request took 7 us.");
  assert.equal(latencyLine('vmm_pause_vm', 1), undefined);
});

test('with an instance id, every stderr line goes out in the format, to the log path once set', () => {
  const dir = mkdtempSync(join(tmpdir(), 'tv-log-'));
  const counters = new Counters();
  const logger = new LoggerControl(counters, { instanceId: 'inst-1' });
  try {
    const path = join(dir, 'log');
    logger.configure({ log_path: path, level: 'Debug', show_level: true });
    log('info', 'API server started.', { thread: 'fc_api' });
    log('debug', 'a debug line');
    // A worker's line, as it reaches the main thread's stderr.
    process.stderr.write('typervisor: warn: virtio-blk rootfs: bad request\n');
    process.stderr.write('a bare line\n');
    logger.configure({ level: 'Off' });
    log('error', 'not written: the level is Off');
    logger.configure({ level: 'Info', show_level: false });
    log('debug', 'below the level');
    log('info', 'back');
    const lines = readFileSync(path, 'utf8').trimEnd().split('\n');
    const re = (rest: string) =>
      new RegExp(`^\\d{4}-\\d\\d-\\d\\dT[\\d:]{8}\\.\\d{9} \\[inst-1:${rest}$`);
    assert.equal(lines.length, 5, lines.join('\n'));
    assert.match(lines[0]!, re('fc_api:INFO\\] API server started\\.'));
    assert.match(lines[1]!, re('main:DEBUG\\] a debug line'));
    assert.match(lines[2]!, re('-:WARN\\] virtio-blk rootfs: bad request'));
    assert.match(lines[3]!, re('-:ERROR\\] a bare line'));
    assert.match(lines[4]!, re('main\\] back'));
    assert.equal(counters.snapshot().logger?.missed_log_count, undefined);
  } finally {
    logger.restore();
    rmSync(dir, { recursive: true, force: true });
  }
  // Restored: the default format again.
});

/**
 * --boot-timer: the vCPU thread that takes the marker logs the line itself when the log allows;
 * else the line comes as soon as the guest writes the marker (woken, not polled), and the exit
 * path still gets it when the guest powers off right after its marker.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Worker } from 'node:worker_threads';
import { LoggerControl } from '../api/logger.js';
import { Counters } from '../api/metrics.js';
import { VcpuControl, type LoggerConfig } from '../vmm/index.js';
import { monoMs } from '../util/clock.js';
import { BootTimer } from './firecracker.js';

const LINE = /^Guest-boot-time = +\d+ us \d+ ms, +\d+ CPU us \d+ CPU ms$/;

test('the marker written on another thread wakes the timer at once', async () => {
  const control = new VcpuControl();
  const timer = new BootTimer();
  let woke = false;
  const waiting = control.waitBootMarker().then(() => (woke = true));
  timer.watch(control);
  await new Promise((r) => setTimeout(r, 20));
  assert.equal(woke, false, 'nothing before the marker');
  assert.equal(timer.report(), undefined);
  // The vCPU thread's write: markBoot from a worker sharing the control block.
  const w = new Worker(
    `const { workerData } = require('node:worker_threads');
     const ints = new Int32Array(workerData, 0, 4);
     const times = new Float64Array(workerData, ${control.times.byteOffset}, 4);
     const t = process.hrtime(); // monoMs(), util/clock.ts
     times[0] = t[0] * 1e3 + t[1] / 1e6;
     Atomics.store(ints, 2, 1);
     Atomics.notify(ints, 2);`,
    { eval: true, workerData: control.sab },
  );
  await new Promise((r) => w.on('exit', r));
  await waiting;
  assert.ok(woke);
  // watch() reported it already: a second report gives nothing (one line only).
  await new Promise((r) => setImmediate(r));
  assert.equal(timer.report(), undefined);
});

test('a guest that powers off right after its marker: the exit path reports the line', () => {
  const control = new VcpuControl();
  const timer = new BootTimer();
  // watch()'s wake-up has not run yet (same turn): the exit path's report() writes the line.
  timer.watch(control);
  control.markBoot(monoMs() + 3);
  const line = timer.report();
  assert.match(line ?? '', LINE);
  const us = Number(/= +(\d+) us/.exec(line!)![1]);
  assert.ok(us >= 3000 && us < 60_000_000, line);
  assert.equal(timer.report(), undefined, 'once');
});

test('no marker, no line', () => {
  const timer = new BootTimer();
  timer.watch(new VcpuControl());
  assert.equal(timer.report(), undefined);
});

/** A logger in Firecracker's format writing to a log file in a temp dir, for `f`. */
function withLogFile(
  f: (logger: LoggerControl, path: string) => void | Promise<void>,
  cfg: LoggerConfig = {},
) {
  return async () => {
    const dir = mkdtempSync(join(tmpdir(), 'tv-boot-timer-'));
    const logger = new LoggerControl(new Counters(), { instanceId: 'vm-1' });
    try {
      const path = join(dir, 'log');
      logger.configure({ log_path: path, ...cfg });
      await f(logger, path);
    } finally {
      logger.restore();
      rmSync(dir, { recursive: true, force: true });
    }
  };
}

const FC_LINE =
  /^\d{4}-\d\d-\d\dT[\d:]{8}\.\d{9} \[vm-1:fc_vcpu 0\] Guest-boot-time = +(\d+) us \d+ ms, +\d+ CPU us \d+ CPU ms$/;

test(
  'the vCPU thread that takes the marker logs the line itself; the timer adds none',
  withLogFile(async (logger, path) => {
    const timer = new BootTimer();
    const line = timer.lineFor(logger);
    assert.ok(line, 'the log lets a vCPU thread write it');
    const control = new VcpuControl();
    timer.watch(control);
    // On a worker sharing the control block, as a vCPU thread: the line is written before the
    // waiters wake.
    const marked = monoMs() + 3;
    const w = new Worker(
      `const { workerData: d } = require('node:worker_threads');
       import(d.url).then(({ VcpuControl }) => new VcpuControl(d.sab).markBoot(d.ms, d.line));`,
      {
        eval: true,
        workerData: {
          url: new URL('../vmm/vcpu-control.js', import.meta.url).href,
          sab: control.sab,
          ms: marked,
          line,
        },
      },
    );
    await new Promise((r) => w.on('exit', r));
    assert.equal(control.bootLineLogged, true);
    assert.equal(control.bootMarkerMs, marked);
    // A second vCPU's marker (or a second write) changes nothing and logs nothing.
    control.markBoot(marked + 50, line);
    assert.equal(control.bootMarkerMs, marked);
    await control.waitBootMarker();
    await new Promise((r) => setImmediate(r));
    assert.equal(timer.report(), undefined, 'nothing more from the main thread');
    const lines = readFileSync(path, 'utf8').trimEnd().split('\n');
    assert.equal(lines.length, 1, lines.join('\n'));
    const us = Number(FC_LINE.exec(lines[0]!)?.[1]);
    assert.ok(us >= 3000 && us < 60_000_000, lines[0]);
  }),
);

test(
  'a line the vCPU thread cannot write is logged by the main thread',
  withLogFile((logger, path) => {
    const timer = new BootTimer();
    const control = new VcpuControl();
    timer.watch(control);
    control.markBoot(monoMs(), {
      ...timer.lineFor(logger)!,
      fd: -1,
    });
    assert.equal(control.bootLineLogged, false);
    assert.match(timer.report() ?? '', LINE);
    const lines = readFileSync(path, 'utf8').trimEnd().split('\n');
    assert.equal(lines.length, 1, lines.join('\n'));
    assert.match(lines[0]!, FC_LINE);
  }),
);

test('lineFor: only when the line can be written as log() would write it', async () => {
  for (const [cfg, head] of [
    [{}, '[vm-1:fc_vcpu 0]'],
    [{ show_level: true }, '[vm-1:fc_vcpu 0:INFO]'],
    [{ show_log_origin: true }, undefined], // log() names its caller's file
    [{ level: 'Warning' }, undefined],
    [{ level: 'Off' }, undefined],
  ] as const) {
    await withLogFile((logger) => {
      assert.equal(new BootTimer().lineFor(logger)?.head, head, JSON.stringify(cfg));
    }, cfg)();
  }
  // Without Firecracker's format (no instance id) the line goes through log().
  const plain = new LoggerControl(new Counters());
  assert.equal(new BootTimer().lineFor(plain), undefined);
});

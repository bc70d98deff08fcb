/**
 * --boot-timer: the line comes as soon as the guest writes the marker (woken, not polled), and
 * the exit path still gets it when the guest powers off right after its marker.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Worker } from 'node:worker_threads';
import { VcpuControl } from '../vmm/index.js';
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
     times[0] = performance.timeOrigin + performance.now();
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
  control.markBoot(performance.timeOrigin + performance.now() + 3);
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

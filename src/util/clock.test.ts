/**
 * util/clock.ts: the clock reads as performance.now() does, in ms, from an origin every thread
 * shares, and a plain process that uses it does not load node:perf_hooks.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { Worker } from 'node:worker_threads';
import { epochMs, epochOf, monoMs, processStartMs } from './clock.js';

test('monoMs advances as performance.now() does; processStartMs is before it', async () => {
  // Each monoMs() read is bracketed by two performance.now() reads, so a thread preempted
  // between the two clocks' reads (a loaded CI host) widens the bracket instead of failing.
  const p0a = performance.now();
  const m0 = monoMs();
  const p0b = performance.now();
  await new Promise((r) => setTimeout(r, 30));
  const p1a = performance.now();
  const m1 = monoMs();
  const p1b = performance.now();
  const dm = m1 - m0;
  assert.ok(dm >= 29, `advanced ${dm} ms over a 30 ms timer`);
  assert.ok(
    dm >= p1a - p0b - 1 && dm <= p1b - p0a + 1,
    `monoMs advanced ${dm} ms; performance.now() between ${p1a - p0b} and ${p1b - p0a}`,
  );
  const u0 = process.uptime() * 1e3;
  const sinceStart = monoMs() - processStartMs;
  const u1 = process.uptime() * 1e3;
  assert.ok(
    sinceStart >= u0 - 2 && sinceStart <= u1 + 2,
    `process start: where uptime counts from (${sinceStart} against ${u0}..${u1})`,
  );
});

test('a worker reads the same clock', async () => {
  const w = new Worker(
    `const { parentPort } = require('node:worker_threads');
     const t = process.hrtime();
     parentPort.postMessage(t[0] * 1e3 + t[1] / 1e6);`,
    { eval: true },
  );
  const before = monoMs();
  const theirs = await new Promise<number>((r) => w.once('message', r));
  const after = monoMs();
  await new Promise((r) => w.on('exit', r));
  assert.ok(theirs >= before && theirs <= after, `${before} <= ${theirs} <= ${after}`);
});

test('epochMs is the wall clock, within a few ms', () => {
  assert.ok(Math.abs(epochMs() - Date.now()) < 5);
  const m = monoMs();
  assert.ok(Math.abs(epochOf(m + 1000) - epochOf(m) - 1000) < 1e-6);
});

test('using it does not load node:perf_hooks (the global `performance` would)', () => {
  const url = new URL('./clock.js', import.meta.url).href;
  const probe = (use: string) =>
    spawnSync(
      process.execPath,
      [
        '--input-type=module',
        '-e',
        `const c = await import(${JSON.stringify(url)}); ${use};
         console.log(process.moduleLoadList.includes('NativeModule perf_hooks'))`,
      ],
      { encoding: 'utf8' },
    );
  const ours = probe('c.monoMs(); c.epochMs(); c.processStartMs');
  assert.equal(ours.status, 0, ours.stderr);
  assert.equal(ours.stdout.trim(), 'false');
  const theirs = probe('performance.now()');
  assert.equal(theirs.stdout.trim(), 'true', 'the check sees perf_hooks when it is loaded');
});

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
import type { Collected } from './backend.js';
import { IdleTrim } from './trim.js';

test('IdleTrim trims once after the last note, not while notes keep coming', async () => {
  let calls = 0;
  const t = new IdleTrim(() => (calls++, true), 60);
  for (let i = 0; i < 6; i++) {
    t.note();
    await sleep(20);
  }
  assert.equal(calls, 0, 'busy: no trim');
  await sleep(150);
  assert.equal(calls, 1);
  assert.deepEqual({ runs: t.stats.runs, released: t.stats.released }, { runs: 1, released: 1 });
  t.note();
  t.close();
  await sleep(120);
  assert.equal(calls, 1, 'closed: the pending trim is dropped');
});

test('IdleTrim collects first, then trims; busy again or closed meanwhile, no trim', async () => {
  const order: string[] = [];
  let finish: (() => void) | undefined;
  const collect = () =>
    new Promise<Collected>((resolve) => {
      order.push('collect');
      finish = () => resolve({ main: true, mainMs: 4, workers: 2 });
    });
  const t = new IdleTrim(() => (order.push('trim'), false), 100, collect);
  t.note();
  await sleep(250);
  assert.deepEqual(order, ['collect'], 'the trim waits for the collection');
  finish!();
  await sleep(5);
  assert.deepEqual(order, ['collect', 'trim']);
  assert.deepEqual(t.stats, {
    runs: 1,
    released: 0,
    ms: t.stats.ms,
    gc_runs: 1,
    gc_ms: 4,
    gc_max_ms: 4,
    gc_workers: 2,
  });

  // A VM ended while collecting: this trim is dropped, the next idle moment collects and trims.
  t.note();
  await sleep(250);
  t.note();
  finish!();
  await sleep(5);
  assert.deepEqual(order, ['collect', 'trim', 'collect']);
  await sleep(250);
  finish!();
  await sleep(5);
  assert.deepEqual(order, ['collect', 'trim', 'collect', 'collect', 'trim']);

  // Closed while collecting: no trim.
  t.note();
  await sleep(250);
  t.close();
  finish!();
  await sleep(5);
  assert.equal(order.filter((x) => x === 'trim').length, 2);

  // A collection that failed or found no gc: counted as none, the trim still runs.
  const none = new IdleTrim(
    () => true,
    10,
    async () => ({ main: false, mainMs: 0, workers: 0 }),
  );
  none.note();
  await sleep(60);
  assert.deepEqual(
    { ...none.stats, ms: 0 },
    {
      runs: 1,
      released: 1,
      ms: 0,
      gc_runs: 0,
      gc_ms: 0,
      gc_max_ms: 0,
      gc_workers: 0,
    },
  );
  none.close();
});

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { setTimeout as sleep } from 'node:timers/promises';
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

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Worker } from 'node:worker_threads';
import { SharedMutex } from './shared-mutex.js';

test('SharedMutex keeps a read-modify-write whole across threads', async () => {
  const slots = new Int32Array(new SharedArrayBuffer(8));
  const url = new URL('./shared-mutex.js', import.meta.url).href;
  const rounds = 20_000;
  const code = `const { workerData } = require('node:worker_threads');
    import(workerData.url).then(({ SharedMutex }) => {
      const s = workerData.slots, m = new SharedMutex(s, 0);
      for (let i = 0; i < workerData.rounds; i++) { m.lock(); const v = s[1]; s[1] = v + 1; m.unlock(); }
    });`;
  const workers = [0, 1, 2].map(
    () => new Worker(code, { eval: true, workerData: { url, slots, rounds } }),
  );
  const m = new SharedMutex(slots, 0);
  for (let i = 0; i < rounds; i++) m.with(() => (slots[1] = slots[1]! + 1));
  await Promise.all(workers.map((w) => new Promise((r) => w.once('exit', r))));
  assert.equal(slots[1], rounds * 4);
  assert.equal(slots[0], 0, 'unlocked at the end');
});

test('SharedMutex refuses unshared memory', () => {
  assert.throws(() => new SharedMutex(new Int32Array(2), 0));
});

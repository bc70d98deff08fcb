/** util/cpus.ts: a cpulist's count, and this process's count as os.availableParallelism(). */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { availableParallelism } from 'node:os';
import { cpuListCount, cpusAllowed } from './cpus.js';

test('a cpulist counts its CPUs; anything else is not one', () => {
  assert.equal(cpuListCount('0'), 1);
  assert.equal(cpuListCount('0-1'), 2);
  assert.equal(cpuListCount('0-3,8,10-11\n'), 7);
  for (const bad of ['', 'x', '3-1', '0-', '0,,1', '-1'])
    assert.equal(cpuListCount(bad), undefined, bad);
});

test('this process: the same count as os.availableParallelism()', () => {
  assert.equal(cpusAllowed(), availableParallelism());
});

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { chooseVcpuThreads, NATIVE_FROM_VCPUS, workersFor } from './vcpu-mode.js';

test('vCPU threads: an explicit setting wins, auto picks by vCPU count, a bad one names itself', () => {
  for (const n of [1, NATIVE_FROM_VCPUS, 64]) {
    assert.equal(chooseVcpuThreads(n, 'worker'), 'worker');
    assert.equal(chooseVcpuThreads(n, 'native'), 'native');
    assert.equal(chooseVcpuThreads(n, 'hybrid'), 'hybrid');
  }
  for (const s of [undefined, '', 'auto']) {
    assert.equal(chooseVcpuThreads(1, s), NATIVE_FROM_VCPUS <= 1 ? 'hybrid' : 'worker');
    assert.equal(chooseVcpuThreads(NATIVE_FROM_VCPUS - 1, s), 'worker');
    assert.equal(chooseVcpuThreads(NATIVE_FROM_VCPUS, s), 'hybrid');
    assert.equal(chooseVcpuThreads(64, s), 'hybrid');
  }
  assert.throws(
    () => chooseVcpuThreads(2, 'threads'),
    /'threads' is not one of worker, native, hybrid, auto/,
  );
});

test('workers started per mode: one per vCPU, one hub, or vCPU 0 and a hub', () => {
  assert.deepEqual(
    [1, 2, 64].map((n) => [
      workersFor('worker', n),
      workersFor('native', n),
      workersFor('hybrid', n),
    ]),
    [
      [1, 1, 1],
      [2, 1, 2],
      [64, 1, 2],
    ],
  );
});

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { chooseVcpuThreads, NATIVE_FROM_VCPUS } from './vcpu-mode.js';

test('vCPU threads: an explicit setting wins, auto picks by vCPU count, a bad one names itself', () => {
  for (const n of [1, NATIVE_FROM_VCPUS, 64]) {
    assert.equal(chooseVcpuThreads(n, 'worker'), 'worker');
    assert.equal(chooseVcpuThreads(n, 'native'), 'native');
  }
  for (const s of [undefined, '', 'auto']) {
    assert.equal(chooseVcpuThreads(1, s), NATIVE_FROM_VCPUS <= 1 ? 'native' : 'worker');
    assert.equal(chooseVcpuThreads(NATIVE_FROM_VCPUS - 1, s), 'worker');
    assert.equal(chooseVcpuThreads(NATIVE_FROM_VCPUS, s), 'native');
    assert.equal(chooseVcpuThreads(64, s), 'native');
  }
  assert.throws(
    () => chooseVcpuThreads(2, 'threads'),
    /'threads' is not one of worker, native, auto/,
  );
});

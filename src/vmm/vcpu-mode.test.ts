import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  chooseHubPlace,
  chooseVcpuThreads,
  NATIVE_FROM_VCPUS,
  setLoopByDefault,
  workersFor,
} from './vcpu-mode.js';

test('vCPU threads: an explicit setting wins, auto picks by vCPU count, a bad one names itself', () => {
  for (const n of [1, NATIVE_FROM_VCPUS, 64]) {
    assert.equal(chooseVcpuThreads(n, 'worker'), 'worker');
    assert.equal(chooseVcpuThreads(n, 'native'), 'native');
    assert.equal(chooseVcpuThreads(n, 'hybrid'), 'hybrid');
    assert.equal(chooseVcpuThreads(n, 'loop'), 'loop');
  }
  for (const s of [undefined, '', 'auto']) {
    assert.equal(chooseVcpuThreads(1, s), NATIVE_FROM_VCPUS <= 1 ? 'hybrid' : 'worker');
    assert.equal(chooseVcpuThreads(NATIVE_FROM_VCPUS - 1, s), 'worker');
    assert.equal(chooseVcpuThreads(NATIVE_FROM_VCPUS, s), 'hybrid');
    assert.equal(chooseVcpuThreads(64, s), 'hybrid');
  }
  assert.throws(
    () => chooseVcpuThreads(2, 'threads'),
    /'threads' is not one of worker, native, hybrid, loop, auto/,
  );
});

test('workers started per mode: one per vCPU; with the hub on the main thread none for native and vCPU 0 for hybrid; a hub worker adds one', () => {
  const table = (hub: 'main' | 'worker') =>
    [1, 2, 64].map((n) => [
      workersFor('worker', n, hub),
      workersFor('native', n, hub),
      workersFor('hybrid', n, hub),
    ]);
  assert.deepEqual(table('main'), [
    [1, 0, 1],
    [2, 0, 1],
    [64, 0, 1],
  ]);
  assert.deepEqual(table('worker'), [
    [1, 1, 1],
    [2, 1, 2],
    [64, 1, 2],
  ]);
});

test("the hub's place: main by default, worker when asked, a bad setting names itself", () => {
  for (const s of [undefined, '', 'main']) assert.equal(chooseHubPlace(s), 'main');
  assert.equal(chooseHubPlace('worker'), 'worker');
  assert.throws(() => chooseHubPlace('thread'), /'thread' is not one of main, worker/);
});

test("auto picks 'loop' for any vCPU count only where the process allows it (one VM per process)", () => {
  try {
    setLoopByDefault(true);
    for (const s of [undefined, '', 'auto'])
      for (const n of [1, 2, NATIVE_FROM_VCPUS, 64]) assert.equal(chooseVcpuThreads(n, s), 'loop');
    for (const s of ['worker', 'native', 'hybrid'] as const) {
      assert.equal(chooseVcpuThreads(1, s), s);
      assert.equal(chooseVcpuThreads(2, s), s);
    }
    assert.equal(workersFor('loop', 1), 0);
    assert.equal(workersFor('loop', 8, 'worker'), 0);
  } finally {
    setLoopByDefault(false);
  }
  assert.equal(chooseVcpuThreads(1, undefined), 'worker');
  assert.equal(chooseVcpuThreads(2, 'auto'), 'worker');
  assert.equal(chooseVcpuThreads(NATIVE_FROM_VCPUS, 'auto'), 'hybrid');
});

// Pausing and stopping a VM whose vCPU worker does not answer (no KVM needed: real worker
// threads stand in for vCPU workers, and /dev/zero for the vCPU fd's kvm_run mapping). A pause
// counts a worker that has not reached its loop as parked; after STOP_TIMEOUT_MS a stop
// terminates the worker, and how the VM's end reads depends on whether the vCPU had entered its
// loop (the shared state leaves Starting first thing in VcpuLoop.run).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { closeSync, openSync, readFileSync } from 'node:fs';
import { Worker } from 'node:worker_threads';
import { PAUSE_TIMEOUT_MS, STOP_TIMEOUT_MS, Vmm, type VcpuWorkerSource } from './vmm.js';

const MAP_SIZE = 4096;

/**
 * A worker that takes 'start' and then either never gets to the loop (it keeps loading, as a
 * cold worker on a host short of CPU does) or says it runs and then never looks at the command
 * again (a vCPU stuck outside the guest).
 */
function fakeVcpuWorker(behaviour: 'loading' | 'stuck'): Worker {
  const controlUrl = new URL('./vcpu-control.js', import.meta.url).href;
  return new Worker(
    `const { parentPort, workerData } = require('node:worker_threads');
     parentPort.on('message', async (m) => {
       if (workerData.behaviour === 'loading') return;
       const { VcpuControl } = await import(workerData.controlUrl);
       new VcpuControl(m.data.control).setState(0, 1 /* Running */);
       for (;;) {}
     });`,
    { eval: true, workerData: { behaviour, controlUrl } },
  );
}

function startWith(worker: Worker): { vmm: Vmm; close: () => void } {
  // A shared mapping of /dev/zero stands in for the vCPU fd's kvm_run.
  const fd = openSync('/dev/zero', 'r+');
  const source: VcpuWorkerSource = { take: () => [worker], give: () => {} };
  const vmm = new Vmm(MAP_SIZE);
  vmm.start([fd], () => ({}) as never, { vcpuThreads: 'worker', workers: source });
  return { vmm, close: () => closeSync(fd) };
}

test('a vCPU worker that has not reached its loop: a pause holds at once, a stop ends the VM as stopped, not fatal', async () => {
  const loading = startWith(fakeVcpuWorker('loading'));
  const stuck = startWith(fakeVcpuWorker('stuck'));
  try {
    // Give the stuck one time to say it runs (its import).
    await new Promise((r) => setTimeout(r, 300));
    // The loading one has not run the guest and will see the command when it does: its pause
    // holds now (without this, it timed out after PAUSE_TIMEOUT_MS), and resume undoes it.
    const p0 = Date.now();
    await loading.vmm.pause();
    assert.equal(loading.vmm.state, 'paused');
    assert.ok(Date.now() - p0 < PAUSE_TIMEOUT_MS / 2, `the pause took ${Date.now() - p0} ms`);
    loading.vmm.resume();
    assert.equal(loading.vmm.state, 'running');
    const t0 = Date.now();
    loading.vmm.requestStop();
    stuck.vmm.requestStop();
    const [a, b] = await Promise.all([loading.vmm.exited, stuck.vmm.exited]);
    const took = Date.now() - t0;
    assert.deepEqual(a, { kind: 'stopped' }, 'the worker never ran the guest: a plain stop');
    assert.equal(b.kind, 'fatal', 'a vCPU that ran and did not stop is a fatal end');
    assert.match(
      (b as { message: string }).message,
      new RegExp(`vCPU 0 did not stop within ${STOP_TIMEOUT_MS} ms`),
    );
    assert.ok(took >= STOP_TIMEOUT_MS - 100, `both waited for the stop timeout (${took} ms)`);
  } finally {
    // Whatever failed above, the workers end (the stuck one spins until terminated).
    for (const x of [loading, stuck]) x.vmm.requestStop();
    await Promise.all([loading.vmm.exited, stuck.vmm.exited]);
    loading.close();
    stuck.close();
  }
});

/** This process's shared mappings of /dev/zero (the stand-in kvm_run mappings). */
const zeroMappings = () =>
  readFileSync('/proc/self/maps', 'utf8')
    .split('\n')
    .filter((l) => l.includes('/dev/zero')).length;

test('a start() that throws partway stops what it started and leaves no mapping, worker or teardown behind', async () => {
  const before = zeroMappings();
  const fd = openSync('/dev/zero', 'r+');
  const [w0, w1] = [fakeVcpuWorker('loading'), fakeVcpuWorker('loading')];
  const given: Worker[] = [];
  const source: VcpuWorkerSource = { take: () => [w0, w1], give: (w) => void given.push(w) };
  const vmm = new Vmm(MAP_SIZE);
  let tornDown = false;
  vmm.onTeardown(() => void (tornDown = true)); // the builder's: it undoes its own steps
  try {
    // vCPU 0 maps and starts; vCPU 1's fd cannot be mapped, so start() throws.
    assert.throws(
      () => vmm.start([fd, -1], () => ({}) as never, { vcpuThreads: 'worker', workers: source }),
      /EBADF|bad file/i,
    );
    assert.deepEqual(given, [w1], 'the worker never sent its start goes back to its source');
    const ended = await vmm.exited;
    assert.deepEqual(ended, { kind: 'stopped' }, 'vCPU 0 never ran: stopped');
    assert.equal(vmm.state, 'stopped');
    assert.equal(tornDown, false, "the caller's teardown does not run twice");
    assert.equal(zeroMappings(), before, 'the kvm_run mapping of vCPU 0 is gone');
  } finally {
    for (const w of [w0, w1]) void w.terminate();
    closeSync(fd);
  }
});

test('a start() whose worker source fails ends at once: exited resolves, no teardown runs twice', async () => {
  const source: VcpuWorkerSource = {
    take: () => {
      throw new Error('no warm worker');
    },
    give: () => {},
  };
  const vmm = new Vmm(MAP_SIZE);
  let tornDown = false;
  vmm.onTeardown(() => void (tornDown = true));
  assert.throws(
    () => vmm.start([0], () => ({}) as never, { vcpuThreads: 'worker', workers: source }),
    /no warm worker/,
  );
  assert.deepEqual(await vmm.exited, { kind: 'fatal', message: 'the VM did not start' });
  assert.equal(vmm.state, 'stopped');
  assert.equal(tornDown, false);
});

/** This process's threads (a worker that ended is gone from the list). */
const threads = () =>
  Number(/^Threads:\s+(\d+)/m.exec(readFileSync('/proc/self/status', 'utf8'))![1]);

test('a start() on native runners whose kvm_run cannot be mapped sends the hub worker nothing and ends it', async () => {
  const [mapsBefore, threadsBefore] = [zeroMappings(), threads()];
  const fd = openSync('/dev/zero', 'r+');
  const vmm = new Vmm(MAP_SIZE);
  try {
    // vCPU 0's mapping is made, vCPU 1's fails: neither runner may start, and the hub worker
    // (taken for this VM) must not be left waiting, or serving runners that do not exist.
    assert.throws(
      () => vmm.start([fd, -1], () => ({}) as never, { vcpuThreads: 'native', vcpuHub: 'worker' }),
      /EBADF|bad file/i,
    );
    assert.deepEqual(await vmm.exited, { kind: 'fatal', message: 'the VM did not start' });
    assert.equal(zeroMappings(), mapsBefore, "vCPU 0's mapping is undone");
    const deadline = Date.now() + 10_000;
    while (threads() > threadsBefore && Date.now() < deadline)
      await new Promise((r) => setTimeout(r, 50));
    assert.ok(threads() <= threadsBefore, `the hub worker ended (${threads()} threads)`);
  } finally {
    closeSync(fd);
  }
});

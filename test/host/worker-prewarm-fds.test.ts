/**
 * Prewarmed workers that nobody uses end without leaking descriptors (vcpu-pool.ts). The
 * daemon's shared mode prewarms a device worker for each VM and takeVcpuWorkers ends it when
 * the VM has no virtio device; ended while it was still loading its modules, Node 20's ESM
 * loader left those module files open (44 -> 494 descriptors over 300 VMs). Here: a device
 * worker and two surplus vCPU workers prewarmed and given up 30 times, at moments spread over
 * their loading (10-250 ms after the start); before the fix this test saw 65 and 92 new
 * descriptors of dist/ module files. About 5 s. Needs no KVM (the workers never get a VM).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readdirSync, readlinkSync } from 'node:fs';
import {
  UNUSED_WORKER_READY_LIMIT_MS,
  prewarmDeviceWorker,
  prewarmVcpuWorkers,
  takeVcpuWorkers,
} from '../../src/vmm/vcpu-pool.js';
import { eventually, threadCount } from './helpers.js';

const ROUNDS = 30;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** This process's open descriptors, by what they point at. */
function fds(): string[] {
  const out: string[] = [];
  for (const fd of readdirSync('/proc/self/fd')) {
    try {
      out.push(readlinkSync(`/proc/self/fd/${fd}`));
    } catch {
      // closed meanwhile (the readdir's own descriptor)
    }
  }
  return out;
}

test(
  'prewarmed device and vCPU workers given up while loading leave no descriptor or thread behind',
  { timeout: 180_000 },
  async () => {
    // The process's own start-up threads and descriptors settle first.
    await sleep(300);
    const fd0 = fds();
    const threads0 = threadCount();
    for (let i = 0; i < ROUNDS; i++) {
      prewarmDeviceWorker();
      // TYPERVISOR_VCPU_THREADS unset: one worker per vCPU; two asked for, none taken below.
      prewarmVcpuWorkers(2);
      await sleep(10 + ((i * 37) % 240));
      assert.deepEqual(takeVcpuWorkers(0), []);
    }
    // Every worker given up ends once it has loaded (its 'ready'), its thread with it; one that
    // never does is ended at the pool's limit.
    assert.ok(
      await eventually(() => threadCount() <= threads0, UNUSED_WORKER_READY_LIMIT_MS + 10_000),
      `threads: ${threadCount()} now, ${threads0} before (an unused worker did not end)`,
    );
    // Worker teardown closes its own descriptors (eventfds, epoll) shortly after its thread.
    const settled = await eventually(() => fds().length <= fd0.length, 10_000);
    const now = fds();
    const leaked = now.filter((p) => !fd0.includes(p));
    assert.ok(
      settled,
      `descriptors: ${fd0.length} before, ${now.length} after ${ROUNDS} rounds; new: ${leaked.join(', ')}`,
    );
  },
);

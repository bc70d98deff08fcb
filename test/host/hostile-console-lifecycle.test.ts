/**
 * Needs /dev/kvm, gcc and ld. Pause and stop with a vCPU that is stuck outside the guest
 * (issue 12): the VM is built in this process on the consoleflood guest, and the main thread
 * holds the UART's lock, so the vCPU's next COM1 write waits on it (Atomics.wait: neither the
 * kick signal nor immediate_exit reaches it), as a vCPU stuck in a device would.
 *  - a pause then fails within PAUSE_TIMEOUT_MS with a message naming the vCPU, and leaves a
 *    true state: the pause is undone, the VM is "running", and once the vCPU is free, pause,
 *    resume and stop work as usual;
 *  - a stop still ends the VM: the worker is terminated after STOP_TIMEOUT_MS and `exited`
 *    resolves with a fatal event that says so (the CLI prints it as its one line, exit 1).
 * The second test leaves that VM's mappings in this process (a terminated worker does not
 * unmap): it runs last, in a file of its own.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { closeSync, openSync } from 'node:fs';
import { buildVm, type BuiltVm } from '../../src/vmm/builder.js';
import { validateResources } from '../../src/vmm/resources.js';
import { Command } from '../../src/vmm/vcpu-control.js';
import { PAUSE_TIMEOUT_MS, STOP_TIMEOUT_MS } from '../../src/vmm/vmm.js';
import type { SharedMutex } from '../../src/util/shared-mutex.js';
import { eventually, guestPath, tinyGuests } from './helpers.js';

const guests = tinyGuests();
const T = { timeout: 30_000, skip: guests.skip ?? false };

interface Flood {
  vm: BuiltVm;
  bytesOut: () => number;
  /** Takes the UART's lock and returns once the vCPU waits on it. */
  stickVcpu(): Promise<void>;
  unstickVcpu(): void;
  /** Ends the VM whatever happened (bounded) and closes the console. */
  done(): Promise<void>;
}

async function flood(): Promise<Flood> {
  const fd = openSync('/dev/null', 'w');
  const vm = buildVm(
    validateResources({
      machine: { vcpu_count: 1, mem_size_mib: 32 },
      boot: { kernel_image_path: guestPath('consoleflood') },
    }),
    { consoleFd: fd },
  );
  // The UART's own lock (private: taken here to stand in for a vCPU stuck outside the guest).
  // Its slot reads 2 once a thread waits on it (SharedMutex: locked, with waiters).
  const lock = (vm.devices.serial as unknown as { mutex: SharedMutex }).mutex;
  const { slots, index } = lock as unknown as { slots: Int32Array; index: number };
  let held = false;
  const unstickVcpu = () => {
    if (held) lock.unlock();
    held = false;
  };
  const f: Flood = {
    vm,
    bytesOut: () => vm.devices.serial.stats().bytesOut,
    async stickVcpu() {
      // tryLock, never lock(): a lock() that had to wait for the vCPU's section leaves the slot
      // at 2 itself (the futex mutex's "maybe waiters"), which would read below as the vCPU
      // waiting when it is not yet; a stop or pause would then reach it first (seen in CI's lab).
      const until = Date.now() + 5000;
      while (!lock.tryLock()) {
        assert.ok(Date.now() < until, 'the UART lock was never free');
        await new Promise((r) => setTimeout(r, 1));
      }
      held = true;
      const waiting = await eventually(() => Atomics.load(slots, index) === 2, 5000);
      assert.ok(waiting, 'the vCPU never waited on the UART lock');
    },
    unstickVcpu,
    async done() {
      unstickVcpu();
      vm.vmm.requestStop();
      await Promise.race([vm.vmm.exited, new Promise((r) => setTimeout(r, 10_000))]);
      closeSync(fd);
    },
  };
  assert.ok(await eventually(() => f.bytesOut() > 1000, 10_000), 'the guest never wrote');
  return f;
}

describe('pause and stop with a stuck vCPU (KVM)', () => {
  test(
    'a pause that times out is undone and says so; pause, resume and stop work after',
    T,
    async () => {
      const f = await flood();
      const { vmm } = f.vm;
      try {
        await f.stickVcpu(); // its THR write waits for the lock
        const started = performance.now();
        await assert.rejects(
          vmm.pause(),
          new RegExp(
            `^Error: vCPU 0 did not pause within ${PAUSE_TIMEOUT_MS} ms .*the pause was undone and the VM keeps running$`,
          ),
        );
        const took = performance.now() - started;
        assert.ok(took < PAUSE_TIMEOUT_MS + 1000, `the pause took ${took} ms to fail`);
        assert.equal(vmm.state, 'running');
        assert.equal(vmm.control.command, Command.Run, 'the vCPUs are still told to pause');
        f.unstickVcpu();
        const before = f.bytesOut();
        assert.ok(await eventually(() => f.bytesOut() > before + 1000, 5000), 'the guest stopped');
        // Everything works as usual once the vCPU is free again.
        await vmm.pause();
        assert.equal(vmm.state, 'paused');
        const paused = f.bytesOut();
        await new Promise((r) => setTimeout(r, 100));
        assert.equal(f.bytesOut(), paused, 'output while paused');
        vmm.resume();
        assert.equal(vmm.state, 'running');
        assert.ok(
          await eventually(() => f.bytesOut() > paused + 1000, 5000),
          'no output after resume',
        );
        vmm.requestStop();
        assert.deepEqual(await vmm.exited, { kind: 'stopped' });
      } finally {
        await f.done();
      }
    },
  );

  test('a stop with a vCPU that does not leave ends the VM anyway, saying which', T, async () => {
    const f = await flood();
    const { vmm } = f.vm;
    try {
      await f.stickVcpu();
      const started = performance.now();
      vmm.requestStop();
      const ev = await vmm.exited;
      const took = performance.now() - started;
      f.unstickVcpu();
      assert.deepEqual(ev, {
        kind: 'fatal',
        message: `vCPU 0 did not stop within ${STOP_TIMEOUT_MS} ms; its thread was terminated`,
      });
      assert.equal(vmm.state, 'stopped');
      assert.ok(took < STOP_TIMEOUT_MS + 3000, `the stop took ${took} ms`);
    } finally {
      await f.done();
    }
  });
});

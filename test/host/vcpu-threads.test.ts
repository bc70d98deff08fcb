/**
 * Needs /dev/kvm, gcc and ld. vCPUs on native runner threads (TYPERVISOR_VCPU_THREADS=native,
 * src/vmm/vcpu-threads.ts), VMs built in THIS process with several vCPUs: the guest's output and
 * poweroff; one runner thread per vCPU (named tv-vrunN), each with its own seccomp filter, and
 * one hub (the main thread, or a worker with TYPERVISOR_VCPU_HUB=worker); pause parks every vCPU and stops the exits, resume runs them again, stop ends them;
 * a snapshot of a running counting guest restores and counts on; no thread is left behind. And
 * the shim's argument checks of vcpuRunnerStart and friends.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { openSync, readFileSync, readdirSync } from 'node:fs';
import { join } from 'node:path';
import { readFile } from 'node:fs/promises';
import { buildVm, type BuiltVm } from '../../src/vmm/builder.js';
import { validateResources } from '../../src/vmm/resources.js';
import { createSnapshot, loadSnapshot } from '../../src/vmm/snapshot.js';
import { VcpuState } from '../../src/vmm/vcpu-control.js';
import { Worker } from 'node:worker_threads';
import { EFD_NONBLOCK, native, O_RDWR } from '../../src/kvm/native.js';
import { eventually, guestPath, tempDir, threadCount, tinyGuests } from './helpers.js';
import { counts, countsIn, cutLine, lines, stop } from './counting-guest.js';

const guests = tinyGuests();
const skip = guests.skip ?? false;
const T = { timeout: 60_000, skip };
const BOUND_MS = 5000;

// Warm libuv's thread pool so that it does not start threads in the middle of a count.
await readFile(new URL(import.meta.url));

/** This process's threads by name (comm), with their seccomp mode. */
function threads(): Array<{ name: string; seccomp: number }> {
  const out: Array<{ name: string; seccomp: number }> = [];
  for (const t of readdirSync('/proc/self/task')) {
    try {
      const name = readFileSync(`/proc/self/task/${t}/comm`, 'utf8').trim();
      const m = /^Seccomp:\s+(\d+)/m.exec(readFileSync(`/proc/self/task/${t}/status`, 'utf8'));
      out.push({ name, seccomp: Number(m?.[1] ?? -1) });
    } catch {
      // exited meanwhile
    }
  }
  return out;
}

function build(
  guest: string,
  vcpus: number,
  consoleFile: string,
  mode: 'native' | 'hybrid' | 'loop' = 'native',
  hub: 'main' | 'worker' = 'main',
): BuiltVm {
  const prev = process.env.TYPERVISOR_VCPU_THREADS;
  process.env.TYPERVISOR_VCPU_THREADS = mode;
  process.env.TYPERVISOR_VCPU_HUB = hub;
  try {
    return buildVm(
      validateResources({
        machine: { vcpu_count: vcpus, mem_size_mib: 32 },
        boot: { kernel_image_path: guestPath(guest) },
      }),
      { consoleFd: openSync(consoleFile, 'w') },
    );
  } finally {
    if (prev === undefined) delete process.env.TYPERVISOR_VCPU_THREADS;
    else process.env.TYPERVISOR_VCPU_THREADS = prev;
    delete process.env.TYPERVISOR_VCPU_HUB;
  }
}

async function gone(baseline: number): Promise<void> {
  assert.ok(
    await eventually(() => threadCount() <= baseline, BOUND_MS),
    `threads: ${threadCount()} now, ${baseline} before the VM: ${threads()
      .map((t) => t.name)
      .join(', ')}`,
  );
  assert.equal(threads().filter((t) => t.name.startsWith('tv-vrun')).length, 0);
  assert.equal(threads().filter((t) => t.name === 'tv-vloopwatch').length, 0);
}

const states = (vm: BuiltVm, n: number) => [...Array(n).keys()].map((i) => vm.vmm.control.state(i));

describe('native vCPU runner threads (KVM)', () => {
  test('4 vCPUs: the guest prints, powers off, and every runner is joined', T, async () => {
    const baseline = threadCount();
    const dir = tempDir();
    const out = join(dir, 'console');
    const vm = build('poweroff', 4, out);
    assert.equal(vm.vmm.mode, 'native');
    const ev = await vm.vmm.exited;
    assert.deepEqual(ev, { kind: 'poweroff' });
    assert.match(readFileSync(out, 'utf8'), /^tiny guest up\n/);
    assert.deepEqual(states(vm, 4), new Array(4).fill(VcpuState.Exited));
    await gone(baseline);
  });

  for (const [mode, hub] of [
    ['native', 'main'],
    ['hybrid', 'main'],
    ['native', 'worker'],
    ['hybrid', 'worker'],
    ['loop', 'main'],
  ] as const)
    test(
      `${mode}, 8 vCPUs: one filtered runner thread per vCPU${mode === 'hybrid' ? ' but vCPU 0 (a worker)' : mode === 'loop' ? ' but vCPU 0 (the main thread, with a filtered watcher)' : ''}, the hub on ${hub === 'main' ? 'the main thread' : 'a worker'}; pause, resume, stop`,
      T,
      async () => {
        const baseline = threadCount();
        const dir = tempDir();
        const vm = build('piospin', 8, join(dir, 'console'), mode, hub);
        try {
          assert.equal(vm.vmm.mode, mode);
          const first = mode === 'native' ? 0 : 1;
          // every vCPU runs, vCPU 0 exits on every port write
          assert.ok(await eventually(() => vm.vmm.control.exits(0) > 100, BOUND_MS), 'no exits');
          // the runners start once the hub's worker is up (vCPU 0's worker may be running
          // already); a hub worker names itself just after it has started them
          assert.ok(
            await eventually(() => {
              const ts = threads();
              return (
                ts.filter((t) => t.name.startsWith('tv-vrun')).length === 8 - first &&
                ts.some((t) => t.name === 'tv-vcpuhub') === (hub === 'worker')
              );
            }, BOUND_MS),
            'the runner threads did not start',
          );
          const ts = threads();
          const runners = ts.filter((t) => t.name.startsWith('tv-vrun'));
          assert.deepEqual(
            runners.map((t) => t.name).sort(),
            [...Array(8 - first).keys()].map((i) => `tv-vrun${i + first}`),
          );
          for (const r of runners) assert.equal(r.seccomp, 2, `${r.name} has no seccomp filter`);
          assert.equal(ts.filter((t) => t.name === 'tv-vcpuhub').length, hub === 'worker' ? 1 : 0);
          const watchers = ts.filter((t) => t.name === 'tv-vloopwatch');
          assert.equal(watchers.length, mode === 'loop' ? 1 : 0);
          for (const w of watchers) assert.equal(w.seccomp, 2, 'the watcher has no seccomp filter');
          assert.deepEqual(
            ts
              .filter((t) => t.name.startsWith('tv-vcpu') && t.name !== 'tv-vcpuhub')
              .map((t) => t.name),
            mode === 'hybrid' ? ['tv-vcpu0'] : [],
          );
          // a VM of 8 vCPUs costs 8 small threads and at most two workers, not 8 workers; with
          // the hub on the main thread, native mode starts no worker at all
          const extra = threadCount() - baseline;
          if (mode !== 'hybrid' && hub === 'main') assert.ok(extra <= 8, `${extra} new threads`);
          assert.ok(extra <= 8 + 6, `${extra} new threads`);

          await vm.vmm.pause();
          assert.equal(vm.vmm.state, 'paused');
          assert.deepEqual(states(vm, 8), new Array(8).fill(VcpuState.Paused));
          const parked = vm.vmm.control.exits(0);
          await new Promise((r) => setTimeout(r, 200));
          assert.equal(vm.vmm.control.exits(0), parked, 'exits while paused');
          vm.vmm.resume();
          assert.ok(
            await eventually(() => vm.vmm.control.exits(0) > parked + 100, BOUND_MS),
            'no exits after resume',
          );
          // a second pause and resume, to see the runners go round
          await vm.vmm.pause();
          assert.deepEqual(states(vm, 8), new Array(8).fill(VcpuState.Paused));
          vm.vmm.resume();
          vm.vmm.requestStop();
          assert.deepEqual(await vm.vmm.exited, { kind: 'stopped' });
          assert.deepEqual(states(vm, 8), new Array(8).fill(VcpuState.Exited));
        } finally {
          // A failed check leaves the VM running: stop it, or the next test finds the
          // process's one loop runner (and its threads) still taken.
          if (vm.vmm.state !== 'stopped') {
            vm.vmm.requestStop();
            await Promise.race([vm.vmm.exited, new Promise((r) => setTimeout(r, 10_000))]);
          }
        }
        await gone(baseline);
      },
    );

  for (const [mode, hub] of [
    ['native', 'main'],
    ['hybrid', 'main'],
    ['native', 'worker'],
    ['loop', 'main'],
  ] as const)
    test(
      `${mode}, the hub on ${hub === 'main' ? 'the main thread' : 'a worker'}: a snapshot of a running 4-vCPU counting guest restores and counts on`,
      T,
      async () => {
        const baseline = threadCount();
        const dir = tempDir();
        const out = join(dir, 'a.out');
        const vm = build('count', 4, out, mode, hub);
        await lines(out, 5);
        await vm.vmm.pauseAll(vm.deviceWorker);
        await createSnapshot(vm, {
          snapshotPath: join(dir, 'state'),
          memFilePath: join(dir, 'mem'),
          type: 'Full',
        });
        // The pause may fall in the middle of a line: the copy prints the rest of it.
        const text = readFileSync(out, 'latin1');
        const c = countsIn(text);
        const last = c[c.length - 1]!;
        const cut = cutLine(text);
        // the snapshotted VM runs on after the snapshot, then stops
        await vm.vmm.resumeAll(vm.deviceWorker);
        await lines(out, c.length + 2);
        await stop(vm);

        const out2 = join(dir, 'b.out');
        process.env.TYPERVISOR_VCPU_THREADS = mode;
        process.env.TYPERVISOR_VCPU_HUB = hub;
        let vm2: BuiltVm;
        try {
          vm2 = await loadSnapshot(
            {
              snapshotPath: join(dir, 'state'),
              memBackend: { type: 'File', path: join(dir, 'mem') },
              trackDirtyPages: false,
              resumeVm: true,
              clockRealtime: false,
              networkOverrides: [],
            },
            { consoleFd: openSync(out2, 'w') },
          );
        } finally {
          delete process.env.TYPERVISOR_VCPU_THREADS;
          delete process.env.TYPERVISOR_VCPU_HUB;
        }
        try {
          assert.equal(vm2.vmm.mode, mode);
          await lines(out2, 3);
          const c2 = counts(out2, cut);
          assert.equal(c2[0], last + 1, 'the restored count goes on from the snapshot');
          for (let i = 1; i < c2.length; i++) assert.equal(c2[i], c2[i - 1]! + 1);
        } finally {
          await stop(vm2); // a failed check must not leave its threads to the next test
        }
        await gone(baseline);
      },
    );
});

describe('vcpuRunnerStart and friends check their arguments', { skip }, () => {
  test('bad descriptors, words, index, program and handles are refused', () => {
    const n = native();
    const words = new Int32Array(new SharedArrayBuffer(16));
    const sig = n.installKickHandler();
    const efd = n.eventfd(0, 0);
    const kvm = n.open('/dev/kvm', O_RDWR, 0);
    try {
      assert.throws(() => n.vcpuRunnerStart(-1, words, 0, efd, sig, 'x', null), /EBADF/);
      assert.throws(() => n.vcpuRunnerStart(kvm, words, 0, -1, sig, 'x', null), /EBADF/);
      assert.throws(() => n.vcpuRunnerStart(kvm, words, 0, efd, 9, 'x', null), /real-time signal/);
      assert.throws(
        () => n.vcpuRunnerStart(kvm, new Uint8Array(16) as never, 0, efd, sig, 'x', null),
        /Int32Array/,
      );
      assert.throws(() => n.vcpuRunnerStart(kvm, words, 2, efd, sig, 'x', null), /range/);
      assert.throws(
        () => n.vcpuRunnerStart(kvm, words, 0, efd, sig, 'x', new Uint8Array(7)),
        /instructions of 8 bytes/,
      );
      for (const spin of [-1, 100_001])
        assert.throws(
          () => n.vcpuRunnerStart(kvm, words, 0, efd, sig, 'x', null, spin),
          /spin must be 0 to 100000/,
        );
      words[0] = 2;
      assert.throws(() => n.vcpuRunnerStart(kvm, words, 0, efd, sig, 'x', null), /not IDLE/);
      for (const h of [-1, 0, 12345])
        (assert.throws(() => n.vcpuRunnerGo(h), /ESRCH/), assert.equal(n.vcpuRunnerKick(h), false));
      assert.throws(() => n.vcpuRunnerJoin(7), /ESRCH/);
    } finally {
      n.close(kvm);
      n.close(efd);
    }
  });

  test('a runner on a non-vCPU fd reports the error, quits and is joined', async () => {
    const n = native();
    const words = new Int32Array(new SharedArrayBuffer(16));
    const sig = n.installKickHandler();
    const efd = n.eventfd(0, 0);
    const kvm = n.open('/dev/kvm', O_RDWR, 0);
    // The runner by its name: the process's other threads come and go on their own (libuv's
    // pool, V8's helpers: CI once counted one more than the runner here).
    const runners = () => threads().filter((t) => t.name === 'tv-vrun-test').length;
    assert.equal(runners(), 0);
    try {
      const h = n.vcpuRunnerStart(kvm, words, 0, efd, sig, 'tv-vrun-test', null);
      assert.equal(runners(), 1);
      assert.throws(() => n.vcpuRunnerJoin(h), /EBUSY/);
      n.vcpuRunnerGo(h);
      n.eventfdRead(efd); // KVM_RUN on /dev/kvm fails at once: ENOTTY or EINVAL
      assert.equal(Atomics.load(words, 0), 2);
      assert.ok(Atomics.load(words, 1) > 0, `errno ${Atomics.load(words, 1)}`);
      assert.equal(Atomics.load(words, 2), 1);
      assert.throws(() => n.vcpuRunnerStart(kvm, words, 0, efd, sig, 'x', null), /not IDLE/);
      n.vcpuRunnerQuit(h);
      while (Atomics.load(words, 0) !== 4) n.eventfdRead(efd);
      n.vcpuRunnerJoin(h);
      // pthread_join returns once the thread's tid is cleared, which the kernel does before
      // the task has left /proc/self/task (a full host suite once saw it there a moment later)
      assert.ok(await eventually(() => runners() === 0, BOUND_MS), 'joined');
      assert.throws(() => n.vcpuRunnerGo(h), /ESRCH/);
      assert.equal(n.vcpuRunnerKick(h), false);
    } finally {
      n.close(kvm);
      n.close(efd);
    }
  });
});

describe('loopRunnerStep: the loop runner’s vCPU run again from its callback', { skip }, () => {
  test('it runs only inside the callback, only when told RUN, and reports as the loop does', async () => {
    const n = native();
    const words = new Int32Array(new SharedArrayBuffer(16));
    const sig = n.installKickHandler();
    const kvm = n.open('/dev/kvm', O_RDWR, 0);
    // KVM_RUN on /dev/kvm (not a vCPU) fails at once: each run is one report in the words.
    const keep = setTimeout(() => undefined, 30_000); // the loop has a timer, not due: it runs
    let h = -1;
    let tries = 0;
    let ran: string | undefined;
    let notRun = -1;
    let withWork = -1;
    try {
      await new Promise<void>((resolve) => {
        h = n.loopRunnerStart(
          kvm,
          new ArrayBuffer(4096),
          words,
          0,
          sig,
          () => {
            if (ran !== undefined) return;
            if (++tries > 100) return (Atomics.store(words, 0, 2), resolve());
            // Told RUN again: one more KVM_RUN now, reported before the step returns. A step
            // that finds the loop with work (anything of this test process's) does not run:
            // the loop runs it after its turn, and this callback tries again.
            const runs = Atomics.load(words, 2);
            Atomics.store(words, 0, 1);
            if (n.loopRunnerStep(h) === 0) return;
            const errno = Atomics.load(words, 1);
            ran = `${Atomics.load(words, 0)}/${errno > 0}/${Atomics.load(words, 2) - runs}`;
            // Not told RUN (the word says EXITED): no run.
            notRun = n.loopRunnerStep(h);
            // An immediate queued: the loop has work, so no run either.
            Atomics.store(words, 0, 1);
            setImmediate(resolve);
            withWork = n.loopRunnerStep(h);
            Atomics.store(words, 0, 2);
          },
          null,
        );
        assert.throws(() => n.loopRunnerStep(h), /EPERM/);
        assert.throws(() => n.loopRunnerStep(h + 1), /ESRCH/);
        n.loopRunnerGo(h);
      });
      assert.ok(tries <= 100, 'a step ran within 100 callbacks');
      assert.equal(ran, '2/true/1', 'EXITED, an errno, one run more');
      assert.equal(notRun, 0);
      assert.equal(withWork, 0);
      assert.throws(() => n.loopRunnerStep(h), /EPERM/);
    } finally {
      clearTimeout(keep);
      if (h >= 0) {
        n.loopRunnerQuit(h);
        n.loopRunnerJoin(h);
      }
      n.close(kvm);
    }
  });
});

describe(
  'fdWatch: an fd watched on this thread’s event loop (the hub on the main thread)',
  { skip },
  () => {
    test('it calls back on each write of another thread, not after fdUnwatch; bad arguments are refused', async () => {
      const n = native();
      const efd = n.eventfd(0, EFD_NONBLOCK);
      try {
        assert.throws(() => n.fdWatch(-1, () => {}), /EBADF/);
        assert.throws(() => n.fdWatch(efd, 42 as never), /must be a function/);
        let calls = 0;
        const h = n.fdWatch(efd, () => {
          calls++;
          n.eventfdRead(efd); // level-triggered: drained here, or it would call again at once
        });
        // written from a worker, as a runner thread writes it
        const w = new Worker(
          `const { workerData: d } = require('node:worker_threads');
         const fs = require('node:fs');
         fs.writeSync(d.fd, Buffer.from([1, 0, 0, 0, 0, 0, 0, 0]));`,
          { eval: true, workerData: { fd: efd } },
        );
        await new Promise((r) => w.once('exit', r));
        assert.ok(await eventually(() => calls === 1, BOUND_MS), `calls: ${calls}`);
        n.eventfdWrite(efd, 1);
        assert.ok(await eventually(() => calls === 2, BOUND_MS), `calls: ${calls}`);
        n.fdUnwatch(h);
        n.fdUnwatch(h); // a stale handle: ignored
        n.fdUnwatch(12345);
        n.eventfdWrite(efd, 1);
        await new Promise((r) => setTimeout(r, 100));
        assert.equal(calls, 2, 'called after fdUnwatch');
      } finally {
        n.close(efd);
      }
    });
  },
);

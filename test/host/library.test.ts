/**
 * The library API (src/lib/) on the host's KVM, with the tiny guests (test/guests/tiny.S): many
 * VMs in this one process, one after another and several at once, on a warm host; lifecycle
 * events; console streams both ways; errors as values (bad config, missing kernel, a guest that
 * triple-faults, calls in the wrong state); guest RAM emptied between VMs; the role filters on
 * the library's threads only; no descriptor or memory growth over create/run/destroy cycles.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { readdirSync, readFileSync, readlinkSync } from 'node:fs';
import { once } from 'node:events';
import { spawn } from 'node:child_process';
import { Worker } from 'node:worker_threads';
import {
  createVm,
  createVmHost,
  defaultHost,
  VmError,
  type Vm,
  type VmHost,
  type VmResources,
  type VmState,
} from '../../src/lib/index.js';
import { guestPath, tinyGuests } from './helpers.js';

const guests = tinyGuests();
const skip = guests.skip ?? false;
const T = { timeout: 120_000, skip };

const res = (guest: string, mem = 32): VmResources => ({
  machine: { vcpu_count: 1, mem_size_mib: mem },
  boot: { kernel_image_path: guestPath(guest) },
});

/** Everything the VM's console wrote, once its stream has ended. */
async function readAll(vm: Vm): Promise<string> {
  const out = vm.console!.output;
  let s = '';
  out.on('data', (d: Buffer) => (s += d.toString('latin1')));
  if (!out.readableEnded) await once(out, 'end');
  return s;
}

function host(opts: Parameters<typeof createVmHost>[0] = {}): VmHost {
  const r = createVmHost(opts);
  assert.ok(r.ok, r.ok ? '' : r.error.message);
  return r.value;
}

async function made(p: ReturnType<VmHost['createVm']>): Promise<Vm> {
  const r = await p;
  assert.ok(r.ok, r.ok ? '' : `${r.error.code}: ${r.error.message}`);
  return r.value;
}

/** The library's entry, for programs run in a child process or a worker. */
const LIB = new URL('../../src/lib/index.js', import.meta.url).href;

/**
 * Runs `script` (an ES module) in a child Node, SIGKILLed after `killMs`: its exit, what it
 * printed (stdout and stderr), and when `mark` first showed on its stdout (0: never).
 */
async function runProgram(
  script: string,
  killMs: number,
  mark?: string,
): Promise<{ code: number | null; signal: string | null; out: string; markAt: number }> {
  const child = spawn(process.execPath, ['--input-type=module', '-e', script], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  let markAt = 0;
  child.stdout.on('data', (d: Buffer) => {
    out += d.toString();
    if (mark !== undefined && markAt === 0 && out.includes(mark)) markAt = Date.now();
  });
  child.stderr.on('data', (d: Buffer) => (out += d.toString()));
  const killer = setTimeout(() => child.kill('SIGKILL'), killMs);
  const [code, signal] = (await once(child, 'exit')) as [number | null, string | null];
  clearTimeout(killer);
  return { code, signal, out, markAt };
}

const fdCount = () => readdirSync('/proc/self/fd').length;

/**
 * fdCount() once the process's descriptors are settled: none open on a module file (a worker
 * of the warm pool still loading its modules holds them for a moment; on a loaded machine one
 * was open when the baseline was taken) and the same count twice, 50 ms apart (at most 10 s).
 */
async function settledFdCount(): Promise<number> {
  const loading = (fds: string[]) =>
    fds.some((f) => {
      try {
        return /\.(m?js|cjs|node|json)$/.test(readlinkSync(`/proc/self/fd/${f}`));
      } catch {
        return false; // closed meanwhile, or readdir's own descriptor
      }
    });
  let last = -1;
  for (const end = Date.now() + 10_000; Date.now() < end;) {
    const fds = readdirSync('/proc/self/fd'); // one read per sample: the count and the links
    if (fds.length === last && !loading(fds)) return last;
    last = fds.length;
    await new Promise((r) => setTimeout(r, 50));
  }
  return fdCount();
}
const rssKiB = () => Number(/VmRSS:\s+(\d+)/.exec(readFileSync('/proc/self/status', 'utf8'))![1]);

test('the package entry: `typervisor` resolves to the library (package.json exports)', async () => {
  const pkg = (await import('typervisor' as string)) as Record<string, unknown>;
  assert.equal(pkg.createVm, createVm);
  assert.equal(pkg.VmError, VmError);
});

describe('library: VMs in this process', () => {
  test(
    'ten VMs one after another on one host: each powers off and prints; workers are reused',
    T,
    async () => {
      const h = host({ warmVcpuWorkers: 1 });
      try {
        await h.ready();
        for (let i = 0; i < 10; i++) {
          const vm = await made(h.createVm(res('poweroff')));
          assert.equal(vm.state, 'created');
          const text = readAll(vm);
          assert.deepEqual(await vm.start(), { ok: true, value: undefined });
          const exit = await vm.wait();
          assert.equal(exit.reason, 'poweroff', JSON.stringify(exit));
          assert.equal(vm.state, 'stopped');
          assert.match(await text, /tiny guest up\n/);
        }
        const s = h.stats();
        assert.equal(s.vmsCreated, 10);
        assert.equal(s.vmsLive, 0);
        // One worker runs every VM's vCPU in turn; the refill may have started one or two more.
        assert.ok(s.vcpuWorkersStarted <= 3, `workers started: ${s.vcpuWorkersStarted}`);
        assert.ok(s.ramReused >= 8, `RAM reused ${s.ramReused} times`);
      } finally {
        await h.drain();
        await h.close();
      }
    },
  );

  test(
    'six VMs at once: all run, each stops on its own; then four power off together',
    T,
    async () => {
      const h = host({ warmVcpuWorkers: 2 });
      try {
        const vms = await Promise.all(
          Array.from({ length: 6 }, () => made(h.createVm(res('spin'), { start: true }))),
        );
        assert.equal(new Set(vms.map((v) => v.id)).size, 6);
        assert.ok(vms.every((v) => v.state === 'running'));
        assert.equal(h.stats().vmsLive, 6);
        assert.equal(h.stats().busyVcpuWorkers, 6);
        // Stopping one leaves the others running.
        const first = await vms[0]!.stop();
        assert.equal(first.reason, 'stopped', JSON.stringify(first));
        await new Promise((r) => setTimeout(r, 50));
        assert.ok(vms.slice(1).every((v) => v.state === 'running'));
        const exits = await Promise.all(vms.slice(1).map((v) => v.stop()));
        assert.deepEqual(
          exits.map((e) => e.reason),
          ['stopped', 'stopped', 'stopped', 'stopped', 'stopped'],
          JSON.stringify(exits),
        );
        const offs = await Promise.all(
          Array.from({ length: 4 }, async () => {
            const vm = await made(h.createVm(res('poweroff'), { console: 'none', start: true }));
            return (await vm.wait()).reason;
          }),
        );
        assert.deepEqual(offs, ['poweroff', 'poweroff', 'poweroff', 'poweroff']);
        assert.equal(h.stats().busyVcpuWorkers, 0);
      } finally {
        await h.drain();
        await h.close();
      }
    },
  );

  test('events: state changes in order, one exit event equal to wait()', T, async () => {
    const h = host();
    try {
      const vm = await made(h.createVm(res('spin'), { console: 'none' }));
      const states: Array<[VmState, VmState]> = [];
      vm.on('state', (s, prev) => states.push([s, prev]));
      const exitEvents: unknown[] = [];
      vm.on('exit', (e) => exitEvents.push(e));
      const started = await vm.start();
      assert.ok(started.ok, JSON.stringify(started));
      const paused = await vm.pause();
      assert.ok(paused.ok, JSON.stringify(paused));
      assert.equal(vm.state, 'paused');
      const c1 = vm.stats().exits[0]!;
      await new Promise((r) => setTimeout(r, 30));
      assert.equal(vm.stats().exits[0], c1, 'no exits while paused');
      const resumed = await vm.resume();
      assert.ok(resumed.ok, JSON.stringify(resumed));
      const exit = await vm.stop();
      assert.deepEqual(states, [
        ['running', 'created'],
        ['paused', 'running'],
        ['running', 'paused'],
        ['stopping', 'running'],
        ['stopped', 'stopping'],
      ]);
      assert.deepEqual(exitEvents, [exit]);
      assert.equal(exit.reason, 'stopped');
      assert.deepEqual(await vm.wait(), exit);
      assert.deepEqual(vm.exit, exit);
    } finally {
      await h.drain();
      await h.close();
    }
  });

  test(
    'console streams: input reaches the guest, its echo comes back, output ends',
    T,
    async () => {
      const vm = await made(createVm(res('echo'), { start: true }));
      const text = readAll(vm);
      vm.console!.input.write('hello library\n');
      const exit = await vm.wait();
      assert.equal(exit.reason, 'poweroff');
      assert.match(await text, /hello library\n/);
      // Written after the VM ended: dropped, no error.
      await new Promise<void>((resolve, reject) =>
        vm.console!.input.write('late\n', (e) => (e ? reject(e) : resolve())),
      );
      await defaultHost().drain();
    },
  );

  test(
    'a program that only calls createVm exits on its own: idle warm workers hold nothing',
    T,
    async () => {
      // The default host's warm vCPU workers and closer thread stay for the next VM, but
      // unreferenced: the embedding program ends when its own work does, with no close().
      const script = `
        const { createVm } = await import(${JSON.stringify(LIB)});
        const r = await createVm(${JSON.stringify(res('echo'))}, { start: true });
        if (!r.ok) throw r.error;
        let s = '';
        const out = r.value.console.output;
        out.on('data', (d) => (s += d));
        const ended = new Promise((resolve) => out.on('end', resolve));
        r.value.console.input.write('bye\\n');
        const exit = await r.value.wait();
        // The guest's last bytes may still be in the pipe when wait() resolves: the output's
        // end is what says all of them have arrived.
        await ended;
        console.log(exit.reason, JSON.stringify(s), exit.message ?? "");`;
      const { code, signal, out } = await runProgram(script, 30_000);
      assert.equal(signal, null, `the program did not exit by itself within 30 s: ${out}`);
      assert.equal(code, 0, out);
      assert.match(out, /^poweroff ".*bye/m);
    },
  );

  test('a program that calls process.exit() while a busy guest runs ends at once', T, async () => {
    // The spin guest never leaves the guest by itself: its vCPU worker sits in KVM_RUN, which
    // Node's termination of workers at exit cannot interrupt. The VM is stopped (its vCPUs
    // kicked out) as the process exits (vmm.ts liveVmms); before that such a program took
    // 75 s to end in the lab, and a test file whose failure left one never ended.
    const script = `
        const { createVm } = await import(${JSON.stringify(LIB)});
        const r = await createVm(${JSON.stringify(res('spin'))}, { start: true, console: 'none' });
        if (!r.ok) throw r.error;
        const t0 = Date.now();
        while (r.value.stats().exits[0] === 0 && Date.now() - t0 < 20000)
          await new Promise((resolve) => setTimeout(resolve, 20));
        await new Promise((resolve) => setTimeout(resolve, 200)); // in the guest's loop by now
        console.log('exiting', r.value.state);
        process.exit(0);`;
    const { code, signal, out, markAt } = await runProgram(script, 60_000, 'exiting');
    assert.equal(signal, null, `the program did not end within 60 s: ${out}`);
    assert.equal(code, 0, out);
    assert.match(out, /^exiting running$/m);
    const ms = Date.now() - markAt;
    assert.ok(ms < 10_000, `process.exit() took ${ms} ms to end the program`);
  });

  test(
    'errors as values: bad config, missing kernel, wrong states, bad host options',
    T,
    async () => {
      const h = host();
      try {
        const bad = await h.createVm({
          machine: { vcpu_count: 0, mem_size_mib: 32 },
          boot: { kernel_image_path: guestPath('poweroff') },
        });
        assert.equal(bad.ok, false);
        assert.ok(!bad.ok && bad.error instanceof VmError && bad.error.code === 'INVALID_CONFIG');
        assert.match(!bad.ok ? bad.error.message : '', /vcpu_count/);

        const gone = await h.createVm({
          machine: { vcpu_count: 1, mem_size_mib: 32 },
          boot: { kernel_image_path: '/nonexistent/vmlinux' },
        });
        assert.ok(!gone.ok && gone.error.code === 'INVALID_CONFIG');
        assert.match(!gone.ok ? gone.error.message : '', /\/nonexistent\/vmlinux/);

        const notKernel = await h.createVm({
          machine: { vcpu_count: 1, mem_size_mib: 32 },
          boot: { kernel_image_path: '/etc/hostname' },
        });
        assert.ok(!notKernel.ok && notKernel.error.code === 'BAD_IMAGE', JSON.stringify(notKernel));

        const notObject = await h.createVm(null as unknown as VmResources);
        assert.ok(!notObject.ok && notObject.error.code === 'INVALID_CONFIG');
        const noBoot = await h.createVm({ machine: { vcpu_count: 1, mem_size_mib: 32 } } as never);
        assert.ok(!noBoot.ok && noBoot.error.code === 'INVALID_CONFIG');
        const badConsole = await h.createVm(res('poweroff'), { console: 'tty' as never });
        assert.ok(!badConsole.ok && badConsole.error.code === 'INVALID_CONFIG');
        assert.equal(h.stats().vmsLive, 0, 'a refused VM leaves nothing running');

        const vm = await made(h.createVm(res('poweroff'), { console: 'none' }));
        const paused = await vm.pause();
        assert.ok(!paused.ok && paused.error.code === 'INVALID_STATE');
        assert.ok((await vm.start()).ok);
        const again = await vm.start();
        assert.ok(!again.ok && again.error.code === 'INVALID_STATE');
        await vm.wait();
        const late = await vm.resume();
        assert.ok(!late.ok && late.error.code === 'INVALID_STATE');

        for (const o of [{ warmVcpuWorkers: -1 }, { maxPendingReleases: 0 }, { seccomp: 'x' }]) {
          const r = createVmHost(o as never);
          assert.ok(!r.ok && r.error.code === 'INVALID_CONFIG', JSON.stringify(o));
        }
      } finally {
        await h.drain();
        await h.close();
      }
      const closed = await h.createVm(res('poweroff'));
      assert.ok(!closed.ok && closed.error.code === 'CLOSED');
    },
  );

  test(
    "seccomp: 'process' from a worker thread is refused, not installed on the embedding program",
    T,
    async () => {
      // TSYNC from a worker would put the main thread's list on every thread of this process.
      const w = new Worker(
        `import(${JSON.stringify(LIB)}).then(({ createVmHost }) => {
        const r = createVmHost({ seccomp: 'process', warmVcpuWorkers: 0 });
        require('node:worker_threads').parentPort.postMessage(r.ok ? 'created' : r.error.code + ': ' + r.error.message);
      });`,
        { eval: true },
      );
      const [msg] = (await once(w, 'message')) as [string];
      await w.terminate();
      assert.match(msg, /^INVALID_CONFIG: .*main thread/);
    },
  );

  test(
    'a guest that triple-faults ends as a fatal exit, not an exception; the host goes on',
    T,
    async () => {
      const h = host();
      try {
        const vm = await made(h.createVm(res('triple'), { console: 'none', start: true }));
        const exit = await vm.wait();
        assert.equal(exit.reason, 'fatal');
        assert.match(exit.message ?? '', /triple/);
        // The worker that ran it runs the next VM.
        const next = await made(h.createVm(res('poweroff'), { console: 'none', start: true }));
        assert.equal((await next.wait()).reason, 'poweroff');
      } finally {
        await h.drain();
        await h.close();
      }
    },
  );

  test("kept guest RAM is empty: the next VM does not see the last one's memory", T, async () => {
    const h = host({ maxIdleRam: 1 });
    try {
      const first = async () => {
        const vm = await made(h.createVm(res('countmem')));
        const out = vm.console!.output;
        let s = '';
        out.on('data', (d: Buffer) => (s += d.toString('latin1')));
        const started = await vm.start();
        assert.ok(started.ok, JSON.stringify(started));
        // Up to 30 s: on a host it takes a few ms; in the lab a cold vCPU worker alone takes
        // seconds to start (4 s here read one count there).
        for (let i = 0; i < 1500 && !/00000005\n/.test(s); i++)
          await new Promise((r) => setTimeout(r, 20));
        await vm.stop();
        if (!out.readableEnded) await once(out, 'end');
        return s;
      };
      const a = await first();
      assert.match(
        a,
        /00000005\n/,
        `the first VM counted in RAM: ${JSON.stringify(a.slice(0, 80))}`,
      );
      const b = await first();
      assert.ok(h.stats().ramReused >= 1, "the second VM got the first one's RAM");
      // The count starts from the RAM's contents: 1 again, not 6 or more.
      assert.match(b, /tiny guest up\n00000001\n/, b.slice(0, 80));
    } finally {
      await h.drain();
      await h.close();
    }
  });

  test(
    "seccomp: the library's vCPU threads carry the vcpu role's filter, the main thread none",
    T,
    async () => {
      const h = host();
      try {
        const vm = await made(h.createVm(res('spin'), { console: 'none', start: true }));
        const sample = () =>
          readdirSync('/proc/self/task').flatMap((t) => {
            try {
              const st = readFileSync(`/proc/self/task/${t}/status`, 'utf8');
              return [
                {
                  name: /Name:\s+(.*)/.exec(st)![1]!,
                  seccomp: Number(/Seccomp:\s+(\d+)/.exec(st)![1]),
                  main: Number(t) === process.pid,
                },
              ];
            } catch {
              return []; // the thread ended meanwhile
            }
          });
        // A worker names itself tv-vcpu just before it installs its filter
        // (installWorkerFilter): wait, up to 10 s, until no named one is caught in between.
        let threads = sample();
        for (const end = Date.now() + 10_000; Date.now() < end; threads = sample()) {
          const vcpus = threads.filter((t) => t.name.startsWith('tv-vcpu'));
          if (vcpus.length >= 1 && vcpus.every((t) => t.seccomp === 2)) break;
          await new Promise((r) => setTimeout(r, 50));
        }
        assert.equal(threads.find((t) => t.main)!.seccomp, 0, 'the embedding main thread is free');
        const vcpu = threads.filter((t) => t.name.startsWith('tv-vcpu'));
        assert.ok(vcpu.length >= 1, JSON.stringify(threads.map((t) => t.name)));
        assert.ok(
          vcpu.every((t) => t.seccomp === 2),
          JSON.stringify(vcpu),
        );
        await vm.stop();
      } finally {
        await h.drain();
        await h.close();
      }
    },
  );

  test(
    'no growth: descriptors equal and RSS flat over 50 create/run/destroy cycles',
    T,
    async () => {
      const h = host();
      try {
        const cycle = async () => {
          const vm = await made(h.createVm(res('poweroff')));
          const text = readAll(vm);
          await vm.start();
          assert.equal((await vm.wait()).reason, 'poweroff');
          await text;
        };
        // Warm up: workers, kept RAM, modules, JIT.
        for (let i = 0; i < 5; i++) await cycle();
        await h.drain();
        const gc = (globalThis as { gc?: () => void }).gc;
        gc?.();
        const fds0 = await settledFdCount();
        const rss0 = rssKiB();
        for (let i = 0; i < 50; i++) await cycle();
        await h.drain();
        gc?.();
        assert.equal(await settledFdCount(), fds0, 'descriptors after 50 VMs');
        const grew = rssKiB() - rss0;
        // Without --expose-gc the heap may hold garbage; a leak of a VM's RAM (32 MiB) or a
        // worker (~8 MiB) per cycle would be far beyond this.
        assert.ok(grew < 24 * 1024, `RSS grew by ${grew} KiB over 50 VMs`);
      } finally {
        await h.drain();
        await h.close();
      }
    },
  );
});

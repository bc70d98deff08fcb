/**
 * Stock Linux on native vCPU runner threads (--vcpu-threads native, src/vmm/vcpu-threads.ts):
 * the default guest boots with 2 vCPUs, sees both, and powers off. One boot (~the time of
 * boot.test.ts's 2-vCPU boot). And on per-vCPU workers (--vcpu-threads worker), which `run`
 * no longer picks by default (boot.test.ts boots in its default, loop: vCPU 0 on the main
 * thread's loop, the other on a runner) but the library and the daemon's shared mode do: 2
 * vCPUs, its shell driven through the console. With TV_INLAB_VCPU_COMPARE=N it also boots N
 * times more in each mode, interleaved, and prints the boot-marker times (a measurement, not an
 * assertion); the modes are TV_INLAB_VCPU_MODES (worker, native, native-hubw: the hub on a
 * worker, hybrid, loop).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { defaultGuest, describeRun, skipReason, typervisor, POWEROFF } from './helpers.js';

const MARKER = 'TYPERVISOR-BOOT-OK';
// TV_INLAB_VCPU_COMPARE=N boots ~N x modes x counts times more: room for them (~1 min each).
const compare = Number(process.env.TV_INLAB_VCPU_COMPARE ?? 0);
const opts = { skip: skipReason, timeout: 400_000 + compare * 12 * 60_000 };

/** 'native-hubw': native runner threads served by a hub worker (TYPERVISOR_VCPU_HUB=worker). */
type Mode = 'native' | 'native-hubw' | 'worker' | 'hybrid' | 'loop';

async function boot(mode: Mode, vcpus: number) {
  const g = defaultGuest();
  if (mode === 'native-hubw') process.env.TYPERVISOR_VCPU_HUB = 'worker';
  const run = typervisor(
    [
      'run',
      '--kernel',
      g.kernel,
      '--initrd',
      g.initrd,
      '--vcpus',
      String(vcpus),
      '--memory',
      '256',
      '--boot-timer',
      '--vcpu-threads',
      mode === 'native-hubw' ? 'native' : mode,
    ],
    `echo CPUS=$(nproc)\n${POWEROFF}\n`,
  );
  delete process.env.TYPERVISOR_VCPU_HUB; // the child has its environment already
  const r = await run;
  assert.equal(r.code, 0, describeRun(r));
  assert.match(r.stdout, new RegExp(MARKER), describeRun(r));
  assert.match(r.stdout, new RegExp(`CPUS=${vcpus}\\b`), describeRun(r));
  const m = /boot marker at ([\d.]+) ms/.exec(r.stderr);
  assert.ok(m, describeRun(r));
  return Number(m[1]);
}

test(
  'the default guest boots on per-vCPU workers (--vcpu-threads worker, 2 vCPUs: the library’s and the daemon’s mode), answers its console and powers off',
  opts,
  async () => {
    const ms = await boot('worker', 2);
    console.log(`worker, 2 vCPUs: boot marker at ${ms.toFixed(0)} ms`);
  },
);

test(
  'the default guest boots on native vCPU runner threads (2 vCPUs) and powers off',
  opts,
  async () => {
    const ms = await boot('native', 2);
    console.log(`native, 2 vCPUs: boot marker at ${ms.toFixed(0)} ms`);
    const n = compare;
    const times: Record<string, number[]> = {};
    for (let i = 0; i < n; i++) {
      for (const vcpus of (process.env.TV_INLAB_VCPU_COUNTS ?? '1,2').split(',').map(Number)) {
        const modes = (process.env.TV_INLAB_VCPU_MODES ?? 'worker,native').split(',') as Mode[];
        for (const mode of i % 2 ? [...modes].reverse() : modes) {
          try {
            (times[`${mode} ${vcpus}`] ??= []).push(await boot(mode, vcpus));
          } catch (e) {
            // a measurement: report the failed boot and go on
            console.log(`VCPU-BOOT-FAIL ${mode} ${vcpus}: ${(e as Error).message.slice(0, 1500)}`);
          }
        }
      }
    }
    for (const [k, v] of Object.entries(times)) {
      const s = [...v].sort((a, b) => a - b);
      console.log(
        `VCPU-BOOT ${k} vCPU(s): median ${s[s.length >> 1]!.toFixed(0)} ms (${s.map((x) => x.toFixed(0)).join(', ')})`,
      );
    }
  },
);

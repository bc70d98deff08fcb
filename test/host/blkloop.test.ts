/**
 * Needs /dev/kvm, gcc and ld. Typervisor's virtio-blk under an independent driver: the micro
 * benchmark's blk-loop guest (bench/guests/blkloop.S, a polled virtio-mmio version 2 driver in
 * assembly) reads a disk whose every sector starts with its own number and checks each request.
 * It prints "D" when every read was right, "E<reason>" otherwise.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import {
  REPO,
  processGone,
  runCli,
  tempDir,
  type CliResult,
  benchGuestSkipReason,
} from './helpers.js';

/** The disk: 2051 sectors, not a whole number of requests, so the guest's wrap-around runs. */
const SECTORS = 2051;

const skip = benchGuestSkipReason();
const T = { skip: skip ?? false, timeout: 60_000 };
let dir = '';
if (!skip) {
  dir = tempDir('typervisor-blkloop-');
  const r = spawnSync('sh', [join(REPO, 'bench', 'guests', 'build.sh'), dir], {
    encoding: 'utf8',
  });
  if (r.status !== 0) throw new Error(`bench/guests/build.sh failed (${r.status}): ${r.stderr}`);
}

/** A disk in the guest's pattern, with the first word of sectors in `corrupt` changed. */
function disk(name: string, corrupt: number[] = []): string {
  const b = Buffer.alloc(SECTORS * 512);
  for (let i = 0; i < SECTORS; i++) b.writeUInt32LE(i, i * 512);
  for (const i of corrupt) b.writeUInt32LE(i ^ 0x5a5a, i * 512);
  const p = join(dir, name);
  writeFileSync(p, b);
  return p;
}

/**
 * A Firecracker-style config file `<name>.json`: `guest` as the kernel, 64 MiB, one read-only
 * drive `data` on a fresh pattern disk `<name>.img`. Returns its path.
 */
function vmConfig(name: string, guest: string): string {
  const config = join(dir, `${name}.json`);
  writeFileSync(
    config,
    JSON.stringify({
      'boot-source': { kernel_image_path: join(dir, `${guest}.elf`) },
      'machine-config': { vcpu_count: 1, mem_size_mib: 64 },
      drives: [
        {
          drive_id: 'data',
          path_on_host: disk(`${name}.img`),
          is_root_device: false,
          is_read_only: true,
        },
      ],
    }),
  );
  return config;
}

/** blk4k-small: 500 requests of 4 KiB; blk64k-small: 200 requests of 64 KiB (build.sh). */
async function blkloop(t: TestContext, guest: string, image?: string): Promise<CliResult> {
  const drive = image ? ['--drive', `path=${image},ro`] : [];
  const r = await runCli(
    ['run', '--kernel', join(dir, `${guest}.elf`), '--memory', '64', ...drive],
    { timeoutMs: 45_000 },
  );
  t.diagnostic(
    `${guest}: exit ${r.code} in ${r.ms.toFixed(0)} ms, stdout ${JSON.stringify(r.stdout)}`,
  );
  assert.equal(r.timedOut, false, `timed out; stdout=${JSON.stringify(r.stdout)}`);
  assert.ok(processGone(r.pid), `child ${r.pid} is still there (zombie?)`);
  assert.equal(r.code, 0, r.stderr);
  return r;
}

test('500 reads of 4 KiB over virtio-blk, polled: every one right', T, async (t) => {
  const r = await blkloop(t, 'blk4k-small', disk('good4k.img'));
  assert.equal(r.stdout, 'M\nD\n', r.stderr);
  assert.doesNotMatch(r.stderr, /bad request|I\/O error/);
});

test('200 reads of 64 KiB over virtio-blk, polled: every one right', T, async (t) => {
  const r = await blkloop(t, 'blk64k-small', disk('good64k.img'));
  assert.equal(r.stdout, 'M\nD\n', r.stderr);
  assert.doesNotMatch(r.stderr, /bad request|I\/O error/);
});

test('a disk without the pattern: the guest sees the wrong data ("Ed")', T, async (t) => {
  // Sector 8 starts the second 4 KiB request; sector 127 ends the first 64 KiB one.
  const bad = disk('bad.img', [8, 127]);
  assert.equal((await blkloop(t, 'blk4k-small', bad)).stdout, 'M\nEd\n');
  assert.equal((await blkloop(t, 'blk64k-small', bad)).stdout, 'M\nEd\n');
});

test('no disk attached: the guest finds no virtio-blk device ("En")', T, async (t) => {
  assert.equal((await blkloop(t, 'blk4k-small')).stdout, 'M\nEn\n');
});

test(
  'metrics carry per-device counters: block and block_<drive_id>, from the device worker',
  T,
  async (t) => {
    const metrics = join(dir, 'metrics.ndjson');
    const config = vmConfig('vm', 'blk4k-small');
    const r = await runCli(['--no-api', '--config-file', config, '--metrics-path', metrics], {
      timeoutMs: 45_000,
    });
    t.diagnostic(`exit ${r.code} in ${r.ms.toFixed(0)} ms, stdout ${JSON.stringify(r.stdout)}`);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stdout, /D\n/);
    // The last line (written at exit) holds what happened since the previous one: all of it.
    const lines = readFileSync(metrics, 'utf8').trim().split('\n');
    const sum = (g: string, k: string) =>
      lines.reduce((a, l) => a + ((JSON.parse(l)[g]?.[k] as number | undefined) ?? 0), 0);
    assert.equal(sum('block_data', 'read_count'), 500);
    assert.equal(sum('block_data', 'read_bytes'), 500 * 4096);
    assert.equal(sum('block', 'read_count'), 500);
    assert.equal(sum('block_data', 'write_count'), 0);
    assert.equal(sum('block_data', 'guest_errors'), 0);
  },
);

test(
  "register pages and the ACK eventfd: an interrupt handler's register accesses do not exit",
  T,
  async (t) => {
    // blk4k-isr: after each of its 500 requests the guest reads InterruptStatus and writes back
    // what it read, as Linux's vm_interrupt does (the device interrupts; the guest has them off).
    // Register pages (vmm/register-pages.ts) make the read a load; KVM takes the ACK of 1 on an
    // eventfd (virtio-plan.ts ackFd). The probe's and set-up's writes exit either way.
    const exits = async (name: string, env: Record<string, string>) => {
      const metrics = join(dir, `${name}.ndjson`);
      const config = vmConfig(name, 'blk4k-isr-small');
      const r = await runCli(['--no-api', '--config-file', config, '--metrics-path', metrics], {
        timeoutMs: 45_000,
        env,
      });
      t.diagnostic(`${name}: exit ${r.code}, stdout ${JSON.stringify(r.stdout)}`);
      assert.equal(r.code, 0, r.stderr);
      assert.equal(r.stdout, 'M\nD\n', 'every read right');
      const lines = readFileSync(metrics, 'utf8').trim().split('\n');
      const sum = (k: string) =>
        lines.reduce((a, l) => a + ((JSON.parse(l).vcpu?.[k] as number | undefined) ?? 0), 0);
      return { reads: sum('exit_mmio_read'), writes: sum('exit_mmio_write') };
    };
    const both = await exits('both', {});
    const noAck = await exits('no-ack', { TYPERVISOR_MMIO_ACK_EVENTFD: '0' });
    const none = await exits('none', {
      TYPERVISOR_MMIO_ACK_EVENTFD: '0',
      TYPERVISOR_MMIO_REGISTER_PAGES: '0',
    });
    t.diagnostic(`MMIO exits: ${JSON.stringify({ both, noAck, none })}`);
    assert.equal(both.reads, 0, 'no register read exits');
    assert.ok(both.writes < 100, `only the set-up's writes exit (${both.writes})`);
    assert.equal(noAck.reads, 0);
    // (A few ACKs of 0 exit either way: the guest polls, and may read InterruptStatus before
    // the device has raised the request's interrupt.)
    assert.ok(noAck.writes >= both.writes + 450, `each ACK exits (${noAck.writes})`);
    assert.ok(none.reads >= 500, `each InterruptStatus read exits (${none.reads})`);
    assert.ok(Math.abs(none.writes - noAck.writes) <= 2, 'the same writes either way');
  },
);

/** Typervisor boots Debian's cloud kernel + our initramfs to a shell (run inside the lab). */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { defaultGuest, describeRun, skipReason, typervisor, POWEROFF } from './helpers.js';

const MARKER = 'TYPERVISOR-BOOT-OK';
const opts = { skip: skipReason, timeout: 180_000 };

for (const vcpus of [1, 2]) {
  test(
    `boots the default guest with ${vcpus} vCPU(s): uname -r, nproc, poweroff -f`,
    opts,
    async () => {
      const g = defaultGuest();
      const r = await typervisor(
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
        ],
        `uname -r\necho CPUS=$(nproc)\n${POWEROFF}\n`,
      );
      assert.equal(r.code, 0, describeRun(r));
      assert.match(r.stdout, new RegExp(MARKER), describeRun(r));
      assert.match(r.stdout, /\d+\.\d+\.\d+-\d+-cloud-amd64/, describeRun(r));
      assert.match(r.stdout, new RegExp(`CPUS=${vcpus}\\b`), describeRun(r));
      assert.match(r.stderr, /boot marker at [\d.]+ ms/, describeRun(r));
    },
  );
}

test('reboot -f in the guest ends Typervisor with exit 0', opts, async () => {
  const g = defaultGuest();
  const r = await typervisor(
    ['run', '--kernel', g.kernel, '--initrd', g.initrd, '--log-level', 'info'],
    'reboot -f\n',
  );
  assert.equal(r.code, 0, describeRun(r));
  assert.match(r.stdout, new RegExp(MARKER), describeRun(r));
  assert.match(r.stderr, /rebooted/, describeRun(r));
});

test('a truncated bzImage gives a clear error and a non-zero exit', opts, async () => {
  const g = defaultGuest();
  const dir = mkdtempSync(join(tmpdir(), 'tv-trunc-'));
  const truncated = join(dir, 'vmlinuz');
  const full = readFileSync(g.kernel);
  writeFileSync(truncated, full.subarray(0, Math.floor(full.length / 3)));
  let r: Awaited<ReturnType<typeof typervisor>>;
  try {
    r = await typervisor(['run', '--kernel', truncated, '--initrd', g.initrd], '', 30_000);
  } finally {
    rmSync(dir, { recursive: true, force: true }); // a third of a kernel each run otherwise
  }
  assert.notEqual(r.code, 0, describeRun(r));
  assert.equal(r.stderr.trim().split('\n').length, 1, describeRun(r));
  assert.match(r.stderr, /kernel|bzImage|truncated|payload/i, describeRun(r));
});

/**
 * Needs /dev/kvm, gcc and ld. The density benchmark's batch (bench/density.ts) on two idle micro
 * VMs: each VMM process is measured (smaps_rollup, MemAvailable) and every one is gone after the
 * batch; a batch whose VMs cannot start fails naming why and leaves no process behind.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { batch, liveVmms, memAvailableKiB, rollupKiB } from '../../bench/density.js';
import { detectKvm } from '../../src/kvm/detect.js';
import { REPO, tempDir, benchGuestSkipReason } from './helpers.js';

const skip = benchGuestSkipReason();
const T = { skip: skip ?? false, timeout: 90_000 };
let dir = '';
if (!skip) {
  dir = tempDir('typervisor-density-');
  const r = spawnSync('sh', [join(REPO, 'bench', 'guests', 'build.sh'), dir, '1000'], {
    encoding: 'utf8',
  });
  if (r.status !== 0) throw new Error(`bench/guests/build.sh failed (${r.status}): ${r.stderr}`);
}

test('smaps_rollup and MemAvailable are read from /proc', () => {
  const m = rollupKiB(process.pid);
  assert.ok(m.rss > 0 && m.uss > 0 && m.uss <= m.rss && m.pss <= m.rss, JSON.stringify(m));
  assert.ok(memAvailableKiB() > 0);
  assert.throws(() => rollupKiB(2 ** 22 + 1), /ENOENT/);
});

test('a batch of 2 idle Typervisor VMs is measured, then every process is gone', T, async () => {
  const s = await batch('typervisor', 2, join(dir, 'idle.elf'), detectKvm().kind);
  assert.ok(s.rss > s.uss && s.uss > 1024, `RSS ${s.rss} KiB, USS ${s.uss} KiB`);
  assert.ok(s.pss >= s.uss && s.pss <= s.rss, `PSS ${s.pss} KiB`);
  assert.ok(s.ussSum >= 2 * 1024 && s.pssSum >= s.ussSum);
  assert.ok(s.startAllMs > 0);
  assert.equal(liveVmms(), 0);
});

test('a batch whose VMs cannot start fails and leaves no process', T, async () => {
  await assert.rejects(
    batch('typervisor', 3, join(dir, 'no-such-kernel.elf'), detectKvm().kind),
    /exited \(\d+\) before its marker/,
  );
  assert.equal(liveVmms(), 0);
});

/**
 * Needs /dev/kvm, gcc and ld. virtio-blk's io_engine "Async" (io_uring) under an independent
 * driver, with the seccomp filters on (the default): the blkrw-small guest (bench/guests/blkloop.S
 * with BLK_WRITE_KEY) writes 64 requests of 8 KiB, flushes, then reads them back and checks each
 * ("D" when all were right). The image must hold what was written; the metrics show the ring
 * was used (io_uring_submits) and nothing fell back to Sync; no thread was killed by seccomp.
 * The same guest under "Sync" is the control.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { REPO, tempDir, benchGuestSkipReason } from './helpers.js';
import { metricsLines, startVm } from './hostile-helpers.js';

const KEY = 0xa5a5a5a5;
const REQUESTS = 64;
const SECTORS_PER = 16; // 8 KiB
const SECTORS = REQUESTS * SECTORS_PER; // the guest writes, then reads, exactly the whole disk

const skip = benchGuestSkipReason();
const T = { skip: skip ?? false, timeout: 60_000 };
let dir = '';
// startVm's VMM inherits this: our own counters are written too.
process.env.TYPERVISOR_METRICS_EXTRAS = '1';
if (!skip) {
  dir = tempDir('typervisor-blk-async-');
  const r = spawnSync('sh', [join(REPO, 'bench', 'guests', 'build.sh'), dir], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`bench/guests/build.sh failed (${r.status}): ${r.stderr}`);
}

/** seccomp kills (audit type=1326) of process `pid`, when the kernel log is readable. */
function seccompKills(pid: number): string[] | undefined {
  const r = spawnSync('dmesg', [], { encoding: 'utf8' });
  if (r.status !== 0) return undefined;
  return r.stdout.split('\n').filter((l) => l.includes('type=1326') && l.includes(`pid=${pid} `));
}

async function writeThenRead(t: TestContext, engine: 'Sync' | 'Async') {
  const path = join(dir, `rw-${engine}.img`);
  const b = Buffer.alloc(SECTORS * 512);
  for (let i = 0; i < SECTORS; i++) b.writeUInt32LE(i, i * 512);
  writeFileSync(path, b);
  const vm = await startVm({
    kernel: join(dir, 'blkrw-small.elf'),
    drives: [{ id: 'rw', path, readOnly: false, ioEngine: engine }],
  });
  try {
    const ex = await vm.exited;
    t.diagnostic(`${engine}: exit ${JSON.stringify(ex)}, stdout ${JSON.stringify(vm.stdout())}`);
    assert.equal(vm.stdout(), 'M\nD\n', vm.stderr());
    assert.equal(ex.code, 0, vm.stderr());
    assert.doesNotMatch(vm.stderr(), /unavailable|bad request|I\/O error|exception/);
    // On the image: the first word of each request's first and last sector, as written.
    const img = readFileSync(path);
    for (let r = 0; r < REQUESTS; r++) {
      for (const s of [r * SECTORS_PER, r * SECTORS_PER + SECTORS_PER - 1])
        assert.equal(img.readUInt32LE(s * 512), (s ^ KEY) >>> 0, `sector ${s}`);
      // The rest of each request was written too (zeros from the guest's buffer).
      assert.equal(img.readUInt32LE((r * SECTORS_PER + 1) * 512), 0);
    }
    const sum = (k: string) => metricsLines(vm).reduce((a, l) => a + (l.block_rw?.[k] ?? 0), 0);
    assert.equal(sum('write_count'), REQUESTS);
    assert.equal(sum('read_count'), REQUESTS);
    assert.equal(sum('flush_count'), 1);
    assert.equal(sum('execute_fails'), 0);
    const kills = seccompKills(vm.pid);
    if (kills) assert.deepEqual(kills, [], 'a thread was killed by seccomp');
    // Our counters (no Firecracker name) are in the `typervisor` group (TYPERVISOR_METRICS_EXTRAS).
    const ours = (k: string) =>
      metricsLines(vm).reduce(
        (a, l) =>
          a + ((l.typervisor as Record<string, number> | undefined)?.[`block_rw.${k}`] ?? 0),
        0,
      );
    return { submits: ours('io_uring_submits'), inflightMax: ours('io_uring_inflight_max') };
  } finally {
    await vm.kill();
  }
}

test(
  'io_engine Async: 64 writes, a flush, 64 reads by the guest; on disk and read back right',
  T,
  async (t) => {
    const m = await writeThenRead(t, 'Async');
    // One request in flight at a time (the guest polls each): one io_uring_enter per request.
    assert.equal(m.submits, 2 * REQUESTS + 1);
    assert.equal(m.inflightMax, 1);
  },
);

test('io_engine Sync (the control): the same guest, the same result, no ring', T, async (t) => {
  const m = await writeThenRead(t, 'Sync');
  assert.equal(m.submits, 0);
});

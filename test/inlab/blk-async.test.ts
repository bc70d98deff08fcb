/**
 * virtio-blk's io_engine "Async" (io_uring) with Debian's cloud kernel (run inside the lab): the
 * Debian root disk boots from an Async drive, a data drive on Async reads back its checksum,
 * takes a direct write whose checksum the host finds in the image, and serves fio at iodepth
 * 16 (several requests in flight). Seccomp is on (the default): no thread may be killed.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { createHash, randomBytes } from 'node:crypto';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { imagePaths } from '../../src/lab/guest.js';
import { defaultGuest, describeRun, skipReason, typervisor, POWEROFF } from './helpers.js';

const opts = { skip: skipReason, timeout: 300_000 };

/** The kernel log's seccomp records (audit type 1326), or undefined without dmesg. */
function seccompKills(): string[] | undefined {
  const d = spawnSync('dmesg', [], { encoding: 'utf8' });
  return d.status === 0 ? d.stdout.split('\n').filter((l) => l.includes('type=1326')) : undefined;
}
const MIB = 1024 * 1024;

test(
  'io_engine Async: Debian boots from it; a data drive reads, writes and checksums right; fio qd16',
  opts,
  async () => {
    const g = defaultGuest();
    const dir = mkdtempSync(join(tmpdir(), 'tv-blk-async-'));
    try {
      const src = imagePaths('rootfs').ROOTFS!;
      if (!existsSync(src))
        throw new Error('the Debian root disk is not built: npm run guest -- build rootfs');
      const root = join(dir, 'rootfs.ext4');
      assert.equal(spawnSync('cp', ['--sparse=always', src, root]).status, 0, 'cp rootfs');
      const data = randomBytes(8 * MIB);
      const dataImg = join(dir, 'data.img');
      writeFileSync(dataImg, data);
      const sum = createHash('sha256').update(data).digest('hex');
      const script =
        [
          'sha256sum /dev/vdb',
          // 2 MiB of new data at 4 MiB, written direct and synced; its checksum for the host.
          'head -c 2097152 /dev/urandom > /tmp/w && dd if=/tmp/w of=/dev/vdb bs=256k seek=16 oflag=direct conv=fsync 2>/dev/null && echo WSUM=$(sha256sum < /tmp/w | cut -d" " -f1)',
          // Read back through the page cache-free path.
          'echo RSUM=$(dd if=/dev/vdb bs=256k skip=16 count=8 iflag=direct 2>/dev/null | sha256sum | cut -d" " -f1)',
          'fio --name=t --filename=/dev/vdb --readonly --rw=randread --bs=4k --size=8M --direct=1 --ioengine=libaio --iodepth=16 --runtime=2 --time_based 2>&1 | grep -E "IOPS=" | head -1',
          POWEROFF,
        ].join('\n') + '\n';
      // The lab boot's earlier files kill processes by seccomp on purpose (test/host's
      // seccomp-kill, in CI's lab boot): only a record that is new since here counts.
      const killsBefore = seccompKills();
      const r = await typervisor(
        [
          'run',
          ...['--kernel', g.kernel, '--initrd', g.initrd, '--memory', '512'],
          ...[
            '--drive',
            `path=${root},root,async`,
            '--drive',
            `path=${dataImg},async,serial=data0`,
          ],
        ],
        script,
        240_000,
        /TYPERVISOR-BOOT-OK/,
      );
      assert.equal(r.code, 0, describeRun(r));
      assert.doesNotMatch(r.stderr, /unavailable|I\/O error|exception/, describeRun(r));
      assert.match(r.stdout, new RegExp(`${sum}\\s+/dev/vdb`), describeRun(r));
      const w = /WSUM=([0-9a-f]{64})/.exec(r.stdout)?.[1];
      const rd = /RSUM=([0-9a-f]{64})/.exec(r.stdout)?.[1];
      assert.ok(w, describeRun(r));
      assert.equal(rd, w, describeRun(r));
      const onDisk = readFileSync(dataImg).subarray(4 * MIB, 6 * MIB);
      assert.equal(createHash('sha256').update(onDisk).digest('hex'), w);
      assert.match(r.stdout, /IOPS=/, describeRun(r));
      const kills = seccompKills();
      if (kills && killsBefore)
        assert.deepEqual(
          kills.filter((l) => !killsBefore.includes(l)),
          [],
          'a seccomp kill during the run',
        );
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  },
);

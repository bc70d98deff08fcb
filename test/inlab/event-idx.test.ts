/**
 * Issue 17 in the lab: Debian's kernel negotiates VIRTIO_F_RING_EVENT_IDX on every virtio
 * device we give it (virtio-blk root and data disks, virtio-rng), and I/O that keeps a queue
 * full (fio randread qd32 on libaio, 1 MiB sequential reads, /dev/hwrng) completes with it:
 * kicks suppressed while we drain, used_event honoured. One boot, about a minute.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { imagePaths } from '../../src/lab/guest.js';
import { defaultGuest, describeRun, skipReason, typervisor, POWEROFF } from './helpers.js';

test(
  'Linux negotiates EVENT_IDX on every virtio device, and blk/rng I/O at depth completes',
  { skip: skipReason, timeout: 300_000 },
  async () => {
    const g = defaultGuest();
    const dir = mkdtempSync(join(tmpdir(), 'tv-evidx-'));
    try {
      const src = imagePaths('rootfs').ROOTFS!;
      if (!existsSync(src))
        throw new Error('the Debian root disk is not built: npm run guest -- build rootfs');
      const root = join(dir, 'rootfs.ext4');
      assert.equal(spawnSync('cp', ['--sparse=always', src, root]).status, 0, 'cp rootfs');
      const data = join(dir, 'data.img');
      writeFileSync(data, Buffer.alloc(32 * 1024 * 1024, 0x5a));
      const script =
        [
          // One line per device: name, device id, negotiated feature bit 29 (the file is a
          // string of 0/1 characters, bit 0 first).
          'for d in /sys/bus/virtio/devices/*; do echo "VDEV $(basename $d) $(cat $d/device) EVIDX=$(cut -c30 $d/features)"; done',
          'fio --name=r --filename=/dev/vdb --readonly --rw=randread --bs=4k --iodepth=32 --ioengine=libaio --direct=1 --runtime=3 --time_based 2>&1 | grep -E "IOPS=" | head -1 | sed "s/^/RANDREAD /"',
          'fio --name=s --filename=/dev/vdb --readonly --rw=read --bs=1M --iodepth=8 --ioengine=libaio --direct=1 --size=32M 2>&1 | grep -E "IOPS=" | head -1 | sed "s/^/SEQREAD /"',
          // The data disk is all 0x5a ('Z'): count the other bytes read through the queue.
          'dd if=/dev/vdb bs=1M count=32 iflag=direct 2>/dev/null | tr -d Z | wc -c | sed "s/^/OTHER_BYTES /"',
          'head -c 262144 /dev/hwrng | wc -c | sed "s/^/HWRNG /"',
          POWEROFF,
        ].join('\n') + '\n';
      const r = await typervisor(
        [
          'run',
          '--kernel',
          g.kernel,
          '--initrd',
          g.initrd,
          '--memory',
          '512',
          '--rng',
          '--drive',
          `path=${root},root`,
          '--drive',
          `path=${data},ro`,
        ],
        script,
        240_000,
        /TYPERVISOR-BOOT-OK/,
      );
      assert.equal(r.code, 0, describeRun(r));
      const devs = [...r.stdout.matchAll(/VDEV (\S+) (\S+) EVIDX=(\d)/g)];
      assert.ok(devs.length >= 3, `three virtio devices expected: ${describeRun(r)}`);
      for (const m of devs) assert.equal(m[3], '1', `${m[1]} (device ${m[2]}) without EVENT_IDX`);
      assert.match(r.stdout, /RANDREAD .*IOPS=/, describeRun(r));
      assert.match(r.stdout, /SEQREAD .*IOPS=/, describeRun(r));
      assert.match(r.stdout, /OTHER_BYTES 0\b/, describeRun(r));
      assert.match(r.stdout, /HWRNG 262144/, describeRun(r));
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  },
);

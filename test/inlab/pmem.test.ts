/**
 * virtio-pmem with Debian's cloud kernel (run inside the lab): two ext4 images made on the host
 * are attached from --config-file, one read-write and one read-only. The guest sees /dev/pmem0
 * and /dev/pmem1, mounts the first with dax (plain when the kernel refuses dax there) and reads a
 * file the host wrote; a file it writes and syncs (the sync is a virtio-pmem flush) is in the
 * image on the host afterwards; the read-only one mounts read-only and reads right.
 * About 10-20 s in the lab (one initramfs boot).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { defaultGuest, describeRun, skipReason, typervisor } from './helpers.js';

const opts = { skip: skipReason, timeout: 300_000 };

/** An ext4 image of `mib` MiB (4 KiB blocks: dax needs them) holding `files`. */
function ext4Image(dir: string, name: string, mib: number, files: Record<string, string>): string {
  const content = join(dir, `${name}.d`);
  mkdirSync(content);
  for (const [f, text] of Object.entries(files)) writeFileSync(join(content, f), text);
  const img = join(dir, `${name}.img`);
  const r = spawnSync('mkfs.ext4', ['-q', '-F', '-b', '4096', '-d', content, img, `${mib}M`]);
  assert.equal(r.status, 0, `mkfs.ext4: ${r.stderr}`);
  return img;
}

test(
  'virtio-pmem: the guest mounts a pmem device (dax where supported), reads and writes it',
  opts,
  async () => {
    const g = defaultGuest();
    const dir = mkdtempSync(join(tmpdir(), 'tv-pmem-'));
    try {
      const rw = ext4Image(dir, 'rw', 64, { 'hello.txt': 'pmem-hello-from-host\n' });
      const ro = ext4Image(dir, 'ro', 32, { 'ro.txt': 'pmem-readonly-file\n' });
      const cfg = join(dir, 'vm.json');
      writeFileSync(
        cfg,
        JSON.stringify({
          'boot-source': {
            kernel_image_path: g.kernel,
            initrd_path: g.initrd,
            boot_args: 'console=ttyS0 reboot=k panic=1 pci=off quiet',
          },
          'machine-config': { vcpu_count: 1, mem_size_mib: 256 },
          pmem: [
            { id: 'data', path_on_host: rw },
            { id: 'ro', path_on_host: ro, read_only: true },
          ],
        }),
      );
      const script =
        [
          'i=0; while [ ! -b /dev/pmem1 ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done',
          'ls /dev/pmem*',
          'mkdir -p /m0 /m1',
          'if mount -t ext4 -o dax /dev/pmem0 /m0; then echo MOUNT=dax; else mount -t ext4 /dev/pmem0 /m0 && echo MOUNT=plain; fi',
          'cat /m0/hello.txt',
          'echo guest-wrote-this > /m0/guest.txt && sync && echo SYNCED',
          'umount /m0 && echo UMOUNTED',
          'mount -t ext4 -o ro,noload /dev/pmem1 /m1 && cat /m1/ro.txt',
          'poweroff -f',
        ].join('\n') + '\n';
      const r = await typervisor(
        ['--no-api', '--config-file', cfg],
        script,
        200_000,
        /TYPERVISOR-BOOT-OK/,
      );
      assert.equal(r.code, 0, describeRun(r));
      assert.match(r.stdout, /\/dev\/pmem0\s+\/dev\/pmem1/, describeRun(r));
      assert.match(r.stdout, /MOUNT=(dax|plain)/, describeRun(r));
      assert.match(r.stdout, /pmem-hello-from-host/, describeRun(r));
      assert.match(r.stdout, /SYNCED/, describeRun(r));
      assert.match(r.stdout, /UMOUNTED/, describeRun(r));
      assert.match(r.stdout, /pmem-readonly-file/, describeRun(r));
      // What the guest wrote through the mapping is in the host file.
      const cat = spawnSync('debugfs', ['-R', 'cat /guest.txt', rw], { encoding: 'utf8' });
      assert.match(cat.stdout, /guest-wrote-this/, `debugfs: ${cat.stderr}\n${describeRun(r)}`);
      console.log(`pmem in-lab: ${r.stdout.match(/MOUNT=\w+/)?.[0]}, ${r.ms} ms`);
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  },
);

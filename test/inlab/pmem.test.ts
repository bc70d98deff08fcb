/**
 * virtio-pmem with Debian's cloud kernel (run inside the lab): two ext4 images made on the host
 * are attached from --config-file, one read-write and one read-only. The guest sees /dev/pmem0
 * and /dev/pmem1, mounts the first with dax (plain when the kernel refuses dax there) and reads a
 * file the host wrote; a file it writes and syncs (the sync is a virtio-pmem flush) is in the
 * image on the host afterwards; the read-only one mounts read-only and reads right.
 * virtio-mem: a VM with 512 MiB hotpluggable gets PATCH /hotplug/memory 256 and its MemTotal
 * grows (the KVM slots of the plugged blocks go in: none is there at boot); the guest then fills
 * much of its memory (tmpfs) and reads a data drive with O_DIRECT and through the page cache:
 * those buffers are user and page cache memory, which the kernel takes from the hotplugged
 * blocks (onlined movable) first, so virtio-blk's data lands in device memory, and both
 * checksums must be the image's. PATCH 0 and the guest unplugs it again (the slots go out).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createHash, randomBytes } from 'node:crypto';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { call } from '../api/client.js';
import { defaultGuest, describeRun, skipReason, typervisor, POWEROFF } from './helpers.js';
import { GuestSession } from './session.js';

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
          POWEROFF,
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

test(
  'virtio-mem: the guest sees its memory grow after PATCH /hotplug/memory, does I/O into it, and shrink',
  { ...opts, timeout: 480_000 },
  async () => {
    const g = defaultGuest();
    // Not under /tmp: in the lab that is the host's /tmp over 9p, where Unix sockets cannot live.
    const dir = mkdtempSync(join(existsSync('/run') ? '/run' : tmpdir(), 'tv-mem-'));
    const sock = join(dir, 'api.sock');
    const cfg = join(dir, 'vm.json');
    // A read-only data drive (/dev/vda: the initrd is the root) for I/O into hotplugged memory.
    const data = randomBytes(16 * 1024 * 1024);
    const dataImg = join(dir, 'data.img');
    writeFileSync(dataImg, data);
    const dataSum = createHash('sha256').update(data).digest('hex');
    writeFileSync(
      cfg,
      JSON.stringify({
        'boot-source': {
          kernel_image_path: g.kernel,
          initrd_path: g.initrd,
          // Hotplugged memory is onlined by the kernel, movable so that it can be unplugged again.
          boot_args:
            'console=ttyS0 reboot=k panic=1 pci=off quiet memhp_default_state=online_movable',
        },
        'machine-config': { vcpu_count: 1, mem_size_mib: 256 },
        'memory-hotplug': { total_size_mib: 512 },
        drives: [
          { drive_id: 'data', path_on_host: dataImg, is_root_device: false, is_read_only: true },
        ],
      }),
    );
    // Our counters beside Firecracker's (the `typervisor` group): the KVM slots of the region.
    const metrics = join(dir, 'metrics.ndjson');
    process.env.TYPERVISOR_METRICS_EXTRAS = '1';
    const s = new GuestSession([
      '--api-sock',
      sock,
      '--config-file',
      cfg,
      '--metrics-path',
      metrics,
    ]);
    delete process.env.TYPERVISOR_METRICS_EXTRAS;
    /** memory_hotplug.<name> summed over the metrics lines so far (after a flush). */
    const slotMetric = async (name: string): Promise<number> => {
      const f = await call(sock, 'PUT', '/actions', { action_type: 'FlushMetrics' });
      assert.equal(f.status, 204);
      return readFileSync(metrics, 'utf8')
        .trim()
        .split('\n')
        .map((l) => JSON.parse(l) as { typervisor?: Record<string, number> })
        .reduce((a, l) => a + (l.typervisor?.[`memory_hotplug.${name}`] ?? 0), 0);
    };
    const memTotal = async (tag: string): Promise<number> => {
      // "K" ends the number: output can arrive split inside it.
      s.send(`echo ${tag}=$(grep MemTotal /proc/meminfo | tr -s ' ' | cut -d' ' -f2)K\n`);
      const m = await s.waitFor(new RegExp(`${tag}=(\\d+)K`), 30_000);
      return Number(m[1]);
    };
    try {
      await s.waitFor(/TYPERVISOR-BOOT-OK/, 200_000);
      s.send(
        'i=0; while [ ! -d /sys/bus/virtio/drivers/virtio_mem ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i+1)); done; dmesg | grep -i virtio_mem | tail -5; ls /sys/bus/virtio/drivers/virtio_mem | grep -c virtio | sed s/^/MEMDEV=/\n',
      );
      await s.waitFor(/MEMDEV=1/, 30_000);
      const before = await memTotal('BEFORE');
      let r = await call(sock, 'PATCH', '/hotplug/memory', { requested_size_mib: 256 });
      assert.equal(r.status, 204, JSON.stringify(r.json));
      let st = (await call(sock, 'GET', '/hotplug/memory')).json;
      for (let i = 0; i < 150 && st.plugged_size_mib !== 256; i++) {
        await sleep(200);
        st = (await call(sock, 'GET', '/hotplug/memory')).json;
      }
      assert.equal(st.plugged_size_mib, 256, `${JSON.stringify(st)}\n${s.describe()}`);
      assert.equal(st.requested_size_mib, 256);
      let after = await memTotal('AFTER');
      for (let i = 0; i < 20 && after - before < 200 * 1024; i++) {
        await sleep(250);
        after = await memTotal(`AFTER${i}`);
      }
      // MemTotal in KiB: 256 MiB more, less what the kernel keeps for the new memory's memmap.
      assert.ok(
        after - before >= 200 * 1024,
        `MemTotal ${before} -> ${after} KiB\n${s.describe()}`,
      );
      // 256 MiB plugged: its 128 MiB KVM slots went in (none was there at boot).
      const added = await slotMetric('slots_added');
      assert.ok(added >= 2, `${added} slots added for 256 MiB`);
      assert.equal(await slotMetric('slots_removed'), 0);
      // Virtio-blk buffers in hotplugged memory: fill much of the memory, then read the drive
      // with O_DIRECT (dd's buffer) and through the page cache. Free pages of the Movable zone
      // (the hotplugged blocks) before and after, for the log.
      const movable = (tag: string) =>
        `echo ${tag}=$(grep -A1 Movable /proc/zoneinfo | tail -1 | tr -dc 0-9)P`;
      s.send(
        [
          movable('MOV0'),
          // A tmpfs of our own: /dev/shm's is capped at half the boot RAM.
          'mkdir -p /fill && mount -t tmpfs -o size=400M fill /fill && dd if=/dev/zero of=/fill/f bs=1M count=200 2>/dev/null',
          'echo FILLED=$(($(wc -c < /fill/f) / 1048576))M',
          movable('MOV1'),
          `echo DSUM=$(dd if=/dev/vda bs=1M iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)`,
          'echo 3 > /proc/sys/vm/drop_caches',
          `echo CSUM=$(sha256sum < /dev/vda | cut -d' ' -f1)`,
          movable('MOV2'),
          'rm -f /fill/f; umount /fill',
          'echo IO-"DONE"',
        ].join('; ') + '\n',
      );
      await s.waitFor(/IO-DONE/, 180_000);
      const dsum = /DSUM=([0-9a-f]{64})/.exec(s.out)?.[1];
      const csum = /CSUM=([0-9a-f]{64})/.exec(s.out)?.[1];
      const mov = ['MOV0', 'MOV1', 'MOV2'].map((t) => new RegExp(`${t}=(\\d*)P`).exec(s.out)?.[1]);
      const filled = /FILLED=(\d+)M/.exec(s.out)?.[1];
      console.log(
        `virtio-mem in-lab: ${filled} MiB filled; Movable free pages before/after fill/after I/O ${mov.join('/')}`,
      );
      assert.equal(filled, '200', s.describe());
      assert.equal(dsum, dataSum, `O_DIRECT read of the data drive\n${s.describe()}`);
      assert.equal(csum, dataSum, `page cache read of the data drive\n${s.describe()}`);
      assert.doesNotMatch(s.err, /outside guest|I\/O error/, s.describe());
      // Back to 0: the guest unplugs (movable memory can be offlined), the host sees it.
      r = await call(sock, 'PATCH', '/hotplug/memory', { requested_size_mib: 0 });
      assert.equal(r.status, 204);
      for (let i = 0; i < 150 && st.plugged_size_mib !== 0; i++) {
        await sleep(200);
        st = (await call(sock, 'GET', '/hotplug/memory')).json;
      }
      const shrunk = await memTotal('SHRUNK');
      console.log(
        `virtio-mem in-lab: MemTotal ${before} -> ${after} -> ${shrunk} KiB, plugged back to ${st.plugged_size_mib} MiB, ${Date.now() - s.t0} ms`,
      );
      assert.equal(st.plugged_size_mib, 0, `${JSON.stringify(st)}\n${s.describe()}`);
      assert.ok(
        after - shrunk >= 200 * 1024,
        `MemTotal ${after} -> ${shrunk} KiB\n${s.describe()}`,
      );
      // Every block unplugged: every slot that went in is out again.
      assert.equal(await slotMetric('slots_removed'), added);
      assert.equal(await slotMetric('slot_fails'), 0);
    } finally {
      s.kill();
      await s.exited;
      rmSync(dir, { recursive: true, force: true });
    }
  },
);

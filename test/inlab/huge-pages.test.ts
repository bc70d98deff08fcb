/**
 * machine-config huge_pages "2M" with a stock Linux guest (run inside the lab): the test gives
 * the lab kernel a pool of 2 MiB pages (vm.nr_hugepages, put back at the end), boots the default
 * guest from --config-file with 128 MiB of hugetlbfs RAM, and watches the pool from outside:
 * all 64 pages reserved while the VM runs, all back after it. Then a VM larger than the pool is
 * refused before it starts, with the pool named. Then a snapshot of such a VM: created, the
 * process killed (the pool whole again), and restored (its RAM then the memory file, mapped
 * privately, 4 KiB pages): what the guest wrote before goes on. About 60 s in the lab.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { repoRoot } from '../../src/lab/guest.js';
import { hugePagePool } from '../../src/vmm/guest-ram.js';
import { describeRun, skipReason, typervisor, writeGuestConfig, POWEROFF } from './helpers.js';
import { GuestSession } from './session.js';

const opts = { skip: skipReason, timeout: 240_000 };
const MARKER = /TYPERVISOR-BOOT-OK/;
const NR_HUGEPAGES = '/proc/sys/vm/nr_hugepages';
const MEM_MIB = 128;
const PAGES = MEM_MIB / 2;

/** 2 MiB pages neither used nor promised (HugePages_Free - HugePages_Rsvd). */
function available(): number {
  const p = hugePagePool();
  return p.free - p.reserved;
}

/**
 * available() while a VM runs: the first level read twice in a row, 20 ms apart (a single read
 * can land inside a guest fault and be one page short for an instant; see the watch below).
 */
async function availableWhileRunning(): Promise<number> {
  let prev = available();
  for (let i = 0; i < 10; i++) {
    await new Promise((r) => setTimeout(r, 20));
    const now = available();
    if (now === prev) return now;
    prev = now;
  }
  return prev;
}

/**
 * Runs `body` with the lab kernel's pool raised by PAGES + 8 pages and a fresh directory under
 * /run (API sockets cannot live on the lab's /tmp, the host's over 9p); puts the pool back and
 * removes the directory after.
 */
async function withPool(body: (dir: string, avail0: number) => Promise<void>): Promise<void> {
  const dir = mkdtempSync(join(existsSync('/run') ? '/run' : tmpdir(), 'tv-huge-'));
  const before = Number(readFileSync(NR_HUGEPAGES, 'utf8'));
  try {
    writeFileSync(NR_HUGEPAGES, String(before + PAGES + 8));
    const avail0 = available();
    assert.ok(avail0 >= PAGES + 8, `the lab kernel gave ${avail0} free 2 MiB pages`);
    await body(dir, avail0);
  } finally {
    writeFileSync(NR_HUGEPAGES, String(before));
    rmSync(dir, { recursive: true, force: true });
  }
}

test(
  'huge_pages "2M": the guest boots on the reserved pool, which is whole again after',
  opts,
  () =>
    withPool(async (dir, avail0) => {
      const config = (mem: number) =>
        writeGuestConfig(join(dir, `vm-${mem}.json`), {
          'machine-config': { vcpu_count: 1, mem_size_mib: mem, huge_pages: '2M' },
        });
      // The pool, watched from outside while the VM runs. /proc/meminfo reads the hugetlb
      // counters without the kernel's hugetlb_lock, so a sample taken while a guest fault moves
      // a page from reserved to used can see it gone from Free before it leaves Rsvd: one page
      // short, for an instant (CI saw 7 against 8 once). A page the VM really holds stays held,
      // so the level judged is the lowest one seen in two samples in a row, 50 ms apart.
      let least = avail0;
      let lowestSample = avail0;
      let prev = avail0;
      const watch = setInterval(() => {
        const now = available();
        lowestSample = Math.min(lowestSample, now);
        least = Math.min(least, Math.max(prev, now));
        prev = now;
      }, 50);
      let r;
      try {
        r = await typervisor(
          ['--no-api', '--config-file', config(MEM_MIB)],
          ['echo MEMTOTAL=$(grep MemTotal /proc/meminfo)', POWEROFF, ''].join('\n'),
          200_000,
          MARKER,
        );
      } finally {
        clearInterval(watch);
      }
      assert.equal(r.code, 0, describeRun(r));
      assert.match(r.stdout, /MEMTOTAL=MemTotal:\s+\d+ kB/, describeRun(r));
      assert.equal(
        least,
        avail0 - PAGES,
        `every page of the VM's RAM came from the pool (lowest single sample ${lowestSample})`,
      );
      assert.equal(available(), avail0, 'the pool is whole again after the VM');

      // Larger than the pool: refused at start, naming it; nothing held.
      const big = await typervisor(
        ['--no-api', '--config-file', config(2 * (avail0 + 2))],
        '',
        60_000,
      );
      assert.notEqual(big.code, 0, describeRun(big));
      assert.match(
        big.stderr,
        /too few free 2 MiB pages .*raise vm\.nr_hugepages/,
        describeRun(big),
      );
      assert.doesNotMatch(big.stdout, MARKER);
      assert.equal(available(), avail0);
    }),
);

test('huge_pages "2M": snapshot, kill -9, restore: the guest goes on', opts, () =>
  withPool(async (dir, avail0) => {
    const bin = join(repoRoot(), 'bin', 'typervisor');
    let vm: GuestSession | undefined;
    try {
      const cfg = writeGuestConfig(join(dir, 'vm.json'), {
        'machine-config': { vcpu_count: 1, mem_size_mib: MEM_MIB, huge_pages: '2M' },
      });
      const sock = join(dir, 'api.sock');
      vm = new GuestSession(['--api-sock', sock, '--config-file', cfg]);
      await vm.waitFor(MARKER, 200_000);
      assert.equal(await availableWhileRunning(), avail0 - PAGES, vm.describe());
      // A file in the initramfs's tmpfs: it lives in guest RAM only.
      vm.send('echo HUGE-$((40000+2)) > /tmp/mark; echo WROTE-$((1+1))\n');
      await vm.waitFor(/WROTE-2/, 60_000);
      const snap = join(dir, 'vm.snap');
      const mem = join(dir, 'vm.mem');
      const create = spawnSync(
        process.execPath,
        [
          bin,
          'snapshot',
          'create',
          '--api-sock',
          sock,
          '--snapshot-path',
          snap,
          '--mem-file-path',
          mem,
        ],
        { encoding: 'utf8', timeout: 120_000 },
      );
      assert.equal(create.status, 0, `${create.stdout}${create.stderr}`);
      vm.kill();
      await vm.exited;
      assert.equal(available(), avail0, 'the pool is whole again after kill -9');
      // The restored guest is at its shell: ask until it answers (the first bytes may arrive
      // while the load is still under way).
      vm = new GuestSession(['run', '--restore', snap, '--mem-file', mem]);
      const restored = vm;
      const ask = setInterval(() => restored.send('cat /tmp/mark\n'), 2000);
      try {
        await restored.waitFor(/HUGE-40002/, 120_000);
      } finally {
        clearInterval(ask);
      }
      restored.send(`${POWEROFF}\n`);
      assert.equal(await restored.exited, 0, restored.describe());
      assert.equal(available(), avail0, 'the pool is whole after the restored VM');
    } finally {
      vm?.kill();
    }
  }),
);

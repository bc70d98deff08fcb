/**
 * machine-config huge_pages "2M" with a stock Linux guest (run inside the lab): the test gives
 * the lab kernel a pool of 2 MiB pages (vm.nr_hugepages, put back at the end), boots the default
 * guest from --config-file with 128 MiB of hugetlbfs RAM, and watches the pool from outside:
 * all 64 pages reserved while the VM runs, all back after it. Then a VM larger than the pool is
 * refused before it starts, with the pool named. About 30 s in the lab.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describeRun, skipReason, typervisor, writeGuestConfig, POWEROFF } from './helpers.js';

const opts = { skip: skipReason, timeout: 240_000 };
const MARKER = /TYPERVISOR-BOOT-OK/;
const NR_HUGEPAGES = '/proc/sys/vm/nr_hugepages';
const MEM_MIB = 128;
const PAGES = MEM_MIB / 2;

/** 2 MiB pages neither used nor promised (HugePages_Free - HugePages_Rsvd). */
function available(): number {
  const info = readFileSync('/proc/meminfo', 'utf8');
  const f = (k: string) => Number(new RegExp(`^${k}:\\s+(\\d+)`, 'm').exec(info)?.[1]);
  return f('HugePages_Free') - f('HugePages_Rsvd');
}

test(
  'huge_pages "2M": the guest boots on the reserved pool, which is whole again after',
  opts,
  async () => {
    const dir = mkdtempSync(join(tmpdir(), 'tv-huge-'));
    const before = Number(readFileSync(NR_HUGEPAGES, 'utf8'));
    try {
      writeFileSync(NR_HUGEPAGES, String(before + PAGES + 8));
      const avail0 = available();
      assert.ok(avail0 >= PAGES + 8, `the lab kernel gave ${avail0} free 2 MiB pages`);
      const config = (mem: number) =>
        writeGuestConfig(join(dir, `vm-${mem}.json`), {
          'machine-config': { vcpu_count: 1, mem_size_mib: mem, huge_pages: '2M' },
        });
      // The pool, watched from outside while the VM runs.
      let least = avail0;
      const watch = setInterval(() => (least = Math.min(least, available())), 50);
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
      assert.equal(least, avail0 - PAGES, `every page of the VM's RAM came from the pool`);
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
    } finally {
      writeFileSync(NR_HUGEPAGES, String(before));
      rmSync(dir, { recursive: true, force: true });
    }
  },
);

/**
 * Guest RAM's mappings ask for transparent huge pages (needs the native addon, not KVM): the
 * kernel's own record of each mapping (/proc/self/smaps) is the oracle.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { native } from '../kvm/native.js';
import { ConfigError, HostError } from '../util/errors.js';
import {
  allocateGuestRam,
  createGuestRam,
  hugePagePool,
  mapGuestRam,
  residentRuns,
} from './guest-ram.js';

const MIB = 1024 * 1024;
const SHMEM_THP = '/sys/kernel/mm/transparent_hugepage/shmem_enabled';

/** The smaps block of the mapping that holds `addr`, or undefined. */
function smapsOf(addr: bigint): Map<string, string> | undefined {
  const lines = readFileSync('/proc/self/smaps', 'utf8').split('\n');
  const at = lines.findIndex((l) => {
    const m = /^([0-9a-f]+)-([0-9a-f]+) /.exec(l);
    return m !== null && BigInt(`0x${m[1]}`) <= addr && addr < BigInt(`0x${m[2]}`);
  });
  if (at < 0) return undefined;
  const fields = new Map<string, string>();
  for (const l of lines.slice(at + 1)) {
    const m = /^([A-Za-z_]+):\s*(.*)$/.exec(l);
    if (!m) break;
    fields.set(m[1]!, m[2]!.trim());
  }
  return fields;
}

function thpBuilt(): boolean {
  try {
    readFileSync(SHMEM_THP, 'utf8');
    return true;
  } catch {
    return false;
  }
}

test(
  'every region of guest RAM is mapped with MADV_HUGEPAGE (VmFlags hg)',
  { skip: !thpBuilt() && 'no THP in this kernel' },
  () => {
    const n = native();
    // Two regions, as a VM with RAM above the 32-bit hole has (the second at a 2 MiB-aligned
    // file offset).
    const layout = createGuestRam([
      { base: 0, size: 8 * MIB },
      { base: 2 ** 32, size: 4 * MIB },
    ]);
    const ram = mapGuestRam(layout);
    try {
      for (const b of ram.buffers) {
        const s = smapsOf(n.bufferAddress(b));
        assert.ok(s, 'the mapping is in /proc/self/smaps');
        assert.match(s.get('VmFlags') ?? '', /\bhg\b/, 'VM_HUGEPAGE set on the mapping');
        assert.match(s.get('VmFlags') ?? '', /\bsh\b/, 'still a shared mapping of the memfd');
      }
    } finally {
      ram.unmap();
      n.close(layout.memfd);
    }
  },
);

// With the host's shmem THP policy at `advise` (set here for the test when it is `never` and we
// may, and put back), touching guest RAM gives it 2 MiB pages: the kernel maps them with PMDs.
test('with shmem_enabled=advise, touched guest RAM is backed by 2 MiB pages', (t) => {
  let before: string;
  try {
    before = /\[(\w+)\]/.exec(readFileSync(SHMEM_THP, 'utf8'))?.[1] ?? '';
  } catch {
    t.skip('no THP in this kernel');
    return;
  }
  const changed = before === 'never' || before === 'deny';
  if (changed) {
    try {
      writeFileSync(SHMEM_THP, 'advise');
    } catch {
      t.skip(`shmem_enabled is ${before} and not writable here`);
      return;
    }
  }
  const n = native();
  const layout = createGuestRam([{ base: 0, size: 16 * MIB }]);
  let ram: ReturnType<typeof mapGuestRam> | undefined;
  try {
    ram = mapGuestRam(layout);
    const bytes = new Uint8Array(ram.buffers[0]!);
    // One write per 2 MiB of the middle 8 MiB, as a guest's first touch of each.
    for (let off = 4 * MIB; off < 12 * MIB; off += 2 * MIB) bytes[off + 4096] = 1;
    const s = smapsOf(n.bufferAddress(ram.buffers[0]!));
    assert.ok(s);
    const pmd = Number(/^(\d+) kB$/.exec(s.get('ShmemPmdMapped') ?? '')?.[1] ?? NaN);
    // Huge pages can be refused for want of free contiguous memory: at least one of four.
    assert.ok(pmd >= 2048, `ShmemPmdMapped ${s.get('ShmemPmdMapped')}, expected >= 2048 kB`);
    assert.equal(bytes[4 * MIB + 4096], 1);
    assert.equal(bytes[4 * MIB], 0, 'the rest of the huge page reads zero');
  } finally {
    ram?.unmap();
    n.close(layout.memfd);
    if (changed) writeFileSync(SHMEM_THP, before);
  }
});

const NR_HUGEPAGES = '/proc/sys/vm/nr_hugepages';
/** 2 MiB pages neither used nor promised. */
const available = () => {
  const p = hugePagePool();
  return p.free - p.reserved;
};

test('huge_pages "2M": a hugetlbfs memfd, reserved when mapped, refused cleanly when short', (t) => {
  assert.throws(
    () => createGuestRam([{ base: 0, size: 3 * MIB }], { hugetlb: true }),
    (e: unknown) => e instanceof ConfigError && /multiple of 2 MiB/.test(e.message),
  );
  let before: number;
  try {
    before = Number(readFileSync(NR_HUGEPAGES, 'utf8'));
    // The test's own pool: 8 more 2 MiB pages than the host had (put back at the end).
    writeFileSync(NR_HUGEPAGES, String(before + 8));
  } catch {
    t.skip('vm.nr_hugepages is not writable here');
    return;
  }
  try {
    const free0 = available();
    if (free0 < 8) {
      t.skip(`the kernel gave the pool only ${free0} free 2 MiB pages`);
      return;
    }
    const n = native();
    const layout = createGuestRam(
      [
        { base: 0, size: 8 * MIB },
        { base: 2 ** 32, size: 4 * MIB },
      ],
      { hugetlb: true },
    );
    assert.equal(layout.hugetlb, true);
    const ram = mapGuestRam(layout);
    // A second thread's mapping (the device worker's) of the same file reserves nothing more.
    const worker = mapGuestRam(layout);
    try {
      assert.equal(available(), free0 - 6);
      for (const b of ram.buffers) {
        const s = smapsOf(n.bufferAddress(b));
        assert.equal(s?.get('KernelPageSize'), '2048 kB');
        assert.doesNotMatch(s?.get('VmFlags') ?? '', /\bnr\b/, 'no MAP_NORESERVE');
      }
      // Guest memory works through every mapping.
      ram.memory.write(2 ** 32 + 5, new Uint8Array([7, 8, 9]));
      const back = new Uint8Array(3);
      worker.memory.read(2 ** 32 + 5, back);
      assert.deepEqual([...back], [7, 8, 9]);
      // More RAM than the pool has: a HostError naming the pool, nothing left mapped or held.
      const big = createGuestRam([{ base: 0, size: (free0 + 2) * 2 * MIB }], { hugetlb: true });
      try {
        assert.throws(
          () => mapGuestRam(big),
          (e: unknown) =>
            e instanceof HostError &&
            /too few free 2 MiB pages .*HugePages_Free \d+.*raise vm\.nr_hugepages/.test(e.message),
        );
      } finally {
        n.close(big.memfd);
      }
      assert.equal(available(), free0 - 6);
    } finally {
      worker.unmap();
      ram.unmap();
      n.close(layout.memfd);
    }
    assert.equal(available(), free0);
  } finally {
    writeFileSync(NR_HUGEPAGES, String(before));
  }
});

// A booted VM's RAM: anonymous private memory that the main thread maps and the other threads
// wrap. The kernel's record of the mapping (smaps) and of its pages (pagemap) are the oracles.
test('anonymous guest RAM: private, THP-advised, not inherited by a child; views see its writes', () => {
  const n = native();
  const { layout, ram } = allocateGuestRam([
    { base: 0, size: 8 * MIB },
    { base: 2 ** 32, size: 4 * MIB },
  ]);
  try {
    assert.equal(layout.memfd, -1);
    assert.equal(layout.anonymous, true);
    assert.equal(ram.anonymous, true);
    assert.equal(layout.hostAddrs?.length, 2);
    for (const [i, b] of ram.buffers.entries()) {
      assert.equal(layout.hostAddrs![i], n.bufferAddress(b));
      assert.equal(n.bufferAddress(b) % BigInt(2 * MIB), 0n, 'a 2 MiB-aligned mapping');
      const s = smapsOf(n.bufferAddress(b));
      assert.ok(s, 'the mapping is in /proc/self/smaps');
      const flags = s.get('VmFlags') ?? '';
      assert.doesNotMatch(flags, /\bsh\b/, 'a private mapping');
      assert.match(flags, /\bdc\b/, 'MADV_DONTFORK: a child process does not get the guest');
      if (!thpBuilt()) continue;
      if (i === 0) {
        // The first 2 MiB (the boot loader's tables, a tiny guest) stay on 4 KiB pages.
        assert.match(flags, /\bnh\b/, 'MADV_NOHUGEPAGE on the first 2 MiB');
        const rest = smapsOf(n.bufferAddress(b) + BigInt(2 * MIB));
        assert.match(rest?.get('VmFlags') ?? '', /\bhg\b/, 'MADV_HUGEPAGE above 2 MiB');
      } else assert.match(flags, /\bhg\b/, 'MADV_HUGEPAGE');
    }
    // Another thread's view (what the device worker maps) is the same memory.
    const view = mapGuestRam(layout);
    try {
      ram.memory.write(2 ** 32 + 0x1234, Uint8Array.of(7, 8, 9));
      const got = new Uint8Array(3);
      view.memory.read(2 ** 32 + 0x1234, got);
      assert.deepEqual([...got], [7, 8, 9]);
      view.memory.write(0x10, Uint8Array.of(5));
      assert.equal(ram.memory.readU8(0x10), 5);
      assert.equal(view.anonymous, undefined, 'a view is not the owner');
    } finally {
      view.unmap(); // drops the view only
    }
    assert.equal(ram.memory.readU8(0x10), 5, "the owner's mapping outlives the view");
  } finally {
    ram.unmap();
  }
});

test('residentRuns: only pages that exist, whatever the page size under them', () => {
  const { ram } = allocateGuestRam([{ base: 0, size: 16 * MIB }]);
  try {
    const b = ram.buffers[0]!;
    assert.deepEqual(residentRuns(b), [], 'untouched RAM has no pages');
    const bytes = new Uint8Array(b);
    bytes[0] = 1; // page 0
    bytes[9 * MIB + 4096] = 2; // page 2305, in the 2 MiB page of pages 2048-2559
    const runs = residentRuns(b);
    const covered = (p: number) => runs.some(([a, z]) => a <= p && p < z);
    assert.ok(covered(0) && covered(2305), `runs ${JSON.stringify(runs)}`);
    // The first 2 MiB are on 4 KiB pages: page 0 alone. With THP a touch above brings its whole
    // 2 MiB page (512 pages, the mapping is 2 MiB-aligned); nothing outside those.
    assert.deepEqual(runs[0], [0, 1], 'a 4 KiB page at the bottom');
    for (const [a, z] of runs.slice(1))
      assert.ok(a >= 2048 && z <= 2560, `run [${a}, ${z}) outside the touched 2 MiB page`);
    // Given back (what the RAM pool does), the pages are gone and read zero.
    native().madvise(b, 0, b.byteLength, 4 /* MADV_DONTNEED */);
    assert.deepEqual(residentRuns(b), []);
    assert.equal(bytes[0], 0);
  } finally {
    ram.unmap();
  }
});

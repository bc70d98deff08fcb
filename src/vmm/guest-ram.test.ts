/**
 * Guest RAM's mappings ask for transparent huge pages (needs the native addon, not KVM): the
 * kernel's own record of each mapping (/proc/self/smaps) is the oracle.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import { native } from '../kvm/native.js';
import { ConfigError, HostError } from '../util/errors.js';
import { createGuestRam, hugePagePool, mapGuestRam } from './guest-ram.js';

const MIB = 1024 * 1024;
const SHMEM_THP = '/sys/kernel/mm/transparent_hugepage/shmem_enabled';

/** The smaps block of the mapping that starts at `addr`, or undefined. */
function smapsOf(addr: bigint): Map<string, string> | undefined {
  const lines = readFileSync('/proc/self/smaps', 'utf8').split('\n');
  const head = `${addr.toString(16)}-`;
  const at = lines.findIndex((l) => l.startsWith(head));
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

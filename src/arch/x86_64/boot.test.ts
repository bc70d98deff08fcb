import { test } from 'node:test';
import assert from 'node:assert/strict';
import { makeBzImage, makeElf, prng } from '../../../test/fixtures/kernel-images.js';
import type { Sregs, Segment } from '../../kvm/types.js';
import { Cmdline } from '../../loader/cmdline.js';
import { GuestMemory } from '../../memory/guest-memory.js';
import { err, ok } from '../../util/result.js';
import { PVH_START_INFO_MAGIC } from './boot-params.js';
import { type KernelLoad, loadKernel, placeInitrd, setupBoot } from './boot.js';
import {
  CMDLINE_ADDR,
  MPTABLE_START,
  PML4_ADDR,
  PVH_START_INFO_ADDR,
  ZERO_PAGE_ADDR,
  ramRegions,
} from './layout.js';

const MiB = 1024 * 1024;
const mem = (bytes: number) => GuestMemory.anonymous(ramRegions(bytes));
const seg: Segment = {
  base: 0n,
  limit: 0xffff,
  selector: 0,
  type: 3,
  present: 1,
  dpl: 0,
  db: 0,
  s: 1,
  l: 0,
  g: 0,
  avl: 0,
  unusable: 0,
};
const sregs: Sregs = {
  cs: seg,
  ds: seg,
  es: seg,
  fs: seg,
  gs: seg,
  ss: seg,
  tr: seg,
  ldt: seg,
  gdt: { base: 0n, limit: 0 },
  idt: { base: 0n, limit: 0 },
  cr0: 0x60000010n,
  cr2: 0n,
  cr3: 0n,
  cr4: 0n,
  cr8: 0n,
  efer: 0n,
  apicBase: 0xfee00900n,
};

test('loadKernel: bzImage payload at 1 MiB', () => {
  const m = mem(64 * MiB);
  const img = makeBzImage({ initSize: 0x200000 });
  const r = loadKernel(m, img);
  assert.ok(r.ok);
  assert.equal(r.value.kind, 'bzimage');
  assert.equal(r.value.entry, 0x100200);
  assert.equal(r.value.kernelEnd, 0x100000 + 0x200000);
  assert.deepEqual(m.view(0x100000, 4096), img.subarray(1024));
});

test('loadKernel: ELF segments with bss zeroed, PVH or 64-bit entry', () => {
  const m = mem(64 * MiB);
  m.fill(0x100000, 0x3000, 0xcc);
  const data = new Uint8Array([1, 2, 3, 4]);
  const r = loadKernel(
    m,
    makeElf({ pvhEntry: 0x100002, segments: [{ paddr: 0x100000, data, memsz: 0x3000 }] }),
  );
  assert.ok(r.ok);
  assert.equal(r.value.kind, 'elf-pvh');
  assert.equal(r.value.entry, 0x100002);
  assert.deepEqual(m.view(0x100000, 4), data);
  assert.ok(m.view(0x100004, 0x3000 - 4).every((b) => b === 0));
  const r2 = loadKernel(m, makeElf({ entry: 0x100001 }));
  assert.ok(r2.ok);
  assert.equal(r2.value.kind, 'elf64');
  assert.equal(r2.value.entry, 0x100001);
});

test('loadKernel: outside RAM, below 1 MiB, or across the MMIO hole is an error', () => {
  const small = mem(2 * MiB);
  const big = makeBzImage({ initSize: 4 * MiB });
  const r = loadKernel(small, big);
  assert.equal(r.ok, false);
  if (!r.ok) assert.match(r.error.message, /outside guest RAM \(2 MiB\)/);
  const low = loadKernel(
    mem(8 * MiB),
    makeElf({ segments: [{ paddr: 0x7000, data: new Uint8Array(4) }] }),
  );
  assert.equal(low.ok, false);
  if (!low.ok) assert.match(low.error.message, /below 1 MiB/);
  const hole = loadKernel(
    mem(4 * 1024 * MiB),
    makeElf({ segments: [{ paddr: 0xbffff000, data: new Uint8Array(0x2000) }] }),
  );
  assert.equal(hole.ok, false);
  assert.equal(loadKernel(mem(8 * MiB), new Uint8Array(100)).ok, false);
  const m = mem(4 * MiB);
  assert.equal(
    loadKernel(
      m,
      makeElf({
        segments: [
          { paddr: 0x100000, data: new Uint8Array([9]) },
          { paddr: 0x900000, data: new Uint8Array(1) },
        ],
      }),
    ).ok,
    false,
  );
  assert.equal(m.readU8(0x100000), 0); // nothing written when any segment is refused
});

test('placeInitrd: page-aligned top of low RAM, under initrd_addr_max, above the kernel', () => {
  const kernel: KernelLoad = {
    kind: 'elf64',
    entry: 0x100000,
    kernelStart: 0x100000,
    kernelEnd: 0x200000,
  };
  const m = mem(64 * MiB);
  const a = placeInitrd(m, 1 * MiB + 5, kernel);
  assert.ok(a.ok);
  assert.equal(a.value % 4096, 0);
  assert.ok(a.value + MiB + 5 <= 64 * MiB && a.value + MiB + 5 > 64 * MiB - 4096 - MiB);
  const big = mem(4 * 1024 * MiB); // low region ends at 3 GiB
  const b = placeInitrd(big, MiB, kernel);
  assert.ok(b.ok && b.value + MiB <= 0xc0000000);
  const bz = loadKernel(mem(64 * MiB), makeBzImage({ initrdAddrMax: 0x1ffffff }));
  assert.ok(bz.ok);
  const c = placeInitrd(big, MiB, bz.value);
  assert.ok(c.ok);
  assert.equal(c.value, 0x2000000 - MiB);
  const tooBig = placeInitrd(m, 63 * MiB, kernel);
  assert.equal(tooBig.ok, false);
  if (!tooBig.ok)
    assert.match(
      tooBig.error.message,
      /^initrd \(63 MiB\) does not fit in guest memory \(64 MiB\)/,
    );
  assert.equal(placeInitrd(m, 0, kernel).ok, false);
});

test('setupBoot bzImage: zero page, cmdline, initrd, GDT, page tables, MP table, regs', () => {
  const m = mem(128 * MiB);
  const initrd = new Uint8Array(10000).fill(7);
  let acpiCalled = 0;
  const r = setupBoot(m, {
    kernel: makeBzImage(),
    initrd,
    cmdline: 'console=ttyS0 reboot=k',
    vcpus: 2,
    acpi: (mm, e820) => {
      acpiCalled++;
      assert.equal(e820.length, 3);
      mm.writeU32(0xe0000, 0x20445352);
      return ok({ rsdpAddr: 0xe0000 });
    },
  });
  assert.ok(r.ok, r.ok ? '' : r.error.message);
  const b = r.value;
  assert.equal(acpiCalled, 1);
  assert.equal(b.mode, 'long64');
  assert.equal(b.regs.rip, 0x100200n);
  assert.equal(b.regs.rsi, BigInt(ZERO_PAGE_ADDR));
  const s = b.sregs(sregs);
  assert.equal(s.cr3, BigInt(PML4_ADDR));
  assert.equal(s.cs.l, 1);
  assert.equal(m.readU32(ZERO_PAGE_ADDR + 0x202), 0x53726448);
  assert.equal(m.readU32(ZERO_PAGE_ADDR + 0x228), CMDLINE_ADDR);
  assert.equal(m.readU32(ZERO_PAGE_ADDR + 0x218), b.initrd!.addr);
  assert.equal(m.readU32(ZERO_PAGE_ADDR + 0x21c), 10000);
  assert.equal(m.readU64(ZERO_PAGE_ADDR + 0x70), 0xe0000n);
  assert.equal(m.readU8(ZERO_PAGE_ADDR + 0x1e8), 3);
  assert.equal(
    Buffer.from(m.view(CMDLINE_ADDR, 23)).toString('latin1'),
    'console=ttyS0 reboot=k\0',
  );
  assert.deepEqual(m.view(b.initrd!.addr, 10000), initrd);
  assert.equal(m.readU32(MPTABLE_START), 0x5f504d5f);
  assert.equal(m.readU64(PML4_ADDR) & 1n, 1n);
  assert.ok(b.msrs.length > 0);
});

test('setupBoot ELF with PVH note: start_info, 32-bit mode', () => {
  const m = mem(64 * MiB);
  const c = new Cmdline();
  assert.ok(c.insert('console', 'ttyS0').ok);
  const r = setupBoot(m, {
    kernel: makeElf({ pvhEntry: 0x100001 }),
    cmdline: c,
    vcpus: 1,
    mptable: false,
  });
  assert.ok(r.ok);
  assert.equal(r.value.mode, 'pvh32');
  assert.equal(r.value.regs.rbx, BigInt(PVH_START_INFO_ADDR));
  assert.equal(r.value.sregs(sregs).cr0, 0x11n);
  assert.equal(m.readU32(PVH_START_INFO_ADDR), PVH_START_INFO_MAGIC);
  assert.equal(m.readU64(PVH_START_INFO_ADDR + 24), BigInt(CMDLINE_ADDR));
  assert.equal(m.readU32(MPTABLE_START), 0); // skipped
  assert.equal(m.readU32(ZERO_PAGE_ADDR + 0x202), 0); // no zero page in PVH mode
});

test('setupBoot errors are values', () => {
  const m = mem(64 * MiB);
  const cases: Array<[Parameters<typeof setupBoot>[1], RegExp]> = [
    [{ kernel: makeBzImage({ cmdlineSize: 5 }), cmdline: 'console=ttyS0', vcpus: 1 }, /accepts 5/],
    [{ kernel: makeBzImage(), cmdline: 'a\0', vcpus: 1 }, /NUL/],
    [{ kernel: makeBzImage(), cmdline: '', vcpus: 65 }, /vCPUs/],
    [
      { kernel: makeBzImage(), cmdline: '', vcpus: 1, initrd: new Uint8Array(64 * MiB) },
      /does not fit/,
    ],
    [
      { kernel: makeBzImage(), cmdline: '', vcpus: 1, acpi: () => err(new Error('acpi broke')) },
      /acpi broke/,
    ],
  ];
  for (const [o, re] of cases) {
    const r = setupBoot(m, o);
    assert.equal(r.ok, false);
    if (!r.ok) assert.match(r.error.message, re);
  }
  assert.equal(
    setupBoot(GuestMemory.anonymous([{ base: 0, size: 0x80000 }]), {
      kernel: makeBzImage(),
      cmdline: '',
      vcpus: 1,
    }).ok,
    false,
  );
});

test('randomized images never make loadKernel throw', () => {
  const m = mem(4 * MiB);
  const bases = [makeBzImage(), makeElf({ pvhEntry: 0x100000 })];
  const rnd = prng(77);
  for (let i = 0; i < 3000; i++) {
    const img = bases[i % 2]!.slice();
    for (let f = 0; f < 1 + (rnd() % 6); f++)
      img[rnd() % Math.min(img.length, 0x280)] = rnd() & 0xff;
    loadKernel(m, img); // must return, never throw
  }
});

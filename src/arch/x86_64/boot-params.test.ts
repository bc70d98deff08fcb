import { test } from 'node:test';
import assert from 'node:assert/strict';
import { makeBzImage } from '../../../test/fixtures/kernel-images.js';
import { parseBzImage } from '../../loader/bzimage.js';
import { GuestMemory } from '../../memory/guest-memory.js';
import {
  PVH_MEMMAP_MAX,
  PVH_MODLIST_ADDR,
  PVH_START_INFO_MAGIC,
  buildZeroPage,
  writePvhStartInfo,
  writeZeroPage,
} from './boot-params.js';
import { e820Entries } from './e820.js';
import { PVH_MEMMAP_ADDR, PVH_START_INFO_ADDR, ZERO_PAGE_ADDR, ramRegions } from './layout.js';

const MiB = 1024 * 1024;
const e820 = e820Entries(ramRegions(128 * MiB));

test('zero page from a bzImage header (boot.rst / zero-page.rst offsets)', () => {
  const bz = parseBzImage(makeBzImage());
  assert.ok(bz.ok);
  const r = buildZeroPage({
    setupHeader: bz.value.setupHeader,
    cmdlineAddr: 0x20000,
    initrd: { addr: 0x1_2345_6000, size: 0x1_0000_1000 },
    e820,
    rsdpAddr: 0xe0000,
  });
  assert.ok(r.ok);
  const p = r.value;
  const dv = new DataView(p.buffer);
  assert.equal(p.length, 4096);
  assert.equal(dv.getUint32(0x202, true), 0x53726448); // HdrS kept
  assert.equal(dv.getUint16(0x206, true), 0x020f);
  assert.equal(p[0x210], 0xff); // type_of_loader
  assert.equal(p[0x211]! & 0x81, 0x81); // LOADED_HIGH kept, CAN_USE_HEAP set
  assert.equal(dv.getUint16(0x224, true), 0xde00); // heap_end_ptr
  assert.equal(dv.getUint16(0x1fa, true), 0xffff); // vid_mode
  assert.equal(dv.getUint32(0x228, true), 0x20000); // cmd_line_ptr
  assert.equal(dv.getUint32(0x0c8, true), 0); // ext_cmd_line_ptr
  assert.equal(dv.getUint32(0x218, true), 0x2345_6000); // ramdisk_image
  assert.equal(dv.getUint32(0x0c0, true), 1); // ext_ramdisk_image
  assert.equal(dv.getUint32(0x21c, true), 0x1000); // ramdisk_size
  assert.equal(dv.getUint32(0x0c4, true), 1); // ext_ramdisk_size
  assert.equal(dv.getBigUint64(0x070, true), 0xe0000n); // acpi_rsdp_addr
  assert.equal(p[0x1e8], 3); // e820_entries
  for (let i = 0; i < 3; i++) {
    const at = 0x2d0 + i * 20;
    assert.equal(Number(dv.getBigUint64(at, true)), e820[i]!.addr);
    assert.equal(Number(dv.getBigUint64(at + 8, true)), e820[i]!.size);
    assert.equal(dv.getUint32(at + 16, true), e820[i]!.type);
  }
});

test('zero page without a bzImage (ELF 64-bit entry) gets a minimal header', () => {
  const r = buildZeroPage({ cmdlineAddr: 0x20000, e820 });
  assert.ok(r.ok);
  const dv = new DataView(r.value.buffer);
  assert.equal(dv.getUint16(0x1fe, true), 0xaa55);
  assert.equal(dv.getUint32(0x202, true), 0x53726448);
  assert.equal(dv.getUint32(0x230, true), 0x1000000);
  assert.equal(dv.getUint32(0x218, true), 0); // no initrd
  assert.equal(dv.getBigUint64(0x070, true), 0n);
});

test('too many e820 entries is an error', () => {
  const many = Array.from({ length: 129 }, (_, i) => ({ addr: i * 0x1000, size: 0x1000, type: 1 }));
  assert.equal(buildZeroPage({ cmdlineAddr: 0, e820: many }).ok, false);
});

test('writeZeroPage honors guest memory bounds', () => {
  const small = GuestMemory.anonymous([{ base: 0, size: 0x7800 }]);
  assert.equal(writeZeroPage(small, { cmdlineAddr: 0x20000, e820 }).ok, false);
  const mem = GuestMemory.anonymous([{ base: 0, size: 0x10000 }]);
  assert.ok(writeZeroPage(mem, { cmdlineAddr: 0x20000, e820 }).ok);
  assert.equal(mem.readU32(ZERO_PAGE_ADDR + 0x228), 0x20000);
});

test('PVH start_info, memmap and module list (start_info.h v1)', () => {
  const mem = GuestMemory.anonymous([{ base: 0, size: 0x10000 }]);
  const r = writePvhStartInfo(mem, {
    cmdlineAddr: 0x20000,
    e820,
    initrd: { addr: 0x7000000, size: 0x12345 },
    rsdpAddr: 0xe0000,
  });
  assert.ok(r.ok);
  const s = PVH_START_INFO_ADDR;
  assert.equal(mem.readU32(s), PVH_START_INFO_MAGIC);
  assert.equal(mem.readU32(s + 4), 1);
  assert.equal(mem.readU32(s + 12), 1); // nr_modules
  assert.equal(mem.readU64(s + 16), BigInt(PVH_MODLIST_ADDR));
  assert.equal(mem.readU64(s + 24), 0x20000n);
  assert.equal(mem.readU64(s + 32), 0xe0000n);
  assert.equal(mem.readU64(s + 40), BigInt(PVH_MEMMAP_ADDR));
  assert.equal(mem.readU32(s + 48), 3);
  for (let i = 0; i < 3; i++) {
    const at = PVH_MEMMAP_ADDR + i * 24;
    assert.equal(Number(mem.readU64(at)), e820[i]!.addr);
    assert.equal(Number(mem.readU64(at + 8)), e820[i]!.size);
    assert.equal(mem.readU32(at + 16), e820[i]!.type);
  }
  assert.equal(mem.readU64(PVH_MODLIST_ADDR), 0x7000000n);
  assert.equal(mem.readU64(PVH_MODLIST_ADDR + 8), 0x12345n);
  assert.ok(PVH_MODLIST_ADDR + 32 <= ZERO_PAGE_ADDR);
  assert.ok(PVH_MEMMAP_ADDR + PVH_MEMMAP_MAX * 24 <= PVH_MODLIST_ADDR);
  assert.ok(PVH_START_INFO_ADDR + 56 <= PVH_MEMMAP_ADDR);
});

test('PVH without initrd has no modules', () => {
  const mem = GuestMemory.anonymous([{ base: 0, size: 0x10000 }]);
  assert.ok(writePvhStartInfo(mem, { cmdlineAddr: 0x20000, e820 }).ok);
  assert.equal(mem.readU32(PVH_START_INFO_ADDR + 12), 0);
  assert.equal(mem.readU64(PVH_START_INFO_ADDR + 16), 0n);
});

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { GuestMemory } from '../../memory/guest-memory.js';
import { bootGdt, gdtEntry, segmentFromEntry, writeGdt } from './gdt.js';
import { GDT_ADDR, IDT_ADDR } from './layout.js';

test('descriptor encoding matches the well-known values', () => {
  assert.equal(gdtEntry(0xa09b, 0, 0xfffff), 0x00af9b000000ffffn);
  assert.equal(gdtEntry(0xc093, 0, 0xfffff), 0x00cf93000000ffffn);
  assert.equal(gdtEntry(0x808b, 0, 0xfffff), 0x008f8b000000ffffn);
  assert.equal(gdtEntry(0xc09b, 0, 0xfffff), 0x00cf9b000000ffffn);
  assert.equal(gdtEntry(0x0093, 0x12345678, 0xabcde), 0x120a93345678bcden);
});

test('64-bit segments', () => {
  const g = bootGdt('long64');
  assert.deepEqual(g.code, {
    base: 0n,
    limit: 0xffffffff,
    selector: 0x08,
    type: 0xb,
    present: 1,
    dpl: 0,
    db: 0,
    s: 1,
    l: 1,
    g: 1,
    avl: 0,
    unusable: 0,
  });
  assert.deepEqual(g.data, {
    base: 0n,
    limit: 0xffffffff,
    selector: 0x10,
    type: 0x3,
    present: 1,
    dpl: 0,
    db: 1,
    s: 1,
    l: 0,
    g: 1,
    avl: 0,
    unusable: 0,
  });
  assert.equal(g.tss.type, 0xb);
  assert.equal(g.tss.s, 0);
  assert.equal(g.tss.selector, 0x18);
  assert.deepEqual(g.gdt, { base: BigInt(GDT_ADDR), limit: 31 });
  assert.deepEqual(g.idt, { base: BigInt(IDT_ADDR), limit: 7 });
});

test('PVH segments are flat 32-bit', () => {
  const g = bootGdt('pvh32');
  assert.equal(g.code.l, 0);
  assert.equal(g.code.db, 1);
  assert.equal(g.code.limit, 0xffffffff);
  assert.equal(g.tss.limit, 0x67);
  assert.equal(g.tss.g, 0);
  assert.equal(g.tss.type, 0xb);
});

test('segmentFromEntry round-trips base and unscaled limit', () => {
  const s = segmentFromEntry(gdtEntry(0x0093, 0xfedcba98, 0x12345), 5);
  assert.equal(s.base, 0xfedcba98n);
  assert.equal(s.limit, 0x12345);
  assert.equal(s.selector, 40);
  assert.equal(segmentFromEntry(0n, 0).unusable, 1);
});

test('written to guest memory at GDT_ADDR, IDT zeroed', () => {
  const mem = GuestMemory.anonymous([{ base: 0, size: 0x1000 }]);
  mem.fill(IDT_ADDR, 8, 0xaa);
  const g = bootGdt('long64');
  assert.ok(writeGdt(mem, g).ok);
  for (let i = 0; i < 4; i++) assert.equal(mem.readU64(GDT_ADDR + i * 8), g.entries[i]);
  assert.equal(mem.readU64(IDT_ADDR), 0n);
  assert.equal(writeGdt(GuestMemory.anonymous([{ base: 0x1000, size: 0x1000 }]), g).ok, false);
});

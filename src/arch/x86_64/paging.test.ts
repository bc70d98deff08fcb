import { test } from 'node:test';
import assert from 'node:assert/strict';
import { GuestMemory } from '../../memory/guest-memory.js';
import { PDE_ADDR, PDPTE_ADDR, PML4_ADDR } from './layout.js';
import { writeIdentityPageTables } from './paging.js';

/** Walk the tables like the MMU would for a 2 MiB page. */
function translate(mem: GuestMemory, va: number): number | undefined {
  const pml4e = mem.readU64(PML4_ADDR + ((va / 2 ** 39) & 511) * 8);
  if (!(pml4e & 1n)) return undefined;
  const pdpte = mem.readU64(Number(pml4e & ~0xfffn) + ((va / 2 ** 30) & 511) * 8);
  if (!(pdpte & 1n)) return undefined;
  const pde = mem.readU64(Number(pdpte & ~0xfffn) + ((va / 2 ** 21) & 511) * 8);
  if (!(pde & 1n) || !(pde & 0x80n)) return undefined;
  return Number(pde & ~0x1fffffn) + (va % 2 ** 21);
}

test('identity-maps the first GiB with 2 MiB pages', () => {
  const mem = GuestMemory.anonymous([{ base: 0, size: 0x100000 }]);
  const r = writeIdentityPageTables(mem);
  assert.ok(r.ok);
  assert.equal(r.value.cr3, PML4_ADDR);
  assert.equal(mem.readU64(PML4_ADDR), BigInt(PDPTE_ADDR) | 3n);
  assert.equal(mem.readU64(PDPTE_ADDR), BigInt(PDE_ADDR) | 3n);
  assert.equal(mem.readU64(PDE_ADDR), 0x83n);
  assert.equal(mem.readU64(PDE_ADDR + 511 * 8), BigInt(511 * 0x200000) | 0x83n);
  for (const va of [0, 0x100200, 0x1234567, 0x3fffffff]) assert.equal(translate(mem, va), va);
  assert.equal(translate(mem, 0x40000000), undefined);
});

test('4 GiB map uses four page directories', () => {
  const mem = GuestMemory.anonymous([{ base: 0, size: 0x100000 }]);
  assert.ok(writeIdentityPageTables(mem, 4).ok);
  for (const va of [0x40000000, 0xbfffffff, 0xfee00000]) assert.equal(translate(mem, va), va);
});

test('out-of-RAM tables are an error', () => {
  assert.equal(
    writeIdentityPageTables(GuestMemory.anonymous([{ base: 0, size: 0xa000 }])).ok,
    false,
  );
});

/**
 * Identity page tables for the 64-bit entry: PML4 at PML4_ADDR -> one PDPT at PDPTE_ADDR -> page
 * directories from PDE_ADDR of 2 MiB pages. The kernel only needs its image, the zero page and the
 * command line mapped until it builds its own tables (startup_64 does so at once), so 1 GiB is the
 * default; up to 4 GiB is possible, each extra GiB taking one more 4 KiB page after PDE_ADDR
 * (0xc000.. which layout.ts does not otherwise use).
 */
import type { GuestMemory } from '../../memory/guest-memory.js';
import { GuestMemoryError } from '../../util/errors.js';
import { type Result, err, ok } from '../../util/result.js';
import { PDE_ADDR, PDPTE_ADDR, PML4_ADDR } from './layout.js';

const PRESENT = 0x1n;
const WRITABLE = 0x2n;
const PAGE_SIZE_2M = 0x80n; // PS in a PDE: the entry maps a 2 MiB page
const PAGE = 0x1000;

/** Write the tables; returns the value for CR3. */
export function writeIdentityPageTables(mem: GuestMemory, gib = 1): Result<{ cr3: number }, Error> {
  if (!Number.isInteger(gib) || gib < 1 || gib > 4)
    throw new Error(`identity map of ${gib} GiB unsupported`);
  const end = PDE_ADDR + gib * PAGE;
  for (const [a, len] of [
    [PML4_ADDR, PAGE],
    [PDPTE_ADDR, PAGE],
    [PDE_ADDR, gib * PAGE],
  ] as const) {
    if (!mem.isValidRange(a, len)) {
      return err(new GuestMemoryError(`page tables at 0x${a.toString(16)} are outside guest RAM`));
    }
  }
  mem.fill(PML4_ADDR, PAGE);
  mem.fill(PDPTE_ADDR, PAGE);
  mem.fill(PDE_ADDR, end - PDE_ADDR);
  mem.writeU64(PML4_ADDR, BigInt(PDPTE_ADDR) | PRESENT | WRITABLE);
  for (let g = 0; g < gib; g++) {
    const pd = PDE_ADDR + g * PAGE;
    mem.writeU64(PDPTE_ADDR + g * 8, BigInt(pd) | PRESENT | WRITABLE);
    for (let i = 0; i < 512; i++) {
      const phys = (BigInt(g) << 30n) | (BigInt(i) << 21n);
      mem.writeU64(pd + i * 8, phys | PRESENT | WRITABLE | PAGE_SIZE_2M);
    }
  }
  return ok({ cr3: PML4_ADDR });
}

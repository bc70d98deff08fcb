/**
 * The guest's physical memory map (e820), derived from the RAM regions. The same entries feed
 * boot_params.e820_table (zero page) and the PVH start_info memmap (same type numbers).
 *
 *   [0, EBDA_START)            usable (real-mode area, our boot structures live here)
 *   [EBDA_START, 1 MiB)        reserved (EBDA, MP table, ACPI tables, legacy ROM/VGA hole)
 *   [1 MiB, end of low RAM)    usable (kernel, initrd)
 *   [4 GiB, ...)               usable
 */
import { EBDA_START, HIGH_MEMORY_START } from './layout.js';

export const E820_RAM = 1;
export const E820_RESERVED = 2;
export const E820_ACPI = 3;
export const E820_NVS = 4;

export interface E820Entry {
  addr: number;
  size: number;
  type: number;
}

/** boot_params holds at most 128 entries (E820_MAX_ENTRIES_ZEROPAGE). */
export const E820_MAX_ENTRIES = 128;

export function e820Entries(regions: ReadonlyArray<{ base: number; size: number }>): E820Entry[] {
  const out: E820Entry[] = [];
  const add = (addr: number, end: number, type: number) => {
    if (end <= addr) return;
    const last = out[out.length - 1];
    if (last && last.type === type && last.addr + last.size === addr) last.size += end - addr;
    else out.push({ addr, size: end - addr, type });
  };
  const sorted = [...regions].sort((a, b) => a.base - b.base);
  for (const r of sorted) {
    const end = r.base + r.size;
    add(r.base, Math.min(end, EBDA_START), E820_RAM);
    add(Math.max(r.base, EBDA_START), Math.min(end, HIGH_MEMORY_START), E820_RESERVED);
    add(Math.max(r.base, HIGH_MEMORY_START), end, E820_RAM);
  }
  return out;
}

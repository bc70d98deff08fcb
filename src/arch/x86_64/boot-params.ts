/**
 * The two boot-information blocks a kernel may receive:
 *  - the zero page (struct boot_params, Documentation/arch/x86/zero-page.rst and boot.rst) for
 *    the 64-bit Linux boot protocol, RSI -> ZERO_PAGE_ADDR;
 *  - the PVH start_info (xen/include/public/arch-x86/hvm/start_info.h, version 1) for the PVH
 *    32-bit entry, RBX -> PVH_START_INFO_ADDR.
 */
import type { GuestMemory } from '../../memory/guest-memory.js';
import { BOOT_FLAG_MAGIC, CAN_USE_HEAP, HDR, HDRS_MAGIC } from '../../loader/bzimage.js';
import { GuestMemoryError, ImageError } from '../../util/errors.js';
import { type Result, err, ok } from '../../util/result.js';
import { E820_MAX_ENTRIES, type E820Entry } from './e820.js';
import { PVH_MEMMAP_ADDR, PVH_START_INFO_ADDR, ZERO_PAGE_ADDR } from './layout.js';

export const ZERO_PAGE_SIZE = 4096;
/** struct boot_params offsets outside the setup header (zero-page.rst). */
export const BP = {
  acpiRsdpAddr: 0x070,
  extRamdiskImage: 0x0c0,
  extRamdiskSize: 0x0c4,
  extCmdLinePtr: 0x0c8,
  e820Entries: 0x1e8,
  e820Table: 0x2d0,
} as const;
const E820_ENTRY_SIZE = 20;
/** boot.rst: type_of_loader 0xff means "undefined" (a loader without an assigned id). */
const LOADER_TYPE_UNDEFINED = 0xff;
/** boot.rst's example: heap end at 0xe000 into the setup segment, given minus 0x200. */
const HEAP_END_PTR = 0xe000 - 0x200;
/** vid_mode 0xffff: "normal" VGA; the 64-bit entry does not touch video anyway. */
const VID_MODE_NORMAL = 0xffff;

export interface ZeroPageOptions {
  /** Setup header bytes from the bzImage (copied at 0x1f1); absent for an ELF 64-bit entry. */
  setupHeader?: Uint8Array;
  cmdlineAddr: number;
  initrd?: { addr: number; size: number };
  e820: E820Entry[];
  /** Physical address of the ACPI RSDP, when ACPI tables are built (else the kernel scans). */
  rsdpAddr?: number;
}

/** Build struct boot_params (4096 bytes). */
export function buildZeroPage(o: ZeroPageOptions): Result<Uint8Array, ImageError> {
  if (o.e820.length > E820_MAX_ENTRIES) {
    return err(
      new ImageError(`too many e820 entries (${o.e820.length}, at most ${E820_MAX_ENTRIES})`),
    );
  }
  const page = new Uint8Array(ZERO_PAGE_SIZE);
  const dv = new DataView(page.buffer);
  if (o.setupHeader) {
    if (HDR.setupSects + o.setupHeader.length > BP.e820Table) {
      return err(new ImageError('setup header is too long for the zero page'));
    }
    page.set(o.setupHeader, HDR.setupSects);
  } else {
    // No bzImage header (ELF vmlinux, 64-bit entry): give the kernel the fields it checks.
    dv.setUint16(HDR.bootFlag, BOOT_FLAG_MAGIC, true);
    dv.setUint32(HDR.header, HDRS_MAGIC, true);
    dv.setUint32(HDR.kernelAlignment, 0x100_0000, true);
  }
  page[HDR.typeOfLoader] = LOADER_TYPE_UNDEFINED;
  page[HDR.loadflags] = page[HDR.loadflags]! | CAN_USE_HEAP;
  dv.setUint16(HDR.heapEndPtr, HEAP_END_PTR, true);
  dv.setUint16(HDR.vidMode, VID_MODE_NORMAL, true);
  setSplit(dv, HDR.cmdLinePtr, BP.extCmdLinePtr, o.cmdlineAddr);
  if (o.initrd) {
    setSplit(dv, HDR.ramdiskImage, BP.extRamdiskImage, o.initrd.addr);
    setSplit(dv, HDR.ramdiskSize, BP.extRamdiskSize, o.initrd.size);
  }
  if (o.rsdpAddr !== undefined) dv.setBigUint64(BP.acpiRsdpAddr, BigInt(o.rsdpAddr), true);
  page[BP.e820Entries] = o.e820.length;
  o.e820.forEach((e, i) => {
    const at = BP.e820Table + i * E820_ENTRY_SIZE;
    dv.setBigUint64(at, BigInt(e.addr), true);
    dv.setBigUint64(at + 8, BigInt(e.size), true);
    dv.setUint32(at + 16, e.type, true);
  });
  return ok(page);
}

export function writeZeroPage(mem: GuestMemory, o: ZeroPageOptions): Result<void, Error> {
  const page = buildZeroPage(o);
  if (!page.ok) return page;
  return writeChecked(mem, ZERO_PAGE_ADDR, page.value, 'zero page');
}

/** A 64-bit value split into a low u32 field and a high u32 field (ext_* in boot_params). */
function setSplit(dv: DataView, lowOff: number, highOff: number, v: number): void {
  dv.setUint32(lowOff, v % 0x1_0000_0000, true);
  dv.setUint32(highOff, Math.floor(v / 0x1_0000_0000), true);
}

// ---- PVH -------------------------------------------------------------------------------------

export const PVH_START_INFO_MAGIC = 0x336ec578;
const START_INFO_SIZE = 56;
const MEMMAP_ENTRY_SIZE = 24;
const MODLIST_ENTRY_SIZE = 32;
/** The module list takes the last 32 bytes below the zero page (one module: the initrd). */
export const PVH_MODLIST_ADDR = ZERO_PAGE_ADDR - MODLIST_ENTRY_SIZE;
/** Entries that fit between PVH_MEMMAP_ADDR and the module list. */
export const PVH_MEMMAP_MAX = Math.floor((PVH_MODLIST_ADDR - PVH_MEMMAP_ADDR) / MEMMAP_ENTRY_SIZE);

export interface PvhOptions {
  cmdlineAddr: number;
  initrd?: { addr: number; size: number };
  e820: E820Entry[];
  rsdpAddr?: number;
}

/** Write struct hvm_start_info, its memmap (hvm_memmap_table_entry) and module list. */
export function writePvhStartInfo(mem: GuestMemory, o: PvhOptions): Result<void, Error> {
  if (o.e820.length > PVH_MEMMAP_MAX) {
    return err(
      new ImageError(`too many memory map entries (${o.e820.length}, at most ${PVH_MEMMAP_MAX})`),
    );
  }
  const info = new Uint8Array(START_INFO_SIZE);
  const dv = new DataView(info.buffer);
  dv.setUint32(0, PVH_START_INFO_MAGIC, true);
  dv.setUint32(4, 1, true); // version 1: has memmap_paddr / memmap_entries
  dv.setUint32(8, 0, true); // flags
  dv.setUint32(12, o.initrd ? 1 : 0, true); // nr_modules
  dv.setBigUint64(16, o.initrd ? BigInt(PVH_MODLIST_ADDR) : 0n, true);
  dv.setBigUint64(24, BigInt(o.cmdlineAddr), true);
  dv.setBigUint64(32, BigInt(o.rsdpAddr ?? 0), true);
  dv.setBigUint64(40, BigInt(PVH_MEMMAP_ADDR), true);
  dv.setUint32(48, o.e820.length, true);

  const map = new Uint8Array(o.e820.length * MEMMAP_ENTRY_SIZE);
  const mv = new DataView(map.buffer);
  o.e820.forEach((e, i) => {
    mv.setBigUint64(i * MEMMAP_ENTRY_SIZE, BigInt(e.addr), true);
    mv.setBigUint64(i * MEMMAP_ENTRY_SIZE + 8, BigInt(e.size), true);
    mv.setUint32(i * MEMMAP_ENTRY_SIZE + 16, e.type, true); // same numbering as e820
  });
  const r1 = writeChecked(mem, PVH_START_INFO_ADDR, info, 'PVH start_info');
  if (!r1.ok) return r1;
  const r2 = writeChecked(mem, PVH_MEMMAP_ADDR, map, 'PVH memory map');
  if (!r2.ok || !o.initrd) return r2;
  const mod = new Uint8Array(MODLIST_ENTRY_SIZE);
  const dm = new DataView(mod.buffer);
  dm.setBigUint64(0, BigInt(o.initrd.addr), true);
  dm.setBigUint64(8, BigInt(o.initrd.size), true); // cmdline_paddr and reserved stay 0
  return writeChecked(mem, PVH_MODLIST_ADDR, mod, 'PVH module list');
}

export function writeChecked(
  mem: GuestMemory,
  addr: number,
  bytes: Uint8Array,
  what: string,
): Result<void, Error> {
  if (!mem.isValidRange(addr, bytes.length)) {
    return err(
      new GuestMemoryError(
        `${what} at 0x${addr.toString(16)} (+${bytes.length}) is outside guest RAM`,
      ),
    );
  }
  mem.write(addr, bytes);
  return ok(undefined);
}

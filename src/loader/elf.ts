/**
 * ELF kernel parsing (an uncompressed vmlinux or a tiny freestanding guest). Reports the
 * PT_LOAD segments and the entry: the PVH entry from the Xen ELF note when present (32-bit
 * protected-mode entry, xen/include/public/elfnote.h XEN_ELFNOTE_PHYS32_ENTRY), else e_entry.
 * ELF64 x86_64 images, and (helper P, issue 15) ELF32 i386 images as QEMU takes them: an ELF32
 * kernel is entered through its PVH note only, so one without the note is refused (it would be
 * a multiboot kernel to QEMU, which we do not load). Both classes get the same checks.
 * Every offset and size comes from the file and is checked against it before use; 64-bit values
 * that do not fit a safe integer are rejected, so no arithmetic here can overflow.
 */
import { ImageError } from '../util/errors.js';
import { type Result, err, ok } from '../util/result.js';

export const ELF_MAGIC = 0x464c457f; // "\x7fELF" as a little-endian u32
const ELFCLASS32 = 1;
const ELFCLASS64 = 2;
const ELFDATA2LSB = 1;
const EV_CURRENT = 1;
const ET_EXEC = 2;
const ET_DYN = 3;
const EM_386 = 3;
const EM_X86_64 = 62;

/** Where one ELF class keeps what we read (the ELF specification's Elf32/Elf64 layouts). */
interface ElfLayout {
  name: string;
  machine: number;
  machineName: string;
  ehdrSize: number;
  phdrSize: number;
  /** Reads an address-sized field (undefined: 2^53 or more). */
  word(b: Uint8Array, off: number): number | undefined;
  entry: number;
  phoff: number;
  phentsize: number;
  phnum: number;
  /** Program header fields, from the header's start. */
  pOffset: number;
  pPaddr: number;
  pFilesz: number;
  pMemsz: number;
}

const ELF64: ElfLayout = {
  name: 'ELF64',
  machine: EM_X86_64,
  machineName: 'x86_64',
  ehdrSize: 64,
  phdrSize: 56,
  word: (b, off) => rd64(b, off),
  entry: 24,
  phoff: 32,
  phentsize: 54,
  phnum: 56,
  pOffset: 8,
  pPaddr: 24,
  pFilesz: 32,
  pMemsz: 40,
};

const ELF32: ElfLayout = {
  name: 'ELF32',
  machine: EM_386,
  machineName: 'i386',
  ehdrSize: 52,
  phdrSize: 32,
  word: (b, off) => rd32(b, off),
  entry: 24,
  phoff: 28,
  phentsize: 42,
  phnum: 44,
  pOffset: 4,
  pPaddr: 12,
  pFilesz: 16,
  pMemsz: 20,
};
export const PT_LOAD = 1;
export const PT_NOTE = 4;
/** XEN_ELFNOTE_PHYS32_ENTRY: the 32-bit physical PVH entry point. */
export const XEN_ELFNOTE_PHYS32_ENTRY = 18;

export interface ElfSegment {
  /** Guest-physical load address. */
  paddr: number;
  offset: number;
  filesz: number;
  memsz: number;
}

export interface ElfInfo {
  segments: ElfSegment[];
  /** e_entry (the 64-bit entry for a vmlinux: phys_startup_64). */
  entry: number;
  /** The PVH 32-bit entry from the Xen note, when the kernel has one. */
  pvhEntry?: number;
}

export function isElf(image: Uint8Array): boolean {
  return image.length >= 4 && rd32(image, 0) === ELF_MAGIC;
}

export function parseElf(image: Uint8Array): Result<ElfInfo, ImageError> {
  const fail = (m: string) => err(new ImageError(`ELF: ${m}`));
  if (image.length < 5) return fail(`image is too short (${image.length} bytes) for an ELF header`);
  if (!isElf(image)) return fail('bad magic');
  const L = image[4] === ELFCLASS64 ? ELF64 : image[4] === ELFCLASS32 ? ELF32 : undefined;
  if (!L)
    return fail(`unknown ELF class ${image[4]} (EI_CLASS: neither ELFCLASS32 nor ELFCLASS64)`);
  if (image.length < L.ehdrSize)
    return fail(`image is too short (${image.length} bytes) for an ${L.name} header`);
  if (image[5] !== ELFDATA2LSB) return fail('not little-endian');
  if (image[6] !== EV_CURRENT) return fail('unknown ELF version');
  const type = rd16(image, 16);
  if (type !== ET_EXEC && type !== ET_DYN) return fail(`not an executable (e_type ${type})`);
  if (rd16(image, 18) !== L.machine)
    return fail(`${L.name}: not an ${L.machineName} image (e_machine ${rd16(image, 18)})`);
  const PHDR_SIZE = L.phdrSize;
  const entry = L.word(image, L.entry);
  const phoff = L.word(image, L.phoff);
  const phentsize = rd16(image, L.phentsize);
  const phnum = rd16(image, L.phnum);
  if (entry === undefined) return fail('entry point is out of range');
  if (phentsize !== PHDR_SIZE) return fail(`unexpected program header size ${phentsize}`);
  // phnum 0xffff (PN_XNUM) moves the real count to a section header: no kernel needs that.
  if (phnum === 0 || phnum === 0xffff) return fail(`unsupported program header count ${phnum}`);
  if (phoff === undefined || phoff > image.length || phnum * PHDR_SIZE > image.length - phoff) {
    return fail(
      `program headers (${phnum} at offset ${phoff ?? 'huge'}) extend past the end of the file`,
    );
  }

  const segments: ElfSegment[] = [];
  let pvhEntry: number | undefined;
  for (let i = 0; i < phnum; i++) {
    const ph = phoff + i * PHDR_SIZE;
    const ptype = rd32(image, ph);
    if (ptype !== PT_LOAD && ptype !== PT_NOTE) continue;
    const offset = L.word(image, ph + L.pOffset);
    const paddr = L.word(image, ph + L.pPaddr);
    const filesz = L.word(image, ph + L.pFilesz);
    const memsz = L.word(image, ph + L.pMemsz);
    if (
      offset === undefined ||
      paddr === undefined ||
      filesz === undefined ||
      memsz === undefined
    ) {
      return fail(`program header ${i} has a value past 2^53`);
    }
    if (offset > image.length || filesz > image.length - offset) {
      return fail(
        `segment ${i} (offset ${offset}, ${filesz} bytes) extends past the end of the file`,
      );
    }
    if (ptype === PT_NOTE) {
      const r = findPvhEntry(image, offset, filesz);
      if (!r.ok) return fail(`segment ${i}: ${r.error.message}`);
      if (r.value !== undefined) pvhEntry = r.value;
      continue;
    }
    if (memsz < filesz) return fail(`segment ${i} has memsz ${memsz} < filesz ${filesz}`);
    if (memsz === 0) continue;
    if (!Number.isSafeInteger(paddr + memsz)) return fail(`segment ${i} ends past 2^53`);
    segments.push({ paddr, offset, filesz, memsz });
  }
  if (segments.length === 0) return fail('no loadable segments');
  // Overlapping segments would make the load order matter: refuse them.
  const sorted = [...segments].sort((a, b) => a.paddr - b.paddr);
  for (let i = 1; i < sorted.length; i++) {
    const a = sorted[i - 1]!;
    const b = sorted[i]!;
    if (a.paddr + a.memsz > b.paddr) {
      return fail(`segments at 0x${a.paddr.toString(16)} and 0x${b.paddr.toString(16)} overlap`);
    }
  }
  if (L === ELF32 && pvhEntry === undefined)
    return fail(
      'a 32-bit (ELF32) kernel needs a PVH entry note (Xen XEN_ELFNOTE_PHYS32_ENTRY): multiboot kernels are not supported',
    );
  return ok(pvhEntry === undefined ? { segments, entry } : { segments, entry, pvhEntry });
}

/**
 * Walk the notes in [off, off+len) (each: namesz, descsz, type, name and desc padded to 4) and
 * return the PVH entry from a "Xen" note of type 18. Linux emits it as a pointer-sized value.
 */
function findPvhEntry(
  b: Uint8Array,
  off: number,
  len: number,
): Result<number | undefined, ImageError> {
  const end = off + len;
  let p = off;
  let found: number | undefined;
  while (end - p >= 12) {
    const namesz = rd32(b, p);
    const descsz = rd32(b, p + 4);
    const type = rd32(b, p + 8);
    const nameAt = p + 12;
    const descAt = nameAt + align4(namesz);
    const next = descAt + align4(descsz);
    if (next > end) return err(new ImageError(`note at offset ${p} extends past its segment`));
    if (type === XEN_ELFNOTE_PHYS32_ENTRY && namesz === 4 && isXenName(b, nameAt)) {
      let v: number | undefined;
      if (descsz === 4) v = rd32(b, descAt);
      else if (descsz === 8) v = rd64(b, descAt);
      if (v === undefined || v > 0xffff_ffff) {
        return err(new ImageError(`PVH entry note has a bad size (${descsz}) or value`));
      }
      found = v;
    }
    p = next;
  }
  return ok(found);
}

function isXenName(b: Uint8Array, at: number): boolean {
  return b[at] === 0x58 && b[at + 1] === 0x65 && b[at + 2] === 0x6e && b[at + 3] === 0; // "Xen\0"
}

const align4 = (n: number) => n + ((4 - (n % 4)) % 4);

function rd16(b: Uint8Array, off: number): number {
  return b[off]! | (b[off + 1]! << 8);
}
function rd32(b: Uint8Array, off: number): number {
  return (b[off]! | (b[off + 1]! << 8) | (b[off + 2]! << 16) | (b[off + 3]! << 24)) >>> 0;
}
/** A u64 field as a number, or undefined when it is 2^53 or more. */
function rd64(b: Uint8Array, off: number): number | undefined {
  const hi = rd32(b, off + 4);
  if (hi >= 0x20_0000) return undefined;
  return hi * 0x1_0000_0000 + rd32(b, off);
}

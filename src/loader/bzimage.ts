/**
 * bzImage parsing (Linux x86 boot protocol, Documentation/arch/x86/boot.rst). The parser only
 * reads and reports; the VMM loads the protected-mode payload and writes the zero page.
 * Every field read is bounds-checked: a hostile image yields an ImageError, never an exception.
 */
import { ImageError } from '../util/errors.js';
import { type Result, err, ok } from '../util/result.js';

/** Offsets inside the image (and inside struct boot_params, where the header is copied). */
export const HDR = {
  setupSects: 0x1f1,
  syssize: 0x1f4,
  vidMode: 0x1fa,
  bootFlag: 0x1fe,
  jump: 0x200,
  header: 0x202,
  version: 0x206,
  typeOfLoader: 0x210,
  loadflags: 0x211,
  ramdiskImage: 0x218,
  ramdiskSize: 0x21c,
  heapEndPtr: 0x224,
  cmdLinePtr: 0x228,
  initrdAddrMax: 0x22c,
  kernelAlignment: 0x230,
  relocatableKernel: 0x234,
  xloadflags: 0x236,
  cmdlineSize: 0x238,
  prefAddress: 0x258,
  initSize: 0x260,
  /** One past the last field we know (kernel_info_offset, protocol 2.15). */
  end: 0x26c,
} as const;

/** "HdrS" read as a little-endian u32. */
export const HDRS_MAGIC = 0x53726448;
export const BOOT_FLAG_MAGIC = 0xaa55;
/** Protocol 2.12 introduced xloadflags (and with it the 64-bit entry we use). */
export const MIN_PROTOCOL_VERSION = 0x020c;
/** loadflags bit 0: the protected-mode kernel is loaded at 0x100000. */
export const LOADED_HIGH = 0x01;
/** loadflags bit 7: heap_end_ptr is valid. */
export const CAN_USE_HEAP = 0x80;
/** xloadflags bit 0: the kernel has the 64-bit entry at load address + 0x200. */
export const XLF_KERNEL_64 = 0x01;
/** A bzImage's protected-mode part is loaded at 1 MiB (boot.rst, "Loading the rest"). */
export const BZIMAGE_LOAD_ADDR = 0x100000;
/** The 64-bit entry point is 0x200 past the start of the protected-mode kernel. */
export const ENTRY_64_OFFSET = 0x200;
/** The zero page's copy of the header may run up to edd_mbr_sig_buffer at 0x290. */
const HDR_COPY_LIMIT = 0x290;

export interface BzImageInfo {
  protocolVersion: number;
  /** Number of 512-byte setup sectors (after the boot sector); 0 in the image means 4. */
  setupSects: number;
  /** Bytes [0x1f1, header end) of the image, to copy into the zero page at 0x1f1. */
  setupHeader: Uint8Array;
  /** Where the protected-mode kernel starts in the file, and its length up to EOF. */
  payloadOffset: number;
  payloadLength: number;
  loadAddress: number;
  /** 64-bit entry point (loadAddress + 0x200). */
  entry: number;
  loadflags: number;
  xloadflags: number;
  /** Linear memory the kernel needs from its load address while it decompresses itself. */
  initSize: number;
  prefAddress: bigint;
  kernelAlignment: number;
  relocatable: boolean;
  /** Maximum command line length the kernel accepts (without the NUL). */
  cmdlineSize: number;
  /** Highest address the initrd's last byte may occupy. */
  initrdAddrMax: number;
}

/** True when the image carries the boot-protocol header magic ("HdrS" at 0x202). */
export function isBzImage(image: Uint8Array): boolean {
  return image.length >= HDR.header + 4 && u32(image, HDR.header) === HDRS_MAGIC;
}

export function parseBzImage(image: Uint8Array): Result<BzImageInfo, ImageError> {
  const fail = (m: string) => err(new ImageError(`bzImage: ${m}`));
  // The fields we read go up to init_size (0x264); anything shorter is not a modern bzImage.
  if (image.length < HDR.initSize + 4) {
    return fail(`image is too short (${image.length} bytes) to hold a setup header`);
  }
  if (u32(image, HDR.header) !== HDRS_MAGIC) return fail('no "HdrS" magic at 0x202');
  if (u16(image, HDR.bootFlag) !== BOOT_FLAG_MAGIC) return fail('no 0xAA55 boot flag at 0x1fe');
  const version = u16(image, HDR.version);
  if (version < MIN_PROTOCOL_VERSION) {
    const v = `${version >> 8}.${(version & 0xff).toString().padStart(2, '0')}`;
    return fail(`boot protocol ${v} is too old (2.12 or newer is needed for the 64-bit entry)`);
  }
  const loadflags = image[HDR.loadflags]!;
  if ((loadflags & LOADED_HIGH) === 0)
    return fail('not a bzImage (LOADED_HIGH is clear: a zImage)');
  const xloadflags = u16(image, HDR.xloadflags);
  if ((xloadflags & XLF_KERNEL_64) === 0)
    return fail('kernel has no 64-bit entry (XLF_KERNEL_64 clear)');

  // boot.rst: "If this field is 0, the real value is 4." The boot sector is one more sector.
  const rawSects = image[HDR.setupSects]!;
  const setupSects = rawSects === 0 ? 4 : rawSects;
  const payloadOffset = (setupSects + 1) * 512;
  if (payloadOffset >= image.length) {
    return fail(
      `setup (${payloadOffset} bytes) extends to or past the end of the file (${image.length} bytes)`,
    );
  }
  const payloadLength = image.length - payloadOffset;
  // syssize counts 16-byte paragraphs of the protected-mode code; the build pads to it exactly.
  const syssizeBytes = u32(image, HDR.syssize) * 16;
  if (syssizeBytes > payloadLength) {
    return fail(
      `payload (syssize ${syssizeBytes} bytes) extends past the end of the file (${payloadLength} bytes after setup)`,
    );
  }
  // The header ends at 0x202 + the byte at 0x201 (the jump's displacement), per boot.rst.
  // (payloadOffset >= 1024 < image.length, so the copy stays inside the file.)
  const hdrEnd = Math.min(HDR.header + image[HDR.jump + 1]!, HDR_COPY_LIMIT);
  const setupHeader = image.slice(HDR.setupSects, Math.max(hdrEnd, HDR.initSize + 4));

  return ok({
    protocolVersion: version,
    setupSects,
    setupHeader,
    payloadOffset,
    payloadLength,
    loadAddress: BZIMAGE_LOAD_ADDR,
    entry: BZIMAGE_LOAD_ADDR + ENTRY_64_OFFSET,
    loadflags,
    xloadflags,
    initSize: u32(image, HDR.initSize),
    prefAddress: new DataView(image.buffer, image.byteOffset, image.length).getBigUint64(
      HDR.prefAddress,
      true,
    ),
    kernelAlignment: u32(image, HDR.kernelAlignment),
    relocatable: image[HDR.relocatableKernel]! !== 0,
    cmdlineSize: u32(image, HDR.cmdlineSize),
    initrdAddrMax: u32(image, HDR.initrdAddrMax),
  });
}

function u16(b: Uint8Array, off: number): number {
  return b[off]! | (b[off + 1]! << 8);
}
function u32(b: Uint8Array, off: number): number {
  return (b[off]! | (b[off + 1]! << 8) | (b[off + 2]! << 16) | (b[off + 3]! << 24)) >>> 0;
}

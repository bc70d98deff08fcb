/**
 * Kernel image headers (src/loader/): bzImage setup headers and ELF64 images (program headers,
 * PT_NOTE with the PVH entry), built valid and then mutated (fields set to edge values, bytes
 * flipped, the file cut short), plus the kernel command line. Checks: the parsers return a
 * Result and never throw; what they accept is consistent with the file (payload inside it,
 * header copy inside the zero page's window, segments inside the file, not overlapping, below
 * 2^53); a command line never passes its capacity and holds only printable ASCII.
 */
import { parseBzImage, HDR, HDRS_MAGIC } from '../../src/loader/bzimage.js';
import { Cmdline } from '../../src/loader/cmdline.js';
import { parseElf } from '../../src/loader/elf.js';
import { fail, type Prng, type Session, type Target } from '../core.js';

const EDGE32 = [0, 1, 0x7fff_ffff, 0x8000_0000, 0xffff_ffff, 0x10_0000, 0xfff];

function mutateBytes(rng: Prng, b: Uint8Array, hot: readonly number[], n: number): void {
  const dv = new DataView(b.buffer, b.byteOffset, b.byteLength);
  for (let i = 0; i < n; i++) {
    const at = rng.chance(0.7) && hot.length ? rng.pick(hot) : rng.below(b.length);
    if (at >= b.length) continue;
    switch (rng.below(4)) {
      case 0:
        b[at] = rng.u32() & 0xff;
        break;
      case 1:
        if (at + 2 <= b.length) dv.setUint16(at, rng.pick([0, 0xffff, rng.u32() & 0xffff]), true);
        break;
      case 2:
        if (at + 4 <= b.length) dv.setUint32(at, rng.pick(EDGE32), true);
        break;
      default:
        b[at]! ^= 1 << rng.below(8);
    }
  }
}

function bzImage(rng: Prng): Uint8Array {
  const sects = rng.chance(0.1) ? 0 : 1 + rng.below(16);
  const setup = ((sects === 0 ? 4 : sects) + 1) * 512;
  const payload = rng.chance(0.05) ? 0 : 16 * (1 + rng.below(256));
  const img = new Uint8Array(setup + payload + (rng.chance(0.5) ? rng.below(64) : 0));
  const dv = new DataView(img.buffer);
  img[HDR.setupSects] = sects;
  dv.setUint32(HDR.syssize, payload / 16, true);
  dv.setUint16(HDR.bootFlag, 0xaa55, true);
  img[HDR.jump] = 0xeb;
  img[HDR.jump + 1] = rng.pick([0x66, 0x6a, 0x80, 0xff, rng.below(256)]);
  dv.setUint32(HDR.header, HDRS_MAGIC, true);
  dv.setUint16(HDR.version, rng.pick([0x020c, 0x020f, 0x0215, 0x0200, 0xffff]), true);
  img[HDR.loadflags] = 0x01 | (rng.chance(0.5) ? 0x80 : 0);
  dv.setUint16(HDR.xloadflags, 0x01 | (rng.below(0x20) << 1), true);
  dv.setUint32(HDR.kernelAlignment, rng.pick([0x20_0000, 0x100_0000, 0, 3]), true);
  img[HDR.relocatableKernel] = rng.below(2);
  dv.setUint32(HDR.cmdlineSize, rng.pick([2047, 0, 0xffff_ffff]), true);
  dv.setBigUint64(HDR.prefAddress, BigInt(rng.pick([0x100_0000, 0])), true);
  dv.setUint32(HDR.initSize, rng.pick([0x200_0000, 0, 0xffff_ffff]), true);
  return img;
}

const BZ_HOT = Object.values(HDR).flatMap((o) => [o, o + 1, o + 2, o + 3]);

export const bzImageTarget: Target = {
  name: 'bzimage',
  what: 'loader/bzimage.ts setup headers: versions, flags, setup_sects, syssize, truncation',
  cases: 100_000,
  session: 5000,
  open(): Session {
    let accepted = 0;
    let refused = 0;
    return {
      stats: () => ({ accepted, refused }),
      run(rng: Prng) {
        let img = bzImage(rng);
        if (rng.chance(0.8)) mutateBytes(rng, img, BZ_HOT, 1 + rng.below(4));
        if (rng.chance(0.1)) img = img.subarray(0, rng.below(img.length + 1));
        if (rng.chance(0.05)) {
          img = new Uint8Array(rng.below(4096));
          rng.fill(img);
        }
        const r = parseBzImage(img);
        if (!r.ok) {
          refused++;
          if (!(r.error instanceof Error)) fail('bzimage: an error that is not an Error');
          return;
        }
        accepted++;
        const i = r.value;
        if (i.payloadOffset + i.payloadLength !== img.length || i.payloadOffset >= img.length)
          fail(`bzimage: payload [${i.payloadOffset}, +${i.payloadLength}) vs file ${img.length}`);
        if (i.payloadOffset !== (i.setupSects + 1) * 512)
          fail('bzimage: payload offset vs setup_sects');
        if (
          i.setupHeader.length < HDR.initSize + 4 - HDR.setupSects ||
          HDR.setupSects + i.setupHeader.length > 0x290
        )
          fail(`bzimage: setup header copy of ${i.setupHeader.length} bytes`);
        if (i.protocolVersion < 0x020c) fail('bzimage: accepted an old protocol');
      },
    };
  },
};

/** An ELF64 x86_64 executable: header, `phnum` program headers, segments, maybe a PVH note. */
function elf(rng: Prng): { img: Uint8Array; hot: number[] } {
  const phnum = 1 + rng.below(4);
  const phoff = 64;
  const noteAt = phoff + 56 * phnum;
  const note = rng.chance(0.5);
  const dataAt = noteAt + (note ? 24 : 0);
  const segLen = 16 + rng.below(256);
  const img = new Uint8Array(dataAt + segLen * phnum);
  const dv = new DataView(img.buffer);
  dv.setUint32(0, 0x464c457f, true);
  img[4] = 2;
  img[5] = 1;
  img[6] = 1;
  dv.setUint16(16, rng.chance(0.9) ? 2 : 3, true);
  dv.setUint16(18, 62, true);
  dv.setBigUint64(24, 0x100_0000n, true);
  dv.setBigUint64(32, BigInt(phoff), true);
  dv.setUint16(52, 64, true);
  dv.setUint16(54, 56, true);
  dv.setUint16(56, phnum, true);
  const hot = [16, 18, 24, 28, 32, 36, 54, 56];
  for (let i = 0; i < phnum; i++) {
    const ph = phoff + 56 * i;
    const isNote = note && i === 0;
    dv.setUint32(ph, isNote ? 4 : 1, true);
    dv.setBigUint64(ph + 8, BigInt(isNote ? noteAt : dataAt + segLen * i), true);
    dv.setBigUint64(ph + 24, BigInt(0x100_0000 + 0x10_0000 * i), true);
    dv.setBigUint64(ph + 32, BigInt(isNote ? 24 : segLen), true);
    dv.setBigUint64(ph + 40, BigInt(isNote ? 24 : segLen + rng.below(4096)), true);
    hot.push(ph, ph + 8, ph + 12, ph + 24, ph + 28, ph + 32, ph + 36, ph + 40, ph + 44);
  }
  if (note) {
    dv.setUint32(noteAt, 4, true); // namesz
    dv.setUint32(noteAt + 4, rng.chance(0.5) ? 4 : 8, true); // descsz
    dv.setUint32(noteAt + 8, 18, true); // XEN_ELFNOTE_PHYS32_ENTRY
    img.set([0x58, 0x65, 0x6e, 0], noteAt + 12);
    dv.setUint32(noteAt + 16, 0x100_0000, true);
    hot.push(noteAt, noteAt + 4, noteAt + 8, noteAt + 16, noteAt + 20);
  }
  return { img, hot };
}

export const elfTarget: Target = {
  name: 'elf',
  what: 'loader/elf.ts ELF64 headers, program headers, PVH notes; loader/cmdline.ts',
  cases: 100_000,
  session: 5000,
  open(): Session {
    let accepted = 0;
    let refused = 0;
    return {
      stats: () => ({ accepted, refused }),
      run(rng: Prng) {
        let { img, hot } = elf(rng);
        if (rng.chance(0.8)) mutateBytes(rng, img, hot, 1 + rng.below(4));
        if (rng.chance(0.1)) img = img.subarray(0, rng.below(img.length + 1));
        const r = parseElf(img);
        if (!r.ok) refused++;
        if (r.ok) {
          accepted++;
          const segs = [...r.value.segments].sort((a, b) => a.paddr - b.paddr);
          if (segs.length === 0) fail('elf: accepted with no segments');
          for (const [i, s] of segs.entries()) {
            if (s.offset + s.filesz > img.length) fail(`elf: segment past the file`);
            if (s.memsz < s.filesz) fail('elf: memsz < filesz');
            if (!Number.isSafeInteger(s.paddr + s.memsz)) fail('elf: segment end past 2^53');
            const prev = segs[i - 1];
            if (prev && prev.paddr + prev.memsz > s.paddr)
              fail('elf: overlapping segments accepted');
          }
          const pvh = r.value.pvhEntry;
          if (pvh !== undefined && (pvh < 0 || pvh > 0xffff_ffff)) fail(`elf: PVH entry ${pvh}`);
        }
        // The kernel command line, from user-supplied pieces.
        const cap = rng.pick([1, 2, 16, 256, 2048]);
        const c = new Cmdline(cap);
        const piece = () => {
          const s = Array.from({ length: rng.below(rng.chance(0.1) ? 3000 : 12) }, () =>
            String.fromCharCode(rng.chance(0.95) ? 0x20 + rng.below(0x5f) : rng.below(0x110)),
          ).join('');
          return s;
        };
        for (let i = 0, n = rng.below(6); i < n; i++) {
          if (rng.chance(0.5)) c.insert(piece(), piece());
          else c.insertStr(piece());
        }
        const bytes = c.toBytes();
        if (bytes.length > cap)
          fail(`cmdline: ${bytes.length} bytes with the NUL, capacity ${cap}`);
        if (bytes[bytes.length - 1] !== 0) fail('cmdline: not NUL-terminated');
        for (let i = 0; i < bytes.length - 1; i++)
          if (bytes[i]! < 0x20 || bytes[i]! > 0x7e)
            fail(`cmdline: byte 0x${bytes[i]!.toString(16)}`);
      },
    };
  },
};

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { makeElf, prng } from '../../test/fixtures/kernel-images.js';
import { ImageError } from '../util/errors.js';
import { isElf, parseElf } from './elf.js';

function parseErr(img: Uint8Array): string {
  const r = parseElf(img);
  assert.equal(r.ok, false);
  if (r.ok) throw new Error('unreachable');
  assert.ok(r.error instanceof ImageError);
  return r.error.message;
}
const dv = (b: Uint8Array) => new DataView(b.buffer, b.byteOffset, b.byteLength);

test('valid ELF with a PVH note (8-byte and 4-byte desc)', () => {
  for (const pvhDescSize of [8, 4] as const) {
    const img = makeElf({
      entry: 0x1000000,
      pvhEntry: 0x1000123,
      pvhDescSize,
      segments: [
        { paddr: 0x1000000, data: new Uint8Array(100).fill(1), memsz: 0x3000 },
        { paddr: 0x1200000, data: new Uint8Array(10).fill(2) },
      ],
    });
    assert.ok(isElf(img));
    const r = parseElf(img);
    assert.ok(r.ok, r.ok ? '' : r.error.message);
    assert.equal(r.value.entry, 0x1000000);
    assert.equal(r.value.pvhEntry, 0x1000123);
    assert.equal(r.value.segments.length, 2);
    assert.deepEqual(
      r.value.segments.map((s) => [s.paddr, s.filesz, s.memsz]),
      [
        [0x1000000, 100, 0x3000],
        [0x1200000, 10, 10],
      ],
    );
  }
});

test('ELF without a note reports only e_entry', () => {
  const r = parseElf(makeElf({ entry: 0x100010 }));
  assert.ok(r.ok);
  assert.equal(r.value.pvhEntry, undefined);
  assert.equal(r.value.entry, 0x100010);
});

test('wrong class / machine / truncated header', () => {
  const a = makeElf();
  a[4] = 3;
  assert.match(parseErr(a), /unknown ELF class 3/);
  const a32 = makeElf();
  a32[4] = 1; // an ELF64 x86_64 header read as ELF32: e_machine 62 is not i386
  assert.match(parseErr(a32), /ELF32: not an i386 image/);
  const b = makeElf();
  dv(b).setUint16(18, 3, true);
  assert.match(parseErr(b), /x86_64/);
  assert.match(parseErr(makeElf().subarray(0, 40)), /too short/);
});

test('PT_LOAD past EOF', () => {
  const img = makeElf();
  // first phdr is the PT_LOAD (no note): p_filesz at 64 + 32
  dv(img).setBigUint64(64 + 32, 0x10000n, true);
  assert.match(parseErr(img), /past the end/);
  const img2 = makeElf();
  dv(img2).setBigUint64(64 + 8, 0xffff_ffff_ffff_0000n, true); // p_offset huge
  assert.match(parseErr(img2), /2\^53|past the end/);
});

test('memsz < filesz', () => {
  const img = makeElf();
  dv(img).setBigUint64(64 + 40, 1n, true);
  assert.match(parseErr(img), /memsz/);
});

test('huge phnum / phoff', () => {
  const img = makeElf();
  dv(img).setUint16(56, 0xfffe, true);
  assert.match(parseErr(img), /program headers/);
  const img2 = makeElf();
  dv(img2).setBigUint64(32, 0xffff_ffff_ffff_ffffn, true);
  assert.match(parseErr(img2), /program headers/);
});

test('overlapping segments', () => {
  const img = makeElf({
    segments: [
      { paddr: 0x100000, data: new Uint8Array(16), memsz: 0x2000 },
      { paddr: 0x101000, data: new Uint8Array(16) },
    ],
  });
  assert.match(parseErr(img), /overlap/);
});

test('note with bad sizes', () => {
  const img = makeElf({ pvhEntry: 0x100000 });
  const note = 64 + 2 * 56;
  dv(img).setUint32(note, 0xffff_fff0, true); // namesz runs past the segment
  assert.match(parseErr(img), /note/);
  const img2 = makeElf({ pvhEntry: 0x100000 });
  dv(img2).setUint32(note + 4, 2, true); // descsz 2 is not a pointer size
  assert.match(parseErr(img2), /PVH entry note/);
});

test('random mutations never throw', () => {
  const base = makeElf({
    pvhEntry: 0x100040,
    segments: [
      { paddr: 0x100000, data: new Uint8Array(64).fill(0x90), memsz: 0x1000 },
      { paddr: 0x200000, data: new Uint8Array(8) },
    ],
  });
  const rnd = prng(0xe1f);
  let oks = 0;
  for (let i = 0; i < 5000; i++) {
    const len = rnd() % 4 === 0 ? rnd() % (base.length + 1) : base.length;
    const img = base.slice(0, len);
    const flips = 1 + (rnd() % 6);
    for (let f = 0; f < flips && len > 0; f++)
      img[rnd() % Math.min(len, 64 + 3 * 56 + 24)] = rnd() & 0xff;
    const r = parseElf(img);
    if (r.ok) {
      oks++;
      for (const s of r.value.segments) {
        assert.ok(s.offset + s.filesz <= img.length && s.filesz <= s.memsz);
      }
    } else assert.ok(r.error instanceof ImageError);
  }
  assert.ok(oks > 0);
});

/**
 * A hand-made ELF32 i386 kernel (helper P): PT_NOTE first (a 4-byte Xen PVH entry note) when
 * `pvhEntry` is given, then PT_LOADs, as `ld -m elf_i386` lays out test/guests/tiny.S.
 */
function makeElf32(
  o: {
    pvhEntry?: number;
    entry?: number;
    segments?: Array<{ paddr: number; data: Uint8Array; memsz?: number }>;
  } = {},
): Uint8Array {
  const segs = o.segments ?? [{ paddr: 0x100000, data: new Uint8Array([0xf4]), memsz: 0x1000 }];
  const note = o.pvhEntry !== undefined;
  const phnum = segs.length + (note ? 1 : 0);
  let off = 52 + phnum * 32;
  const noteOff = off;
  if (note) off += 20;
  const at = segs.map((s) => {
    const a = off;
    off += s.data.length;
    return a;
  });
  const img = new Uint8Array(off);
  const v = new DataView(img.buffer);
  img.set([0x7f, 0x45, 0x4c, 0x46, 1, 1, 1], 0);
  v.setUint16(16, 2, true); // ET_EXEC
  v.setUint16(18, 3, true); // EM_386
  v.setUint32(20, 1, true);
  v.setUint32(24, o.entry ?? segs[0]!.paddr, true);
  v.setUint32(28, 52, true); // e_phoff
  v.setUint16(40, 52, true);
  v.setUint16(42, 32, true);
  v.setUint16(44, phnum, true);
  let ph = 52;
  if (note) {
    v.setUint32(ph, 4, true); // PT_NOTE
    v.setUint32(ph + 4, noteOff, true);
    v.setUint32(ph + 16, 20, true);
    v.setUint32(ph + 20, 20, true);
    ph += 32;
    v.setUint32(noteOff, 4, true);
    v.setUint32(noteOff + 4, 4, true);
    v.setUint32(noteOff + 8, 18, true);
    img.set([0x58, 0x65, 0x6e, 0], noteOff + 12);
    v.setUint32(noteOff + 16, o.pvhEntry!, true);
  }
  segs.forEach((s, i) => {
    v.setUint32(ph, 1, true); // PT_LOAD
    v.setUint32(ph + 4, at[i]!, true);
    v.setUint32(ph + 8, s.paddr, true);
    v.setUint32(ph + 12, s.paddr, true);
    v.setUint32(ph + 16, s.data.length, true);
    v.setUint32(ph + 20, s.memsz ?? s.data.length, true);
    v.setUint32(ph + 24, 5, true);
    v.setUint32(ph + 28, 0x1000, true);
    img.set(s.data, at[i]!);
    ph += 32;
  });
  return img;
}

test('ELF32 i386 with a PVH note: segments and the PVH entry', () => {
  const img = makeElf32({
    pvhEntry: 0x100010,
    entry: 0x100000,
    segments: [
      { paddr: 0x100000, data: new Uint8Array(40).fill(0x90), memsz: 0x2000 },
      { paddr: 0x300000, data: new Uint8Array(8).fill(7) },
    ],
  });
  const r = parseElf(img);
  assert.ok(r.ok, r.ok ? '' : r.error.message);
  assert.equal(r.value.entry, 0x100000);
  assert.equal(r.value.pvhEntry, 0x100010);
  assert.deepEqual(
    r.value.segments.map((s) => [s.paddr, s.offset, s.filesz, s.memsz]),
    [
      [0x100000, 52 + 3 * 32 + 20, 40, 0x2000],
      [0x300000, 52 + 3 * 32 + 20 + 40, 8, 8],
    ],
  );
});

test('ELF32: the same checks as ELF64, and a PVH note is required', () => {
  assert.match(parseErr(makeElf32()), /ELF32\) kernel needs a PVH entry note/);
  const m = makeElf32({ pvhEntry: 0x100000 });
  dv(m).setUint16(18, 62, true);
  assert.match(parseErr(m), /ELF32: not an i386 image \(e_machine 62\)/);
  assert.match(parseErr(makeElf32({ pvhEntry: 0x100000 }).subarray(0, 51)), /too short .* ELF32/);
  const ph = makeElf32({ pvhEntry: 0x100000 });
  dv(ph).setUint16(42, 56, true);
  assert.match(parseErr(ph), /program header size 56/);
  const past = makeElf32({ pvhEntry: 0x100000 });
  dv(past).setUint32(52 + 32 + 16, 0x10000, true); // PT_LOAD filesz past EOF
  assert.match(parseErr(past), /past the end of the file/);
  const phoff = makeElf32({ pvhEntry: 0x100000 });
  dv(phoff).setUint32(28, 0xffff_fff0, true);
  assert.match(parseErr(phoff), /program headers .* past the end/);
  const small = makeElf32({ pvhEntry: 0x100000 });
  dv(small).setUint32(52 + 32 + 20, 0, true); // memsz 0 < filesz 1
  assert.match(parseErr(small), /memsz 0 < filesz 1/);
  assert.match(
    parseErr(
      makeElf32({
        pvhEntry: 0x100000,
        segments: [
          { paddr: 0x100000, data: new Uint8Array(4), memsz: 0x2000 },
          { paddr: 0x101000, data: new Uint8Array(4) },
        ],
      }),
    ),
    /overlap/,
  );
  const badNote = makeElf32({ pvhEntry: 0x100000 });
  dv(badNote).setUint32(52 + 2 * 32 + 4, 2, true); // descsz 2
  assert.match(parseErr(badNote), /PVH entry note/);
});

test('ELF32: random mutations never throw, and what parses is in bounds', () => {
  const base = makeElf32({
    pvhEntry: 0x100004,
    segments: [
      { paddr: 0x100000, data: new Uint8Array(32).fill(0x90), memsz: 0x1000 },
      { paddr: 0x200000, data: new Uint8Array(8) },
    ],
  });
  const rnd = prng(0x32e1f);
  let oks = 0;
  for (let i = 0; i < 5000; i++) {
    const len = rnd() % 4 === 0 ? rnd() % (base.length + 1) : base.length;
    const img = base.slice(0, len);
    const flips = 1 + (rnd() % 6);
    for (let f = 0; f < flips && len > 0; f++)
      img[rnd() % Math.min(len, 52 + 3 * 32 + 20)] = rnd() & 0xff;
    const r = parseElf(img);
    if (r.ok) {
      oks++;
      assert.notEqual(r.value.pvhEntry, undefined);
      for (const s of r.value.segments)
        assert.ok(s.offset + s.filesz <= img.length && s.filesz <= s.memsz);
    } else assert.ok(r.error instanceof ImageError);
  }
  assert.ok(oks > 0);
});

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
  a[4] = 1;
  assert.match(parseErr(a), /64-bit/);
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

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { makeBzImage, prng } from '../../test/fixtures/kernel-images.js';
import { ImageError } from '../util/errors.js';
import { isBzImage, parseBzImage } from './bzimage.js';

function parseErr(img: Uint8Array): string {
  const r = parseBzImage(img);
  assert.equal(r.ok, false);
  if (r.ok) throw new Error('unreachable');
  assert.ok(r.error instanceof ImageError);
  return r.error.message;
}

test('valid bzImage: header fields, payload, entry', () => {
  const img = makeBzImage({ setupSects: 2, initSize: 0x123000, cmdlineSize: 1000 });
  assert.ok(isBzImage(img));
  const r = parseBzImage(img);
  assert.ok(r.ok);
  const bz = r.value;
  assert.equal(bz.protocolVersion, 0x020f);
  assert.equal(bz.setupSects, 2);
  assert.equal(bz.payloadOffset, 3 * 512);
  assert.equal(bz.payloadLength, 4096);
  assert.equal(bz.loadAddress, 0x100000);
  assert.equal(bz.entry, 0x100200);
  assert.equal(bz.initSize, 0x123000);
  assert.equal(bz.cmdlineSize, 1000);
  assert.equal(bz.initrdAddrMax, 0x7fffffff);
  assert.equal(bz.kernelAlignment, 0x200000);
  assert.equal(bz.prefAddress, 0x1000000n);
  assert.equal(bz.relocatable, true);
  // The header copy spans 0x1f1 .. 0x202 + jump byte (0x6a) = 0x26c.
  assert.equal(bz.setupHeader.length, 0x26c - 0x1f1);
  assert.deepEqual(bz.setupHeader, img.subarray(0x1f1, 0x26c));
});

test('setup_sects 0 means 4', () => {
  const r = parseBzImage(makeBzImage({ setupSects: 0 }));
  assert.ok(r.ok);
  assert.equal(r.value.setupSects, 4);
  assert.equal(r.value.payloadOffset, 5 * 512);
});

test('truncated image', () => {
  assert.match(parseErr(makeBzImage().subarray(0, 0x250)), /too short/);
  assert.match(parseErr(new Uint8Array(0)), /too short/);
});

test('bad magic', () => {
  const img = makeBzImage();
  img[0x202] = 0x41;
  assert.equal(isBzImage(img), false);
  assert.match(parseErr(img), /HdrS/);
});

test('old boot protocol', () => {
  assert.match(parseErr(makeBzImage({ version: 0x020b })), /2\.11 is too old/);
});

test('not 64-bit capable', () => {
  assert.match(parseErr(makeBzImage({ xloadflags: 0x2 })), /64-bit/);
});

test('zImage (not loaded high) is refused', () => {
  assert.match(parseErr(makeBzImage({ loadflags: 0 })), /LOADED_HIGH/);
});

test('setup past end of file', () => {
  const img = makeBzImage({ setupSects: 1 }).slice(0, 1024); // no payload at all
  assert.match(parseErr(img), /setup/);
  const big = makeBzImage();
  big[0x1f1] = 200;
  assert.match(parseErr(big), /setup/);
});

test('payload (syssize) past end of file', () => {
  assert.match(parseErr(makeBzImage({ syssize: 4096 / 16 + 1 })), /past the end/);
  assert.ok(parseBzImage(makeBzImage({ syssize: 4096 / 16 })).ok);
});

test('random mutations of the header never throw', () => {
  const base = makeBzImage();
  const rnd = prng(0xb2);
  let oks = 0;
  for (let i = 0; i < 5000; i++) {
    const len = rnd() % 3 === 0 ? rnd() % (base.length + 1) : base.length;
    const img = base.slice(0, len);
    const flips = 1 + (rnd() % 8);
    for (let f = 0; f < flips && len > 0; f++) {
      const at = rnd() % 4 === 0 ? rnd() % len : Math.min(len - 1, 0x1f1 + (rnd() % 0x80));
      img[at] = rnd() & 0xff;
    }
    const r = parseBzImage(img);
    if (r.ok) {
      oks++;
      assert.ok(r.value.payloadOffset + r.value.payloadLength === img.length);
      assert.ok(r.value.payloadLength > 0);
    } else assert.ok(r.error instanceof ImageError);
  }
  assert.ok(oks > 0);
});

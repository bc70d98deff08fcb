import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  ONE,
  ONES,
  ZERO,
  arg,
  buffer,
  device,
  eisaId,
  eisaIdValue,
  encodePkgLength,
  ifOp,
  integer,
  interrupt,
  io,
  irqNoFlags,
  lEqual,
  memory32Fixed,
  method,
  name,
  namePath,
  notify,
  pkg,
  resourceTemplate,
  returnOp,
  scope,
  string,
  withPkgLength,
} from './aml.js';

const bytes = (a: Uint8Array) => [...a];

test('PkgLength: one byte up to 63, then 2/3/4-byte forms', () => {
  assert.deepEqual(bytes(encodePkgLength(0)), [0x00]);
  assert.deepEqual(bytes(encodePkgLength(63)), [0x3f]);
  assert.deepEqual(bytes(encodePkgLength(64)), [0x40, 0x04]);
  assert.deepEqual(bytes(encodePkgLength(4095)), [0x4f, 0xff]);
  assert.deepEqual(bytes(encodePkgLength(4096)), [0x80, 0x00, 0x01]);
  assert.deepEqual(bytes(encodePkgLength((1 << 20) - 1)), [0x8f, 0xff, 0xff]);
  assert.deepEqual(bytes(encodePkgLength(1 << 20)), [0xc0, 0x00, 0x00, 0x01]);
  assert.deepEqual(bytes(encodePkgLength((1 << 28) - 1)), [0xcf, 0xff, 0xff, 0xff]);
  assert.throws(() => encodePkgLength(1 << 28));
  assert.throws(() => encodePkgLength(-1));
});

test('withPkgLength counts its own bytes at each boundary', () => {
  const check = (payloadLen: number, lenBytes: number) => {
    const out = withPkgLength(new Uint8Array(payloadLen));
    assert.equal(out.length, payloadLen + lenBytes, `payload ${payloadLen}`);
    const lead = out[0]!;
    const follow = lenBytes === 1 ? 0 : lead >> 6;
    assert.equal(follow, lenBytes - 1);
    let total = lenBytes === 1 ? lead : lead & 0x0f;
    for (let i = 1; i <= follow; i++) total |= out[i]! << (4 + 8 * (i - 1));
    assert.equal(total, out.length, `PkgLength value for payload ${payloadLen}`);
  };
  check(62, 1); // 63 total: last one-byte form
  check(63, 2); // 64 would not fit in 6 bits
  check(4093, 2); // 4095 total
  check(4094, 3); // 4096 would not fit in 12 bits
  check((1 << 20) - 4, 3);
  check((1 << 20) - 3, 4);
});

test('integers use the shortest prefix', () => {
  assert.deepEqual(bytes(integer(0)), [0x00]);
  assert.deepEqual(bytes(integer(1)), [0x01]);
  assert.deepEqual(bytes(integer(2)), [0x0a, 0x02]);
  assert.deepEqual(bytes(integer(0xff)), [0x0a, 0xff]);
  assert.deepEqual(bytes(integer(0x100)), [0x0b, 0x00, 0x01]);
  assert.deepEqual(bytes(integer(0x12345678)), [0x0c, 0x78, 0x56, 0x34, 0x12]);
  assert.deepEqual(bytes(integer(0x1_0000_0000)), [0x0e, 0, 0, 0, 0, 1, 0, 0, 0]);
  assert.deepEqual(bytes(integer(0xffff_ffff_ffff_ffffn)), [0x0e, ...Array(8).fill(0xff)]);
  assert.deepEqual([ZERO[0], ONE[0], ONES[0]], [0x00, 0x01, 0xff]);
  assert.throws(() => integer(-1));
});

test('strings are NUL-terminated ASCII', () => {
  assert.deepEqual(bytes(string('AB')), [0x0d, 0x41, 0x42, 0x00]);
  assert.throws(() => string('é'));
});

test('EISAID("PNP0501") == 0x0105D041, written as a DWordConst', () => {
  assert.equal(eisaIdValue('PNP0501'), 0x0105d041);
  assert.equal(eisaIdValue('PNP0303'), 0x0303d041);
  assert.deepEqual(bytes(eisaId('PNP0501')), [0x0c, 0x41, 0xd0, 0x05, 0x01]);
  assert.throws(() => eisaIdValue('pnp0501'));
});

test('name paths: root, single, dual, multi, parent', () => {
  assert.deepEqual(bytes(namePath('\\_SB_')), [0x5c, 0x5f, 0x53, 0x42, 0x5f]);
  assert.deepEqual(bytes(namePath('\\')), [0x5c, 0x00]);
  assert.deepEqual(bytes(namePath('_SB_.COM1')), [0x2e, ...Buffer.from('_SB_COM1')]);
  assert.deepEqual(bytes(namePath('\\_SB_.PCI0.COM1')), [
    0x5c,
    0x2f,
    3,
    ...Buffer.from('_SB_PCI0COM1'),
  ]);
  assert.deepEqual(bytes(namePath('^FOO')), [0x5e, ...Buffer.from('FOO_')]);
  assert.deepEqual(bytes(namePath('PS2')), [...Buffer.from('PS2_')]);
  assert.throws(() => namePath('com1'));
  assert.throws(() => namePath('1ABC'));
  assert.throws(() => namePath('TOOLONG'));
});

// The expected bytes below were checked against iasl's output for the same ASL.
test('Device(COM1) { Name(_UID, Zero) } encodes to hand-checked bytes', () => {
  assert.deepEqual(bytes(device('COM1', name('_UID', ZERO))), [
    0x5b,
    0x82,
    0x0b,
    ...Buffer.from('COM1'),
    0x08,
    ...Buffer.from('_UID'),
    0x00,
  ]);
});

test('Method with flags and Return', () => {
  assert.deepEqual(bytes(method('_STA', 0, false, returnOp(integer(0x0f)))), [
    0x14,
    0x09,
    ...Buffer.from('_STA'),
    0x00,
    0xa4,
    0x0a,
    0x0f,
  ]);
  assert.deepEqual(bytes(method('FOO', 1, true, returnOp(ONE))), [
    0x14,
    0x08,
    ...Buffer.from('FOO_'),
    0x09,
    0xa4,
    0x01,
  ]);
  assert.throws(() => method('BAD', 8, false));
});

test('Scope, Package, Buffer', () => {
  assert.deepEqual(bytes(scope('\\_SB_')), [0x10, 0x06, 0x5c, ...Buffer.from('_SB_')]);
  assert.deepEqual(bytes(name('_S5', pkg(integer(5), ZERO))), [
    0x08,
    ...Buffer.from('_S5_'),
    0x12,
    0x05,
    0x02,
    0x0a,
    0x05,
    0x00,
  ]);
  assert.deepEqual(bytes(buffer(Uint8Array.of(1, 2))), [0x11, 0x05, 0x0a, 0x02, 1, 2]);
  // A scope big enough to need a 2-byte PkgLength: 2 + 5 (name) + 100 = 107 = 0x6B.
  const big = scope('\\_SB_', new Uint8Array(100));
  assert.deepEqual(bytes(big.subarray(0, 3)), [0x10, 0x4b, 0x06]);
});

test('resource descriptors and the End Tag checksum', () => {
  assert.deepEqual(bytes(io(0x3f8, 0x3f8, 1, 8)), [0x47, 0x01, 0xf8, 0x03, 0xf8, 0x03, 0x01, 0x08]);
  assert.deepEqual(bytes(irqNoFlags(4)), [0x22, 0x10, 0x00]);
  assert.deepEqual(
    bytes(memory32Fixed(true, 0xc0001000, 0x1000)),
    [0x86, 0x09, 0x00, 0x01, 0x00, 0x10, 0x00, 0xc0, 0x00, 0x10, 0x00, 0x00],
  );
  const edge = { consumer: true, edge: true, activeLow: false, shared: false };
  assert.deepEqual(bytes(interrupt(edge, 5)), [0x89, 0x06, 0x00, 0x03, 0x01, 0x05, 0, 0, 0]);
  const level = { consumer: true, edge: false, activeLow: true, shared: true };
  assert.equal(interrupt(level, 5)[3], 0x0d);
  // Buffer(8) { 22 10 00 79 cs } with cs making the template's bytes sum to 0.
  assert.deepEqual(
    bytes(resourceTemplate(irqNoFlags(4))),
    [0x11, 0x08, 0x0a, 0x05, 0x22, 0x10, 0x00, 0x79, 0x55],
  );
  const tpl = resourceTemplate(io(0x60, 0x60, 1, 1), interrupt(edge, 1));
  const body = tpl.subarray(tpl.length - (8 + 9 + 2));
  assert.equal(
    body.reduce((s, b) => (s + b) & 0xff, 0),
    0,
  );
  assert.throws(() => memory32Fixed(true, 0xffff_f000, 0x2000));
});

test('Arg, LEqual, If and Notify encode to hand-checked bytes', () => {
  assert.deepEqual(bytes(arg(0)), [0x68]);
  assert.deepEqual(bytes(arg(6)), [0x6e]);
  assert.throws(() => arg(7));
  assert.throws(() => arg(-1));
  assert.deepEqual(bytes(lEqual(arg(0), integer(23))), [0x93, 0x68, 0x0a, 23]);
  // Notify (\_SB_.VGEN, 0x80): NotifyOp, the root-prefixed dual name, a ByteConst.
  const n = notify('\\_SB_.VGEN', integer(0x80));
  assert.deepEqual(bytes(n), [0x86, 0x5c, 0x2e, ...Buffer.from('_SB_VGEN'), 0x0a, 0x80]);
  // If (LEqual (Arg0, 23)) { Notify (...) }: IfOp, PkgLength over predicate and body.
  const i = ifOp(lEqual(arg(0), integer(23)), n);
  assert.equal(i[0], 0xa0);
  assert.equal(i[1], 1 + 4 + n.length); // PkgLength counts itself
  assert.deepEqual(bytes(i.subarray(2, 6)), [0x93, 0x68, 0x0a, 23]);
  assert.deepEqual(bytes(i.subarray(6)), bytes(n));
  // _EVT as a serialized one-argument method holding that If.
  const m = method('_EVT', 1, true, i);
  assert.equal(m[0], 0x14);
  assert.deepEqual(bytes(m.subarray(2, 6)), [...Buffer.from('_EVT')]);
  assert.equal(m[6], 0x09); // one argument | Serialized
});

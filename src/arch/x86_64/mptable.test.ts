import { test } from 'node:test';
import assert from 'node:assert/strict';
import { GuestMemory } from '../../memory/guest-memory.js';
import { IOAPIC_ADDR, LAPIC_ADDR, MAX_VCPUS, MPTABLE_START, RSDP_ADDR } from './layout.js';
import { buildMptable, mptableSize, writeMptable } from './mptable.js';

const sum = (b: Uint8Array) => b.reduce((s, x) => (s + x) & 0xff, 0);
const str = (b: Uint8Array, at: number, n: number) =>
  String.fromCharCode(...b.subarray(at, at + n));

test('MP floating pointer and configuration table (MP spec 1.4)', () => {
  for (const n of [1, 2, 4, MAX_VCPUS]) {
    const r = buildMptable(n);
    assert.ok(r.ok);
    const b = r.value;
    const dv = new DataView(b.buffer);
    assert.equal(b.length, mptableSize(n));
    assert.ok(MPTABLE_START + b.length <= RSDP_ADDR);
    // floating pointer
    assert.equal(str(b, 0, 4), '_MP_');
    assert.equal(dv.getUint32(4, true), MPTABLE_START + 16);
    assert.equal(b[8], 1);
    assert.equal(b[9], 4);
    assert.equal(sum(b.subarray(0, 16)), 0);
    // header
    const cfg = b.subarray(16);
    const cv = new DataView(cfg.buffer, cfg.byteOffset);
    assert.equal(str(cfg, 0, 4), 'PCMP');
    assert.equal(cv.getUint16(4, true), cfg.length);
    assert.equal(sum(cfg), 0);
    assert.equal(cv.getUint16(34, true), n + 2 + 24 + 2);
    assert.equal(cv.getUint32(36, true), LAPIC_ADDR);
    // entries
    let p = 44;
    for (let id = 0; id < n; id++) {
      assert.deepEqual([cfg[p], cfg[p + 1], cfg[p + 3]], [0, id, id === 0 ? 3 : 1]);
      p += 20;
    }
    assert.equal(cfg[p], 1);
    assert.equal(str(cfg, p + 2, 6), 'ISA   ');
    p += 8;
    assert.deepEqual([cfg[p], cfg[p + 1], cfg[p + 3]], [2, n, 1]);
    assert.equal(cv.getUint32(p + 4, true), IOAPIC_ADDR);
    p += 8;
    for (let irq = 0; irq < 24; irq++) {
      assert.deepEqual([...cfg.subarray(p, p + 8)], [3, 0, 0, 0, 0, irq, n, irq]);
      p += 8;
    }
    assert.deepEqual([...cfg.subarray(p, p + 8)], [4, 3, 0, 0, 0, 0, 0xff, 0]);
    assert.deepEqual([...cfg.subarray(p + 8, p + 16)], [4, 1, 0, 0, 0, 0, 0xff, 1]);
    assert.equal(p + 16, cfg.length);
  }
});

test('too many or too few vCPUs is an error', () => {
  assert.equal(buildMptable(MAX_VCPUS + 1).ok, false);
  assert.equal(buildMptable(0).ok, false);
});

test('written at MPTABLE_START, bounded by guest RAM', () => {
  const mem = GuestMemory.anonymous([{ base: 0, size: 0x100000 }]);
  assert.ok(writeMptable(mem, 2).ok);
  assert.equal(mem.readU32(MPTABLE_START), 0x5f504d5f); // "_MP_"
  assert.equal(writeMptable(GuestMemory.anonymous([{ base: 0, size: 0x9fc00 }]), 2).ok, false);
});

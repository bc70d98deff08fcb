import { test } from 'node:test';
import assert from 'node:assert/strict';
import { E820_RAM, E820_RESERVED, e820Entries } from './e820.js';
import { ramRegions } from './layout.js';

const GiB = 1024 ** 3;

test('small VM: low RAM, reserved legacy hole, RAM from 1 MiB', () => {
  assert.deepEqual(e820Entries(ramRegions(256 * 1024 * 1024)), [
    { addr: 0, size: 0x9fc00, type: E820_RAM },
    { addr: 0x9fc00, size: 0x100000 - 0x9fc00, type: E820_RESERVED },
    { addr: 0x100000, size: 256 * 1024 * 1024 - 0x100000, type: E820_RAM },
  ]);
});

test('large VM: RAM resumes at 4 GiB after the MMIO hole', () => {
  const e = e820Entries(ramRegions(6 * GiB));
  assert.equal(e.length, 4);
  assert.deepEqual(e[2], { addr: 0x100000, size: 3 * GiB - 0x100000, type: E820_RAM });
  assert.deepEqual(e[3], { addr: 4 * GiB, size: 3 * GiB, type: E820_RAM });
});

test('tiny VM below 1 MiB', () => {
  assert.deepEqual(e820Entries([{ base: 0, size: 0x80000 }]), [
    { addr: 0, size: 0x80000, type: E820_RAM },
  ]);
});

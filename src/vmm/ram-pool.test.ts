/**
 * The RAM pool keeps a VM's anonymous RAM for the next VM of its size, emptied (needs the native
 * addon, not KVM): the next guest reads zeros, and the pages went back to the host.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { allocateGuestRam, residentRuns } from './guest-ram.js';
import { GuestRamPool } from './ram-pool.js';

const MIB = 1024 * 1024;

test('anonymous RAM given back is kept emptied; a restored-style mapping is not kept', () => {
  const pool = new GuestRamPool(2);
  const ranges = [{ base: 0, size: 8 * MIB }];
  const kept = allocateGuestRam(ranges);
  try {
    kept.ram.memory.write(0x3000, Uint8Array.of(1, 2, 3));
    pool.give(kept);
    assert.equal(pool.idleCount, 1);
    assert.equal(pool.take([{ base: 0, size: 4 * MIB }]), undefined, 'only the same regions');
    const again = pool.take(ranges);
    assert.equal(again, kept);
    assert.deepEqual(residentRuns(again.ram.buffers[0]!), [], 'its pages went back to the host');
    assert.equal(again.ram.memory.readU8(0x3001), 0, 'the next guest reads zeros');

    // Private memory that is not anonymous (a restored VM's file mapping) would read the file's
    // bytes again after MADV_DONTNEED: released, never kept.
    const restoredLike = allocateGuestRam(ranges);
    pool.give({ layout: { ...restoredLike.layout, anonymous: false }, ram: restoredLike.ram });
    assert.equal(pool.idleCount, 0);
    assert.equal(restoredLike.ram.buffers[0]!.byteLength, 0, 'unmapped');
  } finally {
    pool.close();
    kept.ram.unmap();
  }
});

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { GuestMemory } from '../memory/guest-memory.js';
import { ConfigError } from '../util/errors.js';
import { readGenerationId, VMGENID_ADDR, VMGENID_SIZE, writeGenerationId } from './vmgenid.js';

const ramOver = (size: number) => new GuestMemory([{ base: 0, size, bytes: new Uint8Array(size) }]);

test('each generation id is new, random and in guest RAM at VMGENID_ADDR', () => {
  const mem = ramOver(VMGENID_ADDR + 4096);
  const seen = new Set<string>();
  for (let i = 0; i < 64; i++) {
    const id = writeGenerationId(mem);
    assert.equal(id.length, VMGENID_SIZE);
    assert.deepEqual(readGenerationId(mem), id);
    seen.add(Buffer.from(id).toString('hex'));
  }
  assert.equal(seen.size, 64, 'no id repeats');
  // 64 ids of 16 random bytes: each byte position takes more than one value
  for (let b = 0; b < VMGENID_SIZE; b++)
    assert.ok(new Set([...seen].map((h) => h.slice(2 * b, 2 * b + 2))).size > 1, `byte ${b}`);
});

test('guest RAM that does not cover the id is a clear error', () => {
  assert.throws(() => writeGenerationId(ramOver(VMGENID_ADDR + 8)), ConfigError);
});

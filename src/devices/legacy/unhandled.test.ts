import { test } from 'node:test';
import assert from 'node:assert/strict';
import { UnhandledAccesses, type UnhandledAccessInfo } from './unhandled.js';

test('reads are all-ones, writes dropped, each address logged once across objects', () => {
  const logged: UnhandledAccessInfo[] = [];
  const state = UnhandledAccesses.createState();
  const a = new UnhandledAccesses(state, (i) => logged.push(i));
  const b = new UnhandledAccesses(state, (i) => logged.push(i)); // another vCPU's view
  const d = new Uint8Array(4);
  a.read('pio', 0x80, d);
  assert.deepEqual([...d], [0xff, 0xff, 0xff, 0xff]);
  b.read('pio', 0x80, new Uint8Array(1));
  a.write('pio', 0x80, Uint8Array.of(1));
  a.read('mmio', 0x80, new Uint8Array(8)); // same number, other space
  b.write('mmio', 0xd000_0000, Uint8Array.of(1, 2, 3, 4));
  assert.deepEqual(
    logged.map((l) => [l.space, l.addr, l.write]),
    [
      ['pio', 0x80, false],
      ['mmio', 0x80, false],
      ['mmio', 0xd000_0000, true],
    ],
  );
  assert.deepEqual(a.stats(), { reads: 3, writes: 2, distinctAddresses: 3 });
});

test('when the table is full new addresses are counted, logged once more, then quiet', () => {
  let logs = 0;
  const u = new UnhandledAccesses(UnhandledAccesses.createState(), () => void logs++);
  for (let p = 0; p < 1100; p++) u.read('pio', p, new Uint8Array(1));
  assert.equal(logs, 1025);
  assert.equal(u.stats().reads, 1100);
});

test('the counters carry into their high half past 2^32', () => {
  const state = UnhandledAccesses.createState();
  const u = new UnhandledAccesses(state, () => undefined);
  // The reads counter sits after the 1024-slot table: set it just below 2^32.
  new BigInt64Array(state, 1024 * 8, 4)[0] = 0xffff_fffen;
  for (let i = 0; i < 3; i++) u.read('pio', 0x80, new Uint8Array(1));
  assert.equal(u.stats().reads, 0x1_0000_0001);
});

test('addresses sharing a slot of the per-thread cache are each logged once', () => {
  const logged: number[] = [];
  const u = new UnhandledAccesses(UnhandledAccesses.createState(), (i) => logged.push(i.addr));
  // 0x40 and 0x80 map to different slots, 0x00 and 0x41 to the same one ((a ^ a >>> 6) & 63).
  for (let i = 0; i < 4; i++) {
    u.write('pio', 0x00, Uint8Array.of(1));
    u.write('pio', 0x41, Uint8Array.of(1));
    u.write('mmio', 0x41, Uint8Array.of(1)); // same number, other space: its own key
  }
  assert.deepEqual(logged, [0x00, 0x41, 0x41]);
  assert.equal(u.stats().writes, 12);
  assert.equal(u.stats().distinctAddresses, 3);
});

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { GuestMemory, type GuestRegion } from './guest-memory.js';
import { GuestMemoryError } from '../util/errors.js';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;

function region(base: number, size: number, extra: Partial<GuestRegion> = {}): GuestRegion {
  return { base, size, bytes: new Uint8Array(size), ...extra };
}

/** RAM below and above the hole; pmem at 4 GiB (rw) and 4 GiB + 2 MiB (ro); a gated region. */
function memory(allows?: (addr: number, len: number) => boolean) {
  const ram = [region(0, 2 * MiB), region(3 * GiB, 1 * MiB)];
  const rw = region(4 * GiB, 2 * MiB);
  const ro = region(4 * GiB + 2 * MiB, 2 * MiB, { readOnly: true });
  const gated = region(5 * GiB, 4 * MiB, allows ? { allows } : {});
  return { mem: new GuestMemory(ram, [gated, ro, rw]), rw, ro, gated };
}

test('device memory is reachable like RAM; `regions` and totalSize stay RAM', () => {
  const { mem, rw } = memory();
  assert.deepEqual(
    mem.regions.map((r) => r.base),
    [0, 3 * GiB],
  );
  assert.deepEqual(
    mem.deviceRegions.map((r) => r.base),
    [4 * GiB, 4 * GiB + 2 * MiB, 5 * GiB],
  );
  assert.equal(mem.totalSize, 3 * MiB);
  mem.writeU32(4 * GiB + 16, 0xdeadbeef);
  assert.equal(rw.bytes[16], 0xef);
  assert.equal(mem.readU32(4 * GiB + 16), 0xdeadbeef);
  const v = mem.tryView(4 * GiB + 4096, 4096)!;
  v.fill(7);
  assert.equal(rw.bytes[4096 + 4095], 7);
  // Regions are never joined: rw and ro are adjacent, an access across them fails.
  assert.equal(mem.tryView(4 * GiB + 2 * MiB - 8, 16, 'read'), undefined);
  assert.equal(
    mem.refusal(4 * GiB + 2 * MiB - 8, 16, 'read'),
    'outside guest RAM and device memory',
  );
  // Between regions and past the last one.
  assert.equal(mem.isValidRange(4 * GiB - 1, 1, 'read'), false);
  assert.equal(mem.isValidRange(5 * GiB + 4 * MiB, 1, 'read'), false);
  assert.equal(mem.isValidRange(2 ** 53, 1, 'read'), false);
  // RAM as before.
  mem.writeU8(3 * GiB + MiB - 1, 9);
  assert.equal(mem.readU8(3 * GiB + MiB - 1), 9);
  assert.equal(mem.isValidRange(3 * GiB + MiB - 1, 2), false);
});

test('read-only device memory: reads and read views, never a write or a writable view', () => {
  const { mem, ro } = memory();
  ro.bytes[8] = 0x42;
  const at = 4 * GiB + 2 * MiB;
  assert.equal(mem.readU8(at + 8), 0x42);
  assert.equal(mem.tryView(at, 16, 'read')![8], 0x42);
  assert.equal(mem.isValidRange(at, 16, 'read'), true);
  // The default access is 'write': whoever does not say 'read' is refused.
  assert.equal(mem.tryView(at, 16), undefined);
  assert.equal(mem.isValidRange(at, 16), false);
  assert.equal(mem.refusal(at, 16), 'in read-only device memory');
  assert.equal(mem.refusal(at, 16, 'read'), undefined);
  assert.throws(() => mem.writeU8(at, 1), GuestMemoryError);
  assert.throws(() => mem.writeU64(at, 1n), /read-only device memory/);
  assert.throws(() => mem.write(at, new Uint8Array(4)), GuestMemoryError);
  assert.throws(() => mem.fill(at, 4), GuestMemoryError);
  assert.throws(() => mem.view(at, 4), GuestMemoryError);
  assert.equal(ro.bytes[0], 0);
  assert.equal(ro.bytes[8], 0x42);
});

test('gated device memory: only what `allows` says, asked with guest-physical addresses', () => {
  const asked: Array<[number, number]> = [];
  let open = new Set<number>([5 * GiB + 2 * MiB]); // the 2 MiB block at +2 MiB
  const allows = (addr: number, len: number) => {
    asked.push([addr, len]);
    return (
      open.has(addr - (addr % (2 * MiB))) &&
      open.has(addr + len - 1 - ((addr + len - 1) % (2 * MiB)))
    );
  };
  const { mem } = memory(allows);
  assert.equal(mem.tryView(5 * GiB, 64, 'read'), undefined);
  assert.equal(
    mem.refusal(5 * GiB, 64),
    'in device memory the guest does not have now (unplugged)',
  );
  assert.throws(() => mem.readU32(5 * GiB), /unplugged/);
  assert.ok(mem.tryView(5 * GiB + 2 * MiB + 64, 64));
  assert.deepEqual(asked.at(-1), [5 * GiB + 2 * MiB + 64, 64]);
  // From a plugged block into an unplugged one: refused.
  assert.equal(mem.tryView(5 * GiB + 2 * MiB - 32, 64), undefined);
  open = new Set();
  assert.equal(mem.isValidRange(5 * GiB + 2 * MiB + 64, 64), false, 'asked again each time');
  // RAM and other device memory never ask.
  const before = asked.length;
  mem.readU32(0);
  mem.readU32(4 * GiB);
  assert.equal(asked.length, before);
});

test('regions may not overlap across RAM and device memory; RAM is never read-only', () => {
  assert.throws(
    () => new GuestMemory([region(0, 2 * MiB)], [region(MiB, MiB)]),
    /overlapping guest regions/,
  );
  assert.throws(
    () => new GuestMemory([region(0, 2 * MiB, { readOnly: true })]),
    /guest RAM cannot be read-only/,
  );
});

test('lookups among many device regions (a virtio-mem region of 256 slots)', () => {
  const slots = Array.from({ length: 256 }, (_, i) =>
    region(8 * GiB + i * 2 * MiB + i * 4096, 4096),
  );
  const mem = new GuestMemory([region(0, MiB)], slots);
  for (const i of [0, 1, 127, 255]) {
    const base = 8 * GiB + i * 2 * MiB + i * 4096;
    mem.writeU32(base + 4092, i);
    assert.equal(slots[i]!.bytes[4092], i);
    assert.equal(mem.isValidRange(base + 4092, 8), false);
    assert.equal(mem.isValidRange(base - 1, 1), false);
  }
  assert.equal(mem.readU8(MiB - 1), 0);
  assert.equal(mem.isValidRange(MiB, 1), false);
});

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { countDirty, DirtyPages, dirtyBitmapBytes, isDirty } from './dirty-pages.js';
import { GuestMemory } from './guest-memory.js';

const MiB = 1024 * 1024;
const regions = [
  { base: 0, size: 1 * MiB },
  { base: 4 * MiB, size: 2 * MiB + 4096 },
];

function set(bits: Uint8Array): number[] {
  const out: number[] = [];
  for (let p = 0; p < bits.length * 8; p++) if (isDirty(bits, p)) out.push(p);
  return out;
}

test("each region's part is whole u64 words, as KVM's dirty log", () => {
  assert.equal(dirtyBitmapBytes(1 * MiB), 32); // 256 pages
  assert.equal(dirtyBitmapBytes(2 * MiB + 4096), 72); // 513 pages: 9 words
  assert.equal(dirtyBitmapBytes(4096), 8);
  assert.equal(DirtyPages.allocate(regions).byteLength, 32 + 72);
});

test('mark() sets the pages a guest range touches, in its own region, and nothing outside RAM', () => {
  const d = new DirtyPages(DirtyPages.allocate(regions), regions);
  d.mark(0x1fff, 2); // straddles pages 1 and 2
  d.mark(4 * MiB + 2 * MiB, 4096); // the second region's last page (512)
  d.mark(4 * MiB + 2 * MiB + 100, 1 * MiB); // runs past the region: clipped at its end
  d.mark(2 * MiB, 4096); // in the hole between the regions: ignored
  d.mark(0, 0); // empty: nothing
  assert.deepEqual(set(d.region(0)), [1, 2]);
  assert.deepEqual(set(d.region(1)), [512]);
  assert.equal(countDirty(d.region(0)) + countDirty(d.region(1)), 3);
  // KVM's layout: page p at byte p >> 3, bit p & 7.
  assert.equal(d.region(0)[0], 0b110);
  assert.equal(d.region(1)[64], 1);
});

test('markView() finds the region by its buffer; clear() and orInto()', () => {
  const mem = GuestMemory.anonymous(regions);
  const shared = DirtyPages.allocate(regions);
  const d = new DirtyPages(
    shared,
    regions,
    mem.regions.map((r) => r.bytes),
  );
  d.markView(mem.view(4 * MiB + 3 * 4096 + 10, 5000)); // region 1, pages 3 and 4
  d.markView(mem.view(0, 1)); // region 0, page 0
  d.markView(new Uint8Array(64)); // not guest RAM: ignored
  d.markAt(mem.regions[1]!.bytes.buffer, 0, 0); // zero bytes: nothing
  assert.deepEqual(set(d.region(0)), [0]);
  assert.deepEqual(set(d.region(1)), [3, 4]);
  assert.equal(d.marks, 2);

  // Another thread's handle over the same shared bytes sees the same bits.
  const other = new DirtyPages(shared, regions);
  assert.deepEqual(set(other.region(1)), [3, 4]);
  other.clear();
  assert.equal(countDirty(d.region(0)) + countDirty(d.region(1)), 0);
  const kvm = new Uint8Array(dirtyBitmapBytes(regions[1]!.size));
  kvm[0] = 0x81;
  d.orInto(1, kvm);
  assert.deepEqual(set(d.region(1)), [0, 7]);
  assert.throws(() => d.region(2), /no region 2/);
  assert.throws(() => new DirtyPages(new SharedArrayBuffer(8), regions), /too small/);
});

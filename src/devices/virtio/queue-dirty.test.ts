/**
 * Dirty page marking through the real queue and a real device (virtio-rng): the VMM's own writes
 * to guest RAM (filled buffers, used-ring entries) must reach the device-dirty bitmap, or a Diff
 * snapshot would miss them (KVM's dirty log sees only the vCPUs' writes).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { DirtyPages, isDirty } from '../../memory/dirty-pages.js';
import { GuestMemory } from '../../memory/guest-memory.js';
import { Virtqueue } from './queue.js';
import { RngDevice, rngIdentity } from './rng/rng.js';
import { harness, RAM_BASE, RAM_SIZE } from './testing/harness.js';
import { GuestAllocator, MockQueue } from './testing/mock-driver.js';

const PAGE = 4096;
const RAM = 1 << 20;

function tracked(size: number) {
  const regions = [{ base: RAM_BASE, size }];
  const mem = GuestMemory.anonymous(regions);
  const dirty = new DirtyPages(
    DirtyPages.allocate(regions),
    regions,
    mem.regions.map((r) => r.bytes),
  );
  mem.deviceWrites = dirty;
  const pages = () => {
    const out: number[] = [];
    for (let p = 0; p < size / PAGE; p++) if (isDirty(dirty.region(0), p)) out.push(p);
    return out;
  };
  return { mem, dirty, pages };
}

test('pop marks the writable buffers (not the readable ones); pushUsed marks the used ring', () => {
  const { mem, dirty, pages } = tracked(RAM);
  const alloc = new GuestAllocator(0x1000, RAM);
  const mq = new MockQueue(mem, alloc, 8); // rings at 0x1000.. (page 1)
  const r = Virtqueue.create(
    mem,
    { size: 8, desc: mq.desc, driver: mq.avail, device: mq.used },
    { indirect: true, maxSize: 256 },
  );
  assert.ok(r.ok);
  const q = r.value;
  const head = mq.addChain([
    { addr: 0x10000, len: 100 }, // readable, page 16
    { addr: 0x20000 - 8, len: 16, write: true }, // writable, pages 31 and 32
    { addr: 0x40000, len: 3 * PAGE, write: true }, // writable, pages 64-66
  ]);
  const c = q.pop();
  assert.equal(c.kind, 'chain');
  assert.deepEqual(pages(), [31, 32, 64, 65, 66]);

  // A snapshot takes the bits; the backend fills the held buffer afterwards and uses the chain:
  // the buffer is marked again with the used ring.
  dirty.clear();
  q.pushUsed(head, 16);
  assert.deepEqual(pages(), [1, 31, 32, 64, 65, 66]);

  // markForSnapshot: every ring page, and the buffers of chains still held.
  dirty.clear();
  const h2 = mq.addChain([{ addr: 0x80000, len: 10, write: true }]);
  assert.equal(q.pop().kind, 'chain');
  dirty.clear();
  q.markForSnapshot();
  assert.deepEqual(pages(), [1, 128]);
  // Given back unused: no longer held.
  assert.ok(q.unpop(h2));
  dirty.clear();
  q.markForSnapshot();
  assert.deepEqual(pages(), [1]);
});

test('without a device-dirty bitmap nothing is marked and nothing is held', () => {
  const mem = GuestMemory.anonymous([{ base: 0, size: RAM }]);
  const alloc = new GuestAllocator(0x1000, RAM);
  const mq = new MockQueue(mem, alloc, 8);
  const r = Virtqueue.create(
    mem,
    { size: 8, desc: mq.desc, driver: mq.avail, device: mq.used },
    { indirect: true, maxSize: 256 },
  );
  assert.ok(r.ok);
  mq.addChain([{ addr: 0x40000, len: 10, write: true }]);
  assert.equal(r.value.pop().kind, 'chain');
  r.value.markForSnapshot(); // no-op
  assert.equal(mem.deviceWrites, undefined);
});

test('a real device (virtio-rng): the pages it filled and its used ring are device-dirty', () => {
  const { mem, dirty, pages } = tracked(RAM_SIZE);
  const h = harness(rngIdentity(), new RngDevice(), {
    mem,
    alloc: new GuestAllocator(0x1000, RAM_SIZE),
  });
  const [q] = h.start();
  dirty.clear(); // the driver's own setup writes are not the device's
  const a = 0x200000; // page 512
  q!.addChain([{ addr: a, len: 2 * PAGE, write: true }]);
  h.kick();
  assert.deepEqual(q!.takeUsed(), [{ id: 0, len: 2 * PAGE }]);
  assert.ok(mem.view(a, 2 * PAGE).some((x) => x !== 0));
  const usedPage = Math.floor(q!.used / PAGE);
  assert.deepEqual(
    pages(),
    [...new Set([usedPage, 512, 513])].sort((x, y) => x - y),
  );
});

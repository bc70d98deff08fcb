/**
 * Diff memory files and the rebase that merges them (needs the native addon for lseek with
 * SEEK_DATA/SEEK_HOLE, not KVM): a Diff holds exactly the dirty pages (an all-zero dirty page
 * too) at their offsets and holes elsewhere, and rebasing it onto the Full before it gives the
 * Full of the later state byte for byte. Bad pairs are refused with the base unchanged. And the
 * device-dirty bitmap reaches a worker thread with the guest RAM layout (a mark there is seen here).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  closeSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  readFileSync,
  rmSync,
  statSync,
  writeFileSync,
  writeSync,
  ftruncateSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Worker } from 'node:worker_threads';
import { countDirty, DirtyPages } from '../memory/dirty-pages.js';
import { native, SEEK_DATA, SEEK_HOLE } from '../kvm/native.js';
import {
  createGuestRam,
  deviceDirtyPages,
  guestRamOver,
  mapGuestRam,
  trackDeviceWrites,
} from './guest-ram.js';
import { forEachRun, rebaseMemoryFile, writeMemoryFile } from './snapshot-memory.js';
import type { SnapshotRegion } from './snapshot-format.js';

const PAGE = 4096;
const MiB = 1024 * 1024;
const dir = mkdtempSync(join(tmpdir(), 'typervisor-diff-'));
test.after(() => rmSync(dir, { recursive: true, force: true }));

const regions: SnapshotRegion[] = [
  { base: 0, size: 2 * MiB, fileOffset: 0 },
  { base: 0x1_0000_0000, size: 1 * MiB, fileOffset: 2 * MiB },
];

function makeRam() {
  const buffers = regions.map((r) => new ArrayBuffer(r.size));
  const ram = guestRamOver(regions, buffers, () => undefined);
  const dirty = new DirtyPages(
    DirtyPages.allocate(regions),
    regions,
    buffers.map((b) => new Uint8Array(b)),
  );
  return { ram, dirty };
}

/** The data extents of a file, as [start, end) byte ranges. */
function extents(path: string): Array<[number, number]> {
  const fd = openSync(path, 'r');
  try {
    const size = statSync(path).size;
    const n = native();
    const out: Array<[number, number]> = [];
    for (let pos = 0; pos < size;) {
      const d = n.lseek(fd, pos, SEEK_DATA);
      if (d < 0) break;
      let h = n.lseek(fd, d, SEEK_HOLE);
      if (h < 0) h = size;
      out.push([d, h]);
      pos = h;
    }
    return out;
  } finally {
    closeSync(fd);
  }
}

test('forEachRun gives the runs of set bits, skipping clear bytes', () => {
  const bits = new Uint8Array(8);
  bits[0] = 0b1000_0110; // 1, 2, 7
  bits[1] = 0b0000_0001; // 8 (continues 7)
  bits[5] = 0x80; // 47
  const runs: Array<[number, number]> = [];
  forEachRun(bits, 64, (a, b) => runs.push([a, b]));
  assert.deepEqual(runs, [
    [1, 3],
    [7, 9],
    [47, 48],
  ]);
  const cut: Array<[number, number]> = [];
  forEachRun(bits, 8, (a, b) => cut.push([a, b])); // only the first 8 pages exist
  assert.deepEqual(cut, [
    [1, 3],
    [7, 8],
  ]);
});

test('a Diff holds only the dirty pages, zeroed ones too; rebased on its Full it is the later Full', () => {
  const { ram, dirty } = makeRam();
  // State 1: some data in both regions.
  ram.memory.fill(0x10 * PAGE, 4 * PAGE, 0x11);
  ram.memory.fill(0x1_0000_0000 + 3 * PAGE, PAGE, 0x22);
  const s1 = join(dir, 'full1.mem');
  writeMemoryFile(s1, ram, regions);
  const full1 = readFileSync(s1);

  // State 2: a new page, a changed page, a page zeroed (page 0x11) and one in region 1.
  const change = (addr: number, len: number, v: number) => {
    ram.memory.fill(addr, len, v);
    dirty.mark(addr, len);
  };
  change(0x100 * PAGE + 17, 5, 0x33); // page 0x100
  change(0x10 * PAGE, 10, 0x44); // page 0x10
  change(0x11 * PAGE, PAGE, 0); // page 0x11, now all zero
  change(0x1_0000_0000 + 0xff * PAGE, PAGE, 0x55); // region 1's last page
  const diff = join(dir, 'diff2.mem');
  writeMemoryFile(diff, ram, regions, {
    dirty: regions.map((_, i) => dirty.region(i)),
  });
  const total = 3 * MiB;
  assert.equal(statSync(diff).size, total);
  assert.deepEqual(extents(diff), [
    [0x10 * PAGE, 0x12 * PAGE],
    [0x100 * PAGE, 0x101 * PAGE],
    [2 * MiB + 0xff * PAGE, total],
  ]);
  assert.ok(statSync(diff).blocks * 512 <= 8 * PAGE, `${statSync(diff).blocks} blocks`);

  const s2 = join(dir, 'full2.mem');
  writeMemoryFile(s2, ram, regions);
  const r = rebaseMemoryFile(s1, diff);
  assert.deepEqual(r, { extents: 3, bytes: 4 * PAGE });
  const merged = readFileSync(s1);
  assert.ok(merged.equals(readFileSync(s2)), 'base + diff = the later Full');
  assert.ok(!merged.equals(full1));
  // Page 0x12 (unchanged since state 1) still has state 1's data.
  assert.equal(merged[0x12 * PAGE], 0x11);
  assert.equal(merged[0x11 * PAGE], 0);
});

test('a diff made elsewhere (data at the very start and end, holes between) rebases too', () => {
  const size = 64 * PAGE;
  const base = join(dir, 'b.mem');
  writeFileSync(base, Buffer.alloc(size, 0xaa));
  const diff = join(dir, 'fc.mem');
  const fd = openSync(diff, 'w');
  writeSync(fd, Buffer.alloc(PAGE, 1), 0, PAGE, 0);
  writeSync(fd, Buffer.alloc(2 * PAGE, 2), 0, 2 * PAGE, size - 2 * PAGE);
  ftruncateSync(fd, size);
  closeSync(fd);
  assert.deepEqual(rebaseMemoryFile(base, diff), { extents: 2, bytes: 3 * PAGE });
  const b = readFileSync(base);
  assert.equal(b[0], 1);
  assert.equal(b[PAGE], 0xaa);
  assert.equal(b[size - 2 * PAGE - 1], 0xaa);
  assert.equal(b[size - 1], 2);

  // An all-hole diff (nothing changed) copies nothing.
  const empty = join(dir, 'empty.mem');
  writeFileSync(empty, '');
  ftruncateEmpty(empty, size);
  assert.deepEqual(rebaseMemoryFile(base, empty), { extents: 0, bytes: 0 });
});

function ftruncateEmpty(path: string, size: number): void {
  const fd = openSync(path, 'r+');
  ftruncateSync(fd, size);
  closeSync(fd);
}

test('rebase refuses a bad pair with a clear error and leaves the base as it was', () => {
  const base = join(dir, 'base.mem');
  writeFileSync(base, Buffer.alloc(8 * PAGE, 7));
  const before = readFileSync(base);
  const short = join(dir, 'short.mem');
  writeFileSync(short, Buffer.alloc(7 * PAGE, 1));
  const sub = join(dir, 'a-directory');
  mkdirSync(sub);
  const cases: Array<[string, string, RegExp]> = [
    [base, short, /the base is 32768 bytes and the diff 28672/],
    [base, base, /the same file/],
    [base, join(dir, 'missing.mem'), /cannot open the diff .*missing\.mem/],
    [join(dir, 'missing.mem'), short, /cannot open the base .*missing\.mem/],
    [base, sub, /the diff .* is not a regular file/],
    [sub, short, /cannot open the base|is not a regular file/],
  ];
  for (const [b, d, re] of cases) assert.throws(() => rebaseMemoryFile(b, d), re, `${b} ${d}`);
  assert.ok(readFileSync(base).equals(before));
});

test('the device-dirty bitmap travels with the guest RAM layout to a worker thread', async () => {
  const layout = createGuestRam([
    { base: 0, size: 1 * MiB },
    { base: 0x1_0000_0000, size: 1 * MiB },
  ]);
  trackDeviceWrites(layout);
  const main = deviceDirtyPages(layout)!;
  const worker = new Worker(
    `const { parentPort, workerData } = require('node:worker_threads');
     import(workerData.url).then(({ mapGuestRam }) => {
       const ram = mapGuestRam(workerData.layout);
       const seen = ram.memory.deviceWrites !== undefined;
       // What a virtqueue does with a buffer it hands out: mark the view.
       ram.memory.deviceWrites.markView(ram.memory.view(0x1_0000_0000 + 5 * 4096, 10));
       ram.unmap();
       parentPort.postMessage({ seen });
     }).catch((e) => parentPort.postMessage({ error: String(e && e.stack || e) }));`,
    {
      eval: true,
      workerData: { url: new URL('./guest-ram.js', import.meta.url).href, layout },
    },
  );
  const reply = await new Promise<{ seen?: boolean; error?: string }>((res) =>
    worker.once('message', res),
  );
  await worker.terminate();
  native().close(layout.memfd);
  assert.equal(reply.error, undefined);
  assert.equal(reply.seen, true);
  assert.equal(countDirty(main.region(0)), 0);
  assert.deepEqual([...main.region(1).subarray(0, 1)], [1 << 5]);
  // Without tracking the layout has no bitmap and the memory marks nothing.
  const plain = createGuestRam([{ base: 0, size: 1 * MiB }]);
  const ram = mapGuestRam(plain);
  assert.equal(ram.memory.deviceWrites, undefined);
  assert.equal(deviceDirtyPages(plain), undefined);
  ram.unmap();
  native().close(plain.memfd);
});

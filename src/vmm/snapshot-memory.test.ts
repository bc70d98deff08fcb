/**
 * The snapshot memory file: sparse write (zero pages are holes, the size is exact), atomic
 * replace, the refusal to overwrite the backing file, the exact-size check, and a private
 * mapping that reads the file and never writes it back. mapMemoryFile needs the native addon
 * (mmap), not KVM.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  closeSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  truncateSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { guestRamOver, type MappedGuestRam } from './guest-ram.js';
import {
  checkMemoryFile,
  mapMemoryFile,
  memoryFileBytes,
  writeMemoryFile,
} from './snapshot-memory.js';
import type { SnapshotRegion } from './snapshot-format.js';

const PAGE = 4096;

function plainRam(regions: SnapshotRegion[]): MappedGuestRam {
  return guestRamOver(
    regions,
    regions.map((r) => new ArrayBuffer(r.size)),
    () => {},
  );
}

function withDir(f: (dir: string) => void): void {
  const dir = mkdtempSync(join(tmpdir(), 'typervisor-snapmem-'));
  try {
    f(dir);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

const regions: SnapshotRegion[] = [
  { base: 0, size: 64 * PAGE, fileOffset: 0 },
  { base: 0x1_0000_0000, size: 32 * PAGE, fileOffset: 64 * PAGE },
];

test('writeMemoryFile: regions back to back, zero pages left as holes, exact size', () => {
  withDir((dir) => {
    const ram = plainRam(regions);
    // Region 0: pages 1, 2 (a run), 10 and the last byte of the region; region 1: page 0.
    ram.memory.write(1 * PAGE, new Uint8Array(2 * PAGE).fill(0xaa));
    ram.memory.write(10 * PAGE + 5, Uint8Array.of(7));
    ram.memory.write(64 * PAGE - 1, Uint8Array.of(9));
    ram.memory.write(0x1_0000_0000 + 17, Uint8Array.of(1, 2, 3));
    const path = join(dir, 'mem');
    writeMemoryFile(path, ram, regions);
    const st = statSync(path);
    assert.equal(st.size, memoryFileBytes(regions));
    assert.equal(st.size, 96 * PAGE);
    // Sparse: 5 non-zero pages of 96 written (blocks are 512 bytes).
    assert.ok(st.blocks * 512 <= 8 * PAGE, `allocated ${st.blocks * 512} bytes`);
    const file = readFileSync(path);
    const expect = new Uint8Array(96 * PAGE);
    expect.set(new Uint8Array(ram.buffers[0]!), 0);
    expect.set(new Uint8Array(ram.buffers[1]!), 64 * PAGE);
    assert.ok(Buffer.from(expect).equals(file));
    assert.deepEqual(readdirSync(dir), ['mem']);

    // Overwrite: the old contents go (the new RAM is all zero: a file of holes).
    writeMemoryFile(path, plainRam(regions), regions);
    assert.equal(statSync(path).size, 96 * PAGE);
    assert.ok(readFileSync(path).every((b) => b === 0));
  });
});

test('writeMemoryFile: deferred rename, refusal of the backing file, failures leave the old file', () => {
  withDir((dir) => {
    const path = join(dir, 'mem');
    writeFileSync(path, 'old');
    const ram = plainRam(regions);
    ram.memory.write(0, Uint8Array.of(1));
    const p = writeMemoryFile(path, ram, regions, { deferRename: true });
    assert.equal(readFileSync(path, 'utf8'), 'old');
    assert.equal(statSync(p.tmpPath).size, 96 * PAGE);
    p.commit();
    p.commit(); // no-op
    assert.equal(statSync(path).size, 96 * PAGE);
    assert.deepEqual(readdirSync(dir), ['mem']);

    const q = writeMemoryFile(path, ram, regions, { deferRename: true });
    q.discard();
    assert.deepEqual(readdirSync(dir), ['mem']);

    const st = statSync(path);
    assert.throws(
      () => writeMemoryFile(path, ram, regions, { backingFile: { dev: st.dev, ino: st.ino } }),
      /is the memory file this microVM was restored from/,
    );
    assert.throws(() => writeMemoryFile(join(dir, 'no', 'mem'), ram, regions), /ENOENT/);
    assert.throws(() => writeMemoryFile(join(dir, 'x'), ram, [regions[0]!]), /do not match/);
    assert.deepEqual(readdirSync(dir), ['mem']);
  });
});

test('checkMemoryFile: exactly the regions total, a regular file', () => {
  withDir((dir) => {
    const path = join(dir, 'mem');
    writeMemoryFile(path, plainRam(regions), regions);
    const ok = checkMemoryFile(path, regions);
    assert.ok(ok.ok);
    assert.equal(ok.value.size, 96 * PAGE);
    assert.equal(ok.value.backing.ino, statSync(path).ino);
    closeSync(ok.value.fd);

    truncateSync(path, 95 * PAGE);
    const short = checkMemoryFile(path, regions);
    assert.ok(
      !short.ok && /truncated/.test(short.error.message),
      String(!short.ok && short.error.message),
    );
    truncateSync(path, 97 * PAGE);
    const long = checkMemoryFile(path, regions);
    assert.ok(!long.ok && /too long/.test(long.error.message));
    // With device memory after RAM (the virtio-mem region): RAM + that many bytes exactly.
    const withRegion = checkMemoryFile(path, regions, PAGE);
    assert.ok(withRegion.ok, String(!withRegion.ok && withRegion.error.message));
    closeSync(withRegion.value.fd);
    const noRegion = checkMemoryFile(path, regions, 2 * PAGE);
    assert.ok(!noRegion.ok && /truncated/.test(noRegion.error.message));
    const missing = checkMemoryFile(join(dir, 'nope'), regions);
    assert.ok(!missing.ok && /ENOENT/.test(missing.error.message));
    const isDir = checkMemoryFile(dir, regions);
    assert.ok(!isDir.ok && /not a regular file/.test(isDir.error.message));
    const badLayout = checkMemoryFile(path, [{ base: 0, size: PAGE, fileOffset: PAGE }]);
    assert.ok(!badLayout.ok && /file offset/.test(badLayout.error.message));
  });
});

test('mapMemoryFile: private copy-on-write mapping of the file', () => {
  withDir((dir) => {
    const path = join(dir, 'mem');
    const src = plainRam(regions);
    src.memory.write(3 * PAGE, new Uint8Array(PAGE).fill(0x5a));
    src.memory.write(0x1_0000_0000 + PAGE, Uint8Array.of(0xc3));
    writeMemoryFile(path, src, regions);
    const before = readFileSync(path);

    const checked = checkMemoryFile(path, regions);
    assert.ok(checked.ok);
    const m = mapMemoryFile(checked.value.fd, regions);
    closeSync(checked.value.fd); // the mapping holds the file
    try {
      assert.equal(m.layout.memfd, -1);
      assert.equal(m.layout.hostAddrs?.length, 2);
      assert.deepEqual(m.layout.regions, regions);
      assert.deepEqual(m.backing, checked.value.backing);
      assert.equal(m.ram.memory.readU8(3 * PAGE + 100), 0x5a);
      assert.equal(m.ram.memory.readU8(0x1_0000_0000 + PAGE), 0xc3);
      // Writes go to private copies, never to the file.
      m.ram.memory.write(3 * PAGE, Uint8Array.of(1, 2, 3));
      m.ram.memory.write(0x1_0000_0000 + 5 * PAGE, Uint8Array.of(4));
      const got = new Uint8Array(3);
      m.ram.memory.read(3 * PAGE, got);
      assert.deepEqual([...got], [1, 2, 3]);
    } finally {
      m.ram.unmap();
      m.ram.unmap(); // harmless twice
    }
    assert.ok(before.equals(readFileSync(path)));
  });
});

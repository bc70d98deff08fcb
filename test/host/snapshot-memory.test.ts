/**
 * The snapshot memory file against the real kernel (needs the native addon built from this tree:
 * viewAddress, release, lseek; not KVM).
 *
 * A restored VM's guest RAM: the main thread maps the memory file privately (copy-on-write) once;
 * a worker wraps the same addresses (viewAddress) instead of mapping, so its writes are the main
 * thread's (and KVM's) memory, not a private copy of its own. The file itself never changes.
 *
 * A booted VM's guest RAM (a memfd): writing the memory file reads only the memfd's data extents,
 * so guest RAM the guest never touched is not allocated by the snapshot.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { closeSync, fstatSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Worker } from 'node:worker_threads';
import { native } from '../../src/kvm/native.js';
import {
  allocateGuestRam,
  createGuestRam,
  mapGuestRam,
  residentRuns,
} from '../../src/vmm/guest-ram.js';
import { checkMemoryFile, mapMemoryFile, writeMemoryFile } from '../../src/vmm/snapshot-memory.js';
import type { SnapshotRegion } from '../../src/vmm/snapshot-format.js';
import { tempDir } from './helpers.js';

const MiB = 1024 * 1024;
const HIGH = 0x1_0000_0000;

// The worker: map through the layout (viewAddress), read, write, release, report.
const WORKER = `
const { parentPort, workerData } = require('node:worker_threads');
import(workerData.url).then(({ mapGuestRam }) => {
  const ram = mapGuestRam(workerData.layout);
  const seen = [ram.memory.readU8(0), ram.memory.readU8(${HIGH} + 4096)];
  ram.memory.write(0x234, Uint8Array.of(0xde, 0xad));
  ram.memory.write(${HIGH} + 0x8000, new Uint8Array(4096).fill(0x77));
  ram.unmap();
  parentPort.postMessage({ seen, after: ram.buffers.map((b) => b.byteLength) });
}).catch((e) => parentPort.postMessage({ error: String(e && e.stack || e) }));
`;

test('guest RAM view: a worker writes through viewAddress into the main thread private mapping', async () => {
  const n = native();
  assert.equal(
    typeof n.viewAddress,
    'function',
    'the native shim predates viewAddress/release: rebuild it (npm install)',
  );
  const regions: SnapshotRegion[] = [
    { base: 0, size: MiB, fileOffset: 0 },
    { base: HIGH, size: MiB, fileOffset: MiB },
  ];
  const path = join(tempDir('typervisor-ramview-'), 'mem');
  const content = new Uint8Array(2 * MiB);
  content.fill(0x11, 0, 4096);
  content.fill(0x22, MiB + 4096, MiB + 8192);
  writeFileSync(path, content);

  const checked = checkMemoryFile(path, regions);
  assert.ok(checked.ok, checked.ok ? '' : checked.error.message);
  const m = mapMemoryFile(checked.value.fd, regions);
  closeSync(checked.value.fd);
  try {
    assert.throws(
      () => mapGuestRam({ ...m.layout, hostAddrs: m.layout.hostAddrs!.slice(1) }),
      /one host address per region/,
    );
    const url = new URL('../../src/vmm/guest-ram.js', import.meta.url).href;
    const w = new Worker(WORKER, { eval: true, workerData: { url, layout: m.layout } });
    const reply = await new Promise<{ seen?: number[]; after?: number[]; error?: string }>(
      (resolve, reject) => {
        w.once('message', resolve);
        w.once('error', reject);
      },
    );
    await w.terminate();
    assert.equal(reply.error, undefined, reply.error);
    assert.deepEqual(reply.seen, [0x11, 0x22], 'the worker reads the file through the view');
    assert.deepEqual(reply.after, [0, 0], 'release detaches the views');

    // The worker's writes are in the main thread's mapping (the one KVM would use)...
    assert.equal(m.ram.memory.readU8(0x234), 0xde);
    assert.equal(m.ram.memory.readU8(0x235), 0xad);
    assert.equal(m.ram.memory.readU8(HIGH + 0x8000 + 4095), 0x77);
    assert.equal(m.ram.memory.readU8(0), 0x11); // still mapped after the worker's release
    // ...at the same host addresses...
    assert.equal(n.bufferAddress(m.ram.buffers[1]!), m.layout.hostAddrs![1]);
    // ...but not in the file, nor in another private mapping of it (a clone).
    assert.ok(Buffer.from(content).equals(readFileSync(path)), 'the memory file changed');
    const again = checkMemoryFile(path, regions);
    assert.ok(again.ok);
    const clone = mapMemoryFile(again.value.fd, regions);
    closeSync(again.value.fd);
    assert.equal(clone.ram.memory.readU8(0x234), 0x11);
    assert.equal(clone.ram.memory.readU8(HIGH + 0x8000), 0);
    clone.ram.unmap();
  } finally {
    m.ram.unmap();
  }
});

/** Two 16 MiB regions (0 and HIGH): 3 bytes low, 3 pages of 0x42 high, one zeroed page. */
function writePattern(memory: { write(addr: number, src: Uint8Array): void }): void {
  memory.write(5 * 4096 + 3, Uint8Array.of(1, 2, 3));
  memory.write(HIGH + 8 * MiB, new Uint8Array(3 * 4096).fill(0x42));
  memory.write(HIGH + 9 * MiB, new Uint8Array(4096)); // touched, but zero: a hole in the file
}

/** The memory file of writePattern's RAM: exactly that, sparse; its bytes. */
function checkPatternFile(path: string): Buffer {
  const file = readFileSync(path);
  assert.equal(file.length, 32 * MiB);
  assert.ok(statSync(path).blocks * 512 <= 8 * 4096, 'the memory file is not sparse');
  assert.deepEqual([...file.subarray(5 * 4096 + 3, 5 * 4096 + 6)], [1, 2, 3]);
  assert.ok(file.subarray(24 * MiB, 24 * MiB + 3 * 4096).every((b) => b === 0x42));
  const nonZero = file.reduce((c, b) => c + (b === 0 ? 0 : 1), 0);
  assert.equal(nonZero, 3 + 3 * 4096);
  return file;
}

test('memory file from a memfd: only data extents are read, untouched RAM stays unallocated', (t) => {
  const n = native();
  assert.equal(typeof n.lseek, 'function', 'the native shim predates lseek: rebuild it');
  const layout = createGuestRam([
    { base: 0, size: 16 * MiB },
    { base: HIGH, size: 16 * MiB },
  ]);
  const ram = mapGuestRam(layout);
  const dir = tempDir('typervisor-memfd-');
  try {
    writePattern(ram.memory);
    const allocated = () => fstatSync(layout.memfd).blocks * 512;
    const before = allocated();
    assert.ok(before <= 64 * 4096, `memfd has ${before} bytes allocated before the snapshot`);

    const path = join(dir, 'mem');
    assert.equal(ram.memfd, layout.memfd);
    writeMemoryFile(path, ram, layout.regions); // sourceFd defaults to ram.memfd
    assert.equal(allocated(), before, 'writing the memory file allocated guest RAM');
    const file = checkPatternFile(path);

    // The same RAM scanned whole gives the same file (and, on shmem, allocates what it reads).
    const whole = join(dir, 'whole');
    writeMemoryFile(whole, ram, layout.regions, { sourceFd: -1 });
    assert.ok(file.equals(readFileSync(whole)));
    t.diagnostic(`memfd allocation after a whole scan: ${allocated()} bytes (was ${before})`);
  } finally {
    ram.unmap();
    closeSync(layout.memfd);
  }
});

test('memory file from anonymous RAM (a booted VM): only existing pages are read', (t) => {
  const { layout, ram } = allocateGuestRam([
    { base: 0, size: 16 * MiB },
    { base: HIGH, size: 16 * MiB },
  ]);
  const dir = tempDir('typervisor-anon-');
  try {
    writePattern(ram.memory);
    const runs = () => ram.buffers.map((b) => JSON.stringify(residentRuns(b)));
    const before = runs();
    assert.notEqual(before[1], '[]', 'the second region has pages');

    const path = join(dir, 'mem');
    writeMemoryFile(path, ram, layout.regions);
    // A read of an untouched page would map the zero page there (and pagemap would show it).
    assert.deepEqual(runs(), before, 'writing the memory file read untouched guest RAM');
    const file = checkPatternFile(path);

    // The same RAM scanned whole (no pagemap, as in a jail without /proc) gives the same file.
    const whole = join(dir, 'whole');
    writeMemoryFile(whole, { ...ram, anonymous: false }, layout.regions);
    assert.ok(file.equals(readFileSync(whole)));
    t.diagnostic(`pages after a whole scan: ${runs().join(' ')}`);
  } finally {
    ram.unmap();
  }
});

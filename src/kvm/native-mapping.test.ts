/**
 * The shim's ArrayBuffers over mappings (mmap, viewAddress): V8 does not count them as external
 * memory (native/uncounted.cc), so mapping a large guest RAM starts no garbage collection; they
 * read and write the mapping, and detach on munmap / release.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ftruncateSync, readFileSync } from 'node:fs';
import { PerformanceObserver } from 'node:perf_hooks';
import {
  MAP_ANONYMOUS,
  MAP_NORESERVE,
  MAP_PRIVATE,
  MAP_SHARED,
  native,
  PROT_READ,
  PROT_WRITE,
} from './native.js';

const MIB = 1024 * 1024;

test('a 1 GiB mapping is not V8 external memory and starts no GC; views detach on release', async () => {
  const n = native();
  const gcs: string[] = [];
  const obs = new PerformanceObserver((l) => gcs.push(...l.getEntries().map((e) => e.name)));
  obs.observe({ entryTypes: ['gc'] });
  const fd = n.memfdCreate('typervisor-test', 0);
  try {
    ftruncateSync(fd, 1024 * MIB);
    const before = process.memoryUsage().external;
    const buffers: ArrayBuffer[] = [];
    // Counted, four of these would have made V8 collect (it does at +64 MiB since the last).
    for (let i = 0; i < 4; i++)
      buffers.push(n.mmap(1024 * MIB, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_NORESERVE, fd, 0));
    const grew = process.memoryUsage().external - before;
    assert.ok(grew < MIB, `external memory grew by ${grew} bytes with 4 GiB mapped`);
    // The mappings are the same memory: a write through one is read through another, and
    // through a view of its address.
    new Uint8Array(buffers[0]!)[1000 * MIB] = 0x5a;
    assert.equal(new Uint8Array(buffers[3]!)[1000 * MIB], 0x5a);
    const view = n.viewAddress(n.bufferAddress(buffers[1]!) + BigInt(1000 * MIB), 4096);
    assert.equal(new Uint8Array(view)[0], 0x5a);
    n.release(view);
    assert.equal(view.byteLength, 0);
    for (const b of buffers) n.munmap(b);
    assert.equal(buffers[0]!.byteLength, 0);
    assert.ok(process.memoryUsage().external - before < MIB);
    await new Promise((r) => setTimeout(r, 50)); // the observer reports asynchronously
    assert.deepEqual(gcs, [], 'no garbage collection while mapping');
  } finally {
    obs.disconnect();
    n.close(fd);
  }
});

test('noHugePages marks exactly its range MADV_NOHUGEPAGE (smaps VmFlags nh); an unmapped range throws', () => {
  const n = native();
  const flagsAt = (addr: bigint): string[] => {
    let at = -1n;
    for (const l of readFileSync('/proc/self/smaps', 'latin1').split('\n')) {
      const h = /^([0-9a-f]+)-([0-9a-f]+) /.exec(l);
      if (h) at = BigInt(`0x${h[1]}`) <= addr && addr < BigInt(`0x${h[2]}`) ? addr : -1n;
      else if (at === addr && l.startsWith('VmFlags:')) return l.split(/\s+/).slice(1);
    }
    return [];
  };
  const buf = n.mmap(4 * MIB, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  try {
    const base = n.bufferAddress(buf);
    assert.ok(!flagsAt(base).includes('nh'), 'a fresh anonymous mapping has no nh');
    n.noHugePages(base + BigInt(2 * MIB), BigInt(2 * MIB));
    assert.ok(flagsAt(base + BigInt(2 * MIB)).includes('nh'), 'the range given');
    assert.ok(!flagsAt(base).includes('nh'), 'and not the rest');
    // (below mmap_min_addr: never mapped)
    assert.throws(() => n.noHugePages(0x1000n, 4096n), /ENOMEM/);
  } finally {
    n.munmap(buf);
  }
});

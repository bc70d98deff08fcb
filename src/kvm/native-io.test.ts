/**
 * The shim's preadv/pwritev (virtio-blk's Sync engine): real syscalls on a real file, at an
 * offset, over several buffers; a read past the end is short; argument checks.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { closeSync, mkdtempSync, openSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { native } from './native.js';

test('preadv/pwritev move several buffers at a file offset in one call', () => {
  const dir = mkdtempSync(join(tmpdir(), 'typervisor-pv-'));
  const path = join(dir, 'f');
  const data = new Uint8Array(10_000).map((_, i) => (i * 31) & 0xff);
  writeFileSync(path, data);
  const fd = openSync(path, 'r+');
  try {
    const n = native();
    const bufs = [new Uint8Array(100), new Uint8Array(0), new Uint8Array(3000)];
    assert.equal(n.preadv(fd, bufs, 1234), 3100);
    assert.deepEqual(Buffer.concat(bufs), Buffer.from(data.subarray(1234, 4334)));
    // Past the end: short, then nothing.
    assert.equal(n.preadv(fd, [new Uint8Array(64)], 9_990), 10);
    assert.equal(n.preadv(fd, [new Uint8Array(64)], 10_000), 0);
    const parts = [new Uint8Array(7).fill(1), new Uint8Array(9).fill(2)];
    assert.equal(n.pwritev(fd, parts, 500), 16);
    const back = readFileSync(path);
    assert.deepEqual(
      [...back.subarray(499, 517)],
      [(499 * 31) & 0xff, ...Array(7).fill(1), ...Array(9).fill(2), (516 * 31) & 0xff],
    );
    assert.throws(() => n.preadv(fd, [new Uint8Array(4)], -1), /negative file offset/);
    assert.throws(
      () => n.preadv(fd, new Array(1025).fill(new Uint8Array(1)), 0),
      /too many iovecs/,
    );
    assert.throws(() => n.pwritev(-1, [new Uint8Array(1)], 0), /pwritev.*EBADF|EBADF/);
  } finally {
    closeSync(fd);
    rmSync(dir, { recursive: true });
  }
});

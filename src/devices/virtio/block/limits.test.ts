/**
 * virtio-blk against a hostile driver: seg_max / size_max offered and enforced, and the bytes of
 * one request capped, so that descriptors aliasing one buffer cannot turn a little guest RAM
 * into gigabytes of host I/O (issue 12).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { closeSync, mkdtempSync, openSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { harness, type Harness } from '../testing/harness.js';
import type { MockQueue } from '../testing/mock-driver.js';
import { blockDevice } from './descriptor.js';
import { bit } from '../constants.js';
import {
  BLK_FLUSHES_PER_TURN,
  BLK_MAX_REQUEST_BYTES,
  BLK_SEG_MAX,
  BLK_SIZE_MAX,
  BlockDevice,
  blockIdentity,
  VIRTIO_BLK_F_SEG_MAX,
  VIRTIO_BLK_F_SIZE_MAX,
  type BlockFile,
} from './block.js';
import {
  VIRTIO_BLK_S_IOERR,
  VIRTIO_BLK_S_OK,
  VIRTIO_BLK_T_FLUSH,
  VIRTIO_BLK_T_IN,
  VIRTIO_BLK_T_OUT,
} from './request.js';

/** A 1 GiB disk that only counts the bytes asked of it (no data is copied). */
function countingDisk(opts: { features?: (f: bigint) => bigint } = {}) {
  const sectors = (1 << 30) / 512;
  const io = { read: 0, written: 0, calls: 0, flushes: 0 };
  const file: BlockFile = {
    read: (b) => void ((io.read += b.length), io.calls++),
    write: (b) => void ((io.written += b.length), io.calls++),
    flush: () => void io.flushes++,
  };
  const dev = new BlockDevice({
    name: 'hostile-blk',
    file,
    capacity: sectors,
    readOnly: false,
    serial: new Uint8Array(0),
    log: () => undefined,
  });
  const h = harness(blockIdentity(sectors, false), dev);
  const [q] = h.start({ features: opts.features });
  return { h, q: q!, dev, io };
}

/**
 * One request whose `segs` data descriptors all point at the same `segLen`-byte buffer, in an
 * indirect table; returns [status byte, used.len].
 */
function aliasing(
  h: Harness,
  q: MockQueue,
  type: number,
  segs: number,
  segLen: number,
): [number, number] {
  const hdr = h.alloc.alloc(16);
  h.mem.writeU32(hdr, type);
  h.mem.writeU64(hdr + 8, 0n);
  const buf = h.alloc.alloc(segLen, 4096);
  const st = h.alloc.alloc(1, 1);
  h.mem.writeU8(st, 0xee);
  const write = type === VIRTIO_BLK_T_IN;
  const bufs = [{ addr: hdr, len: 16 }];
  for (let i = 0; i < segs; i++) bufs.push({ addr: buf, len: segLen, write } as never);
  bufs.push({ addr: st, len: 1, write: true } as never);
  q.addIndirectChain(bufs, h.alloc.alloc(16 * bufs.length, 16));
  h.kick();
  h.deferred.drain();
  const used = q.takeUsed();
  assert.equal(used.length, 1);
  return [h.mem.readU8(st), used[0]!.len];
}

test('virtio-blk offers seg_max and size_max in its config space, as Linux reads them', () => {
  const { h } = countingDisk();
  const offered = h.transport.state.deviceFeatures;
  assert.ok(offered & bit(VIRTIO_BLK_F_SEG_MAX) && offered & bit(VIRTIO_BLK_F_SIZE_MAX));
  assert.equal(h.driver.read(0x108), BLK_SIZE_MAX); // size_max
  assert.equal(h.driver.read(0x10c), BLK_SEG_MAX); // seg_max
  // Linux never builds a request larger than max_segments * max_segment_size: our cap.
  assert.equal(BLK_MAX_REQUEST_BYTES, BLK_SEG_MAX * BLK_SIZE_MAX);
  // A driver without indirect descriptors fits header + seg_max segments + status in a queue.
  assert.equal(BLK_SEG_MAX + 2, 256);
});

test('virtio-blk: aliasing requests over seg_max, size_max or the byte cap fail with no host I/O', () => {
  const { h, q, dev, io } = countingDisk();
  // The largest request Linux may build: seg_max segments of size_max, all one buffer: served.
  assert.deepEqual(aliasing(h, q, VIRTIO_BLK_T_IN, BLK_SEG_MAX, BLK_SIZE_MAX), [
    VIRTIO_BLK_S_OK,
    BLK_MAX_REQUEST_BYTES + 1,
  ]);
  assert.equal(io.read, BLK_MAX_REQUEST_BYTES);
  // One segment more (the indirect table allows 1024 descriptors): refused, nothing read.
  assert.deepEqual(aliasing(h, q, VIRTIO_BLK_T_IN, BLK_SEG_MAX + 1, 512), [VIRTIO_BLK_S_IOERR, 1]);
  assert.deepEqual(aliasing(h, q, VIRTIO_BLK_T_OUT, 1022, 65536), [VIRTIO_BLK_S_IOERR, 1]);
  // A segment over size_max.
  assert.deepEqual(aliasing(h, q, VIRTIO_BLK_T_OUT, 1, BLK_SIZE_MAX + 512), [
    VIRTIO_BLK_S_IOERR,
    1,
  ]);
  assert.equal(io.read, BLK_MAX_REQUEST_BYTES, 'no I/O for refused requests');
  assert.equal(io.written, 0);
  assert.equal(dev.counters.oversized, 3);
  assert.equal(dev.counters.badRequests, 3);
  assert.equal(h.transport.state.counters().needsReset, 0);
});

test('virtio-blk: without SIZE_MAX negotiated, segments may be large but a request is still capped', () => {
  const { h, q, dev, io } = countingDisk({
    features: (f) => f & ~bit(VIRTIO_BLK_F_SIZE_MAX),
  });
  // 1 MiB in one segment (bench/guests/blkloop.S negotiates nothing but VERSION_1).
  assert.deepEqual(aliasing(h, q, VIRTIO_BLK_T_IN, 1, 1 << 20), [VIRTIO_BLK_S_OK, (1 << 20) + 1]);
  // 200 segments of 256 KiB over one buffer: 50 MiB asked for with 256 KiB of guest RAM.
  assert.deepEqual(aliasing(h, q, VIRTIO_BLK_T_IN, 200, 256 << 10), [VIRTIO_BLK_S_IOERR, 1]);
  assert.equal(io.read, 1 << 20);
  assert.equal(dev.counters.oversized, 1);
});

test('virtio-blk Sync: a turn runs at most BLK_FLUSHES_PER_TURN flushes, then yields', () => {
  const { h, q, io } = countingDisk({ features: (f) => f });
  const n = 3 * BLK_FLUSHES_PER_TURN + 1;
  const status: number[] = [];
  for (let i = 0; i < n; i++) {
    const hdr = h.alloc.alloc(16);
    h.mem.writeU32(hdr, VIRTIO_BLK_T_FLUSH);
    const st = h.alloc.alloc(1, 1);
    h.mem.writeU8(st, 0xee);
    status.push(st);
    q.addChain([
      { addr: hdr, len: 16 },
      { addr: st, len: 1, write: true },
    ]);
  }
  h.kick(); // the first turn: BLK_FLUSHES_PER_TURN fdatasyncs, then its next turn is deferred
  assert.equal(io.flushes, BLK_FLUSHES_PER_TURN);
  assert.equal(q.takeUsed().length, BLK_FLUSHES_PER_TURN);
  assert.equal(h.deferred.size, 1);
  h.deferred.runRound();
  assert.equal(io.flushes, 2 * BLK_FLUSHES_PER_TURN);
  h.deferred.drain();
  assert.equal(io.flushes, n);
  assert.equal(q.takeUsed().length, n - BLK_FLUSHES_PER_TURN);
  for (const st of status) assert.equal(h.mem.readU8(st), VIRTIO_BLK_S_OK);
  assert.equal(h.device.metrics().queue_budget_yields, 3);
});

test('virtio-blk metrics count oversized requests apart and among the invalid ones', () => {
  const { dir, path } = (() => {
    const d = mkdtempSync(join(tmpdir(), 'typervisor-blk-'));
    const p = join(d, 'disk.img');
    writeFileSync(p, new Uint8Array(1 << 20));
    return { dir: d, path: p };
  })();
  const fd = openSync(path, 'r');
  try {
    const created = blockDevice.create(
      {
        fd,
        path,
        readOnly: true,
        serial: new Uint8Array(0),
        sizeBytes: 1 << 20,
        capacity: 2048,
        ioEngine: 'Sync',
      },
      { name: 'b', sys: {} as never, loop: {} as never, log: () => undefined },
    );
    const dev = created.backend as BlockDevice;
    const h = harness(blockIdentity(2048, true), dev);
    const [q] = h.start();
    assert.deepEqual(aliasing(h, q!, VIRTIO_BLK_T_IN, BLK_SEG_MAX + 1, 512), [
      VIRTIO_BLK_S_IOERR,
      1,
    ]);
    const m = created.metrics!();
    assert.equal(m.oversized_reqs_count, 1);
    assert.equal(m.invalid_reqs_count, 1);
    assert.equal(m.read_bytes, 0);
  } finally {
    closeSync(fd);
    rmSync(dir, { recursive: true });
  }
});

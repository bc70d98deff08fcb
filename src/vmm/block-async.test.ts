/**
 * virtio-blk's Async engine (io_uring) on this host's kernel: a whole device (transport, queue,
 * mock driver over anonymous guest memory) whose requests go through a real ring to a real
 * file, completions arriving on the real eventfd through the device worker's EventLoop.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  closeSync,
  mkdtempSync,
  openSync,
  readFileSync,
  rmSync,
  truncateSync,
  writeFileSync,
  writeSync,
} from 'node:fs';
import { execFileSync } from 'node:child_process';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { EventLoop } from '../events/event-loop.js';
import { native, isSyscallError } from '../kvm/native.js';
import { BlockDevice, blockIdentity, fdBlockFile } from '../devices/virtio/block/block.js';
import { blockDevice } from '../devices/virtio/block/descriptor.js';
import {
  IORING_OP_FSYNC,
  IORING_OP_NOP,
  IORING_OP_READV,
  IORING_OP_WRITEV,
  IOSQE_ASYNC,
  IoUring,
  encodeRestrictions,
} from '../devices/virtio/block/io-uring.js';
import { BLK_URING_ALLOW } from '../devices/virtio/block/async-engine.js';
import { TX_URING_ALLOW } from '../devices/virtio/net/tx-batch.js';
import {
  VIRTIO_BLK_S_IOERR,
  VIRTIO_BLK_S_OK,
  VIRTIO_BLK_T_FLUSH,
  VIRTIO_BLK_T_GET_ID,
  VIRTIO_BLK_T_IN,
  VIRTIO_BLK_T_OUT,
} from '../devices/virtio/block/request.js';
import type { HostSys } from '../devices/virtio/descriptor.js';
import { harness } from '../devices/virtio/testing/harness.js';

const SECTORS = 2048; // 1 MiB

function image(): { dir: string; path: string; fd: number } {
  const dir = mkdtempSync(join(tmpdir(), 'typervisor-blk-async-'));
  const path = join(dir, 'disk.img');
  const data = Buffer.alloc(SECTORS * 512);
  for (let i = 0; i < data.length; i++) data[i] = (i * 13 + (i >> 9)) & 0xff;
  writeFileSync(path, data);
  return { dir, path, fd: openSync(path, 'r+') };
}

/**
 * The drive's file is a FIFO (opened read-write, so the open does not wait for a writer): io_uring
 * parks a read of it until bytes arrive, so requests stay in flight until the test writes them.
 * A read of a regular file in the page cache completes inside io_uring_enter and is answered in
 * the same turn.
 */
function fifoImage(): { dir: string; path: string; fd: number } {
  const dir = mkdtempSync(join(tmpdir(), 'typervisor-blk-async-'));
  const path = join(dir, 'disk.fifo');
  execFileSync('mkfifo', [path]);
  return { dir, path, fd: openSync(path, 'r+') };
}

function setup(entries = 128, readOnly = false, fifo = false, maxBytesInFlight?: number) {
  const img = fifo ? fifoImage() : image();
  const loop = new EventLoop((e) => {
    throw e;
  });
  const ring = IoUring.open(native(), entries, BLK_URING_ALLOW);
  const logs: string[] = [];
  const dev = new BlockDevice({
    name: 'async-blk',
    file: fdBlockFile(img.fd),
    capacity: SECTORS,
    readOnly,
    serial: new TextEncoder().encode('async-1'),
    log: (m) => logs.push(m),
    uring: {
      ring,
      loop,
      bufferAddress: native().bufferAddress,
      ...(maxBytesInFlight ? { maxBytesInFlight } : {}),
    },
  });
  const h = harness(blockIdentity(SECTORS, readOnly), dev);
  const [q] = h.start();
  const posted: Array<{ head: number; st: number; data: number[]; len: number }> = [];
  const used = new Map<number, number>();
  return {
    ...img,
    h,
    q: q!,
    dev,
    ring,
    loop,
    logs,
    /** Makes one request available (no kick); returns its head. */
    post(type: number, sector: number, bufs: Array<{ len: number; bytes?: Uint8Array }>) {
      const hdr = h.alloc.alloc(16);
      h.mem.writeU32(hdr, type);
      h.mem.writeU64(hdr + 8, BigInt(sector));
      const write = type === VIRTIO_BLK_T_IN || type === VIRTIO_BLK_T_GET_ID;
      const data = bufs.map((b) => {
        const a = h.alloc.alloc(b.len, 512);
        if (b.bytes) h.mem.write(a, b.bytes);
        return a;
      });
      const st = h.alloc.alloc(1, 1);
      h.mem.fill(st, 1, 0xee);
      const head = q!.addChain([
        { addr: hdr, len: 16 },
        ...bufs.map((b, i) => ({ addr: data[i]!, len: b.len, write })),
        { addr: st, len: 1, write: true },
      ] as never);
      posted.push({ head, st, data, len: bufs.reduce((n, b) => n + b.len, 0) });
      return head;
    },
    /** Runs the loop until `n` requests in all were used (fails after 5 s). */
    waitUsed(n: number) {
      const end = Date.now() + 5000;
      for (;;) {
        for (const u of q!.takeUsed()) used.set(u.id, u.len);
        if (used.size >= n) return;
        assert.ok(Date.now() < end, `only ${used.size} of ${n} requests completed`);
        loop.runOnce(100);
      }
    },
    used,
    status: (head: number) => h.mem.readU8(posted.find((p) => p.head === head)!.st),
    dataOf: (head: number, i = 0) => posted.find((p) => p.head === head)!.data[i]!,
    done() {
      dev.close();
      loop.close();
      closeSync(img.fd);
      rmSync(img.dir, { recursive: true, force: true });
    },
  };
}

test('Async: writes, a flush and reads of one kick go through io_uring and reach the file', () => {
  const t = setup();
  try {
    assert.equal(t.dev.ioEngine, 'Async');
    const pattern = (k: number) => Buffer.alloc(8192, 0x40 + k);
    const writes = [0, 1, 2, 3].map((k) =>
      // Two segments each (4 KiB + 4 KiB): writev over the whole chain.
      t.post(VIRTIO_BLK_T_OUT, 100 + k * 16, [
        { len: 4096, bytes: pattern(k).subarray(0, 4096) },
        { len: 4096, bytes: pattern(k).subarray(4096) },
      ]),
    );
    const flush = t.post(VIRTIO_BLK_T_FLUSH, 0, []);
    const id = t.post(VIRTIO_BLK_T_GET_ID, 0, [{ len: 20 }]);
    t.h.kick();
    // One kick, one io_uring_enter for the five requests with file I/O.
    assert.equal(t.dev.engine!.counters.submits, 1);
    assert.equal(t.dev.engine!.counters.submitted, 5);
    t.waitUsed(6);
    for (const h of [...writes, flush, id]) assert.equal(t.status(h), VIRTIO_BLK_S_OK, `head ${h}`);
    assert.equal(t.used.get(writes[0]!), 1);
    assert.equal(t.used.get(id), 21);
    const file = readFileSync(t.path);
    for (let k = 0; k < 4; k++)
      assert.deepEqual(
        file.subarray((100 + k * 16) * 512, (100 + k * 16) * 512 + 8192),
        pattern(k),
      );
    // Reads back (and a read of untouched data), three segments of different sizes.
    const r1 = t.post(VIRTIO_BLK_T_IN, 116, [{ len: 512 }, { len: 3584 }, { len: 4096 }]);
    const r2 = t.post(VIRTIO_BLK_T_IN, 2000, [{ len: 4096 }]);
    t.h.kick();
    t.waitUsed(8);
    assert.equal(t.status(r1), VIRTIO_BLK_S_OK);
    assert.equal(t.used.get(r1), 8193);
    const got = Buffer.concat([
      Buffer.from(t.h.mem.view(t.dataOf(r1, 0), 512)),
      Buffer.from(t.h.mem.view(t.dataOf(r1, 1), 3584)),
      Buffer.from(t.h.mem.view(t.dataOf(r1, 2), 4096)),
    ]);
    assert.deepEqual(got, pattern(1));
    assert.deepEqual(
      Buffer.from(t.h.mem.view(t.dataOf(r2), 4096)),
      file.subarray(2000 * 512, 2000 * 512 + 4096),
    );
    const c = t.dev.counters;
    assert.deepEqual([c.reads, c.writes, c.flushes, c.bytesWritten], [2, 4, 1, 32768]);
  } finally {
    t.done();
  }
});

test('Async: at most the ring size in flight; the rest waits on the queue and is served after', () => {
  const t = setup(4, false, true);
  try {
    const heads = Array.from({ length: 12 }, (_, i) =>
      t.post(VIRTIO_BLK_T_IN, i * 8, [{ len: 4096 }]),
    );
    t.h.kick();
    assert.equal(t.dev.engine!.inFlight, 4);
    assert.ok(t.dev.engine!.counters.ringFull >= 1);
    assert.equal(t.q.takeUsed().length, 0);
    // The bytes the twelve reads wait for.
    writeSync(t.fd, Buffer.alloc(12 * 4096, 0x5a));
    t.waitUsed(12);
    for (const h of heads) assert.equal(t.status(h), VIRTIO_BLK_S_OK);
    assert.equal(t.dev.engine!.counters.inFlightHighWater, 4);
    assert.equal(t.dev.counters.reads, 12);
    assert.equal(t.h.mem.readU8(t.dataOf(heads[11]!) + 4095), 0x5a);
  } finally {
    t.done();
  }
});

test('Async: at most maxBytesInFlight bytes in flight; a larger request goes in alone; drain waits for no more', () => {
  // 64 KiB allowed: four reads of 16 KiB, then one of 128 KiB (over the bound on its own), then
  // four more of 16 KiB. The image is a FIFO, so reads stay in flight until bytes are written.
  const t = setup(128, false, true, 64 * 1024);
  try {
    const small = (i: number) => t.post(VIRTIO_BLK_T_IN, i * 32, [{ len: 16 * 1024 }]);
    const first = [0, 1, 2, 3, 4].map(small);
    const big = t.post(VIRTIO_BLK_T_IN, 512, [{ len: 128 * 1024 }]);
    const last = [5, 6, 7, 8].map(small);
    t.h.kick();
    const e = t.dev.engine!;
    assert.equal(e.inFlight, 4, 'four 16 KiB reads fill 64 KiB');
    assert.equal(e.counters.bytesInFlight, 64 * 1024);
    assert.ok(e.counters.ringFull >= 1, 'the fifth waited (io_engine_throttled_events)');
    // Bytes for the first four: the fifth goes in as they complete, the big one waits for it.
    writeSync(t.fd, Buffer.alloc(4 * 16 * 1024, 1));
    t.waitUsed(4);
    assert.equal(e.inFlight, 1);
    writeSync(t.fd, Buffer.alloc(16 * 1024, 2));
    t.waitUsed(5);
    assert.equal(e.inFlight, 1, 'the 128 KiB read is in flight alone');
    assert.equal(e.counters.bytesInFlight, 128 * 1024);
    writeSync(t.fd, Buffer.alloc(128 * 1024, 3));
    t.waitUsed(6);
    assert.equal(e.inFlight, 4);
    // What is in flight now is all drain() waits for.
    writeSync(t.fd, Buffer.alloc(4 * 16 * 1024, 4));
    t.waitUsed(10);
    assert.equal(e.counters.bytesInFlight, 0);
    for (const h of [...first, big, ...last]) assert.equal(t.status(h), VIRTIO_BLK_S_OK);
    assert.equal(t.h.mem.readU8(t.dataOf(big) + 128 * 1024 - 1), 3);
    assert.equal(t.h.mem.readU8(t.dataOf(last[3]!)), 4);
    assert.ok(e.counters.inFlightHighWater <= 4);
  } finally {
    t.done();
  }
});

test('Async: reads the page cache serves are answered in the kick that posted them', () => {
  const t = setup(4);
  try {
    // Three times the ring's size: each round's completions free the slots for the next.
    const heads = Array.from({ length: 12 }, (_, i) =>
      t.post(VIRTIO_BLK_T_IN, i * 8, [{ len: 4096 }]),
    );
    const interrupts = t.h.interrupts();
    t.h.kick();
    assert.equal(t.dev.engine!.inFlight, 0);
    for (const u of t.q.takeUsed()) t.used.set(u.id, u.len);
    assert.equal(t.used.size, 12);
    for (const h of heads) assert.equal(t.status(h), VIRTIO_BLK_S_OK);
    assert.equal(t.dev.engine!.counters.inFlightHighWater, 4);
    assert.equal(t.dev.engine!.counters.ringFull, 0);
    assert.equal(t.h.interrupts() - interrupts, 1, 'one interrupt for the kick');
    const file = readFileSync(t.path);
    assert.deepEqual(
      Buffer.from(t.h.mem.view(t.dataOf(heads[11]!), 4096)),
      file.subarray(88 * 512, 88 * 512 + 4096),
    );
    // The eventfd was reset with the reap: the loop has nothing to do.
    assert.equal(t.loop.runOnce(0), 0);
  } finally {
    t.done();
  }
});

/**
 * The driver queues more while the device submits (it runs on another CPU): after each of the
 * first `times` io_uring_enter calls, `add()` posts chains. Returns the driver's kick decision
 * after each, as Linux's virtqueue_kick_prepare would make it.
 */
function duringSubmit(t: ReturnType<typeof setup>, times: number, add: () => void): boolean[] {
  const enter = t.ring.enter.bind(t.ring);
  const needed: boolean[] = [];
  t.ring.enter = (...a: Parameters<typeof enter>) => {
    const r = enter(...a);
    if (needed.length < times) {
      add();
      needed.push(t.q.kickNeeded(true));
    }
    return r;
  };
  return needed;
}

test('Async: chains the driver queues while a turn submits are taken by that turn, no kick needed', () => {
  const t = setup();
  try {
    const heads = [0, 1, 2].map((i) => t.post(VIRTIO_BLK_T_IN, i * 8, [{ len: 4096 }]));
    // The driver's kick decision for these three (the device had re-enabled kicks when it
    // found the queue empty at activation).
    assert.equal(t.q.kickNeeded(true), true);
    // While each of the first two io_uring_enter calls runs, the driver queues three more.
    const needed = duringSubmit(t, 2, () => {
      for (let i = 0; i < 3; i++)
        heads.push(t.post(VIRTIO_BLK_T_IN, (heads.length + i) * 8, [{ len: 4096 }]));
    });
    const interrupts = t.h.interrupts();
    t.h.kick();
    for (const u of t.q.takeUsed()) t.used.set(u.id, u.len);
    assert.equal(t.used.size, 9, 'all nine answered in the kick');
    for (const h of heads) assert.equal(t.status(h), VIRTIO_BLK_S_OK);
    assert.deepEqual(
      needed,
      [false, false],
      'the driver need not kick for chains it added meanwhile',
    );
    assert.equal(t.h.interrupts() - interrupts, 1, 'one interrupt for the turn');
    assert.equal(t.dev.engine!.counters.rounds, 2);
    // The turn ended with kicks on again: the next chain is kicked.
    heads.push(t.post(VIRTIO_BLK_T_IN, 0, [{ len: 4096 }]));
    assert.equal(t.q.kickNeeded(true), true);
    assert.equal(t.loop.runOnce(0), 0);
  } finally {
    t.done();
  }
});

test('Async: a turn that handed a read to io-wq turns kicks back on at its first empty look', () => {
  const t = setup();
  try {
    // A big read is punted when another request is in flight: here the small read before it.
    const heads = [
      t.post(VIRTIO_BLK_T_IN, 512, [{ len: 4096 }]),
      t.post(VIRTIO_BLK_T_IN, 0, [{ len: 64 * 1024 }]),
    ];
    assert.equal(t.q.kickNeeded(true), true);
    const needed = duringSubmit(t, 1, () =>
      heads.push(t.post(VIRTIO_BLK_T_IN, 256, [{ len: 4096 }])),
    );
    t.h.kick();
    assert.deepEqual(needed, [true], 'the chain queued during the submit is kicked');
    t.h.kick();
    t.waitUsed(3);
    for (const h of heads) assert.equal(t.status(h), VIRTIO_BLK_S_OK);
    assert.equal(t.dev.engine!.counters.rounds, 0);
  } finally {
    t.done();
  }
});

test('Async: save() drains the requests in flight onto the used ring (a snapshot holds none)', () => {
  const t = setup(128, false, true);
  try {
    const heads = Array.from({ length: 16 }, (_, i) =>
      t.post(VIRTIO_BLK_T_IN, i * 8, [{ len: 4096 }]),
    );
    t.h.kick();
    assert.equal(t.dev.engine!.inFlight, 16);
    for (let i = 0; i < 16; i++) writeSync(t.fd, Buffer.alloc(4096, i));
    t.dev.save();
    assert.equal(t.dev.engine!.inFlight, 0);
    // All used without running the loop.
    assert.equal(t.q.takeUsed().length, 16);
    const got = heads.map((h) => t.h.mem.readU8(t.dataOf(h)));
    assert.deepEqual(
      got.sort((x, y) => x - y),
      [...Array(16).keys()],
    );
  } finally {
    t.done();
  }
});

test('Async: a short read (the image shrank) is IOERR; a write to a read-only disk is refused', () => {
  const t = setup();
  try {
    truncateSync(t.path, 1024 * 512);
    const r = t.post(VIRTIO_BLK_T_IN, 1020, [{ len: 8192 }]);
    t.h.kick();
    t.waitUsed(1);
    assert.equal(t.status(r), VIRTIO_BLK_S_IOERR);
    assert.equal(t.used.get(r), 1);
    assert.equal(t.dev.counters.ioErrors, 1);
    assert.ok(
      t.logs.some((l) => /short read: 2048 of 8192/.test(l)),
      t.logs.join('\n'),
    );
  } finally {
    t.done();
  }
  const ro = setup(8, true);
  try {
    const w = ro.post(VIRTIO_BLK_T_OUT, 0, [{ len: 512, bytes: Buffer.alloc(512, 1) }]);
    const f = ro.post(VIRTIO_BLK_T_FLUSH, 0, []);
    ro.h.kick();
    ro.waitUsed(2);
    assert.equal(ro.status(w), VIRTIO_BLK_S_IOERR);
    assert.equal(ro.status(f), VIRTIO_BLK_S_OK);
    assert.equal(ro.dev.engine!.counters.submitted, 0);
  } finally {
    ro.done();
  }
});

test('Async: a driver reset with requests in flight waits for them and drops their results', () => {
  const t = setup(128, false, true);
  try {
    for (let i = 0; i < 8; i++) t.post(VIRTIO_BLK_T_IN, i * 8, [{ len: 4096 }]);
    t.h.kick();
    assert.equal(t.dev.engine!.inFlight, 8);
    writeSync(t.fd, Buffer.alloc(8 * 4096, 0x5a));
    t.h.driver.write(0x70, 0); // Status = 0: reset
    assert.equal(t.dev.engine!.inFlight, 0);
    // Nothing is put on the old rings after the reset.
    assert.equal(t.q.takeUsed().length, 0);
  } finally {
    t.done();
  }
});

/** blockDevice.create over a host whose io_uring_setup fails (ENOSYS); its log lines. */
function createWithoutIoUring(engine: { ioEngine: 'Sync' | 'Async'; ioEngineDefaulted?: true }) {
  const img = image();
  const loop = new EventLoop((e) => {
    throw e;
  });
  const logs: string[] = [];
  const levels: string[] = [];
  const n = native();
  let setups = 0;
  const sys = {
    ...n,
    ioUringSetup: () => {
      setups++;
      throw Object.assign(new Error('io_uring_setup failed: Function not implemented (ENOSYS)'), {
        code: 'ENOSYS',
        errno: 38,
        syscall: 'io_uring_setup',
      });
    },
  } as HostSys;
  const created = blockDevice.create(
    {
      fd: img.fd,
      path: img.path,
      readOnly: false,
      serial: new Uint8Array(0),
      sizeBytes: SECTORS * 512,
      capacity: SECTORS,
      ...engine,
    },
    {
      name: 'virtio-blk d0',
      sys,
      loop,
      log: (m, level) => {
        logs.push(m);
        levels.push(level ?? 'info');
      },
    },
  );
  return {
    created,
    dev: created.backend as BlockDevice,
    logs,
    levels,
    setups: () => setups,
    done() {
      created.close?.();
      loop.close();
      closeSync(img.fd);
      rmSync(img.dir, { recursive: true, force: true });
    },
  };
}

test('Async asked for but unavailable (io_uring_setup fails): one log line, served with Sync', () => {
  const t = createWithoutIoUring({ ioEngine: 'Async' });
  try {
    assert.equal(t.setups(), 1);
    assert.equal(t.dev.ioEngine, 'Sync');
    assert.equal(t.dev.selfServed, undefined);
    assert.equal(t.logs.length, 1);
    assert.equal(
      t.logs[0],
      'virtio-blk d0: io_uring unavailable (io_uring_setup failed: Function not implemented (ENOSYS)); ' +
        'serving it with io_engine "Sync" instead of the "Async" it asked for',
    );
    assert.deepEqual(t.levels, ['warn'], 'asked for: seen at the default log level');
    assert.equal(t.created.metrics!().io_engine_throttled_events, 0);
  } finally {
    t.done();
  }
});

test('Async by default but unavailable: the log line says it was the default and how to silence it', () => {
  const t = createWithoutIoUring({ ioEngine: 'Async', ioEngineDefaulted: true });
  try {
    assert.equal(t.dev.ioEngine, 'Sync');
    assert.equal(t.logs.length, 1);
    assert.equal(
      t.logs[0],
      'virtio-blk d0: io_uring unavailable (io_uring_setup failed: Function not implemented (ENOSYS)); ' +
        'serving it with io_engine "Sync" (the default engine is "Async"; set io_engine "Sync" to silence this)',
    );
    assert.deepEqual(t.levels, ['info']);
  } finally {
    t.done();
  }
});

test('Sync asked for: no ring is set up, no log line', () => {
  const t = createWithoutIoUring({ ioEngine: 'Sync' });
  try {
    assert.equal(t.setups(), 0);
    assert.equal(t.dev.ioEngine, 'Sync');
    assert.deepEqual(t.logs, []);
  } finally {
    t.done();
  }
});

test('io_uring on this kernel: a bad fd completes with -EBADF; entries are bounded', () => {
  const ring = IoUring.open(native(), 2, BLK_URING_ALLOW);
  try {
    assert.equal(ring.sq.entries, 2);
    assert.ok(ring.sq.push({ opcode: IORING_OP_FSYNC, fd: 1 << 20, userData: 5 }));
    ring.enter(1);
    const got: number[] = [];
    ring.cq.reap((u, res) => got.push(u, res));
    assert.deepEqual(got, [5, -9]);
  } finally {
    ring.close();
  }
  assert.throws(() => IoUring.open(native(), 0, BLK_URING_ALLOW), RangeError);
  assert.throws(() => IoUring.open(native(), 1 << 20, BLK_URING_ALLOW), RangeError);
  assert.ok(isSyscallError(new Error('x')) === false);
});

test('io_uring on this kernel: a ring does only what it was restricted to', () => {
  const sys = native();
  const img = image();
  const ring = IoUring.open(sys, 4, TX_URING_ALLOW); // WRITEV only, no SQE flag
  try {
    const buf = new Uint8Array(512);
    const iov = new BigUint64Array([sys.bufferAddress(buf), 512n]);
    const iovAddr = Number(sys.bufferAddress(new Uint8Array(iov.buffer)));
    // An opcode outside the list (a NOP, a READV of the image), an allowed opcode with a flag
    // outside the list: each completes with -EACCES and touches nothing. (The kernel stops a
    // submission at the first SQE it refuses, so one at a time.)
    const got: number[] = [];
    for (const sqe of [
      { opcode: IORING_OP_NOP, fd: -1, userData: 1 },
      { opcode: IORING_OP_READV, fd: img.fd, addr: iovAddr, len: 1, userData: 2 },
      {
        opcode: IORING_OP_WRITEV,
        flags: IOSQE_ASYNC,
        fd: img.fd,
        addr: iovAddr,
        len: 1,
        userData: 3,
      },
    ]) {
      assert.ok(ring.sq.push(sqe));
      assert.equal(ring.enter(1), 1);
      ring.cq.reap((u, res) => got.push(u, res));
    }
    assert.deepEqual(got, [1, -13, 2, -13, 3, -13]);
    assert.ok(
      buf.every((b) => b === 0),
      'the refused READV read nothing',
    );
    // The allowed opcode without flags runs: WRITEV of 512 bytes at offset 0.
    buf.fill(0xa5);
    ring.sq.push({ opcode: IORING_OP_WRITEV, fd: img.fd, addr: iovAddr, len: 1, userData: 4 });
    ring.enter(1);
    got.length = 0;
    ring.cq.reap((u, res) => got.push(u, res));
    assert.deepEqual(got, [4, 512]);
    assert.deepEqual(readFileSync(img.path).subarray(0, 512), Buffer.alloc(512, 0xa5));
    // No io_uring_register operation is allowed once the ring is enabled.
    assert.throws(
      () => sys.ioUringRegister(ring.fd, 4, new Int32Array([ring.eventFd]), 1),
      (e: unknown) => isSyscallError(e) && /EACCES|errno 13|\b13\b/.test(String(e)),
    );
  } finally {
    ring.close();
    closeSync(img.fd);
    rmSync(img.dir, { recursive: true, force: true });
  }
});

test('io_uring restrictions are encoded as struct io_uring_restriction[] and checked', () => {
  const b = encodeRestrictions(BLK_URING_ALLOW);
  assert.equal(b.length, 4 * 16);
  // SQE_OP (1) entries for READV, WRITEV, FSYNC, then SQE_FLAGS_ALLOWED (2) with the flags.
  assert.deepEqual(
    [0, 1, 2, 3].map((i) => [b[i * 16], b[i * 16 + 1], b[i * 16 + 2]]),
    [
      [1, 0, IORING_OP_READV],
      [1, 0, IORING_OP_WRITEV],
      [1, 0, IORING_OP_FSYNC],
      [2, 0, BLK_URING_ALLOW.flags],
    ],
  );
  assert.throws(() => encodeRestrictions({ ops: [], flags: 0 }), RangeError);
  assert.throws(() => encodeRestrictions({ ops: [256], flags: 0 }), RangeError);
  assert.throws(() => encodeRestrictions({ ops: [1], flags: 0x100 }), RangeError);
});

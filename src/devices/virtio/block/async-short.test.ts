/**
 * The Async engine on a file system that returns less than asked (9p, FUSE, NFS): a short read
 * or write goes on from where it stopped, in the same slot, until the request is whole; one that
 * moves nothing is IOERR. A fake io_uring carries out READV/WRITEV on an in-memory "file" at most
 * CHUNK bytes at a time, decoding the engine's iovecs through the addresses it was given.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  AsyncBlockEngine,
  BLK_ASYNC_PUNT_READ_BYTES,
  type AsyncBlockHost,
} from './async-engine.js';
import {
  IORING_OP_READV,
  IORING_OP_WRITEV,
  IOSQE_ASYNC,
  type IoUring,
  type Sqe,
} from './io-uring.js';
import { VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, type ParsedRequest } from './request.js';
import type { QueueIo } from '../device.js';
import type { DescriptorChain } from '../chain.js';
import type { EventOps } from '../descriptor.js';

const SPAN = 2 ** 32; // each buffer's fake address range

/** Fake addresses: one range per ArrayBuffer, so an address finds its bytes again. */
class Addresses {
  private readonly bufs: ArrayBufferLike[] = [];
  address(b: ArrayBufferLike | ArrayBufferView): bigint {
    const buf = ArrayBuffer.isView(b) ? b.buffer : b;
    const off = ArrayBuffer.isView(b) ? b.byteOffset : 0;
    let i = this.bufs.indexOf(buf);
    if (i < 0) i = this.bufs.push(buf) - 1;
    return BigInt((i + 1) * SPAN + off);
  }
  bytes(addr: number, len: number): Uint8Array {
    const i = Math.floor(addr / SPAN) - 1;
    return new Uint8Array(this.bufs[i]!, addr % SPAN, len);
  }
}

function fakeRing(file: Uint8Array, chunk: number, mem: Addresses) {
  const sqes: Sqe[] = [];
  const cqes: Array<[number, number]> = [];
  let ops = 0;
  const flags: Array<[number, number]> = []; // [opcode, SQE flags] of every op run
  const run = (e: Sqe) => {
    ops++;
    flags.push([e.opcode, e.flags ?? 0]);
    const iov = mem.bytes(e.addr!, e.len! * 16);
    const dv = new DataView(iov.buffer, iov.byteOffset, iov.byteLength);
    let pos = e.offset!;
    let left = chunk;
    let moved = 0;
    for (let k = 0; k < e.len! && left > 0 && pos < file.length; k++) {
      const base = Number(dv.getBigUint64(k * 16, true));
      const n = Math.min(Number(dv.getBigUint64(k * 16 + 8, true)), left, file.length - pos);
      const b = mem.bytes(base, n);
      if (e.opcode === IORING_OP_READV) b.set(file.subarray(pos, pos + n));
      else if (e.opcode === IORING_OP_WRITEV) file.set(b, pos);
      pos += n;
      left -= n;
      moved += n;
    }
    cqes.push([e.userData, moved]);
  };
  const ring = {
    eventFd: 99,
    sq: {
      entries: 8,
      get free() {
        return 8 - sqes.length;
      },
      get unsubmitted() {
        return sqes.length;
      },
      push(e: Sqe) {
        if (sqes.length >= 8) return false;
        sqes.push({ ...e });
        return true;
      },
    },
    cq: {
      get ready() {
        return cqes.length;
      },
      reap(fn: (u: number, res: number, flags: number) => void) {
        const all = cqes.splice(0);
        for (const [u, r] of all) fn(u, r, 0);
        return all.length;
      },
    },
    cqOverflowed: false,
    enter() {
      for (const e of sqes.splice(0)) run(e);
      return 0;
    },
    clearEvent() {},
    close() {},
  };
  return { ring: ring as unknown as IoUring, ops: () => ops, pending: () => cqes.length, flags };
}

function setup(fileBytes: number, chunk: number) {
  const mem = new Addresses();
  const file = new Uint8Array(fileBytes);
  for (let i = 0; i < file.length; i++) file[i] = (i * 7 + 3) & 0xff;
  const { ring, ops, flags } = fakeRing(file, chunk, mem);
  const requests = new Map<number, ParsedRequest>();
  const queue: number[] = [];
  const used: Array<[number, number]> = [];
  const failures: string[] = [];
  const host: AsyncBlockHost = {
    name: 'drive0',
    readOnly: false,
    fd: () => 5,
    maxSegments: 4,
    parse: (c: DescriptorChain) => requests.get(c.head)!,
    serveInline: () => 1,
    charge: () => 0,
    throttleWoke: () => undefined,
    completed: () => undefined,
    failed: (_k, m) => void failures.push(m),
  };
  let subscriber: { process(ev: number): void } | undefined;
  const loop: EventOps = {
    add: (_fd, s) => ((subscriber = s), 1),
    modify: () => undefined,
    remove: () => undefined,
    setTimer: () => () => undefined,
  };
  const io = {
    pop: () => {
      const h = queue.shift();
      return h === undefined ? undefined : ({ head: h } as DescriptorChain);
    },
    pushUsed: (_q: number, head: number, len: number) => void used.push([head, len]),
    unpop: (_q: number, head: number) => (queue.unshift(head), true),
    notify: () => undefined,
    beginBatch: () => undefined,
  } as unknown as QueueIo;
  const engine = new AsyncBlockEngine(host, ring, loop, (b) => mem.address(b as never));
  engine.activate(io);
  const submit = (head: number, req: ParsedRequest) => {
    requests.set(head, req);
    queue.push(head);
    engine.kick();
    // The completions' eventfd fires until nothing is in flight.
    for (let i = 0; i < 100 && engine.inFlight > 0; i++) subscriber!.process(1);
  };
  /** Several requests made available before one kick. */
  const submitAll = (reqs: Array<[number, ParsedRequest]>) => {
    for (const [head, req] of reqs) {
      requests.set(head, req);
      queue.push(head);
    }
    engine.kick();
    for (let i = 0; i < 100 && engine.inFlight > 0; i++) subscriber!.process(1);
  };
  return { file, used, failures, ops, submit, submitAll, engine, flags };
}

test('Async engine: a read the file system returns in pieces is whole in the guest', () => {
  const t = setup(64 * 1024, 1000);
  // 3 segments (4096 + 512 + 8192 bytes) from offset 8192: each op moves at most 1000 bytes.
  const data = [new Uint8Array(4096), new Uint8Array(512), new Uint8Array(8192)];
  const status = new Uint8Array(1).fill(0xff);
  t.submit(1, { ok: true, request: { type: 'read', offset: 8192, data, length: 12800 }, status });
  assert.equal(status[0], VIRTIO_BLK_S_OK, t.failures.join('; '));
  assert.deepEqual(t.used, [[1, 12801]]);
  const got = Buffer.concat(data);
  assert.ok(got.equals(t.file.subarray(8192, 8192 + 12800)), 'the bytes, in order');
  assert.equal(t.ops(), 13, 'ceil(12800 / 1000) operations');
  assert.equal(t.engine.counters.shortResubmits, 12);
  assert.equal(t.engine.counters.inFlight, 0);
});

test('Async engine: a write the file system takes in pieces lands whole', () => {
  const t = setup(64 * 1024, 700);
  const data = [new Uint8Array(3000).fill(0xab), new Uint8Array(1000).fill(0xcd)];
  const status = new Uint8Array(1).fill(0xff);
  t.submit(2, { ok: true, request: { type: 'write', offset: 4096, data, length: 4000 }, status });
  assert.equal(status[0], VIRTIO_BLK_S_OK, t.failures.join('; '));
  assert.ok(t.file.subarray(4096, 7096).every((b) => b === 0xab));
  assert.ok(t.file.subarray(7096, 8096).every((b) => b === 0xcd));
  assert.equal(t.file[8096], (8096 * 7 + 3) & 0xff, 'nothing written past the request');
});

test('Async engine: a read that stops moving (past the end of the file) is IOERR, once', () => {
  const t = setup(10_000, 4096);
  const data = [new Uint8Array(8192)];
  const status = new Uint8Array(1).fill(0xff);
  t.submit(3, { ok: true, request: { type: 'read', offset: 4096, data, length: 8192 }, status });
  assert.equal(status[0], VIRTIO_BLK_S_IOERR);
  assert.deepEqual(t.used, [[3, 1]], 'used.len: the status byte only');
  assert.match(t.failures.join('; '), /short read: 5904 of 8192 bytes/);
  assert.equal(t.engine.counters.inFlight, 0);
});

test('Async engine: big reads go to io-wq at once (IOSQE_ASYNC) when others are in flight; small reads, writes and a lone big read do not', () => {
  const big = BLK_ASYNC_PUNT_READ_BYTES;
  const t = setup(4 * big, 4 * big);
  const req = (type: 'read' | 'write', offset: number, lens: number[]): ParsedRequest => {
    const data = lens.map((l) => new Uint8Array(l));
    const length = lens.reduce((a, b) => a + b, 0);
    return { ok: true, request: { type, offset, data, length }, status: new Uint8Array(1) };
  };
  // One kick each: nothing else in flight, so a big read is copied inline too.
  t.submit(1, req('read', 0, [4096]));
  t.submit(2, req('read', 0, [big / 2, big / 2]));
  // One kick for four: the first starts with nothing in flight; the big reads after it are
  // punted (the whole request counts, not a segment), the small read and the write are not.
  t.submitAll([
    [3, req('read', 0, [4096])],
    [4, req('read', 0, [big / 2, big / 2])],
    [5, req('read', 0, [big - 512])],
    [6, req('write', 0, [big * 2])],
    [7, req('read', big, [big])],
  ]);
  assert.deepEqual(t.flags, [
    [IORING_OP_READV, 0],
    [IORING_OP_READV, 0],
    [IORING_OP_READV, 0],
    [IORING_OP_READV, IOSQE_ASYNC],
    [IORING_OP_READV, 0],
    [IORING_OP_WRITEV, 0],
    [IORING_OP_READV, IOSQE_ASYNC],
  ]);
  assert.deepEqual(
    t.used.map(([h]) => h),
    [1, 2, 3, 4, 5, 6, 7],
  );
});

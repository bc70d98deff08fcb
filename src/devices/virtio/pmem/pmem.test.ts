import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  closeSync,
  fsyncSync,
  mkdtempSync,
  openSync,
  rmSync,
  truncateSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ConfigError } from '../../../util/errors.js';
import { harness } from '../testing/harness.js';
import { DEVICE_ID_PMEM } from '../constants.js';
import { openPmemFile, pmemDevice } from './descriptor.js';
import { PMEM_ALIGN, PmemDevice, VIRTIO_PMEM_REQ_TYPE_FLUSH, pmemIdentity } from './pmem.js';

function request(h: ReturnType<typeof harness>, type: number, respLen = 4) {
  const req = h.alloc.alloc(4);
  new DataView(h.mem.view(req, 4).buffer, h.mem.view(req, 4).byteOffset).setUint32(0, type, true);
  const resp = h.alloc.alloc(Math.max(respLen, 1));
  h.mem.view(resp, 4).fill(0xee);
  return { req, resp };
}

function ret(h: ReturnType<typeof harness>, addr: number): number {
  const v = h.mem.view(addr, 4);
  return new DataView(v.buffer, v.byteOffset, 4).getUint32(0, true);
}

test('virtio-pmem identity: device 27, one queue, config space = le64 start, le64 size', () => {
  const id = pmemIdentity(0x1_4000_0000, 6 * PMEM_ALIGN);
  assert.equal(id.deviceId, DEVICE_ID_PMEM);
  assert.equal(id.queueSizes.length, 1);
  const v = new DataView(id.config.buffer);
  assert.equal(v.getBigUint64(0, true), 0x1_4000_0000n);
  assert.equal(v.getBigUint64(8, true), BigInt(6 * PMEM_ALIGN));
});

test('virtio-pmem answers a flush with ret 0 after flushing, and a bad request with ret 1', () => {
  let flushes = 0;
  const dev = new PmemDevice('pmem0', () => flushes++);
  const h = harness(pmemIdentity(0x1_0000_0000, PMEM_ALIGN), dev);
  const [q] = h.start();
  const a = request(h, VIRTIO_PMEM_REQ_TYPE_FLUSH);
  q!.addChain([
    { addr: a.req, len: 4 },
    { addr: a.resp, len: 4, write: true },
  ]);
  const b = request(h, 7);
  q!.addChain([
    { addr: b.req, len: 4 },
    { addr: b.resp, len: 4, write: true },
  ]);
  // No room for the response: nothing written, used.len 0.
  const c = request(h, VIRTIO_PMEM_REQ_TYPE_FLUSH);
  q!.addChain([{ addr: c.req, len: 4 }]);
  h.kick();
  assert.deepEqual(
    q!.takeUsed().map((u) => u.len),
    [4, 4, 0],
  );
  assert.equal(ret(h, a.resp), 0);
  assert.equal(ret(h, b.resp), 1);
  assert.equal(flushes, 1);
  assert.deepEqual(dev.counters, { flushes: 1, flushFails: 0, badRequests: 2 });
});

test('virtio-pmem: a failing flush (a host I/O error) answers ret 1, is counted and logged once', () => {
  const logs: string[] = [];
  // A real fsync on a closed descriptor: EBADF.
  const dir = mkdtempSync(join(tmpdir(), 'pmem-'));
  const fd = openSync(join(dir, 'f'), 'w');
  closeSync(fd);
  const dev = new PmemDevice(
    'pmem0',
    () => fsyncSync(fd),
    (m) => logs.push(m),
  );
  const h = harness(pmemIdentity(0x1_0000_0000, PMEM_ALIGN), dev);
  const [q] = h.start();
  for (let i = 0; i < 2; i++) {
    const r = request(h, VIRTIO_PMEM_REQ_TYPE_FLUSH);
    q!.addChain([
      { addr: r.req, len: 4 },
      { addr: r.resp, len: 4, write: true },
    ]);
    h.kick();
    assert.equal(ret(h, r.resp), 1);
  }
  assert.equal(dev.counters.flushFails, 2);
  assert.equal(logs.length, 1);
  assert.match(logs[0]!, /flush failed/);
  rmSync(dir, { recursive: true });
});

test('virtio-pmem open: refuses missing, empty and unaligned files; reserves aligned guest memory', () => {
  const dir = mkdtempSync(join(tmpdir(), 'pmem-'));
  try {
    const f = join(dir, 'img');
    assert.throws(
      () => openPmemFile({ kind: 'pmem', id: 'p', path: f, readOnly: true }),
      /does not exist/,
    );
    writeFileSync(f, '');
    assert.throws(() => openPmemFile({ kind: 'pmem', id: 'p', path: f, readOnly: true }), /empty/);
    truncateSync(f, PMEM_ALIGN + 4096);
    assert.throws(
      () => openPmemFile({ kind: 'pmem', id: 'p', path: f, readOnly: true }),
      (e: unknown) => e instanceof ConfigError && /multiple of 2 MiB/.test((e as Error).message),
    );
    truncateSync(f, 2 * PMEM_ALIGN);
    const asked: Array<[number, number]> = [];
    const claims = new Map<string, string>();
    const ctx = {
      sys: {} as never,
      claim: (r: string, o: string) => {
        const prev = claims.get(r);
        if (prev === undefined) claims.set(r, o);
        return prev;
      },
      allocateGuestMemory: (size: number, align: number) => {
        asked.push([size, align]);
        return 0x1_4000_0000;
      },
    };
    const opened = pmemDevice.open({ kind: 'pmem', id: 'p', path: f, readOnly: true }, ctx);
    try {
      assert.deepEqual(asked, [[2 * PMEM_ALIGN, 128 * 1024 * 1024]]);
      assert.deepEqual(
        opened.memory?.map((m) => [m.guestAddr, m.size, m.readOnly]),
        [[0x1_4000_0000, 2 * PMEM_ALIGN, true]],
      );
      // The same file twice is refused.
      assert.throws(
        () => pmemDevice.open({ kind: 'pmem', id: 'q', path: f, readOnly: true }, ctx),
        /already attached/,
      );
      // No room planned: refused with a message.
      assert.throws(
        () =>
          pmemDevice.open(
            { kind: 'pmem', id: 'r', path: f, readOnly: true },
            { sys: {} as never, claim: () => undefined },
          ),
        /no guest-physical room/,
      );
    } finally {
      opened.close();
    }
  } finally {
    rmSync(dir, { recursive: true });
  }
});

/**
 * The native shim's pieces for the Uffd memory backend (milestone 2), against the real kernel:
 * passing fds over a Unix socket (SCM_RIGHTS), and a userfaultfd that serves page faults on an
 * anonymous private mapping, from user mode (a worker reading through a viewAddress view) and
 * from kernel mode (a write(2) reading the page, as KVM's accesses do). Needs the native addon
 * built from this tree, not KVM.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { Worker } from 'node:worker_threads';
import {
  EFD_NONBLOCK,
  MAP_ANONYMOUS,
  MAP_NORESERVE,
  MAP_PRIVATE,
  native,
  PROT_READ,
  PROT_WRITE,
} from '../../src/kvm/native.js';
import { tempDir } from './helpers.js';

const PAGE = 4096;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

// <linux/userfaultfd.h>
const UFFD_API = 0xaan;
const UFFDIO_API = 0xc018aa3f; // _IOWR(0xAA, 0x3F, struct uffdio_api: 24 bytes)
const UFFDIO_REGISTER = 0xc020aa00; // _IOWR(0xAA, 0x00, struct uffdio_register: 32 bytes)
const UFFDIO_COPY = 0xc028aa03; // _IOWR(0xAA, 0x03, struct uffdio_copy: 40 bytes)
const UFFDIO_REGISTER_MODE_MISSING = 1n;
const UFFD_EVENT_PAGEFAULT = 0x12;

test('sendFds/recvFds: an eventfd crosses a Unix socket', () => {
  const n = native();
  assert.equal(typeof n.sendFds, 'function', 'the native shim predates sendFds: rebuild it');
  const path = join(tempDir('typervisor-fds-'), 's');
  const listener = n.unixSocket();
  const client = n.unixSocket();
  let server = -1;
  const efd = n.eventfd(0, EFD_NONBLOCK);
  const got: number[] = [];
  try {
    n.bindListen(listener, path, 1);
    n.connect(client, path);
    server = n.accept(listener);
    assert.ok(server >= 0);
    assert.equal(n.recvFds(server, new Uint8Array(8), 4).bytes, -1, 'nothing sent yet');
    assert.throws(() => n.sendFds(client, new Uint8Array(0), [efd]), /at least one data byte/);

    assert.equal(n.sendFds(client, Uint8Array.of(0x61, 0x62), [efd]), 2);
    const buf = new Uint8Array(8);
    const r = n.recvFds(server, buf, 4);
    got.push(...r.fds);
    assert.equal(r.bytes, 2);
    assert.deepEqual([...buf.subarray(0, 2)], [0x61, 0x62]);
    assert.equal(r.fds.length, 1);
    assert.notEqual(r.fds[0], efd);
    n.eventfdWrite(r.fds[0]!, 5);
    assert.equal(n.eventfdRead(efd), 5n, 'the received fd is the same eventfd');

    // More fds than the receiver takes: refused, and none of them leaks.
    const openFds = () => readdirSync('/proc/self/fd').length;
    const before = openFds();
    assert.equal(n.sendFds(client, Uint8Array.of(1), [efd, efd, efd]), 1);
    assert.throws(() => n.recvFds(server, buf, 1), /more fds than maxFds/);
    assert.equal(openFds(), before, 'a refused fd stayed open');
    // Plain data, no fds.
    assert.equal(n.sendFds(client, Uint8Array.of(9), []), 1);
    assert.deepEqual(n.recvFds(server, buf, 4), { bytes: 1, fds: [] });
  } finally {
    for (const fd of [...got, efd, client, server, listener]) if (fd >= 0) n.close(fd);
  }
});

// Faults on page 1 from user mode (a read through a view), then on page 2 from kernel mode
// (write(2) copying from the page into a file).
const WORKER = `
const { parentPort, workerData } = require('node:worker_threads');
const { writeSync, openSync, closeSync } = require('node:fs');
import(workerData.url).then(({ native }) => {
  const view = new Uint8Array(native().viewAddress(workerData.addr, ${4 * PAGE}));
  const user = view[${PAGE} + 7];
  const fd = openSync(workerData.out, 'w');
  writeSync(fd, view, ${2 * PAGE}, 16);
  closeSync(fd);
  native().release(view.buffer);
  parentPort.postMessage({ user });
}).catch((e) => parentPort.postMessage({ error: String(e && e.stack || e) }));
`;

test('userfaultfd: missing-page faults from user and kernel mode are served by UFFDIO_COPY', async () => {
  const n = native();
  assert.equal(
    typeof n.userfaultfd,
    'function',
    'the native shim predates userfaultfd: rebuild it',
  );
  const uffd = n.userfaultfd(0);
  const mem = n.mmap(
    4 * PAGE,
    PROT_READ | PROT_WRITE,
    MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE,
    -1,
    0,
  );
  const addr = n.bufferAddress(mem);
  let worker: Worker | undefined;
  try {
    const api = new BigUint64Array([UFFD_API, 0n, 0n]);
    n.ioctl(uffd, UFFDIO_API, api);
    assert.notEqual(api[2], 0n, 'UFFDIO_API reports the supported ioctls');
    const reg = new BigUint64Array([addr, BigInt(4 * PAGE), UFFDIO_REGISTER_MODE_MISSING, 0n]);
    n.ioctl(uffd, UFFDIO_REGISTER, reg);
    assert.ok((reg[3]! & (1n << 3n)) !== 0n, 'UFFDIO_COPY is available on the range');

    const out = join(tempDir('typervisor-uffd-'), 'out');
    const url = new URL('../../src/kvm/native.js', import.meta.url).href;
    worker = new Worker(WORKER, { eval: true, workerData: { url, addr, out } });
    const reply = new Promise<{ user?: number; error?: string }>((resolve, reject) => {
      worker!.once('message', resolve);
      worker!.once('error', reject);
    });

    const src = new Uint8Array(PAGE);
    const faults: bigint[] = [];
    const msg = new Uint8Array(32);
    const deadline = Date.now() + 10_000;
    while (faults.length < 2) {
      assert.ok(Date.now() < deadline, `only ${faults.length} faults arrived`);
      if (n.read(uffd, msg) < 0) {
        await sleep(2);
        continue;
      }
      const dv = new DataView(msg.buffer);
      assert.equal(msg[0], UFFD_EVENT_PAGEFAULT);
      const at = dv.getBigUint64(16, true) & ~BigInt(PAGE - 1);
      faults.push(at - addr);
      src.fill(faults.length === 1 ? 0x99 : 0x42);
      const copy = new BigUint64Array([at, n.bufferAddress(src), BigInt(PAGE), 0n, 0n]);
      n.ioctl(uffd, UFFDIO_COPY, copy);
      assert.equal(copy[4], BigInt(PAGE));
    }
    const r = await reply;
    assert.equal(r.error, undefined, r.error);
    assert.equal(r.user, 0x99);
    assert.deepEqual(faults, [BigInt(PAGE), BigInt(2 * PAGE)]);
    assert.deepEqual([...readFileSync(out)], new Array(16).fill(0x42));
    // The pages are in the mapping now; the others still are not (no fault was served for them).
    assert.equal(new Uint8Array(mem)[PAGE], 0x99);
  } finally {
    // Closing the uffd first wakes a fault still waiting (it then gets a zero page), so the
    // worker can end even when the test failed half-way.
    n.close(uffd);
    await worker?.terminate();
    n.munmap(mem);
  }
});

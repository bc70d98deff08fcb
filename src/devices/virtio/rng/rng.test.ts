import { test } from 'node:test';
import assert from 'node:assert/strict';
import { harness } from '../testing/harness.js';
import { MAX_BYTES_PER_REQUEST, RngDevice, rngIdentity } from './rng.js';

test('virtio-rng fills device-writable buffers, and only them', () => {
  const dev = new RngDevice();
  const h = harness(rngIdentity(), dev);
  const [q] = h.start();
  const ro = h.alloc.alloc(64);
  const a = h.alloc.alloc(256);
  const b = h.alloc.alloc(256);
  q!.addChain([
    { addr: ro, len: 64 },
    { addr: a, len: 256, write: true },
    { addr: b, len: 100, write: true },
  ]);
  h.kick();
  assert.deepEqual(q!.takeUsed(), [{ id: 0, len: 356 }]);
  assert.ok(h.mem.view(a, 256).some((x) => x !== 0));
  assert.ok(h.mem.view(b, 100).some((x) => x !== 0));
  assert.ok(h.mem.view(b + 100, 156).every((x) => x === 0));
  assert.ok(h.mem.view(ro, 64).every((x) => x === 0));
  assert.equal(h.interrupts(), 1);
});

test('virtio-rng caps one request and answers 0 bytes to a readable-only chain', () => {
  const h = harness(rngIdentity(), new RngDevice());
  const [q] = h.start();
  q!.addChain([
    { addr: h.alloc.alloc(MAX_BYTES_PER_REQUEST * 2), len: MAX_BYTES_PER_REQUEST * 2, write: true },
  ]);
  q!.addChain([{ addr: h.alloc.alloc(16), len: 16 }]);
  h.kick();
  assert.deepEqual(
    q!.takeUsed().map((u) => u.len),
    [MAX_BYTES_PER_REQUEST, 0],
  );
});

/**
 * An RX buffer with room for a packet header only (found by the fuzzer: `npm run fuzz --
 * --target virtio-vsock --seed 20261130 --from 4000 --cases 973`). It can take control packets,
 * never data: when the next packet is a connection's data, the buffer is returned unused (a
 * guest error) instead of being held, which left the socket readable and watched with every
 * wake-up failing the same way (a busy loop) and the guest's other buffers unused.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { OP_REQUEST, OP_RESPONSE, OP_RW, VSOCK_HDR_SIZE } from './packet.js';
import { setup } from '../testing/vsock.js';

test('vsock RX: a header-only buffer is returned unused when the next packet is data; the data takes the next buffer', () => {
  const t = setup();
  t.host.listeners.add('/tmp/v.sock_80');
  t.addRx(1);
  t.send({ op: OP_REQUEST });
  assert.deepEqual(
    t.received().map((p) => p.op),
    [OP_RESPONSE],
  );
  const fd = [...t.host.socks.keys()][0]!;
  const sock = t.host.socks.get(fd)!;
  assert.deepEqual(sock.watch, [true, false], 'the established connection is read');
  sock.inbox.push(...Buffer.from('hello'));

  const errors = t.h.device.state.counters().guestErrors;
  t.addRx(1, VSOCK_HDR_SIZE);
  t.dev.onSocket(fd, true, false, false);
  const used = t.rx.takeUsed();
  assert.equal(used.length, 1, 'the wake-up made progress: the header-only buffer came back');
  assert.equal(used[0]!.len, 0);
  assert.equal(t.h.device.state.counters().guestErrors, errors + 1);
  assert.equal(sock.inbox.length, 5, 'the data waits');

  // A second wake-up with no buffer left stops reading (no busy loop), and a real buffer
  // takes the data.
  t.dev.onSocket(fd, true, false, false);
  assert.deepEqual(sock.watch, [false, false]);
  t.addRx(1);
  t.dev.onSocket(fd, true, false, false);
  const got = t.received();
  assert.deepEqual(
    got.map((p) => [p.op, p.data]),
    [[OP_RW, 'hello']],
  );
});

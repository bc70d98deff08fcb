/**
 * The virtio-net warm-up (net-warmup.ts): its scratch devices carry every frame round trip and
 * leave nothing open; in the worker's loop it runs in slices, with the loop's other events
 * served between them; the round count's variable is checked. Needs the native addon (eventfds,
 * epoll), not KVM.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readdirSync } from 'node:fs';
import { EventLoop } from '../events/event-loop.js';
import { EFD_NONBLOCK, native } from '../kvm/native.js';
import { NET_WARMUP_ROUNDS, netWarmup, netWarmupRounds, warmNetInSlices } from './net-warmup.js';

const openFds = () => readdirSync('/proc/self/fd').length;

test('net warm-up: every round trip comes back on RX; close() leaves no descriptor open', () => {
  const before = openFds();
  const logged: string[] = [];
  const w = netWarmup(300, (m) => logged.push(m));
  assert.ok(openFds() > before, 'the scratch devices have eventfds and an epoll set');
  // step() throws when a round trip's TX or RX used entry is missing (checked per round).
  assert.equal(w.step(100), true);
  assert.equal(w.done, 100);
  assert.equal(w.step(1000), false);
  assert.equal(w.done, 300);
  assert.equal(w.step(10), false, 'no more than asked');
  assert.equal(w.done, 300);
  w.close();
  assert.equal(openFds(), before);
  assert.deepEqual(logged, []);
});

test('net warm-up: in slices of the loop, the loop serves its other fds between slices', () => {
  const n = native();
  const before = openFds();
  const loop = new EventLoop();
  const fd = n.eventfd(0, EFD_NONBLOCK);
  let served = 0;
  loop.add(fd, {
    process: () => {
      n.eventfdRead(fd);
      served++;
    },
  });
  const logged: string[] = [];
  warmNetInSlices(loop, 400, (m) => logged.push(m));
  let rounds = 0;
  // An event of the guest's comes in before every round: each is served in its own round.
  for (; rounds < 100; rounds++) {
    n.eventfdWrite(fd, 1);
    loop.runOnce(0);
    assert.equal(served, rounds + 1);
  }
  // 400 round trips in slices of 50: done (and closed) within those rounds.
  assert.equal(openFds(), before + 2, 'the scratch devices are closed once done');
  assert.deepEqual(logged, []);
  loop.close();
  n.close(fd);
  assert.equal(openFds(), before);
});

test('net warm-up: cancelled before its end, it closes what it opened', () => {
  const before = openFds();
  const loop = new EventLoop();
  const cancel = warmNetInSlices(loop, 10_000, () => {});
  loop.runOnce(0);
  cancel();
  loop.runOnce(0);
  loop.close();
  assert.equal(openFds(), before);
});

test('net warm-up: TYPERVISOR_NET_WARMUP', () => {
  assert.deepEqual(netWarmupRounds({}), { rounds: NET_WARMUP_ROUNDS });
  assert.deepEqual(netWarmupRounds({ TYPERVISOR_NET_WARMUP: '0' }), { rounds: 0 });
  assert.deepEqual(netWarmupRounds({ TYPERVISOR_NET_WARMUP: '500' }), { rounds: 500 });
  for (const bad of ['-1', '1.5', 'lots', '100001', '0x10']) {
    const r = netWarmupRounds({ TYPERVISOR_NET_WARMUP: bad });
    assert.equal(r.rounds, NET_WARMUP_ROUNDS);
    assert.match(r.ignored!, /TYPERVISOR_NET_WARMUP=.* is not an integer from 0 to 100000/);
  }
});

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { EFD_NONBLOCK, native } from '../kvm/native.js';
import { EventLoop } from './event-loop.js';

test('the epoll loop dispatches eventfds to their subscribers and survives a throwing one', () => {
  const n = native();
  const errors: unknown[] = [];
  const loop = new EventLoop((e) => errors.push(e));
  const a = n.eventfd(0, EFD_NONBLOCK);
  const b = n.eventfd(0, EFD_NONBLOCK);
  const seen: string[] = [];
  try {
    loop.add(a, { process: () => (n.eventfdRead(a), seen.push('a')) });
    const tb = loop.add(b, {
      process: () => {
        n.eventfdRead(b);
        throw new Error('subscriber bug');
      },
    });
    assert.equal(loop.runOnce(0), 0);
    n.eventfdWrite(a, 1);
    n.eventfdWrite(b, 1);
    assert.equal(loop.runOnce(100), 2);
    assert.deepEqual(seen, ['a']);
    assert.equal(errors.length, 1);
    loop.remove(tb);
    n.eventfdWrite(b, 1);
    assert.equal(loop.runOnce(0), 0);
    let stop = false;
    loop.add(b, { process: () => (n.eventfdRead(b), (stop = true)) });
    n.eventfdWrite(b, 1);
    loop.run(() => stop);
    assert.equal(stop, true);
  } finally {
    loop.close();
    n.close(a);
    n.close(b);
  }
});

test('timers run on the loop after their delay, in a blocking wait, and can be cancelled', () => {
  const errors: unknown[] = [];
  const loop = new EventLoop((e) => errors.push(e));
  try {
    const fired: string[] = [];
    const t0 = performance.now();
    loop.setTimer(30, () => fired.push('a'));
    const cancel = loop.setTimer(10, () => fired.push('cancelled'));
    cancel();
    loop.setTimer(40, () => {
      throw new Error('a throwing timer does not stop the loop');
    });
    loop.setTimer(50, () => fired.push('b'));
    // No fds at all: runOnce(-1) must not block forever while a timer is pending.
    while (fired.length < 2) loop.runOnce(-1);
    assert.deepEqual(fired, ['a', 'b']);
    assert.equal(errors.length, 1);
    assert.ok(performance.now() - t0 >= 49, 'not before its delay');
  } finally {
    loop.close();
  }
});

test('timers: hundreds of thousands of them, in due order, FIFO among equals, none spread', () => {
  const errors: unknown[] = [];
  const loop = new EventLoop((e) => errors.push(e));
  try {
    const N = 200_000; // Math.min(...timers) threw RangeError well below this
    const ran: number[] = [];
    const cancels: Array<() => void> = [];
    for (let i = 0; i < N; i++) cancels.push(loop.setTimer(0, () => ran.push(i)));
    for (let i = 0; i < N; i += 2) cancels[i]!(); // every even one cancelled
    const order: string[] = [];
    loop.setTimer(5, () => order.push('late'));
    loop.setTimer(0, () => order.push('early-1'));
    loop.setTimer(0, () => order.push('early-2'));
    loop.runOnce(0);
    assert.equal(ran.length, N / 2);
    assert.ok(
      ran.every((v, i) => v === 2 * i + 1),
      'in insertion order',
    );
    assert.deepEqual(order, ['early-1', 'early-2']);
    while (order.length < 3) loop.runOnce(-1);
    assert.deepEqual(order, ['early-1', 'early-2', 'late']);
    assert.equal(errors.length, 0);
  } finally {
    loop.close();
  }
});

test('timers: one re-armed from a timer waits a round, so a self-re-arming timer cannot starve', () => {
  const n = native();
  const loop = new EventLoop();
  const efd = n.eventfd(0, EFD_NONBLOCK);
  try {
    let rounds = 0;
    const rearm = () => {
      rounds++;
      loop.setTimer(0, rearm);
    };
    loop.setTimer(0, rearm);
    let fdSeen = 0;
    loop.add(efd, { process: () => (n.eventfdRead(efd), fdSeen++) });
    n.eventfdWrite(efd, 1);
    loop.runOnce(-1); // must return: the re-armed timer is for the next round
    assert.equal(rounds, 1);
    assert.equal(fdSeen, 1);
    loop.runOnce(-1);
    assert.equal(rounds, 2);
    // A cancelled timer never runs.
    const cancel = loop.setTimer(0, () => assert.fail('cancelled'));
    cancel();
    loop.runOnce(-1);
    assert.equal(rounds, 3);
  } finally {
    loop.close();
    n.close(efd);
  }
});

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

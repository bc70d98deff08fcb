/**
 * A tiny mutex over one Int32Array slot of a SharedArrayBuffer, usable from any thread
 * (vCPU workers and the main thread alike: Node allows Atomics.wait on its main thread).
 *
 * Slot values: 0 unlocked, 1 locked, 2 locked with (possible) waiters -- the classic futex
 * mutex. Atomics operations are sequentially consistent, so plain reads and writes of other
 * shared slots made while holding the lock are ordered with respect to the next holder's.
 *
 * Critical sections must be short and must not call out (no I/O, no callbacks): a thread that
 * waits here blocks its event loop.
 */
export class SharedMutex {
  constructor(
    private readonly slots: Int32Array,
    private readonly index: number,
  ) {
    if (!(slots.buffer instanceof SharedArrayBuffer))
      throw new Error('SharedMutex needs shared memory');
    if (index < 0 || index >= slots.length) throw new Error('SharedMutex slot out of range');
  }

  lock(): void {
    let c = Atomics.compareExchange(this.slots, this.index, 0, 1);
    if (c === 0) return;
    // Spin briefly: holders keep the lock for a few register updates only.
    for (let i = 0; i < 100 && c !== 0; i++) {
      c = Atomics.compareExchange(this.slots, this.index, 0, 1);
      if (c === 0) return;
    }
    if (c !== 2) c = Atomics.exchange(this.slots, this.index, 2);
    while (c !== 0) {
      Atomics.wait(this.slots, this.index, 2);
      c = Atomics.exchange(this.slots, this.index, 2);
    }
  }

  /** The lock if it is free now; never waits. */
  tryLock(): boolean {
    return Atomics.compareExchange(this.slots, this.index, 0, 1) === 0;
  }

  /**
   * The lock if it comes free within `ms` (tried every millisecond): for a thread that must not
   * wait long on a holder that may never let go (a thread given up on).
   */
  tryLockFor(ms: number): boolean {
    let locked = this.tryLock();
    const nap = new Int32Array(new SharedArrayBuffer(4));
    for (let t = 0; !locked && t < ms; t++) {
      Atomics.wait(nap, 0, 0, 1);
      locked = this.tryLock();
    }
    return locked;
  }

  unlock(): void {
    if (Atomics.exchange(this.slots, this.index, 0) === 2)
      Atomics.notify(this.slots, this.index, 1);
  }

  /** Runs fn with the lock held. fn must not throw for guest-caused conditions. */
  with<T>(fn: () => T): T {
    this.lock();
    try {
      return fn();
    } finally {
      this.unlock();
    }
  }
}

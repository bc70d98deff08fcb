/**
 * A synchronous epoll loop with subscribers (after rust-vmm/event-manager): each file
 * descriptor is registered with the subscriber that handles it; epoll_wait's tag names the
 * registration. Used by the device worker, which blocks here (so it never sees 'message'
 * events: everything reaches it through eventfds and shared memory).
 *
 * A subscriber or timer that throws does not end the loop: the error goes to `onError` (a bug of
 * ours; guest-caused conditions are handled inside the subscribers).
 *
 * Timers are one-shot, kept in a binary min-heap ordered by (due, insertion order), so any number
 * of them costs O(log n) each and nothing is spread into an argument list. A timer added while
 * timers run (a device re-arming itself with `setTimer(0, ...)` after using its work budget) runs
 * in the next round, after the next epoll_wait: so a device that yields lets every other ready
 * fd and timer go first (round-robin), and a timer that re-arms itself cannot starve the loop.
 */
import { EPOLL_CTL_ADD, EPOLL_CTL_DEL, EPOLL_CTL_MOD, EPOLLIN, native } from '../kvm/native.js';
import { monoMs } from '../util/clock.js';

export interface EventSubscriber {
  /** `events`: the epoll bits that fired (EPOLLIN, EPOLLERR...). */
  process(events: number, loop: EventLoop): void;
}

interface Registration {
  fd: number;
  subscriber: EventSubscriber;
}

const MAX_EVENTS = 64;

interface Timer {
  due: number;
  seq: number;
  fn: (() => void) | undefined; // undefined once cancelled or run
}

const before = (a: Timer, b: Timer): boolean => a.due < b.due || (a.due === b.due && a.seq < b.seq);

/** A binary min-heap of timers (cancelled ones are dropped lazily when they reach the top). */
class TimerHeap {
  private readonly h: Timer[] = [];
  get size(): number {
    return this.h.length;
  }
  peek(): Timer | undefined {
    return this.h[0];
  }
  push(t: Timer): void {
    const h = this.h;
    h.push(t);
    for (let i = h.length - 1; i > 0;) {
      const p = (i - 1) >> 1;
      if (!before(h[i]!, h[p]!)) break;
      [h[i], h[p]] = [h[p]!, h[i]!];
      i = p;
    }
  }
  pop(): Timer | undefined {
    const h = this.h;
    const top = h[0];
    const last = h.pop();
    if (h.length > 0 && last) {
      h[0] = last;
      for (let i = 0; ;) {
        const l = 2 * i + 1;
        const r = l + 1;
        let m = i;
        if (l < h.length && before(h[l]!, h[m]!)) m = l;
        if (r < h.length && before(h[r]!, h[m]!)) m = r;
        if (m === i) break;
        [h[i], h[m]] = [h[m]!, h[i]!];
        i = m;
      }
    }
    return top;
  }
  /** Drops cancelled timers from the top; returns the first live one. */
  live(): Timer | undefined {
    while (this.h.length > 0 && this.h[0]!.fn === undefined) this.pop();
    return this.h[0];
  }
}

export class EventLoop {
  private readonly epfd: number;
  private readonly regs: Array<Registration | undefined> = [];
  private readonly out = new Uint32Array(MAX_EVENTS * 2);
  private closed = false;
  /** One-shot timers, run by runOnce once due (epoll_wait's timeout is cut to the nearest). */
  private readonly timers = new TimerHeap();
  private timerSeq = 0;

  constructor(
    private readonly onError: (e: unknown) => void = (e) => {
      throw e;
    },
  ) {
    this.epfd = native().epollCreate();
  }

  /** Watches `fd` for `events` (default EPOLLIN); returns the registration's tag. */
  add(fd: number, subscriber: EventSubscriber, events = EPOLLIN): number {
    let tag = this.regs.indexOf(undefined);
    if (tag < 0) tag = this.regs.length;
    native().epollCtl(this.epfd, EPOLL_CTL_ADD, fd, events, tag);
    this.regs[tag] = { fd, subscriber };
    return tag;
  }

  /** Changes the events watched for registration `tag` (0: only errors and hang-ups). */
  modify(tag: number, events: number): void {
    const r = this.regs[tag];
    if (!r) return;
    native().epollCtl(this.epfd, EPOLL_CTL_MOD, r.fd, events, tag);
  }

  remove(tag: number): void {
    const r = this.regs[tag];
    if (!r) return;
    native().epollCtl(this.epfd, EPOLL_CTL_DEL, r.fd, 0, 0);
    this.regs[tag] = undefined;
  }

  /** Runs `fn` on this loop's thread after `ms` (or later); returns a cancel function. */
  setTimer(ms: number, fn: () => void): () => void {
    const t: Timer = { due: monoMs() + Math.max(0, ms), seq: this.timerSeq++, fn };
    this.timers.push(t);
    return () => {
      t.fn = undefined;
    };
  }

  /** Pending (not cancelled, not run) timers at the top of the heap are due by then. */
  private nextTimeout(timeoutMs: number): number {
    const next = this.timers.live();
    if (!next) return timeoutMs;
    // epoll_wait takes an int: a far timer waits in steps of at most ~24 days.
    const wait = Math.min(0x7fff_ffff, Math.max(0, Math.ceil(next.due - monoMs())));
    return timeoutMs < 0 || wait < timeoutMs ? wait : timeoutMs;
  }

  /** Runs the timers due now that existed before this call (later ones wait a round). */
  private runTimers(): void {
    if (this.timers.size === 0) return;
    const now = monoMs();
    const limit = this.timerSeq;
    for (let t = this.timers.live(); t && t.due <= now && t.seq < limit; t = this.timers.live()) {
      this.timers.pop();
      const fn = t.fn!;
      t.fn = undefined;
      try {
        fn();
      } catch (e) {
        this.onError(e);
      }
    }
  }

  /** Rounds so far: one per runOnce (its events and timers). */
  rounds = 0;

  /** Waits up to timeoutMs (-1: forever) and dispatches; returns how many events ran. */
  runOnce(timeoutMs = -1): number {
    const n = native().epollWait(this.epfd, this.out, this.nextTimeout(timeoutMs));
    this.rounds++;
    for (let i = 0; i < n; i++) {
      const events = this.out[2 * i]!;
      const r = this.regs[this.out[2 * i + 1]!];
      if (!r) continue; // removed by an earlier subscriber in this batch
      try {
        r.subscriber.process(events, this);
      } catch (e) {
        this.onError(e);
      }
    }
    this.runTimers();
    return n;
  }

  /** Runs until `done()` is true (checked after every wake-up). */
  run(done: () => boolean): void {
    while (!done() && !this.closed) this.runOnce(-1);
  }

  close(): void {
    if (this.closed) return;
    this.closed = true;
    native().close(this.epfd);
  }
}

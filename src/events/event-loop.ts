/**
 * A synchronous epoll loop with subscribers (after rust-vmm/event-manager): each file
 * descriptor is registered with the subscriber that handles it; epoll_wait's tag names the
 * registration. Used by the device worker, which blocks here (so it never sees 'message'
 * events: everything reaches it through eventfds and shared memory).
 *
 * A subscriber that throws does not end the loop: the error goes to `onError` (a bug of ours;
 * guest-caused conditions are handled inside the subscribers).
 */
import { EPOLL_CTL_ADD, EPOLL_CTL_DEL, EPOLL_CTL_MOD, EPOLLIN, native } from '../kvm/native.js';

export interface EventSubscriber {
  /** `events`: the epoll bits that fired (EPOLLIN, EPOLLERR...). */
  process(events: number, loop: EventLoop): void;
}

interface Registration {
  fd: number;
  subscriber: EventSubscriber;
}

const MAX_EVENTS = 64;

export class EventLoop {
  private readonly epfd: number;
  private readonly regs: Array<Registration | undefined> = [];
  private readonly out = new Uint32Array(MAX_EVENTS * 2);
  private closed = false;
  /** One-shot timers, run by runOnce once due (epoll_wait's timeout is cut to the nearest). */
  private timers: Array<{ due: number; fn: () => void }> = [];

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
    const t = { due: performance.now() + ms, fn };
    this.timers.push(t);
    return () => {
      this.timers = this.timers.filter((x) => x !== t);
    };
  }

  private runTimers(): void {
    if (this.timers.length === 0) return;
    const now = performance.now();
    const due = this.timers.filter((t) => t.due <= now);
    if (due.length === 0) return;
    this.timers = this.timers.filter((t) => t.due > now);
    for (const t of due) {
      try {
        t.fn();
      } catch (e) {
        this.onError(e);
      }
    }
  }

  /** Waits up to timeoutMs (-1: forever) and dispatches; returns how many events ran. */
  runOnce(timeoutMs = -1): number {
    if (this.timers.length > 0) {
      const next = Math.min(...this.timers.map((t) => t.due));
      const wait = Math.max(0, Math.ceil(next - performance.now()));
      if (timeoutMs < 0 || wait < timeoutMs) timeoutMs = wait;
    }
    const n = native().epollWait(this.epfd, this.out, timeoutMs);
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

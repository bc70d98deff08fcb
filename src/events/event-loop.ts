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

  /** Waits up to timeoutMs (-1: forever) and dispatches; returns how many events ran. */
  runOnce(timeoutMs = -1): number {
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

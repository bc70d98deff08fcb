/**
 * A fake host for device backends: the worker's event loop (EventOps) with epoll's
 * level-triggered semantics, and the syscalls (HostSys) over fake fds whose peers the fuzzer
 * scripts (a TAP, Unix sockets, a listening socket). Time is virtual.
 *
 * Spin detection: `settle()` dispatches ready registrations until nothing is ready; a wake-up
 * that leaves its fd ready and its interest set is dispatched again, as epoll would, and more
 * than `spinLimit` dispatches of one registration in one settle() is a busy loop. EPOLLERR and
 * EPOLLHUP are reported whatever the interest (as epoll does), so a hung-up fd that is never
 * removed is a busy loop too.
 */
import {
  EV_ERR,
  EV_HUP,
  EV_IN,
  EV_OUT,
  type EventOps,
  type HostSys,
} from '../src/devices/virtio/descriptor.js';
import { fail, type Prng } from './core.js';
import { readSync, writeFileSync, writeSync } from 'node:fs';

type Buf = ArrayBuffer | ArrayBufferView;

/** Linux's IOV_MAX, which the native shim enforces (RangeError "too many iovecs"). */
export const IOV_MAX = 1024;

function bytesOf(b: Buf): Uint8Array {
  return b instanceof ArrayBuffer
    ? new Uint8Array(b)
    : new Uint8Array(b.buffer, b.byteOffset, b.byteLength);
}

export function sysError(code: string, syscall: string): Error {
  const e = new Error(`${syscall}: ${code}`) as Error & {
    code: string;
    errno: number;
    syscall: string;
  };
  e.code = code;
  e.errno = 1;
  e.syscall = syscall;
  return e;
}

/** One fake fd and its scripted peer. */
export interface FakeFd {
  fd: number;
  kind: 'tap' | 'socket' | 'listen';
  closed: boolean;
  /** Bytes (or TAP frames) the peer sent us, not read yet. */
  inbox: Uint8Array[];
  /** The peer shut its write side (read returns 0 once the inbox is empty). */
  eof: boolean;
  /** The peer is gone (EPOLLHUP, writes fail with EPIPE). */
  hup: boolean;
  /** Bytes we may still write before the peer's buffer is full (write returns -1). */
  room: number;
  /**
   * The next read fails with this errno: EAGAIN returns -1 (a spurious wake-up: the native
   * readv returns -1 on EAGAIN, it never throws it), any other errno throws as the shim does.
   */
  readError?: string;
  /** Listening socket: fds waiting in the accept queue; or an errno accept() throws. */
  backlog: number[];
  acceptError?: string;
  written: number;
  /** TAP: the frames written, when recorded (their header and length). */
  frames?: Array<{ hdr: Uint8Array; len: number }>;
  /** We shut our write side (shutdown(SHUT_WR)). */
  shutWr: boolean;
}

interface Registration {
  fd: number;
  sub: { process(events: number): void };
  events: number;
}

export class FakeHost {
  readonly fds = new Map<number, FakeFd>();
  private regs: Array<Registration | undefined> = [];
  private timers: Array<{ due: number; fn: () => void; live: boolean }> = [];
  now = 0;
  private nextFd = 100;
  /** Dispatches of one registration in one settle() that count as a busy loop. */
  spinLimit = 4000;
  /** Calls into the device (for per-case work bounds). */
  dispatches = 0;
  /** Injected host errors thrown to the device so far (read and accept errors). */
  errorsThrown = 0;
  /** Rounds of one settle() (ready fds, then due timers) that count as a loop that never idles. */
  roundLimit = 20_000;
  /** accept()/connect() throw EMFILE while set (descriptor exhaustion). */
  emfile = false;
  /** connect() outcome for guest connections: 'ok' | errno | 'pending'. */
  connectResult: () => string = () => 'ok';

  newFd(kind: FakeFd['kind']): FakeFd {
    const f: FakeFd = {
      fd: this.nextFd++,
      kind,
      closed: false,
      inbox: [],
      eof: false,
      hup: false,
      room: 1 << 20,
      backlog: [],
      written: 0,
      shutWr: false,
    };
    this.fds.set(f.fd, f);
    return f;
  }

  private live(fd: number, syscall: string): FakeFd {
    const f = this.fds.get(fd);
    if (!f || f.closed) throw sysError('EBADF', syscall);
    return f;
  }

  /** epoll readiness of a fake fd. */
  ready(f: FakeFd): number {
    if (f.closed) return 0;
    let ev = 0;
    if (f.kind === 'listen') return f.backlog.length > 0 || f.acceptError ? EV_IN : 0;
    if (f.inbox.length > 0 || f.eof || f.readError || f.hup) ev |= EV_IN;
    if (f.room > 0 && !f.hup) ev |= EV_OUT;
    if (f.hup) ev |= EV_HUP;
    return ev;
  }

  /** madvise calls (virtio-balloon) and the bytes they covered. */
  madvised = { calls: 0, bytes: 0 };

  readonly sys: HostSys = {
    // virtio-blk's Sync engine on its real image file: preadv/pwritev as the shim makes them,
    // over node:fs, a short transfer ending the call (block.ts resumes it).
    preadv: (fd, buffers, offset) => vectored(fd, buffers, offset, false),
    pwritev: (fd, buffers, offset) => vectored(fd, buffers, offset, true),
    // Device memory (virtio-mem) is not part of these fuzz targets: any use is a bug here.
    memfdCreate: () => {
      throw new Error('fake host: memfdCreate is not modelled');
    },
    mmap: () => {
      throw new Error('fake host: mmap is not modelled');
    },
    munmap: () => {
      throw new Error('fake host: munmap is not modelled');
    },
    // virtio-blk's Async engine (io_uring) is not part of these fuzz targets either.
    bufferAddress: () => {
      throw new Error('fake host: bufferAddress is not modelled');
    },
    eventfd: () => {
      throw new Error('fake host: eventfd is not modelled');
    },
    eventfdRead: () => {
      throw new Error('fake host: eventfdRead is not modelled');
    },
    ioUringSetup: () => {
      throw sysError('ENOSYS', 'io_uring_setup');
    },
    ioUringEnter: () => {
      throw new Error('fake host: io_uring_enter is not modelled');
    },
    ioUringRegister: () => {
      throw new Error('fake host: io_uring_register is not modelled');
    },
    // As the kernel checks it: a page-aligned start, a range inside the mapping. Not zeroed:
    // the fuzzer's driver keeps its rings in the same RAM, which a hostile PFN may name.
    madvise: (buffer, offset, length) => {
      const b = buffer as ArrayBufferLike;
      if (offset % 4096 !== 0 || length < 0 || offset + length > b.byteLength)
        throw sysError('EINVAL', 'madvise');
      this.madvised.calls++;
      this.madvised.bytes += length;
    },
    close: (fd) => {
      const f = this.live(fd, 'close');
      f.closed = true;
      this.fds.delete(fd);
      for (const [tag, r] of this.regs.entries()) if (r && r.fd === fd) this.regs[tag] = undefined; // close() removes it from epoll
    },
    ioctl: (fd) => {
      this.live(fd, 'ioctl');
      return 0;
    },
    readv: (fd, buffers) => {
      const f = this.live(fd, 'readv');
      if (buffers.length > IOV_MAX) throw new RangeError('too many iovecs');
      if (f.readError) {
        const code = f.readError;
        f.readError = undefined;
        if (code === 'EAGAIN') return -1;
        this.errorsThrown++;
        throw sysError(code, 'readv');
      }
      const bufs = buffers.map(bytesOf);
      if (f.kind === 'tap') {
        // A TAP read returns one frame; what does not fit is lost (tun truncates).
        const frame = f.inbox.shift();
        if (!frame) return -1;
        let n = 0;
        for (const b of bufs) {
          if (n >= frame.length) break;
          const take = Math.min(b.length, frame.length - n);
          b.set(frame.subarray(n, n + take));
          n += take;
        }
        return n;
      }
      if (f.inbox.length === 0) return f.eof || f.hup ? 0 : -1;
      let n = 0;
      for (const b of bufs) {
        let o = 0;
        while (o < b.length && f.inbox.length > 0) {
          const head = f.inbox[0]!;
          const take = Math.min(b.length - o, head.length);
          b.set(head.subarray(0, take), o);
          o += take;
          n += take;
          if (take === head.length) f.inbox.shift();
          else f.inbox[0] = head.subarray(take);
        }
      }
      return n;
    },
    writev: (fd, buffers) => this.write(fd, buffers, 'writev'),
    sendv: (fd, buffers) => this.write(fd, buffers, 'sendmsg'),
    tapOpen: () => this.newFd('tap').fd,
    unixSocket: () => {
      if (this.emfile) throw sysError('EMFILE', 'socket');
      return this.newFd('socket').fd;
    },
    bindListen: (fd, path) => {
      this.live(fd, 'bind').kind = 'listen';
      // bind(2) makes the socket's inode at `path`: the VMM chmods and links it (unix-host.ts).
      writeFileSync(path, '', { flag: 'wx' });
    },
    accept: (fd) => {
      const f = this.live(fd, 'accept');
      if (f.acceptError) {
        const code = f.acceptError;
        // ECONNABORTED takes the aborted connection off the queue: it does not repeat.
        if (code === 'ECONNABORTED') f.acceptError = undefined;
        this.errorsThrown++;
        throw sysError(code, 'accept');
      }
      if (this.emfile && f.backlog.length > 0) throw sysError('EMFILE', 'accept');
      return f.backlog.shift() ?? -1;
    },
    connect: (fd) => {
      this.live(fd, 'connect');
      const r = this.connectResult();
      if (r === 'ok') return 0;
      if (r === 'pending') return -1;
      throw sysError(r, 'connect');
    },
    shutdown: (fd) => {
      this.live(fd, 'shutdown').shutWr = true;
    },
  };

  private write(fd: number, buffers: Buf[], syscall: string): number {
    const f = this.live(fd, syscall);
    if (buffers.length > IOV_MAX) throw new RangeError('too many iovecs');
    if (f.hup) throw sysError('EPIPE', syscall);
    const total = buffers.reduce((a, b) => a + bytesOf(b).length, 0);
    if (f.kind === 'tap') {
      f.written += total;
      if (f.frames) {
        // What the TAP got, copied as it was at the write (the virtio-net header first).
        const hdr = new Uint8Array(12);
        let o = 0;
        for (const b of buffers.map(bytesOf)) {
          if (o >= 12) break;
          const take = Math.min(b.length, 12 - o);
          hdr.set(b.subarray(0, take), o);
          o += take;
        }
        f.frames.push({ hdr, len: total });
      }
      return total;
    }
    if (total === 0) return 0;
    if (f.room <= 0) return -1;
    const n = Math.min(total, f.room);
    f.room -= n;
    f.written += n;
    return n;
  }

  readonly loop: EventOps = {
    add: (fd, sub, events = EV_IN) => {
      this.live(fd, 'epoll_ctl');
      if (this.regs.some((r) => r?.fd === fd)) throw sysError('EEXIST', 'epoll_ctl');
      let tag = this.regs.indexOf(undefined);
      if (tag < 0) tag = this.regs.length;
      this.regs[tag] = { fd, sub, events };
      return tag;
    },
    modify: (tag, events) => {
      const r = this.regs[tag];
      if (r) r.events = events;
    },
    remove: (tag) => {
      this.regs[tag] = undefined;
    },
    setTimer: (ms, fn) => {
      const t = { due: this.now + Math.max(0, ms), fn, live: true };
      this.timers.push(t);
      return () => void (t.live = false);
    },
  };

  /** Registrations (for targets that want to poke a particular fd). */
  registered(fd: number): boolean {
    return this.regs.some((r) => r?.fd === fd);
  }

  /** The events `fd` is watched for (0 when not registered). */
  interest(fd: number): number {
    return this.regs.find((r) => r?.fd === fd)?.events ?? 0;
  }

  /**
   * Runs the loop until nothing is ready and no timer is due: the device worker between two
   * guest actions. Fails on a busy loop.
   */
  settle(what: string): void {
    const counts = new Map<number, number>();
    for (let round = 0; ; round++) {
      if (round > this.roundLimit)
        fail(
          `${what}: the loop never goes idle: ${this.roundLimit} rounds of wake-ups and timers (${this.pendingTimers} timers pending)`,
        );
      let any = false;
      for (let tag = 0; tag < this.regs.length; tag++) {
        const r = this.regs[tag];
        if (!r) continue;
        const f = this.fds.get(r.fd);
        if (!f) continue;
        const ev = this.ready(f) & (r.events | EV_ERR | EV_HUP);
        if (ev === 0) continue;
        any = true;
        const n = (counts.get(tag) ?? 0) + 1;
        counts.set(tag, n);
        if (n > this.spinLimit)
          fail(
            `${what}: busy loop: fd ${r.fd} (${f.kind}${f.hup ? ', hung up' : ''}${f.eof ? ', peer shut down' : ''}${f.inbox.length ? `, ${f.inbox.reduce((a, b) => a + b.length, 0)} bytes unread` : ''}${f.acceptError ? `, accept ${f.acceptError}` : ''}${this.emfile ? ', EMFILE' : ''}) ready (events 0x${ev.toString(16)}, interest 0x${r.events.toString(16)}) after ${this.spinLimit} wake-ups`,
          );
        this.dispatches++;
        r.sub.process(ev);
      }
      if (this.fireDue()) any = true;
      if (!any) return;
    }
  }

  private fireDue(): boolean {
    const due = this.timers.filter((t) => t.live && t.due <= this.now);
    if (due.length === 0) return false;
    this.timers = this.timers.filter((t) => t.live && t.due > this.now);
    for (const t of due) {
      this.dispatches++;
      t.fn();
    }
    return true;
  }

  /** Lets virtual time pass (timers due by then fire at the next settle()). */
  advance(ms: number): void {
    this.now += ms;
  }

  /** Timers still pending (bounded: a target checks it does not grow without limit). */
  get pendingTimers(): number {
    return this.timers.filter((t) => t.live).length;
  }

  openFds(kind?: FakeFd['kind']): number {
    let n = 0;
    for (const f of this.fds.values()) if (!f.closed && (!kind || f.kind === kind)) n++;
    return n;
  }

  /** Random peer-side bytes: mostly text-like, sometimes binary. */
  static bytes(rng: Prng, max: number): Uint8Array {
    const b = new Uint8Array(rng.below(max + 1));
    rng.fill(b);
    return b;
  }
}

function vectored(fd: number, buffers: Buf[], offset: number, write: boolean): number {
  if (buffers.length > IOV_MAX) throw new RangeError('too many iovecs');
  let moved = 0;
  for (const b of buffers) {
    const v = bytesOf(b);
    const n = write
      ? writeSync(fd, v, 0, v.length, offset + moved)
      : readSync(fd, v, 0, v.length, offset + moved);
    moved += n;
    if (n < v.length) break;
  }
  return moved;
}

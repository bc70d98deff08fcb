/**
 * A readable fd (a pipe or a socket: the console's stdin) read on readiness through the shim's
 * fd watch on this thread's libuv loop, without Node's streams.
 */
import { readSync } from 'node:fs';
import { native } from '../kvm/native.js';

/** How much one read of a pipe or socket on stdin takes at most. */
const FD_READ_BYTES = 64 * 1024;

/**
 * stdin when it is a pipe or a socket, read on readiness through the shim's fd watch (the
 * main thread's libuv loop, level-triggered) instead of Node's process.stdin: a net.Socket
 * that loads node:net and node:stream (~1.1 MiB of a native VM's peak RSS on the micro guest
 * and a few ms of its start) for nothing a console needs. The fd is made non-blocking, as
 * libuv makes a piped stdin (never a read that waits: another reader of the same pipe may
 * take the bytes first), and put back as it was by destroy() (Node also restores stdio's
 * flags at exit). One read per readiness, at most FD_READ_BYTES; pause() stops watching (the
 * writer is held back by the pipe), resume() watches again; end of file stops for good.
 */
export class FdInput {
  readonly isTTY = false;
  private watch = -1;
  private readonly dataFns: ((b: Buffer) => void)[] = [];
  private readonly errorFns: ((e: Error) => void)[] = [];
  private paused = false;
  /** End of file, an error or destroy(): no more watching. */
  private done = false;
  private destroyed = false;
  private readonly wasNonBlocking: boolean;
  private readonly buf = Buffer.allocUnsafe(FD_READ_BYTES);

  constructor(private readonly fd: number) {
    this.wasNonBlocking = native().setNonBlocking(fd, true);
  }

  on(event: 'data', fn: (b: Buffer) => void): this;
  on(event: 'error', fn: (e: Error) => void): this;
  on(event: 'data' | 'error', fn: ((b: Buffer) => void) | ((e: Error) => void)): this {
    if (event === 'data') {
      this.dataFns.push(fn as (b: Buffer) => void);
      this.arm();
    } else this.errorFns.push(fn as (e: Error) => void);
    return this;
  }

  off(event: 'data', fn: (b: Buffer) => void): this {
    const i = this.dataFns.indexOf(fn);
    if (i >= 0) this.dataFns.splice(i, 1);
    if (this.dataFns.length === 0) this.disarm();
    return this;
  }

  pause(): this {
    this.paused = true;
    this.disarm();
    return this;
  }

  resume(): this {
    this.paused = false;
    this.arm();
    return this;
  }

  destroy(): this {
    if (this.destroyed) return this;
    this.destroyed = true;
    this.done = true;
    this.dataFns.length = 0;
    this.disarm();
    if (!this.wasNonBlocking) {
      try {
        native().setNonBlocking(this.fd, false);
      } catch {
        // fd 0 closed meanwhile: nothing to put back
      }
    }
    return this;
  }

  /** Whether it is watching its fd (tests). */
  get watching(): boolean {
    return this.watch >= 0;
  }

  private arm(): void {
    if (this.watch >= 0 || this.done || this.paused || this.dataFns.length === 0) return;
    this.watch = native().fdWatch(this.fd, (status) => this.readable(status));
  }

  private disarm(): void {
    if (this.watch < 0) return;
    native().fdUnwatch(this.watch);
    this.watch = -1;
  }

  private readable(status: number): void {
    if (this.watch < 0) return;
    if (status < 0) return this.fail(new Error(`stdin: poll error ${status}`));
    let n: number;
    try {
      n = readSync(this.fd, this.buf, 0, this.buf.length, null);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      if (code === 'EAGAIN' || code === 'EWOULDBLOCK' || code === 'EINTR') return;
      return this.fail(e as Error);
    }
    if (n === 0) {
      // end of file: nothing more will come
      this.done = true;
      this.disarm();
      return;
    }
    const chunk = Buffer.from(this.buf.subarray(0, n));
    for (const fn of [...this.dataFns]) fn(chunk);
  }

  private fail(e: Error): void {
    this.done = true;
    this.disarm();
    for (const fn of [...this.errorFns]) fn(e);
  }
}

/**
 * The console's output path (serial THR bytes -> this process's console file descriptor), built
 * so that a vCPU never blocks on whoever reads the console (issue 12).
 *
 * Every write is non-blocking, on a file description whose flags are our own: the caller's
 * stdout is never switched to O_NONBLOCK (that would change it for every other writer of the
 * same open file description: the parent shell's terminal, a pipeline's other stages).
 *  - a pipe, FIFO or terminal is reopened through /proc/self/fd/N with O_NONBLOCK: a new open
 *    file description of the same pipe or terminal, private to us;
 *  - a socket (Node's child_process pipes are socketpairs) is written with
 *    sendmsg(MSG_DONTWAIT), which is non-blocking per call;
 *  - a regular file is written as it is (writes to a regular file never wait for a reader).
 * What the sink does not take at once goes into a bounded byte ring in shared memory
 * (CONSOLE_OUTPUT_BUFFER_BYTES by default); the ring is retried before every later write, and by
 * the main thread (startFlusher) while the guest is quiet. When the ring is full, the bytes that
 * do not fit are dropped and counted in `missed_write_count` (Firecracker's serial counts a
 * failed write the same way); once the console reports an error (its reader closed it), every
 * byte is dropped and counted without another attempt.
 *
 * Threads: each vCPU worker and the main thread build their own ConsoleOutput over the same
 * state; one SharedMutex orders the writers, so bytes leave in the order the guest wrote them.
 * The critical section makes at most one non-blocking system call.
 */
import { closeSync, constants, fstatSync, openSync } from 'node:fs';
import { native } from '../kvm/native.js';
import { SharedMutex } from '../util/shared-mutex.js';

/** Default capacity of the output ring: bytes held while the console reader is slow. */
export const CONSOLE_OUTPUT_BUFFER_BYTES = 64 * 1024;
/** The main thread's retry interval while bytes wait (doubling up to the maximum). */
const FLUSH_RETRY_MIN_MS = 5;
const FLUSH_RETRY_MAX_MS = 200;
/** How long close() tries for the lock (held only for one non-blocking write at a time). */
const CLOSE_LOCK_WAIT_MS = 100;

/** How the sink is written: writev(2) on a non-blocking fd, or sendmsg(MSG_DONTWAIT). */
export type ConsoleSinkMode = 'write' | 'send';

/** Structured-clone friendly: posted to every vCPU worker. */
export interface ConsoleOutputState {
  sab: SharedArrayBuffer;
  fd: number;
  mode: ConsoleSinkMode;
  /** fd was opened by us (a private description of the console): closed by close(). */
  own: boolean;
  /** Why the console could not be made non-blocking, if it could not (said once at start). */
  warning?: string;
}

export interface ConsoleOutputCounters {
  /** Bytes dropped: the ring was full, or the console had gone. */
  missed_write_count: number;
  /** Times the main thread wrote out bytes that waited in the ring. */
  flush_count: number;
}

// Int32 slots.
const S_LOCK = 0;
const S_HEAD = 1; // offset of the oldest buffered byte
const S_LEN = 2; // bytes buffered
const S_WAKE = 3; // bumped when the ring stops being empty (the flusher waits on it)
const S_GONE = 4; // 1 once the sink failed (or was closed): drop everything
const S_CAPACITY = 5;
const INT32_SLOTS = 8;
const COUNTERS_BYTE_OFFSET = INT32_SLOTS * 4;
const C_MISSED = 0;
const C_FLUSHES = 1;
const COUNTER_COUNT = 2;
const RING_BYTE_OFFSET = COUNTERS_BYTE_OFFSET + COUNTER_COUNT * 8;

type WaitAsync = (
  a: Int32Array,
  i: number,
  v: number,
) => { async: false; value: string } | { async: true; value: Promise<string> };

/**
 * Main thread: the output state for console fd `consoleFd` (opened non-blocking as above).
 * Throws only for a capacity that is not a positive integer.
 */
export function openConsoleOutput(
  consoleFd: number,
  capacity = CONSOLE_OUTPUT_BUFFER_BYTES,
): ConsoleOutputState {
  if (!Number.isInteger(capacity) || capacity < 1 || capacity > 1 << 30)
    throw new Error(`console output buffer of ${capacity} bytes: must be 1 byte to 1 GiB`);
  const sab = new SharedArrayBuffer(RING_BYTE_OFFSET + capacity);
  new Int32Array(sab, 0, INT32_SLOTS)[S_CAPACITY] = capacity;
  let kind: 'file' | 'socket' | 'other';
  try {
    const st = fstatSync(consoleFd);
    kind = st.isFile() ? 'file' : st.isSocket() ? 'socket' : 'other';
  } catch (e) {
    // A closed stdout: every byte is dropped (and counted).
    new Int32Array(sab, 0, INT32_SLOTS)[S_GONE] = 1;
    return {
      sab,
      fd: consoleFd,
      mode: 'write',
      own: false,
      warning: `console output is dropped: fd ${consoleFd}: ${(e as Error).message}`,
    };
  }
  if (kind === 'file') return { sab, fd: consoleFd, mode: 'write', own: false };
  if (kind === 'socket') return { sab, fd: consoleFd, mode: 'send', own: false };
  const reopen = (access: number) =>
    openSync(`/proc/self/fd/${consoleFd}`, access | constants.O_NONBLOCK | constants.O_NOCTTY);
  try {
    let fd: number;
    try {
      fd = reopen(constants.O_WRONLY);
    } catch (e) {
      // A FIFO whose reader has gone cannot be opened write-only without blocking (ENXIO);
      // read-write it can, and it then fills and drops like any stalled console.
      if ((e as NodeJS.ErrnoException).code !== 'ENXIO') throw e;
      fd = reopen(constants.O_RDWR);
    }
    return { sab, fd, mode: 'write', own: true };
  } catch (e) {
    return {
      sab,
      fd: consoleFd,
      mode: 'write',
      own: false,
      warning: `cannot reopen the console (fd ${consoleFd}) non-blocking (${(e as Error).message}): a reader that stops reading can stall the guest`,
    };
  }
}

export class ConsoleOutput {
  private readonly s: Int32Array;
  private readonly counters: Float64Array;
  private readonly ring: Uint8Array;
  private readonly capacity: number;
  private readonly mutex: SharedMutex;

  constructor(private readonly state: ConsoleOutputState) {
    this.s = new Int32Array(state.sab, 0, INT32_SLOTS);
    this.capacity = this.s[S_CAPACITY]!;
    if (state.sab.byteLength !== RING_BYTE_OFFSET + this.capacity)
      throw new Error('not a console output state buffer');
    this.counters = new Float64Array(state.sab, COUNTERS_BYTE_OFFSET, COUNTER_COUNT);
    this.ring = new Uint8Array(state.sab, RING_BYTE_OFFSET, this.capacity);
    this.mutex = new SharedMutex(this.s, S_LOCK);
  }

  /** Any thread: sends `bytes` now, or buffers what the console does not take, or drops it. */
  write(bytes: Uint8Array): void {
    if (bytes.length === 0) return;
    let woke = false;
    this.mutex.lock();
    try {
      const s = this.s;
      if (s[S_GONE] !== 0) {
        this.counters[C_MISSED]! += bytes.length;
        return;
      }
      // Older bytes first: try the ring, then (only if it emptied) write these directly.
      if (s[S_LEN]! > 0) this.flushLocked();
      let rest = bytes;
      if (s[S_LEN] === 0 && s[S_GONE] === 0) {
        const n = this.sink([bytes]);
        rest = n < 0 ? bytes : bytes.subarray(n);
      }
      if (rest.length === 0) return;
      if (s[S_GONE] !== 0) {
        this.counters[C_MISSED]! += rest.length;
        return;
      }
      const len = s[S_LEN]!;
      const take = Math.min(rest.length, this.capacity - len);
      let at = (s[S_HEAD]! + len) % this.capacity;
      for (let i = 0; i < take; i++) {
        this.ring[at] = rest[i]!;
        at = at + 1 === this.capacity ? 0 : at + 1;
      }
      Atomics.store(s, S_LEN, len + take);
      this.counters[C_MISSED]! += rest.length - take;
      woke = len === 0 && take > 0;
    } finally {
      this.mutex.unlock();
    }
    if (woke) {
      Atomics.add(this.s, S_WAKE, 1);
      Atomics.notify(this.s, S_WAKE);
    }
  }

  /** Bytes waiting in the ring. */
  buffered(): number {
    return Atomics.load(this.s, S_LEN);
  }

  /**
   * Any thread: one non-blocking attempt to write out the ring. True if it is now empty. Never
   * waits for the lock (the main thread must not block on a vCPU): when a writer holds it, this
   * returns false at once, and that writer tries the ring itself.
   */
  flush(): boolean {
    if (!this.mutex.tryLock()) return false;
    try {
      if (this.s[S_LEN]! > 0 && this.s[S_GONE] === 0) {
        const before = this.s[S_LEN]!;
        this.flushLocked();
        if (this.s[S_LEN]! < before) this.counters[C_FLUSHES]! += 1;
      }
      return this.s[S_LEN] === 0;
    } finally {
      this.mutex.unlock();
    }
  }

  /**
   * Main thread: writes out what waits in the ring while the guest is quiet. Sleeps on the
   * ring's wake slot while it is empty (no timer runs then); while bytes wait, retries with a
   * backoff from 5 to 200 ms (each retry one non-blocking write). Nothing here keeps the
   * process alive. Returns the function that stops it.
   */
  startFlusher(): () => void {
    let stopped = false;
    let timer: NodeJS.Timeout | undefined;
    let delay = FLUSH_RETRY_MIN_MS;
    const waitAsync = (Atomics as unknown as { waitAsync: WaitAsync }).waitAsync;
    const loop = async () => {
      while (!stopped) {
        const seen = Atomics.load(this.s, S_WAKE);
        if (this.buffered() === 0 || Atomics.load(this.s, S_GONE) !== 0) {
          const r = waitAsync(this.s, S_WAKE, seen);
          if (r.async) await r.value;
          continue;
        }
        const before = this.buffered();
        this.flush();
        delay =
          this.buffered() < before ? FLUSH_RETRY_MIN_MS : Math.min(delay * 2, FLUSH_RETRY_MAX_MS);
        if (this.buffered() > 0 && !stopped) {
          await new Promise<void>((r) => {
            timer = setTimeout(r, delay);
            timer.unref();
          });
        }
      }
    };
    void loop();
    return () => {
      stopped = true;
      if (timer) clearTimeout(timer);
      Atomics.add(this.s, S_WAKE, 1);
      Atomics.notify(this.s, S_WAKE);
    };
  }

  /**
   * Main thread, at teardown (no vCPU runs): a last non-blocking flush, then the sink is marked
   * gone (later writes are dropped and counted) and our private fd closed. A vCPU given up on
   * could still hold the lock: then the fd is left open (the process is ending) rather than
   * closed under a writer, and this does not wait more than CLOSE_LOCK_WAIT_MS.
   */
  close(): void {
    const locked = this.mutex.tryLockFor(CLOSE_LOCK_WAIT_MS);
    if (locked) {
      try {
        if (this.s[S_LEN]! > 0 && this.s[S_GONE] === 0) this.flushLocked();
      } finally {
        Atomics.store(this.s, S_GONE, 1);
        this.mutex.unlock();
      }
    } else Atomics.store(this.s, S_GONE, 1);
    Atomics.add(this.s, S_WAKE, 1);
    Atomics.notify(this.s, S_WAKE);
    if (this.state.own && locked) {
      try {
        closeSync(this.state.fd);
      } catch {
        // already closed
      }
    }
  }

  stats(): ConsoleOutputCounters {
    return {
      missed_write_count: this.counters[C_MISSED]!,
      flush_count: this.counters[C_FLUSHES]!,
    };
  }

  // ---- with the lock held ----

  /** Writes as much of the ring as the sink takes now. */
  private flushLocked(): void {
    const s = this.s;
    const len = s[S_LEN]!;
    const head = s[S_HEAD]!;
    const first = Math.min(len, this.capacity - head);
    const parts = [this.ring.subarray(head, head + first)];
    if (first < len) parts.push(this.ring.subarray(0, len - first));
    const n = this.sink(parts);
    if (n < 0) {
      // The console is gone: what waited is lost.
      this.counters[C_MISSED]! += len;
      s[S_HEAD] = 0;
      Atomics.store(s, S_LEN, 0);
      return;
    }
    s[S_HEAD] = (head + n) % this.capacity;
    Atomics.store(s, S_LEN, len - n);
  }

  /** Bytes the sink took (0 when it would block), or -1 once it failed (marked gone). */
  private sink(parts: Uint8Array[]): number {
    try {
      const n =
        this.state.mode === 'send'
          ? native().sendv(this.state.fd, parts)
          : native().writev(this.state.fd, parts);
      return n < 0 ? 0 : n;
    } catch {
      // EPIPE, ECONNRESET, EBADF, ENOSPC...: the console is gone. Drop from now on, as the
      // serial console of a VM whose terminal went away must not stop the guest.
      Atomics.store(this.s, S_GONE, 1);
      return -1;
    }
  }
}

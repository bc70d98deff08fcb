import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import {
  closeSync,
  constants,
  mkdtempSync,
  openSync,
  readFileSync,
  readSync,
  rmSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ConsoleOutput, openConsoleOutput } from './console-output.js';

/** A FIFO with our own read end (non-blocking) and a blocking write end, as a shell gives us. */
function fifo() {
  const dir = mkdtempSync(join(tmpdir(), 'typervisor-console-'));
  const path = join(dir, 'console');
  assert.equal(spawnSync('mkfifo', [path]).status, 0, 'mkfifo failed');
  const rfd = openSync(path, constants.O_RDONLY | constants.O_NONBLOCK);
  const wfd = openSync(path, constants.O_WRONLY);
  const read = (): Buffer => {
    const parts: Buffer[] = [];
    const buf = Buffer.alloc(65536);
    for (;;) {
      let n = 0;
      try {
        n = readSync(rfd, buf);
      } catch (e) {
        if ((e as NodeJS.ErrnoException).code === 'EAGAIN') break;
        throw e;
      }
      if (n === 0) break;
      parts.push(Buffer.from(buf.subarray(0, n)));
    }
    return Buffer.concat(parts);
  };
  const done = () => {
    for (const fd of [rfd, wfd]) {
      try {
        closeSync(fd);
      } catch {
        // closed by the test
      }
    }
    rmSync(dir, { recursive: true, force: true });
  };
  return { rfd, wfd, read, done };
}

/** The status flags of an fd (/proc/self/fdinfo), to see that O_NONBLOCK is not ours to set. */
const fdFlags = (fd: number) =>
  parseInt(/flags:\s+([0-7]+)/.exec(readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8'))![1]!, 8);

const pattern = (n: number, from = 0) => {
  const b = Buffer.alloc(n);
  for (let i = 0; i < n; i++) b[i] = (from + i) % 251;
  return b;
};

test('a reader that stops: writes never block, the ring is bounded, the rest is dropped and counted, order kept', () => {
  const f = fifo();
  try {
    const state = openConsoleOutput(f.wfd, 4096);
    assert.equal(state.own, true, 'a FIFO is reopened through /proc');
    assert.equal(state.mode, 'write');
    const out = new ConsoleOutput(state);
    const total = 256 * 1024; // far more than the pipe (64 KiB) and the ring (4 KiB) hold
    const data = pattern(total);
    for (let i = 0; i < total; i += 100) out.write(data.subarray(i, i + 100));
    const missed = out.stats().missed_write_count;
    assert.equal(out.buffered(), 4096, 'the ring is full');
    const got = f.read(); // what the pipe held
    assert.equal(got.length + 4096 + missed, total, 'every byte is sent, held or counted');
    assert.ok(missed > 0);
    // The caller's description was left blocking: only our private one is non-blocking.
    assert.equal(fdFlags(f.wfd) & constants.O_NONBLOCK, 0, "the caller's fd became non-blocking");
    assert.notEqual(fdFlags(state.fd) & constants.O_NONBLOCK, 0);
    // The reader is back: one flush sends the ring, in order after what the pipe had.
    assert.equal(out.flush(), true);
    const rest = f.read();
    assert.equal(rest.length, 4096);
    assert.deepEqual(got, data.subarray(0, got.length));
    assert.deepEqual(rest, data.subarray(got.length, got.length + 4096));
    assert.equal(out.stats().flush_count, 1);
    // New bytes go straight out again.
    out.write(Buffer.from('hello\n'));
    assert.equal(f.read().toString(), 'hello\n');
    assert.equal(out.stats().missed_write_count, missed);
    out.close();
  } finally {
    f.done();
  }
});

test('a reader that keeps up loses nothing', () => {
  const f = fifo();
  try {
    const out = new ConsoleOutput(openConsoleOutput(f.wfd, 4096));
    const total = 1024 * 1024;
    const data = pattern(total, 7);
    const got: Buffer[] = [];
    for (let i = 0; i < total; i += 1000) {
      out.write(data.subarray(i, i + 1000));
      if ((i / 1000) % 16 === 0) got.push(f.read());
    }
    out.flush();
    got.push(f.read());
    assert.deepEqual(Buffer.concat(got), data);
    assert.equal(out.stats().missed_write_count, 0);
    out.close();
  } finally {
    f.done();
  }
});

test('the console gone (reader closed): bytes are dropped and counted, no error, no further tries', () => {
  const f = fifo();
  const state = openConsoleOutput(f.wfd, 1024);
  const out = new ConsoleOutput(state);
  try {
    out.write(Buffer.from('seen\n'));
    assert.equal(f.read().toString(), 'seen\n');
    closeSync(f.rfd); // EPIPE from now on (Node ignores SIGPIPE)
    out.write(Buffer.from('lost'));
    out.write(Buffer.from('lost too'));
    assert.equal(out.stats().missed_write_count, 12);
    assert.equal(out.buffered(), 0);
  } finally {
    out.close();
    f.done();
  }
});

test('the flusher writes out what waited once the reader is back, with no write from the guest', async () => {
  const f = fifo();
  const out = new ConsoleOutput(openConsoleOutput(f.wfd, 8192));
  const stop = out.startFlusher();
  try {
    const data = pattern(70 * 1024, 3);
    out.write(data); // 64 KiB into the pipe, the rest into the ring
    assert.ok(out.buffered() > 0);
    const got = [f.read()];
    for (let i = 0; i < 200 && out.buffered() > 0; i++) {
      await new Promise((r) => setTimeout(r, 5));
      got.push(f.read());
    }
    got.push(f.read());
    assert.equal(out.buffered(), 0, 'the flusher did not write out the ring');
    assert.deepEqual(Buffer.concat(got), data);
    assert.ok(out.stats().flush_count >= 1);
  } finally {
    stop();
    out.close();
    f.done();
  }
});

test('a regular file is written as it is; close() leaves a caller fd open', () => {
  const dir = mkdtempSync(join(tmpdir(), 'typervisor-console-'));
  const path = join(dir, 'out');
  const fd = openSync(path, 'w');
  try {
    const state = openConsoleOutput(fd);
    assert.equal(state.own, false);
    assert.equal(state.fd, fd);
    const out = new ConsoleOutput(state);
    out.write(Buffer.from('abc'));
    out.close();
    assert.equal(readFileSync(path, 'utf8'), 'abc');
    closeSync(fd); // still ours: close() did not close it
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('the main thread never waits for a writer that holds the lock', () => {
  const f = fifo();
  const state = openConsoleOutput(f.wfd, 1024);
  const out = new ConsoleOutput(state);
  try {
    out.write(pattern(70 * 1024)); // the pipe full, the ring holding the rest
    assert.ok(out.buffered() > 0);
    f.read(); // room again
    const lock = new Int32Array(state.sab, 0, 1);
    Atomics.store(lock, 0, 1); // a vCPU writing (or stuck) holds the lock
    assert.equal(out.flush(), false, 'flush() should give up at once');
    const started = performance.now();
    out.close(); // gives up on the lock after a bounded wait, marks the console gone
    assert.ok(performance.now() - started < 1000);
    Atomics.store(lock, 0, 0);
    out.write(Buffer.from('y')); // gone: dropped and counted, not written
    assert.equal(f.read().length, 0);
    // Our fd was left open, not closed under the writer that held the lock.
    assert.doesNotThrow(() => closeSync(state.fd));
  } finally {
    f.done();
  }
});

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { closeSync, openSync } from 'node:fs';
import { PassThrough } from 'node:stream';
import { fileURLToPath } from 'node:url';
import { Console, stdinIsNull, type ConsoleSerial } from './console.js';

const UART_RING = 4096;

/**
 * The UART as the console sees it (Serial16550's pushInput contract: takes what fits in its
 * 4 KiB ring, resolves waitForInputSpace once the guest drained some), and the guest's side.
 */
function guestUart() {
  const ring: number[] = [];
  let open = false;
  let spaceWaiters: Array<() => void> = [];
  const dev: ConsoleSerial & { inputSpace(): number } = {
    receiverEnabled: () => open,
    pushInput(bytes: Uint8Array) {
      const n = Math.min(bytes.length, UART_RING - ring.length);
      for (let i = 0; i < n; i++) ring.push(bytes[i]!);
      return n;
    },
    waitForInputSpace: () =>
      ring.length < UART_RING ? Promise.resolve() : new Promise<void>((r) => spaceWaiters.push(r)),
    inputSpace: () => UART_RING - ring.length,
  };
  return {
    dev,
    /** The guest's driver opens the port (Linux's 8250 startup: OUT2, receive interrupt). */
    open() {
      open = true;
    },
    /** The guest reads everything the ring holds. */
    drain(): number[] {
      const got = ring.splice(0);
      const w = spaceWaiters;
      spaceWaiters = [];
      w.forEach((r) => r());
      return got;
    },
  };
}

const tick = (ms = 0) => new Promise((r) => setTimeout(r, ms));

/** Writes `total` bytes (a counting pattern) in 4 KiB chunks, honouring the stream's back-pressure. */
async function feed(stdin: PassThrough, total: number, progress: { written: number }) {
  while (progress.written < total) {
    const n = Math.min(4096, total - progress.written);
    const chunk = Buffer.alloc(n);
    for (let i = 0; i < n; i++) chunk[i] = (progress.written + i) & 0xff;
    progress.written += n;
    if (!stdin.write(chunk)) await new Promise((r) => stdin.once('drain', r));
  }
  stdin.end();
}

test('console input is bounded while the guest has not opened the port: stdin is paused, then resumed and nothing is lost', async () => {
  const uart = guestUart();
  const stdin = new PassThrough();
  const bound = 16 * 1024;
  const con = new Console({ serial: uart.dev }, () => undefined, stdin, bound);
  con.start();
  const total = 1024 * 1024;
  const progress = { written: 0 };
  const writer = feed(stdin, total, progress);
  // The guest never opens the port: the console holds at most the bound plus one chunk, and the
  // producer is held back (it has not been able to write the megabyte).
  let peak = 0;
  for (let i = 0; i < 50; i++) {
    await tick(2);
    peak = Math.max(peak, con.bufferedInput);
  }
  assert.ok(peak >= bound, `held ${peak} bytes: the bound was never reached`);
  assert.ok(peak <= bound + 64 * 1024, `held ${peak} bytes, more than the bound and a chunk`);
  assert.ok(stdin.isPaused(), 'stdin was not paused');
  assert.ok(
    progress.written < 256 * 1024,
    `the producer wrote ${progress.written} bytes unchecked`,
  );
  assert.equal(con.pauses, 1);

  // The guest opens the port and reads: everything arrives, in order, and stdin flows again.
  uart.open();
  const got: number[] = [];
  for (let i = 0; i < 20_000 && got.length < total; i++) {
    got.push(...uart.drain());
    peak = Math.max(peak, con.bufferedInput);
    await tick();
  }
  await writer;
  assert.equal(got.length, total, 'bytes lost or not delivered');
  for (let i = 0; i < total; i++) if (got[i] !== (i & 0xff)) assert.fail(`byte ${i} out of order`);
  assert.ok(peak <= bound + 64 * 1024, `held ${peak} bytes while draining`);
  assert.ok(con.pauses >= 2, 'stdin was paused only once: the guest is slower than the pipe');
  assert.equal(con.bufferedInput, 0);
  con.stop();
});

test('a guest that never reads leaves at most the bound held, never the whole input', async () => {
  const uart = guestUart();
  uart.open(); // open, but it never reads: the UART ring fills, then the console's buffer
  const stdin = new PassThrough();
  const con = new Console({ serial: uart.dev }, () => undefined, stdin, 8192);
  con.start();
  const progress = { written: 0 };
  void feed(stdin, 4 * 1024 * 1024, progress);
  for (let i = 0; i < 50; i++) await tick(2);
  assert.equal(uart.dev.inputSpace(), 0, 'the UART ring should be full');
  assert.ok(con.bufferedInput <= 8192 + 64 * 1024, `held ${con.bufferedInput}`);
  assert.ok(
    progress.written < UART_RING + 8192 + 128 * 1024,
    `the producer wrote ${progress.written} bytes: no back-pressure`,
  );
  con.stop();
});

test('stdin that is /dev/null is not read (stdinIsNull); a pipe or a file is', () => {
  assert.equal(typeof stdinIsNull(), 'boolean');
  const probe = `import(${JSON.stringify(new URL('./console.js', import.meta.url).href)}).then((m) => process.stdout.write(String(m.stdinIsNull())))`;
  const run = (stdin: 'ignore' | 'pipe' | number) =>
    spawnSync(process.execPath, ['-e', probe], {
      stdio: [stdin, 'pipe', 'inherit'],
      encoding: 'utf8',
    }).stdout;
  assert.equal(run('ignore'), 'true'); // Node opens /dev/null for it
  assert.equal(run('pipe'), 'false');
  const fd = openSync(fileURLToPath(import.meta.url), 'r');
  try {
    assert.equal(run(fd), 'false');
  } finally {
    closeSync(fd);
  }
});

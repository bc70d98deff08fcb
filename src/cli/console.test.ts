import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { closeSync, openSync } from 'node:fs';
import { PassThrough } from 'node:stream';
import { fileURLToPath } from 'node:url';
import { Console, stdinKind, type ConsoleSerial } from './console.js';

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

test('stdin: /dev/null is not read, a pipe is read by FdInput, a file by process.stdin (stdinKind)', () => {
  assert.ok(['null', 'fd', 'stream'].includes(stdinKind()));
  const probe = `import(${JSON.stringify(new URL('./console.js', import.meta.url).href)}).then((m) => process.stdout.write(m.stdinKind()))`;
  const run = (stdin: 'ignore' | 'pipe' | number) =>
    spawnSync(process.execPath, ['-e', probe], {
      stdio: [stdin, 'pipe', 'inherit'],
      encoding: 'utf8',
    }).stdout;
  assert.equal(run('ignore'), 'null'); // Node opens /dev/null for it
  assert.equal(run('pipe'), 'fd');
  const fd = openSync(fileURLToPath(import.meta.url), 'r');
  try {
    assert.equal(run(fd), 'stream');
  } finally {
    closeSync(fd);
  }
});

test('FdInput: reads a piped stdin to its end, pauses and resumes, loads no stream modules', () => {
  // The child reads 1 MiB from its stdin pipe through FdInput, pausing 20 ms after each of the
  // first 5 chunks; it prints the byte count and checksum, whether it paused, whether it still
  // watches after the end, and whether node:net was loaded (it must not be: FdInput's point).
  const probe = `
    import(${JSON.stringify(new URL('../events/fd-input.js', import.meta.url).href)}).then((m) => {
      const inp = new m.FdInput(0);
      let bytes = 0, chunks = 0, sum = 0;
      inp.on('error', (e) => { process.stderr.write('error ' + e.message); process.exit(3); });
      inp.on('data', (b) => {
        bytes += b.length; chunks++;
        for (const x of b) sum = (sum + x) % 65521;
        if (chunks <= 5) { inp.pause(); setTimeout(() => inp.resume(), 20); }
      });
      const t = setInterval(() => {
        if (bytes < ${1 << 20}) return;
        clearInterval(t);
        setTimeout(() => {
          const net = process.moduleLoadList.includes('NativeModule net');
          const watching = inp.watching; // false: the end of file stopped the watch
          inp.destroy();
          process.stdout.write(JSON.stringify({ bytes, sum, paused: chunks > 5, watching, net }));
        }, 50);
      }, 5);
    });`;
  const input = Buffer.alloc(1 << 20);
  let sum = 0;
  for (let i = 0; i < input.length; i++) {
    input[i] = (i * 7) & 0xff;
    sum = (sum + input[i]!) % 65521;
  }
  const r = spawnSync(process.execPath, ['--input-type=module', '-e', probe], {
    input,
    encoding: 'utf8',
    timeout: 30_000,
  });
  assert.equal(r.status, 0, r.stderr);
  assert.deepEqual(JSON.parse(r.stdout), {
    bytes: 1 << 20,
    sum,
    paused: true,
    watching: false,
    net: false,
  });
});

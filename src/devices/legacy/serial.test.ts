import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Worker } from 'node:worker_threads';
import { Serial16550, SERIAL_RX_RING_SIZE } from './serial.js';

const RBR = 0,
  IER = 1,
  IIR = 2,
  FCR = 2,
  LCR = 3,
  MCR = 4,
  LSR = 5,
  MSR = 6,
  SCR = 7;

function uart() {
  const out: number[] = [];
  let irqs = 0;
  const state = Serial16550.createState();
  const sinks = { output: (b: Uint8Array) => out.push(...b), irq: { trigger: () => void irqs++ } };
  const dev = new Serial16550(state, sinks);
  const rd = (off: number) => {
    const d = new Uint8Array(1);
    dev.read(off, d);
    return d[0]!;
  };
  const wr = (off: number, v: number) => dev.write(off, Uint8Array.of(v));
  return { dev, state, out, rd, wr, irqs: () => irqs };
}

/** Holding on (the hold timer), FIFOs and THRI on, THRE taken: a driver about to send. */
function startTx(
  dev: Serial16550,
  rd: (off: number) => number,
  wr: (off: number, v: number) => void,
  minMs: number,
  maxMs?: number,
): () => void {
  const stop = dev.startHoldTimer(minMs, maxMs);
  wr(FCR, 0x01);
  wr(IER, 0x02);
  assert.equal(rd(IIR), 0xc2);
  return stop;
}

test('Linux 8250 autoconfig identifies a 16550A', () => {
  const { rd, wr } = uart();
  // Scratch/IER test.
  const scratch = rd(IER);
  wr(IER, 0);
  const scratch2 = rd(IER) & 0x0f;
  wr(IER, 0x0f);
  const scratch3 = rd(IER) & 0x0f;
  wr(IER, scratch);
  assert.equal(scratch2, 0);
  assert.equal(scratch3, 0x0f);
  wr(SCR, 0xa5);
  assert.equal(rd(SCR), 0xa5);
  // Loopback MSR test: LOOP | OUT2 | RTS -> DCD | CTS.
  const saveMcr = rd(MCR);
  wr(MCR, 0x10 | 0x0a);
  assert.equal(rd(MSR) & 0xf0, 0x90);
  wr(MCR, saveMcr);
  // FIFO detection.
  wr(LCR, 0xbf);
  wr(2, 0); // EFR on 16650s; FCR here
  wr(LCR, 0);
  wr(FCR, 0x01);
  assert.equal(rd(IIR) >> 6, 3, 'FIFO bits say 16550A');
  // autoconfig_16550a: EFR probe with LCR=0x80 must read non-zero (no EFR).
  wr(LCR, 0x80);
  assert.notEqual(rd(2), 0);
  // 16750 probe: 64-byte FIFO bit must stay 0.
  wr(LCR, 0);
  wr(FCR, 0x01 | 0x20);
  assert.equal(rd(IIR) & 0xe0, 0xc0);
  wr(FCR, 0);
  assert.equal(rd(IIR) & 0xc0, 0, 'FIFOs off');
  // XScale UUE bit must not stick.
  wr(IER, 0x40);
  assert.equal(rd(IER) & 0x40, 0);
});

test('THR writes reach output and are counted', () => {
  const { dev, out, wr, rd } = uart();
  for (const c of Buffer.from('hi\n')) wr(RBR, c);
  assert.deepEqual(Buffer.from(out).toString(), 'hi\n');
  assert.equal(rd(LSR) & 0x60, 0x60, 'THRE and TEMT');
  assert.equal(dev.stats().bytesOut, 3);
});

test('DLAB selects the divisor latch', () => {
  const { out, wr, rd } = uart();
  wr(LCR, 0x83);
  wr(RBR, 0x01);
  wr(IER, 0x00);
  assert.equal(rd(RBR), 0x01);
  assert.equal(rd(IER), 0x00);
  wr(LCR, 0x03);
  assert.equal(rd(LCR), 0x03);
  assert.equal(out.length, 0, 'divisor writes are not output');
  wr(IER, 0x05);
  assert.equal(rd(IER), 0x05);
  wr(LCR, 0x83);
  assert.equal(rd(RBR), 0x01);
  assert.equal(rd(IER), 0x00);
});

test('input pushed through another object over the same state is read in order', () => {
  const { state, rd, wr, irqs } = uart();
  let producerIrqs = 0;
  const producer = new Serial16550(state, {
    output: () => assert.fail('no output from producer'),
    irq: { trigger: () => void producerIrqs++ },
  });
  assert.equal(rd(LSR) & 0x01, 0);
  wr(IER, 0x01); // RDI
  assert.equal(producer.pushInput(Buffer.from('abc')), 3);
  assert.equal(producerIrqs, 1, 'the pushing thread raises RDA');
  assert.equal(rd(IIR) & 0x0f, 0x04);
  const got: number[] = [];
  while (rd(LSR) & 0x01) got.push(rd(RBR));
  assert.equal(Buffer.from(got).toString(), 'abc');
  assert.equal(rd(IIR) & 0x0f, 0x01);
  assert.equal(irqs(), 0);
});

test('a full ring accepts short and wakes the producer when drained', async () => {
  const { dev, rd } = uart();
  const big = new Uint8Array(SERIAL_RX_RING_SIZE + 10).map((_, i) => i & 0xff);
  assert.equal(dev.pushInput(big), SERIAL_RX_RING_SIZE);
  assert.equal(dev.pushInput(big.subarray(SERIAL_RX_RING_SIZE)), 0);
  assert.equal(dev.inputSpace(), 0);
  let woke = false;
  const waiting = dev.waitForInputSpace().then(() => (woke = true));
  await new Promise((r) => setImmediate(r));
  assert.equal(woke, false);
  assert.equal(rd(RBR), 0);
  await waiting;
  assert.equal(dev.pushInput(big.subarray(SERIAL_RX_RING_SIZE)), 1);
  for (let i = 1; i < SERIAL_RX_RING_SIZE + 1; i++) assert.equal(rd(RBR), i & 0xff);
  assert.equal(rd(LSR) & 0x01, 0);
});

test('THRE interrupt: raised on enabling THRI, cleared by IIR read, re-raised per byte', () => {
  const { rd, wr, irqs } = uart();
  wr(FCR, 0x01);
  assert.equal(rd(IIR), 0xc1);
  wr(IER, 0x02);
  assert.equal(irqs(), 1);
  // Linux serial8250_do_startup's test: THRE shows, IIR read clears it, re-enable re-asserts.
  assert.equal(rd(IIR), 0xc2);
  assert.equal(rd(IIR), 0xc1);
  wr(IER, 0);
  wr(IER, 0x02);
  assert.equal(rd(IIR), 0xc2);
  assert.equal(irqs(), 2);
  wr(RBR, 0x41);
  wr(RBR, 0x42);
  assert.equal(irqs(), 4, 'one edge per transmitted byte');
  wr(IER, 0);
  wr(RBR, 0x43);
  assert.equal(irqs(), 4, 'no THRE interrupt while THRI is off');
  assert.equal(rd(IIR), 0xc1);
});

test('FIFO mode with the hold timer: no THRE edge per byte while the driver fills the FIFO (Linux 8250)', () => {
  const { dev, out, rd, wr, irqs } = uart();
  const stop = dev.startHoldTimer(60_000);
  try {
    wr(FCR, 0x01);
    wr(IER, 0x02); // start_tx: THRI on, THRE shows at once
    assert.equal(irqs(), 1);
    // serial8250_handle_irq: IIR, LSR, then tx_chars writes up to 16 bytes.
    assert.equal(rd(IIR), 0xc2);
    assert.equal(rd(LSR) & 0x60, 0x60, 'THRE and TEMT: the bytes leave at once');
    for (let i = 0; i < 16; i++) wr(RBR, 0x41 + i);
    assert.equal(irqs(), 1, 'no edge while the FIFO is filled');
    assert.equal(out.length, 0, 'the burst is written out when it ends');
    // The handler's next pass: IIR shows THRE (and the read clears it), no edge for it.
    assert.equal(rd(IIR), 0xc2);
    assert.deepEqual(
      out,
      [...Array(16).keys()].map((i) => 0x41 + i),
      'in one write, in order',
    );
    for (let i = 0; i < 5; i++) wr(RBR, 0x61 + i);
    wr(IER, 0x00); // the last bytes: __stop_tx
    assert.equal(rd(IIR), 0xc1);
    assert.equal(irqs(), 1, 'one edge for 21 bytes');
    // An access other than the IIR read ends the hold with an edge: LSR here.
    wr(IER, 0x02);
    assert.equal(irqs(), 2);
    assert.equal(rd(IIR), 0xc2);
    wr(RBR, 0x30);
    assert.equal(irqs(), 2);
    rd(LSR);
    assert.equal(irqs(), 3, 'the line rose when the driver looked elsewhere');
    assert.equal(rd(IIR), 0xc2);
    // A writer that never looks gets an edge per FIFO's worth (17 bytes) at most.
    const before = out.length;
    for (let i = 0; i < 17; i++) wr(RBR, 0x20);
    assert.equal(irqs(), 4);
    assert.equal(out.length - before, 17, 'the overrunning byte ends the hold');
  } finally {
    stop();
  }
});

test('FIFO mode: a driver that only waits gets THRE from the hold timer', async () => {
  const { dev, out, rd, wr, irqs } = uart();
  const stop = dev.startHoldTimer(5, 5);
  try {
    wr(FCR, 0x01);
    wr(IER, 0x02);
    assert.equal(rd(IIR), 0xc2);
    assert.equal(irqs(), 1);
    for (let i = 0; i < 3; i++) wr(RBR, 0x41 + i);
    assert.equal(irqs(), 1);
    assert.equal(out.length, 0);
    const t = Date.now();
    while (irqs() < 2 && Date.now() - t < 5000) await new Promise((r) => setTimeout(r, 2));
    assert.equal(irqs(), 2, 'the hold timer raised the edge');
    assert.deepEqual(out, [0x41, 0x42, 0x43], 'and wrote the bytes out');
    assert.equal(rd(IIR), 0xc2);
    assert.equal(rd(IIR), 0xc1);
  } finally {
    stop();
  }
  // Once the timer is stopped (teardown), nothing is held: an edge per byte again.
  wr(RBR, 0x41);
  wr(RBR, 0x42);
  assert.equal(irqs(), 4);
});

test('FIFO mode: the hold timer leaves a driver that keeps ending its holds alone', async () => {
  const { dev, rd, wr, irqs } = uart();
  const stop = dev.startHoldTimer(20, 20);
  try {
    wr(FCR, 0x01);
    wr(IER, 0x02);
    assert.equal(irqs(), 1);
    // 100 bursts of 3 bytes, each ended by the handler's IIR read, over >= 100 ms: the timer
    // (every 20 ms) sees holds ended meanwhile and raises nothing; per byte it would be 300.
    for (let i = 0; i < 100; i++) {
      assert.equal(rd(IIR), 0xc2);
      for (let j = 0; j < 3; j++) wr(RBR, 0x41 + j);
      await new Promise((r) => setTimeout(r, 1));
    }
    // A host stall of over 20 ms between two bursts would let one expiry end a hold: a few.
    assert.ok(irqs() <= 6, `${irqs()} edges`);
    wr(IER, 0);
  } finally {
    stop();
  }
});

test('stopping the hold timer writes out what a hold kept, and later bytes follow in order', () => {
  const { dev, out, rd, wr, irqs } = uart();
  const stop = startTx(dev, rd, wr, 60_000);
  wr(RBR, 0x61);
  wr(RBR, 0x62);
  assert.deepEqual(out, []);
  stop();
  assert.deepEqual(out, [0x61, 0x62]);
  assert.equal(irqs(), 1, 'no edge at teardown');
  wr(RBR, 0x63);
  assert.deepEqual(out, [0x61, 0x62, 0x63]);
  assert.equal(dev.stats().bytesOut, 3);
});

test('a hold ended with holding turned off still writes its bytes first', () => {
  const { dev, out, rd, wr } = uart();
  const stop = startTx(dev, rd, wr, 60_000);
  wr(RBR, 0x61);
  // FIFOs off: an access to FCR, which ends the hold first.
  wr(FCR, 0x00);
  assert.deepEqual(out, [0x61]);
  wr(RBR, 0x62);
  assert.deepEqual(out, [0x61, 0x62]);
  stop();
});

test('the hold timer never waits for a lock another thread keeps', async () => {
  const { dev, state, out, rd, wr, irqs } = uart();
  const stop = dev.startHoldTimer(2, 2);
  wr(FCR, 0x01);
  wr(IER, 0x02);
  assert.equal(rd(IIR), 0xc2);
  for (let i = 0; i < 3; i++) wr(RBR, 0x41 + i);
  // Another thread (a vCPU given up on, say) holds the UART's lock: slot 0, SharedMutex's.
  const lockWord = new Int32Array(state, 0, 1);
  assert.equal(Atomics.compareExchange(lockWord, 0, 0, 1), 0);
  await new Promise((r) => setTimeout(r, 30));
  assert.equal(irqs(), 1, 'the timer left the hold alone');
  const t = performance.now();
  stop();
  assert.ok(performance.now() - t < 1000, 'stop waited only a moment');
  assert.deepEqual(out, []);
  Atomics.store(lockWord, 0, 0);
  // The next access by the guest ends the hold and writes the burst.
  rd(LSR);
  assert.deepEqual(out, [0x41, 0x42, 0x43]);
});

test('without FIFOs the hold timer changes nothing: one THRE edge per byte', () => {
  const { dev, rd, wr, irqs } = uart();
  const stop = dev.startHoldTimer(60_000);
  try {
    wr(IER, 0x02);
    assert.equal(rd(IIR), 0x02);
    wr(RBR, 0x41);
    wr(RBR, 0x42);
    assert.equal(irqs(), 3);
  } finally {
    stop();
  }
});

test('a held THRE survives save and restore, and the restored VM gets its edge', async () => {
  const a = uart();
  const stopA = startTx(a.dev, a.rd, a.wr, 60_000);
  a.wr(RBR, 0x41);
  const saved = a.dev.saveState();
  stopA();
  assert.equal(saved.threPending, 1);
  assert.equal(saved.line, 0);
  const b = uart();
  b.dev.restoreState(saved);
  assert.equal(b.irqs(), 0);
  const stopB = b.dev.startHoldTimer(5, 5);
  try {
    const t = Date.now();
    while (b.irqs() < 1 && Date.now() - t < 5000) await new Promise((r) => setTimeout(r, 2));
    assert.equal(b.irqs(), 1);
    assert.equal(b.rd(IIR), 0xc2);
  } finally {
    stopB();
  }
  // Held while another interrupt waits (the line is high): saved as THRE pending, which the
  // guest's handler finds when it looks.
  const e = uart();
  const stopE = startTx(e.dev, e.rd, e.wr, 60_000);
  e.wr(IER, 0x03); // and RDI
  e.wr(RBR, 0x41);
  e.dev.pushInput(Uint8Array.of(0x0a));
  const both = e.dev.saveState();
  stopE();
  assert.equal(both.threPending, 1);
  assert.equal(both.line, 1);
  const f = uart();
  f.dev.restoreState(both);
  assert.equal(f.rd(IIR), 0xc4, 'received data first');
  assert.equal(f.rd(RBR), 0x0a);
  assert.equal(f.rd(IIR), 0xc2, 'then THRE');
  // A state that was not holding restores as it was.
  const c = uart();
  c.wr(IER, 0x02);
  const plain = c.dev.saveState();
  assert.equal(plain.line, 1);
  const d = uart();
  d.dev.restoreState(plain);
  assert.equal(d.rd(IIR), 0x02);
});

test('IIR priority: line status > received data > THRE > modem status', () => {
  const { dev, rd, wr } = uart();
  wr(IER, 0x0f);
  // A modem status change: loopback with only RTS set keeps CTS but drops DSR and DCD.
  wr(MCR, 0x10 | 0x02);
  assert.equal(dev.pushInput(new Uint8Array(SERIAL_RX_RING_SIZE)), SERIAL_RX_RING_SIZE);
  wr(RBR, 0x55); // loopback onto a full receiver: overrun, and THRE pending again
  assert.equal(rd(IIR), 0x06);
  assert.equal(rd(LSR) & 0x03, 0x03, 'OE and DR');
  assert.equal(rd(IIR), 0x04);
  wr(FCR, 0x02); // clear the receiver
  assert.equal(rd(IIR), 0x02);
  assert.equal(rd(IIR), 0x00, 'reading IIR cleared THRE; modem status remains');
  assert.equal(rd(MSR), 0x10 | 0x02 | 0x08, 'CTS, DDSR, DDCD');
  assert.equal(rd(IIR), 0x01);
  assert.equal(dev.stats().overruns, 1);
});

test('loopback sends THR to the receiver, not the output', () => {
  const { out, rd, wr } = uart();
  wr(MCR, 0x10);
  wr(RBR, 0x7e);
  assert.equal(out.length, 0);
  assert.equal(rd(LSR) & 0x01, 1);
  assert.equal(rd(RBR), 0x7e);
});

test('unknown offsets and wide accesses read all-ones and are counted', () => {
  const { dev } = uart();
  const d = new Uint8Array(2);
  dev.read(0, d);
  assert.deepEqual([...d], [0xff, 0xff]);
  dev.write(9, Uint8Array.of(1));
  assert.equal(dev.stats().unknownAccesses, 2);
});

test('a real worker thread feeds input while this thread reads it', async () => {
  const { dev, state, rd } = uart();
  const total = 20000;
  const url = new URL('./serial.js', import.meta.url).href;
  const worker = new Worker(
    `const { workerData } = require('node:worker_threads');
     import(workerData.url).then(({ Serial16550 }) => {
       const dev = new Serial16550(workerData.state, { output() {}, irq: { trigger() {} } });
       const bytes = new Uint8Array(workerData.total).map((_, i) => (i * 7 + (i >> 8)) & 0xff);
       const nap = new Int32Array(new SharedArrayBuffer(4));
       let sent = 0;
       while (sent < bytes.length) {
         const n = dev.pushInput(bytes.subarray(sent, Math.min(bytes.length, sent + 333)));
         sent += n;
         if (n === 0) Atomics.wait(nap, 0, 0, 1);
       }
     });`,
    { eval: true, workerData: { url, state, total } },
  );
  const exited = new Promise((r) => worker.once('exit', r));
  const got = new Uint8Array(total);
  let n = 0;
  const deadline = Date.now() + 10_000;
  while (n < total && Date.now() < deadline) {
    if (rd(LSR) & 0x01) got[n++] = rd(RBR);
  }
  await exited;
  assert.equal(n, total);
  for (let i = 0; i < total; i++) {
    if (got[i] !== ((i * 7 + (i >> 8)) & 0xff)) assert.fail(`byte ${i} out of order`);
  }
  assert.equal(dev.stats().bytesIn, total);
});

test('a FIFO clear or FIFO enable change outside loopback keeps pending console input', () => {
  const { dev, rd, wr } = uart();
  assert.equal(dev.pushInput(new TextEncoder().encode('ab')), 2);
  wr(FCR, 0x07); // enable + clear both (Linux serial8250_clear_fifos)
  wr(FCR, 0x00); // FIFO off
  wr(FCR, 0x01); // set_termios turns it back on
  assert.equal(rd(LSR) & 0x01, 1, 'data still ready');
  assert.equal(rd(RBR), 0x61);
  assert.equal(rd(RBR), 0x62);
  assert.equal(rd(LSR) & 0x01, 0);
});

/** A UART with an output bucket on a fake clock (ms), and a second device over its state. */
function limitedUart(limit: { size: number; refill_time: number; one_time_burst?: number }) {
  let t = 1000;
  const now = () => t;
  const state = Serial16550.createState(limit, { now });
  const out: number[] = [];
  const sinks = { output: (b: Uint8Array) => out.push(...b), irq: { trigger: () => undefined } };
  const dev = new Serial16550(state, sinks, { now });
  const other = new Serial16550(state, sinks, { now }); // another vCPU thread's object
  const send = (d: Serial16550, n: number) => {
    for (let i = 0; i < n; i++) d.write(RBR, Uint8Array.of(0x41 + (i % 26)));
  };
  return { dev, other, out, send, advance: (ms: number) => void (t += ms) };
}

test('rate limiter: bytes over the bucket are dropped, counted, and the guest still sees THRE', () => {
  const { dev, out, send } = limitedUart({ size: 10, refill_time: 1000, one_time_burst: 5 });
  assert.deepEqual(dev.rateLimiter(), { size: 10, refill_time: 1000, one_time_burst: 5 });
  send(dev, 40);
  assert.equal(out.length, 15, 'the bucket (10) and the one-time burst (5)');
  assert.equal(Buffer.from(out).toString(), 'ABCDEFGHIJKLMNO', 'the first bytes, in order');
  const st = dev.stats();
  assert.equal(st.rateLimiterDroppedBytes, 25);
  assert.equal(st.bytesOut, 40, 'write_count counts every byte written (as Firecracker)');
  const lsr = new Uint8Array(1);
  dev.read(LSR, lsr);
  assert.equal(lsr[0]! & 0x60, 0x60, 'THRE and TEMT: a dropped byte does not hold the guest');
});

test('rate limiter: the bucket refills as time passes, never above its size', () => {
  const { dev, out, send, advance } = limitedUart({ size: 10, refill_time: 1000 });
  send(dev, 10);
  assert.equal(out.length, 10);
  send(dev, 3);
  assert.equal(out.length, 10, 'empty');
  advance(499);
  send(dev, 5);
  assert.equal(out.length, 14, '4 whole tokens after 499 ms (a fraction is kept, not lost)');
  advance(101); // 600 ms since empty: 6 earned in all
  send(dev, 5);
  assert.equal(out.length, 16);
  advance(60_000);
  send(dev, 30);
  assert.equal(out.length, 26, 'a minute later: one full bucket, no more');
  assert.equal(dev.stats().rateLimiterDroppedBytes, 3 + 1 + 3 + 20);
});

test('rate limiter: one bucket for every thread object over the state; loopback is not limited', () => {
  const { dev, other, out, send } = limitedUart({ size: 8, refill_time: 10_000 });
  send(dev, 5);
  send(other, 5);
  assert.equal(out.length, 8, 'both objects spend the same bucket');
  assert.equal(other.stats().rateLimiterDroppedBytes, 2);
  dev.write(MCR, Uint8Array.of(0x10)); // loopback: the byte goes to the receiver
  dev.write(RBR, Uint8Array.of(0x5a));
  const d = new Uint8Array(1);
  dev.read(RBR, d);
  assert.equal(d[0], 0x5a, 'looped back although the bucket is empty');
  assert.equal(dev.stats().rateLimiterDroppedBytes, 2);
});

test('rate limiter: none for size 0 or refill_time 0; a bad value is refused', () => {
  for (const limit of [
    { size: 0, refill_time: 100 },
    { size: 100, refill_time: 0 },
  ]) {
    const { dev, out, send } = limitedUart(limit);
    assert.equal(dev.rateLimiter(), undefined);
    send(dev, 500);
    assert.equal(out.length, 500);
    assert.equal(dev.stats().rateLimiterDroppedBytes, 0);
  }
  assert.throws(() => Serial16550.createState({ size: 1.5, refill_time: 10 }), RangeError);
  assert.throws(() => Serial16550.createState({ size: 10, refill_time: -1 }), RangeError);
});

test('rate limiter: a real worker thread and this one share the bucket on the process clock', async () => {
  const state = Serial16550.createState({ size: 50, refill_time: 3_600_000 });
  let out = 0;
  const dev = new Serial16550(state, {
    output: (b) => void (out += b.length),
    irq: { trigger: () => undefined },
  });
  const url = new URL('./serial.js', import.meta.url).href;
  const worker = new Worker(
    `const { workerData } = require('node:worker_threads');
     import(workerData.url).then(({ Serial16550 }) => {
       let n = 0;
       const d = new Serial16550(workerData.state, { output: (b) => { n += b.length; }, irq: { trigger() {} } });
       for (let i = 0; i < 100; i++) d.write(0, Uint8Array.of(0x41));
       require('node:worker_threads').parentPort.postMessage(n);
     });`,
    { eval: true, workerData: { url, state } },
  );
  // Both listeners first: a worker that exits right after its message could otherwise emit
  // 'exit' before a listener for it is added (CI once saw this test hang on it).
  const exited = new Promise((r) => worker.once('exit', r));
  const theirs = await new Promise<number>((r) => worker.once('message', r));
  await exited;
  for (let i = 0; i < 100; i++) dev.write(RBR, Uint8Array.of(0x42));
  assert.equal(theirs + out, 50, `worker ${theirs} + main ${out}: one bucket of 50`);
  assert.equal(dev.stats().rateLimiterDroppedBytes, 150);
});

test('the hold timer writes the bytes of a hold it ends while it has the lock (no newer byte of a vCPU can go out first)', async () => {
  const state = Serial16550.createState();
  const lock = new Int32Array(state, 0, 1); // the UART's SharedMutex slot
  const seen: Array<{ bytes: number[]; locked: boolean; by: string }> = [];
  const sink = (by: string) => (b: Uint8Array) =>
    seen.push({ bytes: [...b], locked: Atomics.load(lock, 0) !== 0, by });
  const timerSide = new Serial16550(state, { output: sink('timer'), irq: { trigger() {} } });
  const vcpu = new Serial16550(state, { output: sink('vcpu'), irq: { trigger() {} } });
  const rd = (off: number) => {
    const d = new Uint8Array(1);
    vcpu.read(off, d);
    return d[0]!;
  };
  const stop = startTx(timerSide, rd, (off, v) => vcpu.write(off, Uint8Array.of(v)), 5, 5);
  try {
    vcpu.write(RBR, Uint8Array.of(0x54)); // "T", then the driver only waits
    const t = Date.now();
    while (seen.length === 0 && Date.now() - t < 5000) await new Promise((r) => setTimeout(r, 2));
    assert.deepEqual(seen, [{ bytes: [0x54], locked: true, by: 'timer' }]);
  } finally {
    stop();
  }
});

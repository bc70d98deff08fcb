/**
 * What one call out of JavaScript costs here (docs/bench.md, "What a call costs in the lab"):
 * the clock read every turn took (`process.hrtime()`), a shim function that makes no system
 * call (`bufferAddress`), the shim's eventfd read (a kick's, before it was edge-triggered) on an
 * empty and on a written eventfd, and for scale, JavaScript alone (typed-array reads and calls in
 * optimized code). Each figure is the mean over `--count` calls after as many untimed ones.
 * Last, the CPU of one round trip of the device worker's virtio-net warm-up (the ping's device
 * path over a loopback), `--count` of them after as many untimed.
 * Inside the lab (`npm run lab -- node dist/bench/call-cost.js`) a call costs about one C system
 * call in a fast boot from optimized code, up to 10 times that in a slow boot or from code V8 has
 * not optimized; on a host, a few tens of nanoseconds.
 *
 *   node dist/bench/call-cost.js [--count N] [--runs N]
 */
import { parseArgs } from 'node:util';
import { EFD_NONBLOCK, native } from '../src/kvm/native.js';
import { netWarmup } from '../src/vmm/net-warmup.js';

const { values } = parseArgs({
  options: { count: { type: 'string' }, runs: { type: 'string' } },
});
const count = Number(values.count ?? 20000);
const runs = Number(values.runs ?? 2);
if (!Number.isInteger(count) || count < 1) throw new Error('--count: a positive integer');
if (!Number.isInteger(runs) || runs < 1) throw new Error('--runs: a positive integer');

const n = native();
const empty = n.eventfd(0, EFD_NONBLOCK);
const written = n.eventfd(0, EFD_NONBLOCK);
const page = new ArrayBuffer(4096);
const bytes = new Uint8Array(4096);
let sink = 0;
const inc = (o: { a: number }) => o.a + 1;
const obj = { a: 1 };

const cases: Array<[string, (i: number) => void]> = [
  ['process.hrtime()', () => void (sink += process.hrtime()[1])],
  ['shim bufferAddress (no system call)', () => void (sink += Number(n.bufferAddress(page) & 1n))],
  ['shim eventfdRead, empty (EAGAIN)', () => void (sink += Number(n.eventfdRead(empty)))],
  [
    'shim eventfdWrite + eventfdRead',
    () => {
      n.eventfdWrite(written, 1);
      sink += Number(n.eventfdRead(written));
    },
  ],
  [
    'JS: 100 typed-array reads',
    (i) => {
      for (let k = 0; k < 100; k++) sink += bytes[(i + k) & 4095]!;
    },
  ],
  [
    'JS: 100 calls',
    () => {
      for (let k = 0; k < 100; k++) sink += inc(obj);
    },
  ],
];

try {
  for (let r = 0; r < runs; r++) {
    const line: string[] = [];
    for (const [name, f] of cases) {
      for (let i = 0; i < count; i++) f(i);
      const t0 = process.hrtime.bigint();
      for (let i = 0; i < count; i++) f(i);
      const ns = Number(process.hrtime.bigint() - t0) / count;
      line.push(`${name} ${(ns / 1000).toFixed(3)} us`);
    }
    console.log(`run ${r + 1}: ${line.join('; ')}`);
  }
  // The device worker's own virtio-net warm-up (vmm/net-warmup.ts): a ping's device path
  // (kick, TX turn, TAP write, RX, interrupt) over a loopback, per round trip.
  const w = netWarmup(4 * count, () => {});
  try {
    w.step(count);
    for (let r = 0; r < runs; r++) {
      const c0 = process.cpuUsage();
      w.step(count);
      const c = process.cpuUsage(c0);
      console.log(
        `net warm-up round trip: ${((c.user + c.system) / count).toFixed(2)} us CPU (${count} round trips)`,
      );
    }
  } finally {
    w.close();
  }
} finally {
  n.close(empty);
  n.close(written);
}
if (sink === -1) console.log(''); // keeps the work from being optimized away

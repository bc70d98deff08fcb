/**
 * The racing vCPU: a worker thread that rewrites guest memory (the SharedArrayBuffers behind
 * GuestMemory) at random while the main thread parses and serves chains, as a second vCPU of
 * a hostile guest would: random bytes, u16 and u32 stores anywhere in the ring and data areas,
 * with a bias for the words a device reads twice (descriptor lengths and addresses, avail.idx,
 * header fields at the start of buffers).
 *
 * One worker per process; each racing session hands it its RAM and stops it at the end.
 * Control block (Int32Array over a SharedArrayBuffer): [0] run flag, [1] session generation
 * the worker has finished, [2] stores done (a measure of how hard it raced).
 */
import { Worker } from 'node:worker_threads';

const ctrl = new Int32Array(new SharedArrayBuffer(16));
let worker: Worker | undefined;
let generation = 0;

const WORKER_SOURCE = `
const { parentPort } = require('node:worker_threads');
let ctrl;
parentPort.on('message', (m) => {
  if (m.ctrl) { ctrl = new Int32Array(m.ctrl); return; }
  const views = m.sabs.map((s) => new Uint8Array(s));
  const dv = m.sabs.map((s) => new DataView(s));
  let x = (m.seed >>> 0) || 1;
  const rnd = () => { x ^= x << 13; x >>>= 0; x ^= x >>> 17; x ^= x << 5; x >>>= 0; return x; };
  while (Atomics.load(ctrl, 0) === 1) {
    for (let k = 0; k < 256; k++) {
      const r = rnd();
      const i = (r & 0x30000) === 0 && views.length > 1 ? 1 : 0;
      const v = views[i];
      // Region A: the first buffers of a case [0x20000, 0x24000) (where headers are) and the
      // rings [0x1000, 0x20000) get most stores.
      const sel = (r >>> 8) & 7;
      const off = i !== 0 ? rnd() % (v.length - 4)
        : sel < 3 ? 0x20000 + (rnd() % 0x4000)
        : sel < 6 ? 0x1000 + (rnd() % 0x1f000)
        : rnd() % (v.length - 4);
      switch ((r >>> 2) & 3) {
        case 0: v[off] = rnd() & 0xff; break;
        case 1: dv[i].setUint16(off & ~1, rnd() & 0xffff, true); break;
        case 2: dv[i].setUint32(off & ~3, rnd(), true); break;
        default: dv[i].setUint32(off & ~15, (rnd() & 1) ? 0 : rnd(), true);
      }
    }
    Atomics.add(ctrl, 2, 256);
  }
  Atomics.store(ctrl, 1, m.gen);
  Atomics.notify(ctrl, 1);
});
`;

function ensureWorker(): Worker {
  if (!worker) {
    worker = new Worker(WORKER_SOURCE, { eval: true });
    worker.unref();
    worker.postMessage({ ctrl: ctrl.buffer });
  }
  return worker;
}

/** Starts rewriting `sabs` (until stopRacing). */
export function startRacing(sabs: SharedArrayBuffer[], seed: number): void {
  const w = ensureWorker();
  generation++;
  Atomics.store(ctrl, 0, 1);
  w.postMessage({ sabs, seed, gen: generation });
}

/** Stops the racer and waits (bounded) until it has let go of the memory. */
export function stopRacing(): void {
  if (!worker) return;
  Atomics.store(ctrl, 0, 0);
  const deadline = Date.now() + 5000;
  while (Atomics.load(ctrl, 1) !== generation && Date.now() < deadline)
    Atomics.wait(ctrl, 1, Atomics.load(ctrl, 1), 50);
}

/** Stores the racer made so far. */
export function racerStores(): number {
  return Atomics.load(ctrl, 2);
}

export async function stopRacer(): Promise<void> {
  if (!worker) return;
  stopRacing();
  await worker.terminate();
  worker = undefined;
}

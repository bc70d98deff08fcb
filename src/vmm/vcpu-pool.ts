/**
 * vCPU workers started ahead of need. A worker takes ~100 ms to start and load its modules;
 * started before the main thread has even loaded the builder, that cost overlaps the rest of
 * start-up instead of adding to it. Each waits for a 'start' message with its configuration.
 */
import { Worker } from 'node:worker_threads';
import { newWorker } from '../util/worker-argv.js';
import { DEVICE_WORKER_ROLE } from './device-worker-protocol.js';
import { takeEarlyVcpuWorkers, workerEntry } from '../util/bundle.js';
import {
  chooseHubPlace,
  chooseVcpuThreads,
  workersFor,
  type HubPlace,
  type VcpuThreads,
} from './vcpu-mode.js';
import type { VcpuWorkerSource } from './vmm.js';
/** The messages of an idle warm worker's garbage collection (the library's VmHost). */
export type { VcpuWorkerCollect, VcpuWorkerMessage } from './vcpu-worker.js';
export { setLoopByDefault } from './vcpu-mode.js';

/**
 * Workers of this pool that have loaded their modules: each says { type: 'ready' } once it has
 * (vcpu-worker.ts; device-worker.ts when prewarmed). An unused one is ended only then
 * (endUnused): Node 20's ESM loader reads module files through asynchronous file handles, and a
 * worker terminated in the middle leaves those files open in the process for good (measured:
 * 40 device workers ended 20-200 ms after their start leaked 33-89 descriptors of dist/ files;
 * the daemon's shared mode, one per VM without virtio devices, leaked 44 -> 494 over 300 VMs).
 */
const loaded = new WeakSet<Worker>();

function track(w: Worker): Worker {
  const onMessage = (m: { type?: unknown } | null) => {
    if (m?.type !== 'ready') return;
    loaded.add(w);
    w.off('message', onMessage);
  };
  w.on('message', onMessage);
  return w;
}

/**
 * A worker that never says it is ready (it hangs while loading) is ended after this anyway; one
 * ended while it still loads leaves module files open (above), so this is far above a slow
 * load: on a CI host at full load (a test beside it took 52 s) a prewarmed worker took over
 * 10 s, the limit until 2026-12-07, and was ended mid-load (worker-prewarm-fds.test.ts saw 7
 * descriptors of dist/ files left).
 */
export const UNUSED_WORKER_READY_LIMIT_MS = 60_000;

/**
 * Ends an unused prewarmed worker: now if it has loaded its modules, else once it has (its
 * 'ready' message), so that no module file is left open (see `loaded`); nothing if it ends on
 * its own first. The worker is unreferenced: waiting for it keeps nothing alive.
 */
function endUnused(w: Worker): void {
  if (loaded.has(w)) return void w.terminate();
  const end = () => {
    w.off('message', onMessage);
    w.off('exit', forget);
    clearTimeout(limit);
    void w.terminate();
  };
  const onMessage = (m: { type?: unknown } | null) => {
    if (m?.type === 'ready') end();
  };
  const forget = () => {
    w.off('message', onMessage);
    clearTimeout(limit);
  };
  const limit = setTimeout(end, UNUSED_WORKER_READY_LIMIT_MS);
  limit.unref();
  w.on('message', onMessage);
  w.once('exit', forget);
  w.unref(); // after on('message'), which refs the worker again
}

// A vCPU worker the bundle's loader may have started already (src/util/bundle.ts). Its 'ready'
// cannot have been delivered yet: the main thread has not returned to its event loop since.
const pool: Worker[] = takeEarlyVcpuWorkers().map(track);

/** A new vCPU worker, waiting for its 'start' message (also the library's warm pool's). */
export function spawnVcpuWorker(): Worker {
  return newWorker(workerEntry('vcpu-worker', new URL('./vcpu-worker.js', import.meta.url)), {
    stdout: false,
    stderr: false,
  });
}

/**
 * Starts up to `n` workers now (unused ones are ended by takeVcpuWorkers); for a VM whose vCPUs
 * will run on native runner threads (vcpu-mode.ts), one for vCPU 0 in hybrid mode, and one for
 * the hub that serves them when it is not on the main thread (TYPERVISOR_VCPU_HUB=worker).
 */
export function prewarmVcpuWorkers(n: number): void {
  let mode: VcpuThreads = 'worker';
  let hub: HubPlace = 'main';
  try {
    mode = chooseVcpuThreads(n, process.env.TYPERVISOR_VCPU_THREADS);
    hub = chooseHubPlace(process.env.TYPERVISOR_VCPU_HUB);
  } catch {
    // a bad setting is reported when the VM starts
  }
  n = workersFor(mode, n, hub);
  while (pool.length < n) {
    const w = track(spawnVcpuWorker());
    w.unref(); // an unused prewarmed worker must not keep the process alive
    pool.push(w);
  }
}

/**
 * A device worker started ahead of need, as the vCPU workers are (its modules, every virtio
 * device's, take longer to load than a vCPU worker's): it waits for a 'start' message with its
 * data (device-worker.ts). Used by the API mode, where a snapshot load would otherwise wait for it.
 */
let deviceWorker: Worker | undefined;

export function prewarmDeviceWorker(): void {
  if (deviceWorker) return;
  deviceWorker = track(
    newWorker(workerEntry('device-worker', new URL('./device-worker.js', import.meta.url)), {
      workerData: { role: DEVICE_WORKER_ROLE, deferred: true },
    }),
  );
  deviceWorker.unref();
}

/** The prewarmed device worker, if there is one (start it with a DeviceWorkerStart message). */
export function takeDeviceWorker(): Worker | undefined {
  const w = deviceWorker;
  deviceWorker = undefined;
  w?.ref();
  return w;
}

/**
 * `n` workers: prewarmed ones first, new ones for the rest; surplus prewarmed ones end (once
 * loaded: endUnused), and so does a prewarmed device worker nobody took (the VM's device worker, if it has one, was
 * started before its vCPUs: builder.ts finishVm).
 */
export function takeVcpuWorkers(n: number): Worker[] {
  const taken = pool.splice(0, n);
  for (const w of pool.splice(0)) endUnused(w);
  if (deviceWorker) endUnused(deviceWorker);
  deviceWorker = undefined;
  for (const w of taken) w.ref();
  while (taken.length < n) taken.push(spawnVcpuWorker());
  return taken;
}

/**
 * vCPU workers reused within this process (a VcpuWorkerSource, vmm.ts): the API mode's rehearsal
 * VM (rehearsal.ts) runs on them, and so does the VM the process then serves, on threads whose
 * code has run once. The first come from the prewarm pool. Idle ones are unreferenced (they
 * keep nothing alive) and leave the list if they end.
 */
export class ReusedVcpuWorkers implements VcpuWorkerSource {
  private idle: Worker[] = [];
  private readonly onExit = new Map<Worker, () => void>();

  take(n: number): Worker[] {
    const ws = this.idle.splice(0, n);
    ws.push(...pool.splice(0, n - ws.length));
    while (ws.length < n) ws.push(track(spawnVcpuWorker()));
    for (const w of ws) {
      const f = this.onExit.get(w);
      if (f) w.off('exit', f);
      this.onExit.delete(w);
      w.ref(); // a running vCPU keeps the process alive
    }
    return ws;
  }

  give(w: Worker): void {
    const gone = () => {
      this.onExit.delete(w);
      this.idle = this.idle.filter((x) => x !== w);
    };
    this.onExit.set(w, gone);
    w.once('exit', gone);
    w.unref();
    this.idle.push(w);
  }
}

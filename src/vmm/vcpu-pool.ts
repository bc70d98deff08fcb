/**
 * vCPU workers started ahead of need. A worker takes ~100 ms to start and load its modules;
 * started before the main thread has even loaded the builder, that cost overlaps the rest of
 * start-up instead of adding to it. Each waits for a 'start' message with its configuration.
 */
import { Worker } from 'node:worker_threads';
import { DEVICE_WORKER_ROLE } from './device-worker-protocol.js';
import { takeEarlyVcpuWorkers, workerEntry } from '../util/bundle.js';
import { chooseVcpuThreads, workersFor, type VcpuThreads } from './vcpu-mode.js';

// A vCPU worker the bundle's loader may have started already (src/util/bundle.ts).
const pool: Worker[] = takeEarlyVcpuWorkers();

/** A new vCPU worker, waiting for its 'start' message (also the library's warm pool's). */
export function spawnVcpuWorker(): Worker {
  return new Worker(workerEntry('vcpu-worker', new URL('./vcpu-worker.js', import.meta.url)), {
    stdout: false,
    stderr: false,
  });
}

/**
 * Starts up to `n` workers now (unused ones are ended by takeVcpuWorkers); for a VM whose vCPUs
 * will run on native runner threads (vcpu-mode.ts), one for the hub that serves them (and one
 * for vCPU 0 in hybrid mode).
 */
export function prewarmVcpuWorkers(n: number): void {
  let mode: VcpuThreads = 'worker';
  try {
    mode = chooseVcpuThreads(n, process.env.TYPERVISOR_VCPU_THREADS);
  } catch {
    // a bad setting is reported when the VM starts
  }
  n = workersFor(mode, n);
  while (pool.length < n) {
    const w = spawnVcpuWorker();
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
  deviceWorker = new Worker(
    workerEntry('device-worker', new URL('./device-worker.js', import.meta.url)),
    {
      workerData: { role: DEVICE_WORKER_ROLE, deferred: true },
    },
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
 * `n` workers: prewarmed ones first, new ones for the rest; surplus prewarmed ones end, and so
 * does a prewarmed device worker nobody took (the VM's device worker, if it has one, was
 * started before its vCPUs: builder.ts finishVm).
 */
export function takeVcpuWorkers(n: number): Worker[] {
  const taken = pool.splice(0, n);
  for (const w of pool.splice(0)) void w.terminate();
  void deviceWorker?.terminate();
  deviceWorker = undefined;
  for (const w of taken) w.ref();
  while (taken.length < n) taken.push(spawnVcpuWorker());
  return taken;
}

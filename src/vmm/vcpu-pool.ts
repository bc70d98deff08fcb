/**
 * vCPU workers started ahead of need. A worker takes ~100 ms to start and load its modules;
 * started before the main thread has even loaded the builder, that cost overlaps the rest of
 * start-up instead of adding to it. Each waits for a 'start' message with its configuration.
 */
import { Worker } from 'node:worker_threads';

const pool: Worker[] = [];

function spawnVcpuWorker(): Worker {
  return new Worker(new URL('./vcpu-worker.js', import.meta.url), { stdout: false, stderr: false });
}

/** Starts up to `n` workers now (unused ones are ended by takeVcpuWorkers). */
export function prewarmVcpuWorkers(n: number): void {
  while (pool.length < n) {
    const w = spawnVcpuWorker();
    w.unref(); // an unused prewarmed worker must not keep the process alive
    pool.push(w);
  }
}

/** `n` workers: prewarmed ones first, new ones for the rest; surplus prewarmed ones end. */
export function takeVcpuWorkers(n: number): Worker[] {
  const taken = pool.splice(0, n);
  for (const w of pool.splice(0)) void w.terminate();
  for (const w of taken) w.ref();
  while (taken.length < n) taken.push(spawnVcpuWorker());
  return taken;
}

/**
 * Running from the per-thread bundles (scripts/bundle.mjs, docs/architecture.md "Start-up"):
 * dist/bundle/NAME.cjs sets a global naming its folder before it runs the bundle. A worker
 * started by bundled code loads its own bundle; un-bundled code starts the dist/ module.
 */
import { join } from 'node:path';
import type { Worker } from 'node:worker_threads';
import { pathToFileURL } from 'node:url';

interface BundleInfo {
  /** dist/bundle */
  dir: string;
  /** What became of this thread's code cache. */
  cache: 'used' | 'rejected' | 'none';
}

/** The bundle this thread runs from, if it does. */
export function runningBundle(): BundleInfo | undefined {
  return (globalThis as Record<symbol, unknown>)[Symbol.for('typervisor.bundle')] as
    BundleInfo | undefined;
}

/** The entry of a worker: its bundle's loader when this thread runs bundled, else `unbundled`. */
export function workerEntry(name: 'vcpu-worker' | 'device-worker', unbundled: URL): URL {
  const b = runningBundle();
  return b ? pathToFileURL(join(b.dir, `${name}.cjs`)) : unbundled;
}

/**
 * vCPU workers the bundle's loader started before the main bundle was compiled (`typervisor
 * run`, scripts/bundle-loader.cjs startVcpuWorkerEarly), handed over once.
 */
export function takeEarlyVcpuWorkers(): Worker[] {
  const g = globalThis as Record<symbol, unknown>;
  const key = Symbol.for('typervisor.early-vcpu-workers');
  const ws = (g[key] as Worker[] | undefined) ?? [];
  delete g[key];
  return ws;
}

/**
 * How a VM's vCPUs are run (issue 18 part B): a Node worker each (vcpu-worker.ts), or native
 * runner threads served by one worker (vcpu-threads.ts). A small module: the main thread and the
 * worker pool read it without loading either.
 */
/**
 * How vCPUs are run: a Node worker each ('worker'); native runner threads served by one worker
 * ('native'); or vCPU 0 on a worker of its own and the others on runner threads ('hybrid': the
 * boot vCPU, which takes most of a boot's exits, keeps the in-thread exit path).
 */
export type VcpuThreads = 'worker' | 'native' | 'hybrid';

/**
 * From this many vCPUs up, 'auto' picks 'hybrid' (bench/vcpus.ts, docs/architecture.md): below
 * it hybrid would start as many isolates as workers do, and an exit handed to another thread
 * costs more than one taken in-thread (~+11 µs on our host, ~+400 µs in the nested lab).
 */
export const NATIVE_FROM_VCPUS = 3;

/** How many Node workers a mode starts for `vcpus` vCPUs (the prewarm). */
export function workersFor(mode: VcpuThreads, vcpus: number): number {
  if (mode === 'worker') return vcpus;
  if (mode === 'native') return 1;
  return vcpus > 1 ? 2 : 1;
}

/**
 * The mode for a VM of `vcpus` vCPUs: `setting` ('worker', 'native', 'hybrid', 'auto' or undefined, from
 * TYPERVISOR_VCPU_THREADS or --vcpu-threads) decides; 'auto' and undefined pick by count.
 */
export function chooseVcpuThreads(vcpus: number, setting: string | undefined): VcpuThreads {
  if (setting === 'worker' || setting === 'native' || setting === 'hybrid') return setting;
  if (setting !== undefined && setting !== '' && setting !== 'auto') {
    throw new Error(
      `vCPU threads: '${setting}' is not one of worker, native, hybrid, auto (TYPERVISOR_VCPU_THREADS, --vcpu-threads)`,
    );
  }
  return vcpus >= NATIVE_FROM_VCPUS ? 'hybrid' : 'worker';
}

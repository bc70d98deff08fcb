/**
 * How a VM's vCPUs are run (issue 18 part B): a Node worker each (vcpu-worker.ts), or native
 * runner threads served by one worker (vcpu-threads.ts). A small module: the main thread and the
 * worker pool read it without loading either.
 */
/** How vCPUs are run: a Node worker each, or native runner threads served by one worker. */
export type VcpuThreads = 'worker' | 'native';

/**
 * From this many vCPUs up, 'auto' picks native runner threads (bench/vcpus.ts: below it the
 * per-vCPU workers' memory is small and their in-thread exits are faster).
 */
export const NATIVE_FROM_VCPUS = 4;

/**
 * The mode for a VM of `vcpus` vCPUs: `setting` ('worker', 'native', 'auto' or undefined, from
 * TYPERVISOR_VCPU_THREADS or --vcpu-threads) decides; 'auto' and undefined pick by count.
 */
export function chooseVcpuThreads(vcpus: number, setting: string | undefined): VcpuThreads {
  if (setting === 'worker' || setting === 'native') return setting;
  if (setting !== undefined && setting !== '' && setting !== 'auto') {
    throw new Error(
      `vCPU threads: '${setting}' is not one of worker, native, auto (TYPERVISOR_VCPU_THREADS, --vcpu-threads)`,
    );
  }
  return vcpus >= NATIVE_FROM_VCPUS ? 'native' : 'worker';
}

/**
 * How a VM's vCPUs are run (issue 18 part B): a Node worker each (vcpu-worker.ts), or native
 * runner threads served by one worker (vcpu-threads.ts). A small module: the main thread and the
 * worker pool read it without loading either.
 */
/**
 * How vCPUs are run: a Node worker each ('worker'); native runner threads served by one worker
 * ('native'); or vCPU 0 on a worker of its own and the others on runner threads ('hybrid': the
 * boot vCPU, which takes most of a boot's exits, keeps the in-thread exit path); or vCPU 0 run
 * by the main thread itself whenever its event loop is idle, the others on runner threads
 * ('loop': the in-thread exit path without a worker; one such VM per process).
 */
export type VcpuThreads = 'worker' | 'native' | 'hybrid' | 'loop';

/**
 * From this many vCPUs up, 'auto' picks 'hybrid' (bench/vcpus.ts, docs/architecture.md): below
 * it hybrid would start as many isolates as workers do, and an exit handed to another thread
 * costs more than one taken in-thread (~+11 µs on our host, ~+400 µs in the nested lab).
 */
export const NATIVE_FROM_VCPUS = 3;

/**
 * Where the hub that serves native runner threads runs: on the main thread, driven by its event
 * loop (the default: no isolate of its own), or on a worker of its own that sleeps in
 * read(eventfd) between exits ('worker', the earlier design, kept for comparison:
 * TYPERVISOR_VCPU_HUB=worker). docs/architecture.md "vCPU threads".
 */
export type HubPlace = 'main' | 'worker';

export function chooseHubPlace(setting: string | undefined): HubPlace {
  if (setting === undefined || setting === '' || setting === 'main') return 'main';
  if (setting === 'worker') return 'worker';
  throw new Error(`vCPU hub: '${setting}' is not one of main, worker (TYPERVISOR_VCPU_HUB)`);
}

/** How many Node workers a mode starts for `vcpus` vCPUs (the prewarm). */
export function workersFor(mode: VcpuThreads, vcpus: number, hub: HubPlace = 'main'): number {
  if (mode === 'worker') return vcpus;
  const hubWorker = hub === 'worker' ? 1 : 0;
  if (mode === 'native') return hubWorker;
  if (mode === 'loop') return 0;
  return vcpus > 1 ? 1 + hubWorker : 1;
}

/**
 * Whether 'auto' runs a VM in 'loop' mode (vCPU 0 on the main thread's loop, any others on
 * native runner threads served by that thread: no Node worker for any vCPU): only in a process
 * that runs one VM, whose main thread has nothing else to keep responsive between the loop's
 * turns (`typervisor run` and the API mode without --rehearse; set by src/cli/main.ts and
 * src/cli/api-mode.ts). A library or daemon process runs many VMs and keeps per-vCPU workers,
 * or the hybrid from NATIVE_FROM_VCPUS (a loop runner holds its thread's loop, one per process).
 */
let loopByDefault = false;

export function setLoopByDefault(on: boolean): void {
  loopByDefault = on;
}

/**
 * The mode for a VM of `vcpus` vCPUs: `setting` ('worker', 'native', 'hybrid', 'loop', 'auto' or
 * undefined, from TYPERVISOR_VCPU_THREADS or --vcpu-threads) decides; 'auto' and undefined pick
 * 'loop' where setLoopByDefault allows it (any vCPU count: vCPU 0 keeps the in-thread exit path,
 * the others cost a runner thread each, not an isolate), else by count: 'hybrid' from
 * NATIVE_FROM_VCPUS up, else 'worker'.
 */
export function chooseVcpuThreads(vcpus: number, setting: string | undefined): VcpuThreads {
  if (setting === 'worker' || setting === 'native' || setting === 'hybrid' || setting === 'loop')
    return setting;
  if (setting !== undefined && setting !== '' && setting !== 'auto') {
    throw new Error(
      `vCPU threads: '${setting}' is not one of worker, native, hybrid, loop, auto (TYPERVISOR_VCPU_THREADS, --vcpu-threads)`,
    );
  }
  if (loopByDefault) return 'loop';
  return vcpus >= NATIVE_FROM_VCPUS ? 'hybrid' : 'worker';
}

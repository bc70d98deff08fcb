/**
 * The Firecracker-style API mode (`typervisor --api-sock ...`): what src/cli/main.ts runs for
 * it, and what the `api` bundle's entry (src/cli/api-main.ts) runs alone.
 */
import { createHash } from 'node:crypto';
import { prewarmDeviceWorker, prewarmVcpuWorkers, setLoopByDefault } from '../vmm/vcpu-pool.js';
import { firecrackerCommand } from './firecracker.js';
import { stdinKind } from './console.js';
import { boundExitAfterSignals } from './signals.js';
import { releaseVmsAtExit } from '../vmm/index.js';

export async function apiMode(argv: string[]): Promise<number> {
  boundExitAfterSignals();
  // One VM in this process: by default its vCPU 0 runs on this thread's loop and any others on
  // runner threads (vcpu-mode.ts 'loop'), with no worker to prewarm; a VM told to use workers
  // (TYPERVISOR_VCPU_THREADS) gets them started at its machine-config (firecracker.ts). Not
  // with --rehearse (the daemon's pool): there the rehearsal VM and the real one share their
  // vCPU workers.
  if (!argv.includes('--rehearse')) setLoopByDefault(true);
  // A device worker (and, where a 1-vCPU VM runs on a worker, a vCPU worker) start now, while
  // the API server comes up, so that a boot or a snapshot load does not wait for them (~40-300
  // ms; docs/bench.md). The ones a VM does not use end when it starts; unused, they end at exit.
  if (!argv.includes('--help') && !argv.includes('-h') && !argv.includes('--version')) {
    // After the API socket listens: from the bundle, everything up to listen() runs in this
    // turn of the event loop (its imports are resolved promises), and starting two workers
    // first would delay the socket by their share of this thread and of the CPUs
    // (docs/architecture.md "Start-up"). Un-bundled, the imports read files and the workers
    // start before listen(), as before.
    setImmediate(() => {
      // --rehearse: the rehearsal VM has started its own (firecracker.ts).
      if (!argv.includes('--rehearse')) prewarmVcpuWorkers(1);
      prewarmDeviceWorker();
      // The bundles load node:crypto on first use (scripts/bundle.mjs): load it now, before a
      // snapshot load needs it for the state file's checksum (~1.6 ms).
      createHash('sha256');
      // The console reads stdin once the VM runs (firecracker.ts onStarted): Node makes
      // process.stdin on first use, which took 4.5 ms on this host (its stream modules), on
      // the main thread between the build and InstanceStart's answer, and the boot marker's
      // line waited for it (docs/daemon.md). Made now, it is only made: nothing reads it yet.
      // Only for a terminal or a file: /dev/null is not read, and a pipe or socket is read
      // without a stream (console.ts stdinKind, FdInput).
      if (stdinKind() === 'stream') void process.stdin;
    });
  }
  // The process ends with its VM: the kernel releases the VM at exit (builder.ts).
  releaseVmsAtExit(true);
  return firecrackerCommand(argv);
}

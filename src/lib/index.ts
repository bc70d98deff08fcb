/**
 * The `typervisor` package: microVMs on Linux KVM, created and driven from the calling Node
 * process. docs/library.md has the guide and examples; this file is the whole public surface
 * (semver 0.x: anything not exported here is internal and may change in any release).
 *
 *   import { createVm } from 'typervisor';
 *   const r = await createVm({ boot: { kernel_image_path: 'vmlinux' }, machine: { vcpu_count: 1, mem_size_mib: 128 } });
 *   if (!r.ok) throw r.error;            // errors are values: r.error.code says why
 *   const vm = r.value;
 *   vm.console?.output.pipe(process.stdout);
 *   await vm.start();
 *   const exit = await vm.wait();        // { reason: 'poweroff' | 'reset' | 'stopped' | 'fatal', ... }
 */
import { VmHost, type CreateVmOptions } from './host.js';
import type { Result } from './errors.js';
import type { Vm } from './vm.js';
import type { VmResources } from '../vmm/index.js';

export { VmError, type Result, type VmErrorCode } from './errors.js';
export {
  createVmHost,
  VmHost,
  MAX_PENDING_RELEASES,
  MAX_WARM_VCPU_WORKERS,
  type CreateVmOptions,
  type VmHostOptions,
  type VmHostStats,
} from './host.js';
export { Vm, type VmConsole, type VmEvents, type VmExit, type VmState } from './vm.js';
/** The VM's description: Firecracker's full configuration shape (its API and --config-file). */
export type {
  BalloonConfig,
  BootSource,
  DriveConfig,
  EntropyConfig,
  MachineConfig,
  NetworkInterfaceConfig,
  RateLimiter,
  TokenBucket,
  VmResources,
  VsockConfig,
} from '../vmm/index.js';

let shared: VmHost | undefined;

/**
 * The process's default host (made on first use with the default options: one warm vCPU
 * worker, role filters on the library's own threads). Make your own with createVmHost() for
 * other options, or several.
 */
export function defaultHost(): VmHost {
  return (shared ??= new VmHost());
}

/** createVm on the default host: see VmHost.createVm. */
export function createVm(resources: VmResources, opts?: CreateVmOptions): Promise<Result<Vm>> {
  return defaultHost().createVm(resources, opts);
}

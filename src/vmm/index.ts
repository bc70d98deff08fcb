/**
 * The vmm layer's public surface: api/ and cli/ import vmm only through this file (and the
 * light start-up entry vcpu-pool.ts), checked by scripts/check-imports.mjs. Re-exports only.
 *
 *   VmResources (Firecracker's shape, filled by the CLI, the API and --config-file)
 *     -> validateResources() -> VmSpec (checked) -> buildVm() -> BuiltVm { vmm, devices, ... }
 */
export { MAX_VCPUS } from '../arch/x86_64/layout.js';
export {
  buildVm,
  releaseVmsAtExit,
  type BuildOptions,
  type BuiltVm,
  type VmParts,
} from './builder.js';
export {
  DIFF_NEEDS_TRACKING,
  SnapshotError,
  createSnapshot,
  loadSnapshot,
  type CreateParams,
  type LoadParams,
} from './snapshot.js';
export {
  SnapshotFileError,
  SnapshotV1,
  decodeSnapshotFile,
  readSnapshotFile,
  type SnapshotData,
} from './snapshot-format.js';
export { rebaseMemoryFile, type RebaseResult } from './snapshot-memory.js';
export { FdInput } from '../events/fd-input.js';
export { checkHostCanRun } from './host-check.js';
export { replaceDriveImage, updateRateLimiter, type DriveImageChange } from './drive-patch.js';
export type { RateLimiterConfig } from '../devices/virtio/rate-limiter.js';
export type { AttachedDevices } from './legacy-devices.js';
export {
  DEFAULT_BOOT_ARGS,
  DEFAULT_MACHINE_CONFIG,
  MAX_MEM_MIB,
  MAX_TAP_NAME,
  MAX_UDS_PATH,
  MAX_VIRTIO_DEVICES,
  MIN_MEM_MIB,
  emptyVmConfig,
  resourcesFromConfig,
  configFromResources,
  configFromSpec,
  validateBalloon,
  validateBootSource,
  validateDrive,
  deviceRateLimiter,
  validateLogger,
  validateMachineConfig,
  normalizeCpuConfig,
  type CpuConfigJson,
  validateNetworkInterface,
  validateResources,
  validateRestoreConfig,
  validateVsock,
  withDrive,
  withNetworkInterface,
  checkPmem,
  validateMemoryHotplug,
  validatePmem,
  withPmem,
  afterFailedInterfacePut,
  wireMachineConfig,
  wireVmConfig,
  type BalloonConfig,
  type BootSource,
  type DriveConfig,
  type EntropyConfig,
  type LoggerConfig,
  type MachineConfig,
  type MetricsConfig,
  type NetworkInterfaceConfig,
  type PmemApiConfig,
  type MemoryHotplugConfig,
  type RateLimiter,
  type RestoreOverrides,
  type RestoreSpec,
  type TokenBucket,
  type VmConfig,
  type VmResources,
  type VmSpec,
  type VsockConfig,
} from './resources.js';
export type { VmExitEvent } from './vcpu-loop.js';
export { ExitKind, VcpuControl } from './vcpu-control.js';
export {
  bootTimeLine,
  bootTimeMessage,
  fcTimestamp,
  processCpuUs,
  type BootTimerLine,
} from './boot-timer.js';
export type { DeviceReport, SavedDevice } from './device-worker-protocol.js';
export {
  cloneMemory,
  fileMatch,
  formatCloneMemory,
  summariseCloneSmaps,
  type CloneMemory,
  type FileMatch,
} from './clone-memory.js';
export type { BalloonDescription, BalloonRequest } from '../devices/virtio/balloon/balloon.js';
export { hotplugStatus, requestHotplugSize, type HotplugStatus } from './memory-hotplug.js';
export { chooseVcpuThreads, NATIVE_FROM_VCPUS, type VcpuThreads } from './vcpu-mode.js';
// The library's warm path (src/lib/): reusable vCPU workers, descriptors closed off the main
// thread, a console pipe per VM.
export type { VcpuWorkerSource, VmState } from './vmm.js';
export type { Vmm } from './vmm.js';
export { startFdCloser, type FdCloser } from './fd-closer.js';
export { consolePipe, type ConsolePipe } from './console-pipe.js';
export { GuestRamPool, type GuestRamSource } from './ram-pool.js';
export { OnePreparedVm, prepareVm, type PreparedVm, type PreparedVmSource } from './prepared-vm.js';
export { rehearsalBuildOptions, rehearsalImage } from './rehearsal.js';
export { adoptInheritedVhostVsock } from '../devices/virtio/vsock/vhost.js';

/**
 * The host side of virtio-mem at run time (PATCH and GET /hotplug/memory): the requested size is
 * written into the device's config space in the shared register file (under its lock, bumping
 * ConfigGeneration) and the driver is told by a config-change interrupt; the plugged size is
 * read from the same place, where the device worker keeps it current.
 */
import type { MemHost } from '../devices/virtio/mem/descriptor.js';
import { VirtioDeviceStateV1 } from '../devices/virtio/device-state.js';
import { MEM_CFG, savedPluggedBlocks, u64 } from '../devices/virtio/mem/index.js';
import { VirtioMmioState } from '../devices/virtio/mmio-state.js';
import { native } from '../kvm/native.js';
import { ConfigError } from '../util/errors.js';
import type { BuiltVm } from './builder.js';
import type { MemoryHotplugConfig } from './resources.js';
import type { VirtioPlan } from './virtio-plan.js';

const MIB = 1024 * 1024;

export interface HotplugStatus {
  total_size_mib: number;
  slot_size_mib: number;
  block_size_mib: number;
  plugged_size_mib: number;
  requested_size_mib: number;
}

function memSlot(built: BuiltVm | undefined) {
  return built?.parts?.plan?.slots.find((s) => s.kind === 'mem');
}

function readU64(state: VirtioMmioState, offset: number): number {
  // Written under the register file's lock by the other side: read until two reads agree.
  const once = () =>
    Number(
      new DataView(state.config.buffer, state.config.byteOffset + offset, 8).getBigUint64(0, true),
    );
  let v = once();
  for (let i = 0; i < 4; i++) {
    const again = once();
    if (again === v) break;
    v = again;
  }
  return v;
}

/** GET /hotplug/memory: before boot the configuration with nothing plugged or requested. */
export function hotplugStatus(
  config: Required<MemoryHotplugConfig>,
  built: BuiltVm | undefined,
): HotplugStatus {
  const slot = memSlot(built);
  const state = slot ? new VirtioMmioState(slot.state) : undefined;
  return {
    total_size_mib: config.total_size_mib,
    slot_size_mib: config.slot_size_mib,
    block_size_mib: config.block_size_mib,
    plugged_size_mib: state ? readU64(state, MEM_CFG.pluggedSize) / MIB : 0,
    requested_size_mib: state ? readU64(state, MEM_CFG.requestedSize) / MIB : 0,
  };
}

/**
 * PATCH /hotplug/memory: a new target for the guest. A multiple of block_size_mib, at most
 * total_size_mib; else a ConfigError and nothing changes.
 */
export function requestHotplugSize(
  config: Required<MemoryHotplugConfig>,
  built: BuiltVm,
  requestedMib: number,
): void {
  if (!Number.isSafeInteger(requestedMib) || requestedMib < 0)
    throw new ConfigError('requested_size_mib must be a non-negative integer');
  if (requestedMib > config.total_size_mib)
    throw new ConfigError(
      `requested_size_mib (${requestedMib}) is larger than total_size_mib (${config.total_size_mib})`,
    );
  if (requestedMib % config.block_size_mib !== 0)
    throw new ConfigError(
      `requested_size_mib (${requestedMib}) is not a multiple of block_size_mib (${config.block_size_mib})`,
    );
  const slot = memSlot(built);
  if (!slot) throw new ConfigError('the running VM has no memory hotplug device');
  const state = new VirtioMmioState(slot.state);
  // Through the irqfd: KVM pulses the GSI from a kworker, back to back in the kernel. The device
  // worker pulses it with KVM_IRQ_LINE (device-loop.ts); for its edge to be lost in ours, the
  // guest would have to take ours and read InterruptStatus within that pulse.
  if (state.changeConfig(MEM_CFG.requestedSize, u64(requestedMib * MIB)))
    native().eventfdWrite(slot.irqFd, 1);
}

/**
 * The virtio-mem region's host memory in a plan (its memfd, region_size bytes), or undefined when
 * the VM has no memory hotplug. A snapshot's memory file carries it after RAM (snapshot.ts).
 */
export function hotplugMemory(
  plan: VirtioPlan | undefined,
): { fd: number; size: number } | undefined {
  for (const s of plan?.slots ?? [])
    if (s.kind === 'mem') {
      // The registry's host type does not narrow here (HostOf infers never for mem).
      const host = s.host as unknown as MemHost;
      return { fd: host.memfd, size: host.geometry.regionSize };
    }
  return undefined;
}

/**
 * How many blocks a snapshot's saved virtio-mem device (its VirtioDeviceStateV1 bytes) has
 * plugged. Throws PersistError on a bad blob.
 */
export function savedPluggedCount(state: Uint8Array): number {
  const d = VirtioDeviceStateV1.decodeOrThrow(state);
  return d.backend ? savedPluggedBlocks(d.backend) : 0;
}

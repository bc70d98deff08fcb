/**
 * virtio-mem in the device registry (Firecracker's memory hotplug). open() makes the region's
 * memory, a memfd of total_size (pages are allocated only when the guest touches plugged
 * blocks), reserves its guest-physical range above RAM and asks the VMM to map it as one KVM
 * memory slot per slot_size. The device worker serves plug / unplug / state requests; unplugged
 * blocks are punched out of the memfd (MADV_REMOVE through a short-lived mapping), and a slot
 * with no plugged block is taken out of the guest (KVM_SET_USER_MEMORY_REGION of size 0: the
 * VMM's BackendEnv.memorySlots) until a block in it is plugged again.
 *
 * The region starts on a 1 GiB boundary: Linux adds hotplugged memory in memory blocks of 128 MiB
 * or more (up to 1 GiB on large machines), and the region must be aligned to them.
 */
import { closeSync, ftruncateSync } from 'node:fs';
import { ConfigError } from '../../../util/errors.js';
import type { DeviceMemoryRegion, DeviceType } from '../descriptor.js';
import { MEM_CFG, MemDevice, memIdentity, type MemGeometry } from './mem.js';

const MIB = 1024 * 1024;
export const MEM_REGION_ALIGN = 1024 * MIB;
/** At most this many KVM memory slots for the region (total_size / slot_size). */
export const MEM_MAX_SLOTS = 256;
export const MEM_MIN_BLOCK_MIB = 2;
export const MEM_MIN_SLOT_MIB = 128;
export const MADV_REMOVE = 9;
const PROT_RW = 0x1 | 0x2;
const MAP_SHARED = 0x1;
const MFD_CLOEXEC = 1;

export interface MemConfig {
  kind: 'mem';
  id: string;
  totalMib: number;
  blockMib: number;
  slotMib: number;
}

export interface MemHost {
  memfd: number;
  geometry: MemGeometry;
}

/** The sizes' rules (Firecracker's): throws ConfigError naming the field. */
export function checkMemSizes(c: { totalMib: number; blockMib: number; slotMib: number }): void {
  const int = (v: number) => Number.isSafeInteger(v) && v > 0;
  if (!int(c.blockMib) || c.blockMib < MEM_MIN_BLOCK_MIB || (c.blockMib & (c.blockMib - 1)) !== 0)
    throw new ConfigError(
      `memory hotplug: block_size_mib must be a power of 2 of at least ${MEM_MIN_BLOCK_MIB} (got ${c.blockMib})`,
    );
  if (!int(c.slotMib) || c.slotMib < MEM_MIN_SLOT_MIB || c.slotMib % c.blockMib !== 0)
    throw new ConfigError(
      `memory hotplug: slot_size_mib must be at least ${MEM_MIN_SLOT_MIB} and a multiple of block_size_mib (got ${c.slotMib})`,
    );
  if (!int(c.totalMib) || c.totalMib % c.slotMib !== 0)
    throw new ConfigError(
      `memory hotplug: total_size_mib must be a positive multiple of slot_size_mib (got ${c.totalMib})`,
    );
  if (c.totalMib / c.slotMib > MEM_MAX_SLOTS)
    throw new ConfigError(
      `memory hotplug: at most ${MEM_MAX_SLOTS} slots (total_size_mib / slot_size_mib); ${c.totalMib / c.slotMib} asked`,
    );
}

export const memDevice: DeviceType<MemConfig, MemHost> = {
  kind: 'mem',
  metricsGroup: 'memory_hotplug',
  open(config, ctx) {
    checkMemSizes(config);
    const size = config.totalMib * MIB;
    if (!ctx.allocateGuestMemory)
      throw new ConfigError('memory hotplug: this VM has no guest-physical room for device memory');
    const addr = ctx.allocateGuestMemory(size, MEM_REGION_ALIGN);
    const memfd = ctx.sys.memfdCreate('typervisor-hotplug-memory', MFD_CLOEXEC);
    try {
      ftruncateSync(memfd, size);
    } catch (e) {
      ctx.sys.close(memfd);
      throw new ConfigError(`memory hotplug: cannot size the region: ${(e as Error).message}`);
    }
    const slot = config.slotMib * MIB;
    const memory: DeviceMemoryRegion[] = [];
    for (let off = 0; off < size; off += slot)
      // Out of the guest until a block in it is plugged (the device adds the slot then).
      memory.push({
        guestAddr: addr + off,
        size: slot,
        fd: memfd,
        offset: off,
        readOnly: false,
        startsOut: true,
      });
    const geometry: MemGeometry = {
      addr,
      regionSize: size,
      blockSize: config.blockMib * MIB,
      slotSize: slot,
    };
    return {
      name: `virtio-mem ${config.id} (${config.totalMib} MiB at 0x${addr.toString(16)})`,
      identity: memIdentity(geometry),
      host: { memfd, geometry },
      warnings: [],
      memory,
      close: () => closeSync(memfd),
    };
  },
  create(host, env) {
    const cfg = env.config;
    if (!cfg) throw new Error('virtio-mem needs its config space (BackendEnv.config)');
    const readU64 = (offset: number) => {
      const b = cfg.read(offset, 8);
      return Number(new DataView(b.buffer, b.byteOffset, 8).getBigUint64(0, true));
    };
    const dev = new MemDevice(
      env.name,
      host.geometry,
      {
        // A host PATCH writes it under the register file's lock: read until two reads agree.
        requestedSize: () => {
          let v = readU64(MEM_CFG.requestedSize);
          for (let i = 0; i < 4; i++) {
            const again = readU64(MEM_CFG.requestedSize);
            if (again === v) break;
            v = again;
          }
          return v;
        },
        setPluggedSize: (bytes) => cfg.change(MEM_CFG.pluggedSize, u64(bytes)),
      },
      (offset, length) => {
        const buf = env.sys.mmap(length, PROT_RW, MAP_SHARED, host.memfd, offset);
        try {
          env.sys.madvise(buf, 0, length, MADV_REMOVE);
        } finally {
          env.sys.munmap(buf);
        }
      },
      env.memorySlots,
      (m) => env.log(m),
    );
    const c = dev.counters;
    return {
      backend: dev,
      // Firecracker's MemoryHotplugMetrics names, then ours.
      metrics: () => ({
        queue_event_count: c.plugs + c.unplugs + c.unplugAlls + c.states + c.badRequests,
        plug_count: c.plugs,
        plug_bytes: c.plugBytes,
        plug_fails: c.plugFails,
        unplug_count: c.unplugs + c.unplugAlls,
        unplug_bytes: c.unplugBytes,
        unplug_fails: c.unplugFails,
        state_count: c.states,
        invalid_reqs_count: c.badRequests,
        plugged_bytes: dev.pluggedSize,
        slots_added: c.slotsAdded,
        slots_removed: c.slotsRemoved,
        slot_fails: c.slotFails,
      }),
    };
  },
};

export function u64(v: number): Uint8Array {
  const b = new Uint8Array(8);
  new DataView(b.buffer).setBigUint64(0, BigInt(v), true);
  return b;
}

/**
 * virtio-mem (device ID 24, virtio 1.2 §5.15): a region of guest-physical memory above RAM,
 * divided into blocks that the driver plugs and unplugs on request. The host sets the target
 * (requested_size, in config space: PATCH /hotplug/memory); the driver plugs or unplugs blocks
 * to reach it and the device tracks which blocks are plugged (a bitmap), updates plugged_size,
 * and gives unplugged blocks' pages back to the host (punched out of the region's memfd).
 *
 * Config space (56 bytes): le64 block_size, le16 node_id, pad[6], le64 addr, le64 region_size,
 * le64 usable_region_size, le64 plugged_size, le64 requested_size.
 * Request (24 bytes): le16 type, pad[6], le64 addr, le16 nb_blocks, pad[6].
 * Response (10 bytes): le16 type (ACK 0, NACK 1, BUSY 2, ERROR 3), pad[6], le16 state.
 *
 * Checks (§5.15.6): addr block-aligned and the range inside the usable region, nb_blocks > 0;
 * PLUG needs the whole range unplugged and room under requested_size (else NACK); UNPLUG needs
 * it all plugged; STATE answers PLUGGED, UNPLUGGED or MIXED. Anything else is ERROR.
 *
 * KVM memory slots (Firecracker's): the region is mapped as one KVM slot per slot_size, and a
 * slot is in the guest-physical map only while at least one block in it is plugged. A PLUG puts
 * the slots it touches back before it is acknowledged (the guest uses the blocks as soon as it
 * has the ACK; a slot KVM refuses fails the request with ERROR, nothing plugged); an UNPLUG
 * takes out the slots it empties before their pages are discarded, so the guest cannot fault
 * them back in. A device starts with nothing plugged, so every slot out (the VMM makes none);
 * a restored one puts in the slots of its saved plugged blocks.
 */
import { PersistError } from '../../../util/persist.js';
import type { DescriptorChain } from '../chain.js';
import { DEVICE_ID_MEM, QUEUE_SIZE_MAX, VIRTIO_F_RING_INDIRECT_DESC, bit } from '../constants.js';
import type { VirtioBackend } from '../device.js';
import type { MemorySlots } from '../descriptor.js';
import type { VirtioDeviceIdentity } from '../mmio-state.js';

export const VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE = 1;

export const MEM_CONFIG_SIZE = 56;
export const MEM_CFG = {
  blockSize: 0,
  nodeId: 8,
  addr: 16,
  regionSize: 24,
  usableRegionSize: 32,
  pluggedSize: 40,
  requestedSize: 48,
} as const;

export const REQ_PLUG = 0;
export const REQ_UNPLUG = 1;
export const REQ_UNPLUG_ALL = 2;
export const REQ_STATE = 3;
export const RESP_ACK = 0;
export const RESP_NACK = 1;
export const RESP_ERROR = 3;
export const STATE_PLUGGED = 0;
export const STATE_UNPLUGGED = 1;
export const STATE_MIXED = 2;
export const REQ_SIZE = 24;
export const RESP_SIZE = 10;

export interface MemGeometry {
  /** Guest-physical base of the region. */
  addr: number;
  regionSize: number;
  blockSize: number;
  /** Bytes per KVM memory slot (a multiple of blockSize dividing regionSize). */
  slotSize?: number;
}

export function memIdentity(g: MemGeometry): VirtioDeviceIdentity {
  const config = new Uint8Array(MEM_CONFIG_SIZE);
  const v = new DataView(config.buffer);
  v.setBigUint64(MEM_CFG.blockSize, BigInt(g.blockSize), true);
  v.setBigUint64(MEM_CFG.addr, BigInt(g.addr), true);
  v.setBigUint64(MEM_CFG.regionSize, BigInt(g.regionSize), true);
  v.setBigUint64(MEM_CFG.usableRegionSize, BigInt(g.regionSize), true);
  return {
    deviceId: DEVICE_ID_MEM,
    features: bit(VIRTIO_F_RING_INDIRECT_DESC) | bit(VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE),
    queueSizes: [QUEUE_SIZE_MAX],
    config,
  };
}

/** The device's view of its config space (the register file's, shared with the vCPUs). */
export interface MemConfigAccess {
  /** requested_size as the host last set it. */
  requestedSize(): number;
  /** Writes plugged_size (a config change the driver may be told about). */
  setPluggedSize(bytes: number): void;
}

export interface MemCounters {
  plugs: number;
  plugBytes: number;
  plugFails: number;
  unplugs: number;
  unplugBytes: number;
  unplugFails: number;
  unplugAlls: number;
  states: number;
  badRequests: number;
  /** KVM slots put back (a block in them plugged) and taken out (all their blocks unplugged). */
  slotsAdded: number;
  slotsRemoved: number;
  /** Slot changes KVM refused. */
  slotFails: number;
}

const SAVED_VERSION = 1;

export class MemDevice implements VirtioBackend {
  readonly counters: MemCounters = {
    plugs: 0,
    plugBytes: 0,
    plugFails: 0,
    unplugs: 0,
    unplugBytes: 0,
    unplugFails: 0,
    unplugAlls: 0,
    states: 0,
    badRequests: 0,
    slotsAdded: 0,
    slotsRemoved: 0,
    slotFails: 0,
  };
  /** One byte per block: 1 plugged. */
  private readonly plugged: Uint8Array;
  private pluggedBlocks = 0;
  readonly blocks: number;
  /** Blocks per KVM slot (0: the slots are not managed). */
  private readonly blocksPerSlot: number;
  /** Per slot: its plugged blocks, and whether KVM has it now. */
  private readonly slotPlugged: Uint32Array;
  private readonly slotPresent: Uint8Array;

  /**
   * `discard(offset, length)` gives the pages of [offset, +length) of the region back to the
   * host (MADV_REMOVE on the memfd); it throws on a host failure. `slots`: the region's KVM
   * slots (geometry.slotSize each; present or not as isPresent() says at first), put in and
   * taken out as blocks are plugged and unplugged; without it the slots are left alone.
   */
  constructor(
    readonly name: string,
    readonly geometry: MemGeometry,
    private readonly config: MemConfigAccess,
    private readonly discard: (offset: number, length: number) => void,
    private readonly slots?: MemorySlots,
    private readonly log: (m: string) => void = () => undefined,
  ) {
    if (geometry.regionSize % geometry.blockSize !== 0)
      throw new Error('virtio-mem: the region is not a whole number of blocks');
    this.blocks = geometry.regionSize / geometry.blockSize;
    this.plugged = new Uint8Array(this.blocks);
    const slotSize = geometry.slotSize ?? 0;
    if (
      slots &&
      !(
        slotSize > 0 &&
        slotSize % geometry.blockSize === 0 &&
        geometry.regionSize % slotSize === 0 &&
        geometry.regionSize / slotSize === slots.count
      )
    )
      throw new Error(
        `virtio-mem: ${slots.count} KVM slots of ${slotSize} bytes do not tile the region`,
      );
    this.blocksPerSlot = slots ? slotSize / geometry.blockSize : 0;
    const slotCount = slots ? slots.count : 0;
    this.slotPlugged = new Uint32Array(slotCount);
    this.slotPresent = new Uint8Array(slotCount);
    for (let s = 0; s < slotCount; s++) this.slotPresent[s] = slots!.isPresent(s) ? 1 : 0;
    // Nothing is plugged yet: every slot out of the guest (the VMM made none: `startsOut`).
    this.syncSlots(0, slotCount);
  }

  get pluggedSize(): number {
    return this.pluggedBlocks * this.geometry.blockSize;
  }

  /**
   * Whether every block under guest-physical [addr, addr+len) is plugged (len 0: the block at
   * addr). The device worker reaches the region only there (GuestRegion.allows): a virtio buffer
   * of the guest's in hotplugged memory is used only while the guest has that memory. The loop
   * is bounded by the blocks the range spans (the caller's region bounds the range).
   */
  isPluggedRange(addr: number, len: number): boolean {
    const g = this.geometry;
    const off = addr - g.addr;
    if (!(off >= 0 && len >= 0 && off + len <= g.regionSize)) return false;
    const first = Math.floor(off / g.blockSize);
    const last = len === 0 ? first : Math.floor((off + len - 1) / g.blockSize);
    if (last >= this.blocks) return false;
    for (let i = first; i <= last; i++) if (this.plugged[i] !== 1) return false;
    return true;
  }

  handle(_queue: number, chain: DescriptorChain): number {
    const out = chain.writable[0];
    if (out === undefined || out.length < RESP_SIZE) {
      this.counters.badRequests++;
      return 0;
    }
    const req = gather(chain.readable, REQ_SIZE);
    const answer = (type: number, state = 0) => {
      out.fill(0, 0, RESP_SIZE);
      const v = new DataView(out.buffer, out.byteOffset, RESP_SIZE);
      v.setUint16(0, type, true);
      v.setUint16(8, state, true);
      return RESP_SIZE;
    };
    if (!req) {
      this.counters.badRequests++;
      return answer(RESP_ERROR);
    }
    const v = new DataView(req.buffer);
    const type = v.getUint16(0, true);
    if (type === REQ_UNPLUG_ALL) return answer(this.unplugAll());
    const addr = Number(v.getBigUint64(8, true));
    const nb = v.getUint16(16, true);
    const first = this.blockIndex(addr, nb);
    if (first === undefined) {
      this.counters.badRequests++;
      if (type === REQ_PLUG) this.counters.plugFails++;
      if (type === REQ_UNPLUG) this.counters.unplugFails++;
      return answer(RESP_ERROR);
    }
    const count = this.countPlugged(first, nb);
    switch (type) {
      case REQ_PLUG: {
        if (count !== 0) {
          this.counters.plugFails++;
          return answer(RESP_ERROR);
        }
        if ((this.pluggedBlocks + nb) * this.geometry.blockSize > this.config.requestedSize()) {
          this.counters.plugFails++;
          return answer(RESP_NACK);
        }
        // The slots first: the guest uses the blocks as soon as it has the ACK.
        if (!this.plugSlots(first, nb)) {
          this.counters.plugFails++;
          return answer(RESP_ERROR);
        }
        this.plugged.fill(1, first, first + nb);
        this.pluggedBlocks += nb;
        this.counters.plugs++;
        this.counters.plugBytes += nb * this.geometry.blockSize;
        this.config.setPluggedSize(this.pluggedSize);
        return answer(RESP_ACK);
      }
      case REQ_UNPLUG: {
        if (count !== nb) {
          this.counters.unplugFails++;
          return answer(RESP_ERROR);
        }
        this.plugged.fill(0, first, first + nb);
        this.pluggedBlocks -= nb;
        // Emptied slots out before their pages go, so the guest cannot fault them back in.
        this.countSlots(first, nb, -1);
        this.syncSlots(...this.slotSpan(first, nb));
        this.discardBlocks(first, nb);
        this.counters.unplugs++;
        this.counters.unplugBytes += nb * this.geometry.blockSize;
        this.config.setPluggedSize(this.pluggedSize);
        return answer(RESP_ACK);
      }
      case REQ_STATE:
        this.counters.states++;
        return answer(
          RESP_ACK,
          count === 0 ? STATE_UNPLUGGED : count === nb ? STATE_PLUGGED : STATE_MIXED,
        );
      default:
        this.counters.badRequests++;
        return answer(RESP_ERROR);
    }
  }

  private unplugAll(): number {
    this.counters.unplugAlls++;
    this.slotPlugged.fill(0);
    this.syncSlots(0, this.slotPlugged.length);
    // Runs of plugged blocks are discarded together.
    for (let i = 0; i < this.blocks;) {
      if (!this.plugged[i]) {
        i++;
        continue;
      }
      let j = i;
      while (j < this.blocks && this.plugged[j]) j++;
      this.discardBlocks(i, j - i);
      i = j;
    }
    this.plugged.fill(0);
    this.pluggedBlocks = 0;
    this.config.setPluggedSize(0);
    return RESP_ACK;
  }

  /** The slots [from, to) that blocks [first, + nb) fall in (empty when unmanaged). */
  private slotSpan(first: number, nb: number): [number, number] {
    if (this.blocksPerSlot === 0) return [0, 0];
    return [
      Math.floor(first / this.blocksPerSlot),
      Math.floor((first + nb - 1) / this.blocksPerSlot) + 1,
    ];
  }

  /** Adds `delta` to the plugged count of the slot of each block in [first, + nb). */
  private countSlots(first: number, nb: number, delta: 1 | -1): void {
    if (this.blocksPerSlot === 0) return;
    for (let b = first; b < first + nb; b++)
      this.slotPlugged[Math.floor(b / this.blocksPerSlot)]! += delta;
  }

  /**
   * Blocks [first, + nb) are about to be plugged: their slots are put back. False (nothing
   * plugged, the slots as before) when KVM refuses one.
   */
  private plugSlots(first: number, nb: number): boolean {
    this.countSlots(first, nb, 1);
    const [from, to] = this.slotSpan(first, nb);
    if (this.syncSlots(from, to)) return true;
    this.countSlots(first, nb, -1);
    this.syncSlots(from, to);
    return false;
  }

  /**
   * Makes each slot in [from, to) present exactly when a block in it is plugged. False when
   * KVM refused a change (counted; logged once): that slot stays as it was.
   */
  private syncSlots(from: number, to: number): boolean {
    let ok = true;
    for (let s = from; s < to; s++) {
      const want = this.slotPlugged[s]! > 0 ? 1 : 0;
      if (this.slotPresent[s] === want) continue;
      try {
        this.slots!.setPresent(s, want === 1);
      } catch (e) {
        ok = false;
        if (this.counters.slotFails++ === 0)
          this.log(
            `${this.name}: KVM refused to ${want ? 'add' : 'remove'} memory slot ${s} (logged once): ${(e as Error).message}`,
          );
        continue;
      }
      this.slotPresent[s] = want;
      if (want) this.counters.slotsAdded++;
      else this.counters.slotsRemoved++;
    }
    return ok;
  }

  /** Slots of the region KVM has now (tests, metrics). */
  get presentSlots(): number {
    return this.slotPresent.reduce((a, b) => a + b, 0);
  }

  private discardBlocks(first: number, n: number): void {
    this.discard(first * this.geometry.blockSize, n * this.geometry.blockSize);
  }

  /** The first block of [addr, + nb blocks), or undefined when the range is not valid. */
  private blockIndex(addr: number, nb: number): number | undefined {
    const g = this.geometry;
    if (nb === 0 || !Number.isSafeInteger(addr) || addr < g.addr) return undefined;
    const off = addr - g.addr;
    if (off % g.blockSize !== 0) return undefined;
    const first = off / g.blockSize;
    if (first + nb > this.blocks) return undefined;
    return first;
  }

  private countPlugged(first: number, nb: number): number {
    let n = 0;
    for (let i = first; i < first + nb; i++) n += this.plugged[i]!;
    return n;
  }

  /** The plugged bitmap, for a snapshot: u8 version, u32 blocks, one byte per block. */
  save(): Uint8Array {
    const out = new Uint8Array(5 + this.blocks);
    out[0] = SAVED_VERSION;
    new DataView(out.buffer).setUint32(1, this.blocks, true);
    out.set(this.plugged, 5);
    return out;
  }

  restore(bytes: Uint8Array): void {
    if (bytes.length < 5 || bytes[0] !== SAVED_VERSION)
      throw new PersistError('virtio-mem: unknown saved state version');
    const n = new DataView(bytes.buffer, bytes.byteOffset).getUint32(1, true);
    if (n !== this.blocks || bytes.length !== 5 + n)
      throw new PersistError(`virtio-mem: saved state has ${n} blocks, this device ${this.blocks}`);
    const body = bytes.subarray(5);
    if (body.some((b) => b > 1)) throw new PersistError('virtio-mem: bad plugged bitmap');
    // The saved plugged blocks' slots back into the guest; a load whose slot KVM refuses fails
    // (and leaves the slots as they were).
    const before = this.slotPlugged.slice();
    this.slotPlugged.fill(0);
    if (this.blocksPerSlot > 0)
      body.forEach((b, i) => {
        if (b) this.slotPlugged[Math.floor(i / this.blocksPerSlot)]! += 1;
      });
    if (!this.syncSlots(0, this.slotPlugged.length)) {
      this.slotPlugged.set(before);
      this.syncSlots(0, this.slotPlugged.length);
      throw new PersistError('virtio-mem: KVM refused a memory slot of the plugged blocks');
    }
    this.plugged.set(body);
    this.pluggedBlocks = body.reduce((a, b) => a + b, 0);
  }
}

/**
 * The number of plugged blocks in a saved MemDevice state (save()'s bytes), without a device:
 * a snapshot load checks it before making anything. Throws PersistError on a bad blob.
 */
export function savedPluggedBlocks(bytes: Uint8Array): number {
  if (bytes.length < 5 || bytes[0] !== SAVED_VERSION)
    throw new PersistError('virtio-mem: unknown saved state version');
  const n = new DataView(bytes.buffer, bytes.byteOffset).getUint32(1, true);
  if (bytes.length !== 5 + n) throw new PersistError('virtio-mem: saved state is cut');
  let plugged = 0;
  for (const b of bytes.subarray(5)) {
    if (b > 1) throw new PersistError('virtio-mem: bad plugged bitmap');
    plugged += b;
  }
  return plugged;
}

/** The first `n` bytes of the buffers, or undefined when they hold fewer. */
function gather(bufs: readonly Uint8Array[], n: number): Uint8Array | undefined {
  const out = new Uint8Array(n);
  let got = 0;
  for (const seg of bufs) {
    const take = Math.min(seg.length, n - got);
    out.set(seg.subarray(0, take), got);
    got += take;
    if (got === n) return out;
  }
  return undefined;
}

/**
 * The register file of one virtio-mmio device, in a SharedArrayBuffer (DESIGN.md, "Threads and
 * their talk"). Every vCPU worker answers register accesses from it (mmio.ts); the device worker
 * reads the queue configuration from it when the driver sets DRIVER_OK, raises interrupts by
 * setting InterruptStatus bits in it, and acknowledges resets through it.
 *
 * Concurrency: every read-modify-write of the status, feature and queue slots runs under one
 * SharedMutex (both sides); InterruptStatus is changed only with Atomics.or/and, so raising an
 * interrupt never waits for the lock. Atomics are sequentially consistent, so what a thread wrote
 * under the lock is visible to the next holder on any thread.
 */
import { slots, type PersistError } from '../../util/persist.js';
import { err, ok, type Result } from '../../util/result.js';
import { SharedMutex } from '../../util/shared-mutex.js';
import {
  CONFIG_SPACE_MAX,
  INT_CONFIG_CHANGE,
  MAX_QUEUES,
  STATUS_DEVICE_NEEDS_RESET,
  STATUS_DRIVER_OK,
  VIRTIO_F_RING_EVENT_IDX,
  bit,
} from './constants.js';
import {
  type TransportIdentity,
  type TransportState,
  TransportStateV1,
  checkTransportState,
} from './transport-state.js';

export { CONFIG_SPACE_MAX, MAX_QUEUES };

/**
 * The Int32 slots of the register file, by name. Slots hold raw 32-bit register values (u32
 * registers are stored as their int32 bit pattern; read them with `>>> 0`).
 */
export const REGS = slots([
  'lock',
  'status',
  'interruptStatus',
  'deviceFeaturesSel',
  'driverFeaturesSel',
  'driverFeaturesLo',
  'driverFeaturesHi',
  'queueSel',
  'configGeneration',
  /** Incremented by every reset (Status = 0); the device worker compares it with its own copy. */
  'resetEpoch',
  /**
   * 1 from the reset of a device that had reached DRIVER_OK until the device worker has dropped
   * its queues (the resetting vCPU waits on it, bounded).
   */
  'resetPending',
  // Identity: written once by createState, never by the driver.
  'deviceId',
  'deviceFeaturesLo',
  'deviceFeaturesHi',
  'queueCount',
  'configLen',
  /** The driver-writable window of the config space, [start, end) (virtio-balloon's `actual`). */
  'configWritableStart',
  'configWritableEnd',
]);

/** Counters (int32, wrap harmlessly), changed with Atomics.add. Metrics, not saved state. */
export const COUNTERS = slots(
  [
    'badAccess', // wrong width, unknown offset, write to a read-only register
    'illegalStatus', // refused status transitions and late queue writes
    'guestErrors', // queue / descriptor errors seen by the device worker
    'needsReset', // times the device marked itself broken
    'interrupts',
  ],
  REGS.$count,
);
export type CounterName = Exclude<keyof typeof COUNTERS, '$count'>;

/** One queue's slots, at `VirtioMmioState.q(queue, QREG.x)`. */
export const QREG = slots([
  'numMax',
  'num',
  'ready',
  'descLo',
  'descHi',
  'driverLo',
  'driverHi',
  'deviceLo',
  'deviceHi',
]);

const QUEUE_BASE = COUNTERS.$count;
const QUEUE_STRIDE = QREG.$count;

const INT32_SLOTS = QUEUE_BASE + MAX_QUEUES * QUEUE_STRIDE;
const CONFIG_BYTE_OFFSET = INT32_SLOTS * 4;
const STATE_BYTES = CONFIG_BYTE_OFFSET + CONFIG_SPACE_MAX;

export interface VirtioDeviceIdentity {
  deviceId: number;
  /** All feature bits the device offers (VIRTIO_F_VERSION_1 is added by createState). */
  features: bigint;
  /** QueueNumMax of each queue (each a power of two <= 32768). */
  queueSizes: number[];
  /** The device-specific configuration space (read-only for the driver, but see below). */
  config: Uint8Array;
  /**
   * The bytes of `config` the driver may write (virtio-balloon's `actual`): [offset, offset +
   * length). Default none. A write must lie wholly inside; others are bad accesses.
   */
  configWritable?: { offset: number; length: number };
}

/** One queue's configuration as the driver left it (addresses may be anything: validate them). */
export interface QueueConfig {
  ready: boolean;
  size: number;
  /** u64 values; -1 when >= 2^53 (never valid guest RAM). */
  desc: number;
  driver: number;
  device: number;
}

export interface DeviceSnapshot {
  status: number;
  epoch: number;
  driverFeatures: bigint;
  queues: QueueConfig[];
}

export interface VirtioCounters {
  badAccesses: number;
  illegalStatus: number;
  guestErrors: number;
  needsReset: number;
  interrupts: number;
}

const u64 = (lo: number, hi: number): number => {
  const h = hi >>> 0;
  return h >= 0x20_0000 ? -1 : h * 0x1_0000_0000 + (lo >>> 0);
};
const u64n = (lo: number, hi: number): bigint => (BigInt(hi >>> 0) << 32n) | BigInt(lo >>> 0);
const lo32 = (v: bigint): number => Number(v & 0xffff_ffffn) | 0;
const hi32 = (v: bigint): number => Number((v >> 32n) & 0xffff_ffffn) | 0;

export class VirtioMmioState {
  readonly s: Int32Array;
  readonly config: Uint8Array;
  readonly mutex: SharedMutex;

  static createState(id: VirtioDeviceIdentity, featureVersion1: bigint): SharedArrayBuffer {
    if (id.queueSizes.length === 0 || id.queueSizes.length > MAX_QUEUES)
      throw new Error('bad queue count');
    if (id.config.length > CONFIG_SPACE_MAX) throw new Error('config space too large');
    for (const q of id.queueSizes) {
      if (q <= 0 || q > 32768 || (q & (q - 1)) !== 0) throw new Error(`bad queue size ${q}`);
    }
    const sab = new SharedArrayBuffer(STATE_BYTES);
    const s = new Int32Array(sab, 0, INT32_SLOTS);
    // Every device gets VIRTIO_F_RING_EVENT_IDX: the queue layer implements it (queue.ts).
    const f = id.features | featureVersion1 | bit(VIRTIO_F_RING_EVENT_IDX);
    s[REGS.deviceId] = id.deviceId;
    s[REGS.deviceFeaturesLo] = lo32(f);
    s[REGS.deviceFeaturesHi] = hi32(f);
    s[REGS.queueCount] = id.queueSizes.length;
    s[REGS.configLen] = id.config.length;
    if (id.configWritable) {
      const { offset, length } = id.configWritable;
      if (offset < 0 || length < 0 || offset + length > id.config.length)
        throw new Error('writable config window outside the config space');
      s[REGS.configWritableStart] = offset;
      s[REGS.configWritableEnd] = offset + length;
    }
    id.queueSizes.forEach((size, i) => {
      s[QUEUE_BASE + i * QUEUE_STRIDE + QREG.numMax] = size;
      s[QUEUE_BASE + i * QUEUE_STRIDE + QREG.num] = size;
    });
    new Uint8Array(sab, CONFIG_BYTE_OFFSET, CONFIG_SPACE_MAX).set(id.config);
    return sab;
  }

  constructor(sab: SharedArrayBuffer) {
    if (sab.byteLength !== STATE_BYTES) throw new Error('not a virtio-mmio state buffer');
    this.s = new Int32Array(sab, 0, INT32_SLOTS);
    this.config = new Uint8Array(sab, CONFIG_BYTE_OFFSET, CONFIG_SPACE_MAX);
    this.mutex = new SharedMutex(this.s, REGS.lock);
  }

  get queueCount(): number {
    return this.s[REGS.queueCount]!;
  }
  get deviceFeatures(): bigint {
    return u64n(this.s[REGS.deviceFeaturesLo]!, this.s[REGS.deviceFeaturesHi]!);
  }
  /** Slot index of a queue register (a QREG name); q must be < queueCount. */
  q(queue: number, reg: number): number {
    return QUEUE_BASE + queue * QUEUE_STRIDE + reg;
  }
  count(counter: CounterName): void {
    Atomics.add(this.s, COUNTERS[counter], 1);
  }

  counters(): VirtioCounters {
    const g = (c: CounterName) => Atomics.load(this.s, COUNTERS[c]) >>> 0;
    return {
      badAccesses: g('badAccess'),
      illegalStatus: g('illegalStatus'),
      guestErrors: g('guestErrors'),
      needsReset: g('needsReset'),
      interrupts: g('interrupts'),
    };
  }

  /** What this device is (fixed at createState). */
  identity(): TransportIdentity {
    const s = this.s;
    const queueNumMax: number[] = [];
    for (let i = 0; i < this.queueCount; i++) queueNumMax.push(s[this.q(i, QREG.numMax)]!);
    return {
      deviceId: s[REGS.deviceId]! >>> 0,
      deviceFeatures: this.deviceFeatures,
      queueNumMax,
      configLen: s[REGS.configLen]!,
    };
  }

  // ---- device-worker side ----

  /** The status, reset epoch, negotiated features and queues, read consistently. */
  snapshot(): DeviceSnapshot {
    return this.mutex.with(() => {
      const s = this.s;
      const queues: QueueConfig[] = [];
      for (let i = 0; i < this.queueCount; i++) {
        const r = (reg: number) => s[this.q(i, reg)]!;
        queues.push({
          ready: r(QREG.ready) === 1,
          size: r(QREG.num),
          desc: u64(r(QREG.descLo), r(QREG.descHi)),
          driver: u64(r(QREG.driverLo), r(QREG.driverHi)),
          device: u64(r(QREG.deviceLo), r(QREG.deviceHi)),
        });
      }
      return {
        status: s[REGS.status]!,
        epoch: s[REGS.resetEpoch]!,
        driverFeatures: u64n(s[REGS.driverFeaturesLo]!, s[REGS.driverFeaturesHi]!),
        queues,
      };
    });
  }

  /** The reset epoch now (a reset since activation means the queues must not be touched). */
  epoch(): number {
    return Atomics.load(this.s, REGS.resetEpoch);
  }

  /** Sets InterruptStatus bits (the caller then signals the irqfd); returns the bits before. */
  raise(bits: number): number {
    const was = Atomics.or(this.s, REGS.interruptStatus, bits);
    Atomics.add(this.s, COUNTERS.interrupts, 1);
    return was;
  }

  /**
   * The device changed its configuration space (§2.4.1; helper P, PATCH /drives): writes `bytes`
   * at `offset` and bumps ConfigGeneration under the lock, so a driver that reads across the
   * change sees two generations and reads again. Then, if the driver is live (DRIVER_OK), sets
   * the config-change InterruptStatus bit and returns true: the caller signals the irqfd.
   */
  changeConfig(offset: number, bytes: Uint8Array): boolean {
    const len = this.s[REGS.configLen]!;
    if (!Number.isInteger(offset) || offset < 0 || offset + bytes.length > len)
      throw new Error(
        `config change at ${offset}+${bytes.length} is outside the ${len}-byte space`,
      );
    const live = this.mutex.with(() => {
      this.config.set(bytes, offset);
      Atomics.add(this.s, REGS.configGeneration, 1);
      return (this.s[REGS.status]! & STATUS_DRIVER_OK) !== 0;
    });
    if (live) this.raise(INT_CONFIG_CHANGE);
    return live;
  }

  /**
   * Marks the device broken (§2.1.2: DEVICE_NEEDS_RESET) unless a reset happened since `epoch`.
   * Returns true when the bit was newly set: the caller raises a config-change interrupt.
   */
  markNeedsReset(epoch: number): boolean {
    const set = this.mutex.with(() => {
      const s = this.s;
      if (s[REGS.resetEpoch] !== epoch || !(s[REGS.status]! & STATUS_DRIVER_OK)) return false;
      if (s[REGS.status]! & STATUS_DEVICE_NEEDS_RESET) return false;
      s[REGS.status] = s[REGS.status]! | STATUS_DEVICE_NEEDS_RESET;
      return true;
    });
    if (set) {
      this.count('needsReset');
      this.raise(INT_CONFIG_CHANGE);
    }
    return set;
  }

  /**
   * The device worker holds no queue state of epochs before `epoch`: a Status read may return 0,
   * unless another reset came after the snapshot that saw `epoch` (then its own ack follows).
   */
  ackReset(epoch: number): void {
    const acked = this.mutex.with(() => {
      if (this.s[REGS.resetEpoch] !== epoch || this.s[REGS.resetPending] === 0) return false;
      Atomics.store(this.s, REGS.resetPending, 0);
      return true;
    });
    if (acked) Atomics.notify(this.s, REGS.resetPending);
  }

  /** True while a reset waits for the device worker. */
  resetPending(): boolean {
    return Atomics.load(this.s, REGS.resetPending) !== 0;
  }

  // ---- save / restore (transport-state.ts) ----
  //
  // Precondition for both: no vCPU is inside an MMIO access of this device (the VM is paused,
  // half-done exits completed) and no reset is pending (the device worker has caught up; see
  // VirtioDevice.quiesce). The lock still orders us against any straggler.

  /** The registers as the driver set them, and the identity they belong to. */
  savedState(): TransportState {
    return this.mutex.with(() => {
      const s = this.s;
      const queues: TransportState['queues'] = [];
      for (let i = 0; i < this.queueCount; i++) {
        const r = (reg: number) => s[this.q(i, reg)]!;
        queues.push({
          num: r(QREG.num) >>> 0,
          ready: r(QREG.ready) === 1,
          desc: u64n(r(QREG.descLo), r(QREG.descHi)),
          driver: u64n(r(QREG.driverLo), r(QREG.driverHi)),
          device: u64n(r(QREG.deviceLo), r(QREG.deviceHi)),
        });
      }
      return {
        identity: this.identity(),
        status: s[REGS.status]!,
        interruptStatus: Atomics.load(s, REGS.interruptStatus) >>> 0,
        deviceFeaturesSel: s[REGS.deviceFeaturesSel]! >>> 0,
        driverFeaturesSel: s[REGS.driverFeaturesSel]! >>> 0,
        driverFeatures: u64n(s[REGS.driverFeaturesLo]!, s[REGS.driverFeaturesHi]!),
        queueSel: s[REGS.queueSel]! >>> 0,
        configGeneration: s[REGS.configGeneration]! >>> 0,
        resetEpoch: s[REGS.resetEpoch]!,
        queues,
        config: this.config.slice(0, s[REGS.configLen]!),
      };
    });
  }

  save(): Uint8Array {
    return TransportStateV1.encode(this.savedState());
  }

  /** Decodes a saved transport and checks it against this device; changes nothing. */
  decodeSaved(bytes: Uint8Array): Result<TransportState, PersistError> {
    const r = TransportStateV1.decode(bytes);
    if (!r.ok) return r;
    const c = checkTransportState(r.value, this.identity());
    return c.ok ? ok(r.value) : err(c.error);
  }

  /**
   * Writes a state that decodeSaved (or checkTransportState against this device) accepted.
   * Counters are left as they are; a pending reset is cleared (none can be in a saved state).
   */
  applySaved(t: TransportState): void {
    this.mutex.with(() => {
      const s = this.s;
      s[REGS.status] = t.status;
      s[REGS.deviceFeaturesSel] = t.deviceFeaturesSel | 0;
      s[REGS.driverFeaturesSel] = t.driverFeaturesSel | 0;
      s[REGS.driverFeaturesLo] = lo32(t.driverFeatures);
      s[REGS.driverFeaturesHi] = hi32(t.driverFeatures);
      s[REGS.queueSel] = t.queueSel | 0;
      s[REGS.configGeneration] = t.configGeneration | 0;
      s[REGS.resetEpoch] = t.resetEpoch;
      t.queues.forEach((q, i) => {
        s[this.q(i, QREG.num)] = q.num | 0;
        s[this.q(i, QREG.ready)] = q.ready ? 1 : 0;
        s[this.q(i, QREG.descLo)] = lo32(q.desc);
        s[this.q(i, QREG.descHi)] = hi32(q.desc);
        s[this.q(i, QREG.driverLo)] = lo32(q.driver);
        s[this.q(i, QREG.driverHi)] = hi32(q.driver);
        s[this.q(i, QREG.deviceLo)] = lo32(q.device);
        s[this.q(i, QREG.deviceHi)] = hi32(q.device);
      });
      this.config.fill(0);
      this.config.set(t.config);
      Atomics.store(s, REGS.interruptStatus, t.interruptStatus | 0);
      Atomics.store(s, REGS.resetPending, 0);
    });
  }

  /** decodeSaved + applySaved: on error nothing has changed. */
  restore(bytes: Uint8Array): Result<void, PersistError> {
    const r = this.decodeSaved(bytes);
    if (!r.ok) return r;
    this.applySaved(r.value);
    return ok(undefined);
  }
}

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
import { SharedMutex } from '../../util/shared-mutex.js';
import { STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER_OK, INT_CONFIG_CHANGE } from './constants.js';

// Int32 slots.
export const S_LOCK = 0;
export const S_STATUS = 1;
export const S_INTERRUPT_STATUS = 2;
export const S_DEVICE_FEATURES_SEL = 3;
export const S_DRIVER_FEATURES_SEL = 4;
export const S_DRIVER_FEATURES_LO = 5;
export const S_DRIVER_FEATURES_HI = 6;
export const S_QUEUE_SEL = 7;
export const S_CONFIG_GENERATION = 8;
/** Incremented by every reset (Status = 0); the device worker compares it with its own copy. */
export const S_RESET_EPOCH = 9;
/**
 * 1 from the reset of a device that had reached DRIVER_OK until the device worker has dropped
 * its queues (the resetting vCPU waits on it, bounded).
 */
export const S_RESET_PENDING = 10;
export const S_DEVICE_ID = 11;
export const S_DEVICE_FEATURES_LO = 12;
export const S_DEVICE_FEATURES_HI = 13;
export const S_QUEUE_COUNT = 14;
export const S_CONFIG_LEN = 15;
// Counters (int32, wrap harmlessly), changed with Atomics.add.
export const C_BAD_ACCESS = 16; // wrong width, unknown offset, write to a read-only register
export const C_ILLEGAL_STATUS = 17; // refused status transitions and late queue writes
export const C_GUEST_ERRORS = 18; // queue / descriptor errors seen by the device worker
export const C_NEEDS_RESET = 19; // times the device marked itself broken
export const C_INTERRUPTS = 20;

const QUEUE_BASE = 32;
const QUEUE_STRIDE = 10;
export const Q_NUM_MAX = 0;
export const Q_NUM = 1;
export const Q_READY = 2;
export const Q_DESC_LO = 3;
export const Q_DESC_HI = 4;
export const Q_DRIVER_LO = 5;
export const Q_DRIVER_HI = 6;
export const Q_DEVICE_LO = 7;
export const Q_DEVICE_HI = 8;

export const MAX_QUEUES = 8;
export const CONFIG_SPACE_MAX = 256;
const INT32_SLOTS = QUEUE_BASE + MAX_QUEUES * QUEUE_STRIDE;
const CONFIG_BYTE_OFFSET = INT32_SLOTS * 4;
const STATE_BYTES = CONFIG_BYTE_OFFSET + CONFIG_SPACE_MAX;

export interface VirtioDeviceIdentity {
  deviceId: number;
  /** All feature bits the device offers (VIRTIO_F_VERSION_1 is added by createState). */
  features: bigint;
  /** QueueNumMax of each queue (each a power of two <= 32768). */
  queueSizes: number[];
  /** The device-specific configuration space (read-only for the driver). */
  config: Uint8Array;
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
    const f = id.features | featureVersion1;
    s[S_DEVICE_ID] = id.deviceId;
    s[S_DEVICE_FEATURES_LO] = Number(f & 0xffff_ffffn) | 0;
    s[S_DEVICE_FEATURES_HI] = Number((f >> 32n) & 0xffff_ffffn) | 0;
    s[S_QUEUE_COUNT] = id.queueSizes.length;
    s[S_CONFIG_LEN] = id.config.length;
    id.queueSizes.forEach((size, i) => {
      s[QUEUE_BASE + i * QUEUE_STRIDE + Q_NUM_MAX] = size;
      s[QUEUE_BASE + i * QUEUE_STRIDE + Q_NUM] = size;
    });
    new Uint8Array(sab, CONFIG_BYTE_OFFSET, CONFIG_SPACE_MAX).set(id.config);
    return sab;
  }

  constructor(sab: SharedArrayBuffer) {
    if (sab.byteLength !== STATE_BYTES) throw new Error('not a virtio-mmio state buffer');
    this.s = new Int32Array(sab, 0, INT32_SLOTS);
    this.config = new Uint8Array(sab, CONFIG_BYTE_OFFSET, CONFIG_SPACE_MAX);
    this.mutex = new SharedMutex(this.s, S_LOCK);
  }

  get queueCount(): number {
    return this.s[S_QUEUE_COUNT]!;
  }
  get deviceFeatures(): bigint {
    return (
      (BigInt(this.s[S_DEVICE_FEATURES_HI]! >>> 0) << 32n) |
      BigInt(this.s[S_DEVICE_FEATURES_LO]! >>> 0)
    );
  }
  /** Slot index of a queue register; q must be < queueCount. */
  q(queue: number, reg: number): number {
    return QUEUE_BASE + queue * QUEUE_STRIDE + reg;
  }
  count(counter: number): void {
    Atomics.add(this.s, counter, 1);
  }

  counters(): VirtioCounters {
    const g = (i: number) => Atomics.load(this.s, i) >>> 0;
    return {
      badAccesses: g(C_BAD_ACCESS),
      illegalStatus: g(C_ILLEGAL_STATUS),
      guestErrors: g(C_GUEST_ERRORS),
      needsReset: g(C_NEEDS_RESET),
      interrupts: g(C_INTERRUPTS),
    };
  }

  // ---- device-worker side ----

  /** The status, reset epoch, negotiated features and queues, read consistently. */
  snapshot(): DeviceSnapshot {
    return this.mutex.with(() => {
      const s = this.s;
      const queues: QueueConfig[] = [];
      for (let i = 0; i < this.queueCount; i++) {
        queues.push({
          ready: s[this.q(i, Q_READY)] === 1,
          size: s[this.q(i, Q_NUM)]!,
          desc: u64(s[this.q(i, Q_DESC_LO)]!, s[this.q(i, Q_DESC_HI)]!),
          driver: u64(s[this.q(i, Q_DRIVER_LO)]!, s[this.q(i, Q_DRIVER_HI)]!),
          device: u64(s[this.q(i, Q_DEVICE_LO)]!, s[this.q(i, Q_DEVICE_HI)]!),
        });
      }
      return {
        status: s[S_STATUS]!,
        epoch: s[S_RESET_EPOCH]!,
        driverFeatures:
          (BigInt(s[S_DRIVER_FEATURES_HI]! >>> 0) << 32n) | BigInt(s[S_DRIVER_FEATURES_LO]! >>> 0),
        queues,
      };
    });
  }

  /** The reset epoch now (a reset since activation means the queues must not be touched). */
  epoch(): number {
    return Atomics.load(this.s, S_RESET_EPOCH);
  }

  /** Sets InterruptStatus bits; the caller then signals the irqfd. */
  raise(bits: number): void {
    Atomics.or(this.s, S_INTERRUPT_STATUS, bits);
    Atomics.add(this.s, C_INTERRUPTS, 1);
  }

  /**
   * Marks the device broken (§2.1.2: DEVICE_NEEDS_RESET) unless a reset happened since `epoch`.
   * Returns true when the bit was newly set: the caller raises a config-change interrupt.
   */
  markNeedsReset(epoch: number): boolean {
    const set = this.mutex.with(() => {
      const s = this.s;
      if (s[S_RESET_EPOCH] !== epoch || !(s[S_STATUS]! & STATUS_DRIVER_OK)) return false;
      if (s[S_STATUS]! & STATUS_DEVICE_NEEDS_RESET) return false;
      s[S_STATUS] = s[S_STATUS]! | STATUS_DEVICE_NEEDS_RESET;
      return true;
    });
    if (set) {
      this.count(C_NEEDS_RESET);
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
      if (this.s[S_RESET_EPOCH] !== epoch || this.s[S_RESET_PENDING] === 0) return false;
      Atomics.store(this.s, S_RESET_PENDING, 0);
      return true;
    });
    if (acked) Atomics.notify(this.s, S_RESET_PENDING);
  }

  /** True while a reset waits for the device worker. */
  resetPending(): boolean {
    return Atomics.load(this.s, S_RESET_PENDING) !== 0;
  }
}

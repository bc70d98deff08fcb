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
 *
 * The register page. Every virtio-mmio register the driver reads is free of side effects (even
 * InterruptStatus: InterruptACK clears it), so where KVM has read-only memory slots the main
 * thread maps one 4 KiB page per device at its MMIO window (vmm/register-pages.ts): the guest's
 * reads are plain loads, and only its writes exit (KVM turns a write to a read-only slot into an
 * MMIO exit). This register file stays the truth; the page is its published copy, rewritten by
 * whoever changes what a read returns: under the lock (`publish`), and for InterruptStatus,
 * which changes without the lock, by `publishInterruptStatus`, which repeats until the page
 * holds the register's value as it is after its own store. So the page never misses a bit that
 * was set before an interrupt was raised. A read of a register the driver may not read (a
 * write-only one, a reserved offset, a wrong width) returns what the page holds there (zeros,
 * or part of a register) rather than zero and a `badAccess` count.
 */
import { slots, type PersistError } from '../../util/persist.js';
import { err, ok, type Result } from '../../util/result.js';
import { SharedMutex } from '../../util/shared-mutex.js';
import {
  CONFIG_SPACE_MAX,
  INT_CONFIG_CHANGE,
  INT_USED_BUFFER,
  MAX_QUEUES,
  STATUS_DEVICE_NEEDS_RESET,
  STATUS_DRIVER_OK,
  VENDOR_ID,
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
  /**
   * The host address of the device's register page (0: none), as two 32-bit halves: a 4 KiB
   * mapping that KVM maps read-only at the device's MMIO window, so the driver's register reads
   * are loads, not exits (see "The register page" below). Written once, by the main thread.
   */
  'pageAddrLo',
  'pageAddrHi',
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

/** The register page's size: the device's MMIO window (one page). */
export const REGISTER_PAGE_BYTES = 4096;

/** Register offsets (§4.2.2, Linux include/uapi/linux/virtio_mmio.h). */
export const REG = {
  MAGIC: 0x000,
  VERSION: 0x004,
  DEVICE_ID: 0x008,
  VENDOR_ID: 0x00c,
  DEVICE_FEATURES: 0x010,
  DEVICE_FEATURES_SEL: 0x014,
  DRIVER_FEATURES: 0x020,
  DRIVER_FEATURES_SEL: 0x024,
  QUEUE_SEL: 0x030,
  QUEUE_NUM_MAX: 0x034,
  QUEUE_NUM: 0x038,
  QUEUE_READY: 0x044,
  QUEUE_NOTIFY: 0x050,
  INTERRUPT_STATUS: 0x060,
  INTERRUPT_ACK: 0x064,
  STATUS: 0x070,
  QUEUE_DESC_LOW: 0x080,
  QUEUE_DESC_HIGH: 0x084,
  QUEUE_DRIVER_LOW: 0x090,
  QUEUE_DRIVER_HIGH: 0x094,
  QUEUE_DEVICE_LOW: 0x0a0,
  QUEUE_DEVICE_HIGH: 0x0a4,
  SHM_SEL: 0x0ac,
  SHM_LEN_LOW: 0x0b0,
  SHM_LEN_HIGH: 0x0b4,
  SHM_BASE_LOW: 0x0b8,
  SHM_BASE_HIGH: 0x0bc,
  CONFIG_GENERATION: 0x0fc,
  CONFIG: 0x100,
} as const;

export const MMIO_MAGIC = 0x7472_6976; // "virt"
export const MMIO_VERSION = 2;

/**
 * Wraps a host address as an ArrayBuffer of `length` bytes (the shim's viewAddress): set once per
 * thread by the vmm layer (devices do not reach the shim), before a state with a register page is
 * opened on that thread.
 */
let pageMapper: ((addr: bigint, length: number) => ArrayBuffer) | undefined;
export function setRegisterPageMapper(f: (addr: bigint, length: number) => ArrayBuffer): void {
  pageMapper = f;
}
/** One view of each state's page per thread. */
const pageViews = new WeakMap<SharedArrayBuffer, Int32Array>();

export class VirtioMmioState {
  readonly s: Int32Array;
  readonly config: Uint8Array;
  readonly mutex: SharedMutex;
  /** The register page (see above), or undefined: every read exits and mmio.ts answers it. */
  private page: Int32Array | undefined;
  private pageBytes: Uint8Array | undefined;

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
    this.openPage(sab);
  }

  private openPage(sab: SharedArrayBuffer): void {
    const addr = this.pageAddress();
    if (addr === 0n) return;
    let view = pageViews.get(sab);
    if (!view) {
      if (!pageMapper) throw new Error('a virtio register page, but no page mapper on this thread');
      view = new Int32Array(pageMapper(addr, REGISTER_PAGE_BYTES));
      pageViews.set(sab, view);
    }
    this.page = view;
    this.pageBytes = new Uint8Array(view.buffer, view.byteOffset, REGISTER_PAGE_BYTES);
  }

  private pageAddress(): bigint {
    const s = this.s;
    return (BigInt(s[REGS.pageAddrHi]! >>> 0) << 32n) | BigInt(s[REGS.pageAddrLo]! >>> 0);
  }

  /**
   * Main thread, before any other thread opens this state: `buf` (REGISTER_PAGE_BYTES, mapped
   * for the VM's life, at host address `addr`) becomes the register page, filled in now.
   */
  attachPage(buf: ArrayBuffer, addr: bigint): void {
    if (buf.byteLength !== REGISTER_PAGE_BYTES || addr === 0n) throw new Error('bad register page');
    if (this.page) throw new Error('the register page is already attached');
    this.s[REGS.pageAddrLo] = Number(addr & 0xffff_ffffn) | 0;
    this.s[REGS.pageAddrHi] = Number(addr >> 32n) | 0;
    this.page = new Int32Array(buf);
    this.pageBytes = new Uint8Array(buf);
    this.mutex.with(() => this.publish());
  }

  /**
   * Main thread, after the vCPUs and the device worker are gone, before the page is unmapped:
   * states opened from now on have no page.
   */
  detachPage(): void {
    this.mutex.with(() => {
      this.s[REGS.pageAddrLo] = 0;
      this.s[REGS.pageAddrHi] = 0;
      this.page = undefined;
      this.pageBytes = undefined;
    });
  }

  /** True when the driver's reads are answered by the register page. */
  get hasPage(): boolean {
    return this.page !== undefined;
  }

  /**
   * What a 32-bit read of register `offset` (below the config space) returns, or undefined for
   * a write-only or reserved one. No side effects (that is what lets the page answer reads).
   */
  registerValue(offset: number): number | undefined {
    const s = this.s;
    const qsel = Atomics.load(s, REGS.queueSel);
    const qOk = qsel >= 0 && qsel < this.queueCount;
    switch (offset) {
      case REG.MAGIC:
        return MMIO_MAGIC;
      case REG.VERSION:
        return MMIO_VERSION;
      case REG.DEVICE_ID:
        return s[REGS.deviceId]!;
      case REG.VENDOR_ID:
        return VENDOR_ID;
      case REG.DEVICE_FEATURES: {
        const sel = Atomics.load(s, REGS.deviceFeaturesSel);
        return sel === 0 ? s[REGS.deviceFeaturesLo]! : sel === 1 ? s[REGS.deviceFeaturesHi]! : 0;
      }
      case REG.QUEUE_NUM_MAX:
        return qOk ? s[this.q(qsel, QREG.numMax)]! : 0; // 0: the queue does not exist (§4.2.3.2)
      case REG.QUEUE_READY:
        return qOk ? Atomics.load(s, this.q(qsel, QREG.ready)) : 0;
      case REG.INTERRUPT_STATUS:
        return Atomics.load(s, REGS.interruptStatus);
      case REG.STATUS:
        return Atomics.load(s, REGS.status);
      case REG.SHM_LEN_LOW:
      case REG.SHM_LEN_LOW + 4:
      case REG.SHM_LEN_LOW + 8:
      case REG.SHM_BASE_HIGH:
        return 0xffff_ffff; // no shared memory regions: length -1 (§4.2.2)
      case REG.CONFIG_GENERATION:
        return Atomics.load(s, REGS.configGeneration);
      default:
        return undefined; // write-only or reserved
    }
  }

  /**
   * Rewrites the register page from the register file (no page: nothing). Under the lock, so
   * two publishers do not interleave; the config space first, then its generation.
   */
  publish(): void {
    const page = this.page;
    if (!page) return;
    for (let off = 0; off < REG.CONFIG; off += 4) {
      if (off === REG.INTERRUPT_STATUS) continue;
      Atomics.store(page, off >> 2, this.registerValue(off) ?? 0);
    }
    const len = this.s[REGS.configLen]!;
    this.pageBytes!.set(this.config.subarray(0, len), REG.CONFIG);
    Atomics.store(page, REG.CONFIG_GENERATION >> 2, Atomics.load(this.s, REGS.configGeneration));
    this.publishInterruptStatus();
  }

  /**
   * Copies InterruptStatus to the page after a change, by any thread, with or without the lock:
   * stores what it read, then compares (a locked instruction, so the store is visible first)
   * and stores again until the register still holds what was stored. A publisher that read a
   * value another has since changed stores again, so the last store holds the latest value.
   */
  publishInterruptStatus(): void {
    const page = this.page;
    if (!page) return;
    const s = this.s;
    let v = Atomics.load(s, REGS.interruptStatus);
    for (;;) {
      Atomics.store(page, REG.INTERRUPT_STATUS >> 2, v);
      const now = Atomics.compareExchange(s, REGS.interruptStatus, v, v);
      if (now === v) return;
      v = now;
    }
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

  /**
   * Acknowledgements that did not exit (vmm/virtio-plan.ts `ackFd`: KVM signals an eventfd when
   * the guest writes InterruptACK = INT_USED_BUFFER): `source` returns how many came since it
   * was last asked (0: none). They are applied before InterruptStatus is next set or saved, in
   * this thread (the device worker's, the only one that raises used-buffer interrupts): an
   * acknowledgement the guest wrote before we set the bit again clears it first, as if it had
   * exited then, so a bit set after it is never taken away. Until then the bit stays set, and
   * a handler that runs meanwhile (no interrupt of ours: every one is raised after applying)
   * only finds its rings with nothing new.
   */
  setAckSource(source: () => number): void {
    this.ackSource = source;
  }
  private ackSource: (() => number) | undefined;

  private applyAcks(): void {
    if (this.ackSource && this.ackSource() > 0) {
      Atomics.and(this.s, REGS.interruptStatus, ~INT_USED_BUFFER);
      this.publishInterruptStatus();
    }
  }

  /** Sets InterruptStatus bits (the caller then signals the irqfd); returns the bits before. */
  raise(bits: number): number {
    this.applyAcks();
    const was = Atomics.or(this.s, REGS.interruptStatus, bits);
    this.publishInterruptStatus();
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
      const on = (this.s[REGS.status]! & STATUS_DRIVER_OK) !== 0;
      // The bit is set before the new bytes are published: a driver that reads the register
      // page (no exit between its reads) sees the change and its interrupt bit together.
      if (on) Atomics.or(this.s, REGS.interruptStatus, INT_CONFIG_CHANGE);
      this.publish();
      return on;
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
      Atomics.or(s, REGS.interruptStatus, INT_CONFIG_CHANGE); // before the status is published
      this.publish();
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
    this.applyAcks();
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
      this.publish();
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

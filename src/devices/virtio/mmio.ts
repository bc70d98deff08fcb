/**
 * The virtio-mmio transport, version 2 (virtio 1.2 §4.2.2), as a BusDevice. Every vCPU worker
 * builds its own MmioTransport over the device's shared register file (mmio-state.ts), so a
 * register access is answered in the thread that took the MMIO exit, with no round trip.
 *
 * The device worker hears about two events only: DRIVER_OK (activate the queues) and a reset of
 * an activated device (drop them). Both write its control eventfd through `hooks.lifecycle()`.
 * A reset waits (bounded) until the device worker has dropped its queues, so that once the
 * guest's `Status = 0` write completes the device no longer touches the old rings: Linux's
 * virtio_mmio vm_reset() does not poll Status afterwards.
 */
import type { BusDevice } from '../bus.js';
import {
  STATUS_ACKNOWLEDGE,
  STATUS_DEVICE_NEEDS_RESET,
  STATUS_DRIVER,
  STATUS_DRIVER_OK,
  STATUS_FAILED,
  STATUS_FEATURES_OK,
  VENDOR_ID,
  VIRTIO_F_VERSION_1,
  bit,
} from './constants.js';
import {
  C_BAD_ACCESS,
  C_ILLEGAL_STATUS,
  Q_DESC_HI,
  Q_DESC_LO,
  Q_DEVICE_HI,
  Q_DEVICE_LO,
  Q_DRIVER_HI,
  Q_DRIVER_LO,
  Q_NUM,
  Q_NUM_MAX,
  Q_READY,
  S_CONFIG_GENERATION,
  S_CONFIG_LEN,
  S_DEVICE_FEATURES_HI,
  S_DEVICE_FEATURES_LO,
  S_DEVICE_FEATURES_SEL,
  S_DEVICE_ID,
  S_DRIVER_FEATURES_HI,
  S_DRIVER_FEATURES_LO,
  S_DRIVER_FEATURES_SEL,
  S_INTERRUPT_STATUS,
  S_QUEUE_SEL,
  S_RESET_EPOCH,
  S_RESET_PENDING,
  S_STATUS,
  VirtioMmioState,
} from './mmio-state.js';

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

export interface MmioTransportHooks {
  /** DRIVER_OK was set, or an activated device was reset: wake the device worker. */
  lifecycle(): void;
  /** A QueueNotify write that reached the VMM (KVM's ioeventfd did not take it): kick the queue. */
  notify(queue: number): void;
}

export interface MmioTransportOptions {
  /** How long a reset waits for the device worker to drop its queues (ms). */
  resetWaitMs?: number;
}

const DEFAULT_RESET_WAIT_MS = 1000;

export class MmioTransport implements BusDevice {
  readonly state: VirtioMmioState;
  private readonly resetWaitMs: number;

  constructor(
    sab: SharedArrayBuffer,
    private readonly hooks: MmioTransportHooks,
    opts: MmioTransportOptions = {},
  ) {
    this.state = new VirtioMmioState(sab);
    this.resetWaitMs = opts.resetWaitMs ?? DEFAULT_RESET_WAIT_MS;
  }

  read(offset: number, data: Uint8Array): void {
    if (offset >= REG.CONFIG) {
      this.readConfig(offset - REG.CONFIG, data);
      return;
    }
    const v = data.length === 4 && (offset & 3) === 0 ? this.readRegister(offset) : undefined;
    if (v === undefined) {
      this.state.count(C_BAD_ACCESS);
      data.fill(0);
      return;
    }
    new DataView(data.buffer, data.byteOffset, 4).setUint32(0, v >>> 0, true);
  }

  write(offset: number, data: Uint8Array): void {
    if (offset >= REG.CONFIG) {
      // No device of ours has writable config fields (virtio-blk's writeback is not offered).
      this.state.count(C_BAD_ACCESS);
      return;
    }
    if (data.length !== 4 || (offset & 3) !== 0) {
      this.state.count(C_BAD_ACCESS);
      return;
    }
    const v = new DataView(data.buffer, data.byteOffset, 4).getUint32(0, true);
    if (offset === REG.QUEUE_NOTIFY) {
      if (v < this.state.queueCount && this.driverOk()) this.hooks.notify(v);
      else this.state.count(C_BAD_ACCESS);
      return;
    }
    const effect = this.state.mutex.with(() => this.writeRegister(offset, v));
    if (effect === 'lifecycle') this.hooks.lifecycle();
    else if (effect === 'reset') this.waitForReset();
  }

  private driverOk(): boolean {
    return (Atomics.load(this.state.s, S_STATUS) & STATUS_DRIVER_OK) !== 0;
  }

  private readConfig(off: number, data: Uint8Array): void {
    const len = this.state.s[S_CONFIG_LEN]!;
    if (off + data.length > len || ![1, 2, 4, 8].includes(data.length)) {
      this.state.count(C_BAD_ACCESS);
      data.fill(0);
      return;
    }
    data.set(this.state.config.subarray(off, off + data.length));
  }

  private readRegister(offset: number): number | undefined {
    const st = this.state;
    const s = st.s;
    const qsel = Atomics.load(s, S_QUEUE_SEL);
    const qOk = qsel >= 0 && qsel < st.queueCount;
    switch (offset) {
      case REG.MAGIC:
        return MMIO_MAGIC;
      case REG.VERSION:
        return MMIO_VERSION;
      case REG.DEVICE_ID:
        return s[S_DEVICE_ID]!;
      case REG.VENDOR_ID:
        return VENDOR_ID;
      case REG.DEVICE_FEATURES: {
        const sel = Atomics.load(s, S_DEVICE_FEATURES_SEL);
        return sel === 0 ? s[S_DEVICE_FEATURES_LO]! : sel === 1 ? s[S_DEVICE_FEATURES_HI]! : 0;
      }
      case REG.QUEUE_NUM_MAX:
        return qOk ? s[st.q(qsel, Q_NUM_MAX)]! : 0; // 0: the queue does not exist (§4.2.3.2)
      case REG.QUEUE_READY:
        return qOk ? Atomics.load(s, st.q(qsel, Q_READY)) : 0;
      case REG.INTERRUPT_STATUS:
        return Atomics.load(s, S_INTERRUPT_STATUS);
      case REG.STATUS:
        return Atomics.load(s, S_STATUS);
      case REG.SHM_LEN_LOW:
      case REG.SHM_LEN_HIGH:
      case REG.SHM_BASE_LOW:
      case REG.SHM_BASE_HIGH:
        return 0xffff_ffff; // no shared memory regions: length -1 (§4.2.2)
      case REG.CONFIG_GENERATION:
        return Atomics.load(s, S_CONFIG_GENERATION);
      default:
        return undefined; // write-only or reserved
    }
  }

  /** Runs under the lock. */
  private writeRegister(offset: number, v: number): 'none' | 'lifecycle' | 'reset' {
    const st = this.state;
    const s = st.s;
    const status = s[S_STATUS]!;
    const qsel = s[S_QUEUE_SEL]!;
    switch (offset) {
      case REG.DEVICE_FEATURES_SEL:
        s[S_DEVICE_FEATURES_SEL] = v;
        return 'none';
      case REG.DRIVER_FEATURES_SEL:
        s[S_DRIVER_FEATURES_SEL] = v;
        return 'none';
      case REG.DRIVER_FEATURES: {
        // Features are negotiated between DRIVER and FEATURES_OK only (§3.1.1).
        if (!(status & STATUS_DRIVER) || status & STATUS_FEATURES_OK) {
          st.count(C_ILLEGAL_STATUS);
          return 'none';
        }
        const sel = s[S_DRIVER_FEATURES_SEL];
        if (sel === 0) s[S_DRIVER_FEATURES_LO] = v;
        else if (sel === 1) s[S_DRIVER_FEATURES_HI] = v;
        else if (v !== 0) st.count(C_ILLEGAL_STATUS); // bits we never offer
        return 'none';
      }
      case REG.QUEUE_SEL:
        s[S_QUEUE_SEL] = v;
        return 'none';
      case REG.QUEUE_NUM:
      case REG.QUEUE_READY:
      case REG.QUEUE_DESC_LOW:
      case REG.QUEUE_DESC_HIGH:
      case REG.QUEUE_DRIVER_LOW:
      case REG.QUEUE_DRIVER_HIGH:
      case REG.QUEUE_DEVICE_LOW:
      case REG.QUEUE_DEVICE_HIGH:
        this.writeQueueRegister(offset, qsel, v, status);
        return 'none';
      case REG.INTERRUPT_ACK:
        Atomics.and(s, S_INTERRUPT_STATUS, ~v);
        return 'none';
      case REG.STATUS:
        return this.writeStatus(status, v);
      default:
        st.count(C_BAD_ACCESS);
        return 'none';
    }
  }

  /** Queue registers change only while the queue is being set up: before DRIVER_OK (§4.2.3.2). */
  private writeQueueRegister(offset: number, qsel: number, v: number, status: number): void {
    const st = this.state;
    const s = st.s;
    if (qsel < 0 || qsel >= st.queueCount) {
      st.count(C_BAD_ACCESS);
      return;
    }
    if (status & STATUS_DRIVER_OK || !(status & STATUS_FEATURES_OK)) {
      st.count(C_ILLEGAL_STATUS);
      return;
    }
    const ready = s[st.q(qsel, Q_READY)] === 1;
    if (offset === REG.QUEUE_READY) {
      if (v === 0) {
        s[st.q(qsel, Q_READY)] = 0;
      } else {
        const size = s[st.q(qsel, Q_NUM)]!;
        const max = s[st.q(qsel, Q_NUM_MAX)]!;
        // Queue size non-zero, a power of two, <= QueueNumMax (§2.7): else the queue stays off.
        if (size > 0 && size <= max && (size & (size - 1)) === 0) s[st.q(qsel, Q_READY)] = 1;
        else st.count(C_ILLEGAL_STATUS);
      }
      return;
    }
    if (ready) {
      st.count(C_ILLEGAL_STATUS); // the driver must write QueueReady=0 first
      return;
    }
    const reg = {
      [REG.QUEUE_NUM]: Q_NUM,
      [REG.QUEUE_DESC_LOW]: Q_DESC_LO,
      [REG.QUEUE_DESC_HIGH]: Q_DESC_HI,
      [REG.QUEUE_DRIVER_LOW]: Q_DRIVER_LO,
      [REG.QUEUE_DRIVER_HIGH]: Q_DRIVER_HI,
      [REG.QUEUE_DEVICE_LOW]: Q_DEVICE_LO,
      [REG.QUEUE_DEVICE_HIGH]: Q_DEVICE_HI,
    }[offset];
    if (reg !== undefined) s[st.q(qsel, reg)] = v;
  }

  /**
   * The device status state machine (§2.1, §3.1.1). The driver only ever adds bits, one step at
   * a time, until a reset (0). Illegal writes are ignored and counted.
   */
  private writeStatus(cur: number, v: number): 'none' | 'lifecycle' | 'reset' {
    const st = this.state;
    const s = st.s;
    if (v === 0) return this.reset(cur);
    // DEVICE_NEEDS_RESET is the device's bit; the driver's copy of it is ignored.
    const next = (v & 0xff & ~STATUS_DEVICE_NEEDS_RESET) | (cur & STATUS_DEVICE_NEEDS_RESET);
    const added = next & ~cur;
    const legal =
      (next & cur) === cur && // no bit cleared
      (!(next & STATUS_DRIVER) || next & STATUS_ACKNOWLEDGE) &&
      (!(next & STATUS_FEATURES_OK) || next & STATUS_DRIVER) &&
      (!(next & STATUS_DRIVER_OK) || next & STATUS_FEATURES_OK) &&
      (next &
        ~(
          STATUS_ACKNOWLEDGE |
          STATUS_DRIVER |
          STATUS_FEATURES_OK |
          STATUS_DRIVER_OK |
          STATUS_FAILED |
          STATUS_DEVICE_NEEDS_RESET
        )) ===
        0;
    if (!legal) {
      st.count(C_ILLEGAL_STATUS);
      return 'none';
    }
    if (added & STATUS_FEATURES_OK && !this.featuresAcceptable()) {
      // Not setting FEATURES_OK is how the device refuses (§3.1.1 step 6: the driver re-reads).
      st.count(C_ILLEGAL_STATUS);
      s[S_STATUS] = next & ~STATUS_FEATURES_OK & ~STATUS_DRIVER_OK;
      return 'none';
    }
    s[S_STATUS] = next;
    return added & STATUS_DRIVER_OK && !(next & STATUS_FAILED) ? 'lifecycle' : 'none';
  }

  /** Driver features must be a subset of ours and include VIRTIO_F_VERSION_1 (modern only). */
  private featuresAcceptable(): boolean {
    const s = this.state.s;
    const driver =
      (BigInt(s[S_DRIVER_FEATURES_HI]! >>> 0) << 32n) | BigInt(s[S_DRIVER_FEATURES_LO]! >>> 0);
    const device = this.state.deviceFeatures;
    return (driver & ~device) === 0n && (driver & bit(VIRTIO_F_VERSION_1)) !== 0n;
  }

  /** Status = 0 (§2.4): every register back to its initial value, queues forgotten. */
  private reset(cur: number): 'none' | 'reset' {
    const st = this.state;
    const s = st.s;
    s[S_STATUS] = 0;
    s[S_DEVICE_FEATURES_SEL] = 0;
    s[S_DRIVER_FEATURES_SEL] = 0;
    s[S_DRIVER_FEATURES_LO] = 0;
    s[S_DRIVER_FEATURES_HI] = 0;
    s[S_QUEUE_SEL] = 0;
    for (let i = 0; i < st.queueCount; i++) {
      s[st.q(i, Q_NUM)] = s[st.q(i, Q_NUM_MAX)]!;
      for (const r of [
        Q_READY,
        Q_DESC_LO,
        Q_DESC_HI,
        Q_DRIVER_LO,
        Q_DRIVER_HI,
        Q_DEVICE_LO,
        Q_DEVICE_HI,
      ]) {
        s[st.q(i, r)] = 0;
      }
    }
    Atomics.store(s, S_INTERRUPT_STATUS, 0);
    Atomics.add(s, S_RESET_EPOCH, 1);
    if (!(cur & STATUS_DRIVER_OK)) return 'none';
    Atomics.store(s, S_RESET_PENDING, 1);
    return 'reset';
  }

  /** After the reset of an activated device: wake the device worker and wait for its ack. */
  private waitForReset(): void {
    this.hooks.lifecycle();
    const s = this.state.s;
    const deadline = Date.now() + this.resetWaitMs;
    for (;;) {
      const left = deadline - Date.now();
      if (Atomics.load(s, S_RESET_PENDING) === 0 || left <= 0) return;
      Atomics.wait(s, S_RESET_PENDING, 1, left);
    }
  }
}

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
  VIRTIO_F_VERSION_1,
  bit,
} from './constants.js';
import { MMIO_MAGIC, MMIO_VERSION, QREG, REG, REGS, VirtioMmioState } from './mmio-state.js';

export { MMIO_MAGIC, MMIO_VERSION, REG };

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
    const v =
      data.length === 4 && (offset & 3) === 0 ? this.state.registerValue(offset) : undefined;
    if (v === undefined) {
      this.state.count('badAccess');
      data.fill(0);
      return;
    }
    // Little-endian, byte by byte: no DataView made per access.
    data[0] = v;
    data[1] = v >>> 8;
    data[2] = v >>> 16;
    data[3] = v >>> 24;
  }

  write(offset: number, data: Uint8Array): void {
    if (offset >= REG.CONFIG) {
      // Only a device's declared window is writable (virtio-balloon's `actual`; virtio-blk's
      // writeback is not offered).
      const off = offset - REG.CONFIG;
      const s = this.state.s;
      const n = data.length;
      if (
        (n !== 1 && n !== 2 && n !== 4) ||
        off < s[REGS.configWritableStart]! ||
        off + data.length > s[REGS.configWritableEnd]!
      ) {
        this.state.count('badAccess');
        return;
      }
      this.state.mutex.with(() => {
        this.state.config.set(data, off);
        this.state.publish();
      });
      return;
    }
    if (data.length !== 4 || (offset & 3) !== 0) {
      this.state.count('badAccess');
      return;
    }
    const v = (data[0]! | (data[1]! << 8) | (data[2]! << 16) | (data[3]! << 24)) >>> 0;
    if (offset === REG.QUEUE_NOTIFY) {
      if (v < this.state.queueCount && this.driverOk()) this.hooks.notify(v);
      else this.state.count('badAccess');
      return;
    }
    if (offset === REG.INTERRUPT_ACK) {
      // The hot write (one per interrupt): no lock, only InterruptStatus's copy in the page.
      Atomics.and(this.state.s, REGS.interruptStatus, ~v);
      this.state.publishInterruptStatus();
      return;
    }
    const effect = this.state.mutex.with(() => {
      const e = this.writeRegister(offset, v);
      this.state.publish();
      return e;
    });
    if (effect === 'lifecycle') this.hooks.lifecycle();
    else if (effect === 'reset') this.waitForReset();
  }

  private driverOk(): boolean {
    return (Atomics.load(this.state.s, REGS.status) & STATUS_DRIVER_OK) !== 0;
  }

  private readConfig(off: number, data: Uint8Array): void {
    const len = this.state.s[REGS.configLen]!;
    if (off + data.length > len || ![1, 2, 4, 8].includes(data.length)) {
      this.state.count('badAccess');
      data.fill(0);
      return;
    }
    data.set(this.state.config.subarray(off, off + data.length));
  }

  /** Runs under the lock. */
  private writeRegister(offset: number, v: number): 'none' | 'lifecycle' | 'reset' {
    const st = this.state;
    const s = st.s;
    const status = s[REGS.status]!;
    const qsel = s[REGS.queueSel]!;
    switch (offset) {
      case REG.DEVICE_FEATURES_SEL:
        s[REGS.deviceFeaturesSel] = v;
        return 'none';
      case REG.DRIVER_FEATURES_SEL:
        s[REGS.driverFeaturesSel] = v;
        return 'none';
      case REG.DRIVER_FEATURES: {
        // Features are negotiated between DRIVER and FEATURES_OK only (§3.1.1).
        if (!(status & STATUS_DRIVER) || status & STATUS_FEATURES_OK) {
          st.count('illegalStatus');
          return 'none';
        }
        const sel = s[REGS.driverFeaturesSel];
        if (sel === 0) s[REGS.driverFeaturesLo] = v;
        else if (sel === 1) s[REGS.driverFeaturesHi] = v;
        else if (v !== 0) st.count('illegalStatus'); // bits we never offer
        return 'none';
      }
      case REG.QUEUE_SEL:
        s[REGS.queueSel] = v;
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
      case REG.STATUS:
        return this.writeStatus(status, v);
      default:
        st.count('badAccess');
        return 'none';
    }
  }

  /** Queue registers change only while the queue is being set up: before DRIVER_OK (§4.2.3.2). */
  private writeQueueRegister(offset: number, qsel: number, v: number, status: number): void {
    const st = this.state;
    const s = st.s;
    if (qsel < 0 || qsel >= st.queueCount) {
      st.count('badAccess');
      return;
    }
    if (status & STATUS_DRIVER_OK || !(status & STATUS_FEATURES_OK)) {
      st.count('illegalStatus');
      return;
    }
    const ready = s[st.q(qsel, QREG.ready)] === 1;
    if (offset === REG.QUEUE_READY) {
      if (v === 0) {
        s[st.q(qsel, QREG.ready)] = 0;
      } else {
        const size = s[st.q(qsel, QREG.num)]!;
        const max = s[st.q(qsel, QREG.numMax)]!;
        // Queue size non-zero, a power of two, <= QueueNumMax (§2.7): else the queue stays off.
        if (size > 0 && size <= max && (size & (size - 1)) === 0) s[st.q(qsel, QREG.ready)] = 1;
        else st.count('illegalStatus');
      }
      return;
    }
    if (ready) {
      st.count('illegalStatus'); // the driver must write QueueReady=0 first
      return;
    }
    const reg = {
      [REG.QUEUE_NUM]: QREG.num,
      [REG.QUEUE_DESC_LOW]: QREG.descLo,
      [REG.QUEUE_DESC_HIGH]: QREG.descHi,
      [REG.QUEUE_DRIVER_LOW]: QREG.driverLo,
      [REG.QUEUE_DRIVER_HIGH]: QREG.driverHi,
      [REG.QUEUE_DEVICE_LOW]: QREG.deviceLo,
      [REG.QUEUE_DEVICE_HIGH]: QREG.deviceHi,
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
      st.count('illegalStatus');
      return 'none';
    }
    if (added & STATUS_FEATURES_OK && !this.featuresAcceptable()) {
      // Not setting FEATURES_OK is how the device refuses (§3.1.1 step 6: the driver re-reads).
      st.count('illegalStatus');
      s[REGS.status] = next & ~STATUS_FEATURES_OK & ~STATUS_DRIVER_OK;
      return 'none';
    }
    s[REGS.status] = next;
    return added & STATUS_DRIVER_OK && !(next & STATUS_FAILED) ? 'lifecycle' : 'none';
  }

  /** Driver features must be a subset of ours and include VIRTIO_F_VERSION_1 (modern only). */
  private featuresAcceptable(): boolean {
    const s = this.state.s;
    const driver =
      (BigInt(s[REGS.driverFeaturesHi]! >>> 0) << 32n) | BigInt(s[REGS.driverFeaturesLo]! >>> 0);
    const device = this.state.deviceFeatures;
    return (driver & ~device) === 0n && (driver & bit(VIRTIO_F_VERSION_1)) !== 0n;
  }

  /** Status = 0 (§2.4): every register back to its initial value, queues forgotten. */
  private reset(cur: number): 'none' | 'reset' {
    const st = this.state;
    const s = st.s;
    s[REGS.status] = 0;
    s[REGS.deviceFeaturesSel] = 0;
    s[REGS.driverFeaturesSel] = 0;
    s[REGS.driverFeaturesLo] = 0;
    s[REGS.driverFeaturesHi] = 0;
    s[REGS.queueSel] = 0;
    for (let i = 0; i < st.queueCount; i++) {
      s[st.q(i, QREG.num)] = s[st.q(i, QREG.numMax)]!;
      for (const r of [
        QREG.ready,
        QREG.descLo,
        QREG.descHi,
        QREG.driverLo,
        QREG.driverHi,
        QREG.deviceLo,
        QREG.deviceHi,
      ]) {
        s[st.q(i, r)] = 0;
      }
    }
    Atomics.store(s, REGS.interruptStatus, 0);
    Atomics.add(s, REGS.resetEpoch, 1);
    if (!(cur & STATUS_DRIVER_OK)) return 'none';
    Atomics.store(s, REGS.resetPending, 1);
    return 'reset';
  }

  /** After the reset of an activated device: wake the device worker and wait for its ack. */
  private waitForReset(): void {
    this.hooks.lifecycle();
    const s = this.state.s;
    const deadline = Date.now() + this.resetWaitMs;
    for (;;) {
      const left = deadline - Date.now();
      if (Atomics.load(s, REGS.resetPending) === 0 || left <= 0) return;
      Atomics.wait(s, REGS.resetPending, 1, left);
    }
  }
}

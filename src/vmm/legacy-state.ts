/**
 * The legacy devices' saved state ('legacy-devices' v1): the 16550's registers and unread
 * input, the i8042's registers and keyboard queue, the RTC's index, clock offset and CMOS bytes.
 * Not saved: lock words, waiter flags and counters (host-side statistics), the ACPI PM block
 * (counters only), the unhandled-access statistics and the console output ring (flushed before
 * a save; host-side).
 *
 * Decoding bounds every field (the file is hostile input): the ring and queue by their
 * capacity, the CMOS to exactly 128 bytes, registers to a byte; the device classes check the
 * remaining ranges again when the state is put back.
 */
import { I8042, I8042_KBD_QUEUE_SIZE, type I8042SavedState } from '../devices/legacy/i8042.js';
import { RtcCmos, RTC_CMOS_SIZE, type RtcSavedState } from '../devices/legacy/rtc.js';
import {
  Serial16550,
  SERIAL_RX_RING_SIZE,
  SERIAL_SAVED_MAX,
  type SerialSavedState,
} from '../devices/legacy/serial.js';
import {
  bytes,
  f64,
  i32,
  PersistError,
  struct,
  u8,
  versioned,
  type Codec,
  type Infer,
} from '../util/persist.js';
import type { LegacyDeviceState } from './legacy-devices.js';

/** An integer codec (stored as i32) that refuses values outside [min, max] when decoding. */
function ranged(min: number, max: number): Codec<number> {
  return {
    kind: `i32(${min}..${max})`,
    write(w, v, path) {
      if (!Number.isInteger(v) || v < min || v > max)
        throw new PersistError(`${path}: ${String(v)} is out of range (${min}..${max})`);
      i32.write(w, v, path);
    },
    read(r, path) {
      const v = i32.read(r, path);
      if (v < min || v > max)
        throw new PersistError(`${path}: ${v} is out of range (${min}..${max})`);
      return v;
    },
  };
}

/** Exactly `n` bytes (length-prefixed like bytes()). */
function exactBytes(n: number): Codec<Uint8Array> {
  const b = bytes(n);
  return {
    kind: `bytes(${n})`,
    write(w, v, path) {
      if (v.length !== n) throw new PersistError(`${path}: ${v.length} bytes, expected ${n}`);
      b.write(w, v, path);
    },
    read(r, path) {
      const v = b.read(r, path);
      if (v.length !== n) throw new PersistError(`${path}: ${v.length} bytes, expected ${n}`);
      return v;
    },
  };
}

/** A finite float (an RTC offset of NaN or Infinity is no time at all). */
const finite: Codec<number> = {
  kind: 'f64(finite)',
  write(w, v, path) {
    if (!Number.isFinite(v)) throw new PersistError(`${path}: ${String(v)} is not finite`);
    f64.write(w, v, path);
  },
  read(r, path) {
    const v = f64.read(r, path);
    if (!Number.isFinite(v)) throw new PersistError(`${path}: ${String(v)} is not finite`);
    return v;
  },
};

const flag = ranged(0, 1);

/** A byte at most `max` (a register with bits the device never sets). */
function byteUpTo(max: number): Codec<number> {
  return {
    kind: `u8(<=${max})`,
    write(w, v, path) {
      if (!Number.isInteger(v) || v < 0 || v > max)
        throw new PersistError(`${path}: ${String(v)} is out of range (0..${max})`);
      u8.write(w, v, path);
    },
    read(r, path) {
      const v = u8.read(r, path);
      if (v > max) throw new PersistError(`${path}: ${v} is out of range (0..${max})`);
      return v;
    },
  };
}

const m = SERIAL_SAVED_MAX;
const SerialStateCodec = struct({
  ier: byteUpTo(m.ier),
  lcr: byteUpTo(m.lcr),
  mcr: byteUpTo(m.mcr),
  scr: byteUpTo(m.scr),
  dll: byteUpTo(m.dll),
  dlm: byteUpTo(m.dlm),
  fcr: byteUpTo(m.fcr),
  threPending: byteUpTo(m.threPending),
  line: byteUpTo(m.line),
  msrDelta: byteUpTo(m.msrDelta),
  lsrErrors: byteUpTo(m.lsrErrors),
  rx: bytes(SERIAL_RX_RING_SIZE),
});

const I8042StateCodec = struct({
  status: u8,
  ctr: u8,
  outport: u8,
  obuf: ranged(-1, 0xff),
  obufFromKbd: flag,
  ctrlReply: ranged(-1, 0xff),
  pendingCmd: u8,
  kbdPendingCmd: u8,
  xlateBreak: flag,
  kbd: bytes(I8042_KBD_QUEUE_SIZE),
});

const RtcStateCodec = struct({
  index: ranged(0, RTC_CMOS_SIZE - 1),
  offsetMs: finite,
  cmos: exactBytes(RTC_CMOS_SIZE),
});

export const LegacyStateV1 = versioned(
  'legacy-devices',
  1,
  struct({ serial: SerialStateCodec, i8042: I8042StateCodec, rtc: RtcStateCodec }),
);
export type LegacyStateData = Infer<typeof LegacyStateV1.codec>;

// The codecs and the device classes describe the same fields.
const _serial: SerialSavedState = {} as Infer<typeof SerialStateCodec>;
const _i8042: I8042SavedState = {} as Infer<typeof I8042StateCodec>;
const _rtc: RtcSavedState = {} as Infer<typeof RtcStateCodec>;
void [_serial, _i8042, _rtc];

const noIrq = { trigger: () => undefined };

/**
 * The legacy devices' state, read under each device's lock. Any thread; meant for the main
 * thread while every vCPU is parked (the console flushed by the caller).
 */
export function saveLegacy(s: LegacyDeviceState): LegacyStateData {
  return {
    serial: new Serial16550(s.serial, { output: () => undefined, irq: noIrq }).saveState(),
    i8042: new I8042(s.i8042, { irq: noIrq, onReset: () => undefined }).saveState(),
    rtc: new RtcCmos(s.rtc).saveState(),
  };
}

/**
 * Puts saved state into freshly created legacy device state (createLegacyDeviceState), before
 * any vCPU runs. Throws on an out-of-range value (decoding already refuses those).
 */
export function restoreLegacy(s: LegacyDeviceState, data: LegacyStateData): void {
  new Serial16550(s.serial, { output: () => undefined, irq: noIrq }).restoreState(data.serial);
  new I8042(s.i8042, { irq: noIrq, onReset: () => undefined }).restoreState(data.i8042);
  new RtcCmos(s.rtc).restoreState(data.rtc);
}

import type { BusDevice } from '../bus.js';
import { SharedMutex } from '../../util/shared-mutex.js';

/**
 * MC146818 CMOS RTC at ports 0x70 (index) / 0x71 (data), one 2-byte BusDevice: offset 0 is
 * the index port, offset 1 the data port. Enough for Linux's mach_get_cmos_time() and rtc-cmos.
 *
 * Time comes from the host's UTC clock at every read, plus an offset the guest sets by writing
 * the time registers (so `hwclock --systohc` sticks for this VM without touching the host).
 * Register A never reports update-in-progress, D always reports valid RAM and time (VRT), C
 * never has an interrupt flag: we raise no IRQ 8 (no periodic, alarm or update interrupts).
 * Register B: bit 2 DM (1 = binary, else BCD), bit 1 24/12 (1 = 24-hour). Power-on B = 0x02:
 * BCD, 24-hour, as PC firmware leaves it. Bit 7 of an index write (NMI disable) is ignored.
 * The other CMOS bytes (0x0e..0x7f) are plain storage the guest may write; the VMM may preset
 * them with setCmosByte() (for example memory size fields).
 *
 * Threads: state in a SharedArrayBuffer under one SharedMutex, like serial.ts. The index
 * register is shared, as on hardware (Linux serialises index+data pairs with its rtc_lock).
 */

export const RTC_RANGE_SIZE = 2;

const REG_SECONDS = 0x00;
const REG_MINUTES = 0x02;
const REG_HOURS = 0x04;
const REG_WEEKDAY = 0x06;
const REG_DAY = 0x07;
const REG_MONTH = 0x08;
const REG_YEAR = 0x09;
const REG_A = 0x0a;
const REG_B = 0x0b;
const REG_C = 0x0c;
const REG_D = 0x0d;
const REG_CENTURY = 0x32; // the ACPI FADT's default century register

const A_DEFAULT = 0x26; // 32.768 kHz time base, 1024 Hz rate; UIP (bit 7) always 0
const B_DM_BINARY = 0x04;
const B_24H = 0x02;
const B_DEFAULT = B_24H;
const D_VRT = 0x80;
/** 0000-01-01T00:00:00Z and 9999-12-31T23:59:59Z: what century + year can say. */
const MIN_GUEST_TIME = new Date(0).setUTCFullYear(0, 0, 1);
const MAX_GUEST_TIME = Date.UTC(9999, 11, 31, 23, 59, 59);
const HOUR_PM = 0x80; // 12-hour mode

// Int32 slots, then a Float64 offset, then the 128 CMOS bytes.
const S_LOCK = 0;
const S_INDEX = 1;
const S_UNKNOWN = 2;
const INT32_SLOTS = 4;
const OFFSET_BYTE = INT32_SLOTS * 4; // Float64: guest time minus host time, ms
const CMOS_BYTE = OFFSET_BYTE + 8;
const CMOS_SIZE = 128;
const STATE_BYTES = CMOS_BYTE + CMOS_SIZE;

/** What a snapshot keeps of the RTC (legacy-state.ts encodes it). */
export interface RtcSavedState {
  /** The selected register (0..127). */
  index: number;
  /** Guest time minus host time, in ms. */
  offsetMs: number;
  /** The 128 CMOS bytes. */
  cmos: Uint8Array;
}

export const RTC_CMOS_SIZE = CMOS_SIZE;

export class RtcCmos implements BusDevice {
  private readonly s: Int32Array;
  private readonly offsetMs: Float64Array;
  private readonly cmos: Uint8Array;
  private readonly mutex: SharedMutex;

  static createState(): SharedArrayBuffer {
    const sab = new SharedArrayBuffer(STATE_BYTES);
    const cmos = new Uint8Array(sab, CMOS_BYTE, CMOS_SIZE);
    cmos[REG_A] = A_DEFAULT;
    cmos[REG_B] = B_DEFAULT;
    return sab;
  }

  /** `now` returns host time in ms since the epoch (tests inject a fixed clock). */
  constructor(
    state: SharedArrayBuffer,
    private readonly now: () => number = Date.now,
  ) {
    if (state.byteLength !== STATE_BYTES) throw new Error('not an RtcCmos state buffer');
    this.s = new Int32Array(state, 0, INT32_SLOTS);
    this.offsetMs = new Float64Array(state, OFFSET_BYTE, 1);
    this.cmos = new Uint8Array(state, CMOS_BYTE, CMOS_SIZE);
    this.mutex = new SharedMutex(this.s, S_LOCK);
  }

  /** The state a snapshot keeps (no lock word or counters). */
  saveState(): RtcSavedState {
    return this.mutex.with(() => ({
      index: this.s[S_INDEX]!,
      offsetMs: this.offsetMs[0]!,
      cmos: this.cmos.slice(),
    }));
  }

  /**
   * Puts saved state into this RTC (a fresh state buffer, before any vCPU runs). Throws on an
   * out-of-range value; nothing is changed then.
   */
  restoreState(o: RtcSavedState): void {
    if (!Number.isInteger(o.index) || o.index < 0 || o.index >= CMOS_SIZE)
      throw new Error(`rtc: saved index ${String(o.index)} is out of range (0..${CMOS_SIZE - 1})`);
    if (!Number.isFinite(o.offsetMs))
      throw new Error(`rtc: saved offset ${String(o.offsetMs)} is not a finite number`);
    if (!(o.cmos instanceof Uint8Array) || o.cmos.length !== CMOS_SIZE)
      throw new Error(`rtc: saved CMOS of ${o.cmos?.length} bytes, expected ${CMOS_SIZE}`);
    this.mutex.with(() => {
      this.s[S_INDEX] = o.index;
      this.offsetMs[0] = o.offsetMs;
      this.cmos.set(o.cmos);
    });
  }

  /** Presets a CMOS storage byte (0x0e..0x7f) before boot. */
  setCmosByte(index: number, value: number): void {
    if (!Number.isInteger(index) || index < 0x0e || index >= CMOS_SIZE || index === REG_CENTURY) {
      throw new Error(`CMOS byte 0x${index.toString(16)} is not storage`);
    }
    this.mutex.with(() => (this.cmos[index] = value & 0xff));
  }

  unknownAccesses(): number {
    return Atomics.load(this.s, S_UNKNOWN);
  }

  read(offset: number, data: Uint8Array): void {
    this.mutex.with(() => {
      if (data.length !== 1 || offset !== 1) {
        // The index port is write-only; like hardware without a readable index, answer 0xff.
        if (data.length !== 1 || offset !== 0) this.s[S_UNKNOWN]! += 1;
        data.fill(0xff);
        return;
      }
      data[0] = this.readRegister(this.s[S_INDEX]!);
    });
  }

  write(offset: number, data: Uint8Array): void {
    this.mutex.with(() => {
      const v = data[0];
      if (data.length !== 1 || v === undefined || offset > 1) {
        this.s[S_UNKNOWN]! += 1;
      } else if (offset === 0) {
        this.s[S_INDEX] = v & 0x7f; // bit 7 masks NMIs on PCs: not ours to model
      } else {
        this.writeRegister(this.s[S_INDEX]!, v);
      }
    });
  }

  // ---- with the lock held ----

  private guestTime(): Date {
    return new Date(this.now() + this.offsetMs[0]!);
  }

  private readRegister(index: number): number {
    switch (index) {
      case REG_A:
        return this.cmos[REG_A]! & 0x7f;
      case REG_C:
        return 0;
      case REG_D:
        return D_VRT;
      default:
        break;
    }
    const field = timeField(index);
    if (field === undefined) return this.cmos[index]!;
    const value = readField(this.guestTime(), field);
    return this.encode(value, field === 'hours');
  }

  private writeRegister(index: number, v: number): void {
    if (index === REG_C || index === REG_D) return; // read-only
    if (index === REG_A) {
      this.cmos[REG_A] = v & 0x7f;
      return;
    }
    const field = timeField(index);
    if (field === undefined) {
      this.cmos[index] = v;
      return;
    }
    if (field === 'weekday') return; // derived from the date
    const value = this.decode(v, field === 'hours');
    if (value === undefined) return; // not a valid BCD number: ignored
    const host = this.now();
    const t = new Date(host + this.offsetMs[0]!);
    const parts = {
      year: t.getUTCFullYear(),
      month: t.getUTCMonth() + 1,
      day: t.getUTCDate(),
      hours: t.getUTCHours(),
      minutes: t.getUTCMinutes(),
      seconds: t.getUTCSeconds(),
    };
    if (field === 'year') parts.year = Math.floor(parts.year / 100) * 100 + (value % 100);
    else if (field === 'century') parts.year = value * 100 + (parts.year % 100);
    else parts[field] = value;
    // Date.UTC maps years 0-99 to 1900-1999; setUTCFullYear takes the year as it is (a guest
    // that writes century 0 means years 0-99).
    const d = new Date(0);
    d.setUTCFullYear(parts.year, parts.month - 1, parts.day);
    const set = d.setUTCHours(parts.hours, parts.minutes, parts.seconds, 0);
    // Keep the sub-second phase so that the seconds tick where the guest expects (a time before
    // 1970 is negative: its phase too must be counted from the start of its second).
    const phase = ((t.getTime() % 1000) + 1000) % 1000;
    // The RTC holds years 0000-9999 (century and year are two BCD digits each): a time outside
    // them (a binary-mode field past its range carried into the year) is refused, as is NaN.
    if (Number.isFinite(set) && set >= MIN_GUEST_TIME && set <= MAX_GUEST_TIME)
      this.offsetMs[0] = set + phase - host;
  }

  private encode(value: number, isHours: boolean): number {
    const b = this.cmos[REG_B]!;
    let pm = 0;
    if (isHours && !(b & B_24H)) {
      pm = value >= 12 ? HOUR_PM : 0;
      value = value % 12 || 12;
    }
    return (b & B_DM_BINARY ? value : toBcd(value)) | pm;
  }

  private decode(raw: number, isHours: boolean): number | undefined {
    const b = this.cmos[REG_B]!;
    let pm = false;
    if (isHours && !(b & B_24H)) {
      pm = (raw & HOUR_PM) !== 0;
      raw &= ~HOUR_PM;
    }
    let value = b & B_DM_BINARY ? raw : fromBcd(raw);
    if (value === undefined) return undefined;
    if (isHours && !(b & B_24H)) value = (value % 12) + (pm ? 12 : 0);
    return value;
  }
}

type TimeField = 'seconds' | 'minutes' | 'hours' | 'weekday' | 'day' | 'month' | 'year' | 'century';

function timeField(index: number): TimeField | undefined {
  switch (index) {
    case REG_SECONDS:
      return 'seconds';
    case REG_MINUTES:
      return 'minutes';
    case REG_HOURS:
      return 'hours';
    case REG_WEEKDAY:
      return 'weekday';
    case REG_DAY:
      return 'day';
    case REG_MONTH:
      return 'month';
    case REG_YEAR:
      return 'year';
    case REG_CENTURY:
      return 'century';
    default:
      return undefined;
  }
}

function readField(t: Date, field: TimeField): number {
  switch (field) {
    case 'seconds':
      return t.getUTCSeconds();
    case 'minutes':
      return t.getUTCMinutes();
    case 'hours':
      return t.getUTCHours();
    case 'weekday':
      return t.getUTCDay() + 1; // 1 = Sunday
    case 'day':
      return t.getUTCDate();
    case 'month':
      return t.getUTCMonth() + 1;
    case 'year':
      return t.getUTCFullYear() % 100;
    case 'century':
      return Math.floor(t.getUTCFullYear() / 100);
  }
}

function toBcd(v: number): number {
  return ((Math.floor(v / 10) % 10) << 4) | (v % 10);
}

function fromBcd(v: number): number | undefined {
  const hi = v >> 4;
  const lo = v & 0x0f;
  return hi > 9 || lo > 9 ? undefined : hi * 10 + lo;
}

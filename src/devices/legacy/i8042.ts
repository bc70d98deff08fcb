import type { BusDevice, IrqLine } from '../bus.js';
import { SharedMutex } from '../../util/shared-mutex.js';

/**
 * Just enough of the i8042 PS/2 controller and an AT keyboard behind it for Linux's i8042 and
 * atkbd drivers to probe a keyboard, for the guest to reset the machine (0xFE to port 0x64, as
 * `reboot=k` does), and for the control plane to send Ctrl-Alt-Del. No AUX (mouse) port.
 *
 * Window: ONE BusDevice over ports 0x60..0x64 (5 bytes, as Firecracker registers it): offset 0
 * is the data port 0x60, offset 4 the status/command port 0x64. Offsets 1-3 (0x61-0x63) are not
 * ours: reads give 0xff, writes are ignored, both are counted. (KVM's in-kernel PIT owns 0x61.)
 *
 * Keyboard bytes are produced in scan code set 2 and, while the command byte's XLATE bit is set
 * (our power-on default, like PC firmware leaves it), translated to set 1 on their way to the
 * output buffer, as the 8042 does. Only the keys we inject are in the translation table.
 * Ctrl-Alt-Del uses the extended Delete key (set 2 E0 71, set 1 E0 53; Firecracker's choice too)
 * and, unlike Firecracker, also sends the break codes so that no key stays down if the guest
 * ignores the salute: set 1 on the wire: 1d 38 e0 53 e0 d3 b8 9d.
 *
 * Output buffer: one byte (OBF). Controller replies take precedence over keyboard bytes; each
 * keyboard byte that lands in the buffer raises IRQ 1 (if the command byte enables it), so the
 * guest gets one interrupt per byte as it reads them. Controller replies raise no interrupt:
 * Linux polls for them.
 *
 * Threads: state lives in a SharedArrayBuffer under one SharedMutex, like serial.ts. onReset()
 * and the IRQ are called after the lock is released.
 */

export const I8042_RANGE_SIZE = 5;
export const I8042_DATA_OFFSET = 0;
export const I8042_COMMAND_OFFSET = 4;

// Status register (port 0x64 read).
const STR_OBF = 0x01;
const STR_SYSFLAG = 0x04;
const STR_CMDDAT = 0x08; // last write went to 0x64
const STR_KEYLOCK = 0x10; // 1 = keyboard not inhibited by the key lock
// Command byte (CTR).
const CTR_KBDINT = 0x01;
const CTR_SYSFLAG = 0x04;
const CTR_KBDDIS = 0x10;
const CTR_AUXDIS = 0x20;
const CTR_XLATE = 0x40;
const CTR_DEFAULT = CTR_KBDINT | CTR_SYSFLAG | CTR_AUXDIS | CTR_XLATE;
/** Output port: bit 0 = CPU not in reset, bit 1 = A20 enabled. */
const OUTPORT_DEFAULT = 0x03;

// Controller commands (port 0x64).
const CMD_READ_CTR = 0x20;
const CMD_WRITE_CTR = 0x60;
const CMD_AUX_DISABLE = 0xa7;
const CMD_AUX_ENABLE = 0xa8;
const CMD_AUX_TEST = 0xa9;
const CMD_SELF_TEST = 0xaa;
const CMD_KBD_TEST = 0xab;
const CMD_KBD_DISABLE = 0xad;
const CMD_KBD_ENABLE = 0xae;
const CMD_READ_INPORT = 0xc0;
const CMD_READ_OUTPORT = 0xd0;
const CMD_WRITE_OUTPORT = 0xd1;
const CMD_WRITE_KBD_OBUF = 0xd2;
const CMD_WRITE_AUX_OBUF = 0xd3;
const CMD_WRITE_AUX = 0xd4;
const CMD_READ_TESTIN = 0xe0;
const CMD_RESET = 0xfe;

// Keyboard commands (port 0x60) and replies.
const KBD_SET_LEDS = 0xed;
const KBD_ECHO = 0xee;
const KBD_SCANCODE_SET = 0xf0;
const KBD_GET_ID = 0xf2;
const KBD_SET_REP = 0xf3;
const KBD_RESET = 0xff;
const KBD_ACK = 0xfa;
const KBD_BAT_OK = 0xaa;

/** Set 2 -> set 1 for the keys we inject (Ctrl, Alt, Delete); other bytes pass unchanged. */
const XLATE: ReadonlyMap<number, number> = new Map([
  [0x14, 0x1d],
  [0x11, 0x38],
  [0x71, 0x53],
  [0x83, 0x41], // second keyboard id byte, as a translating 8042 reports it
]);
/** Ctrl, Alt, Delete down, then up in reverse order (set 2). */
const CTRL_ALT_DEL_SET2 = [0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14];

const KBD_QUEUE_SIZE = 16; // an AT keyboard's own buffer

// Int32 slots.
const S_LOCK = 0;
const S_STATUS = 1; // SYSFLAG, CMDDAT bits (OBF is derived)
const S_CTR = 2;
const S_OUTPORT = 3;
const S_OBUF = 4; // byte in the output buffer, -1 when empty
const S_OBUF_FROM_KBD = 5;
const S_CTRL_REPLY = 6; // pending controller reply byte, -1 none
const S_PENDING_CMD = 7; // controller command waiting for its data byte, 0 none
const S_KBD_PENDING_CMD = 8; // keyboard command waiting for its parameter, 0 none
const S_KBD_HEAD = 9;
const S_KBD_TAIL = 10;
const S_XLATE_BREAK = 11; // a set 2 F0 prefix was swallowed by translation
const S_RESETS = 12;
const S_UNKNOWN = 13;
const S_IRQS = 14;
const S_KBD_QUEUE = 16; // KBD_QUEUE_SIZE slots
const STATE_SLOTS = S_KBD_QUEUE + KBD_QUEUE_SIZE;

export interface I8042Sinks {
  /** IRQ 1, edge-triggered. */
  irq: IrqLine;
  /** The guest asked for a CPU reset (0xFE, pulse-output or output-port bit 0 cleared). */
  onReset(): void;
}

export interface I8042Counters {
  resets: number;
  unknownAccesses: number;
  interrupts: number;
}

/** What a snapshot keeps of the controller (legacy-state.ts encodes it). */
export interface I8042SavedState {
  status: number;
  ctr: number;
  outport: number;
  /** The byte in the output buffer, -1 when empty. */
  obuf: number;
  obufFromKbd: number;
  /** A pending controller reply byte, -1 none. */
  ctrlReply: number;
  pendingCmd: number;
  kbdPendingCmd: number;
  xlateBreak: number;
  /** The keyboard's queued bytes, oldest first (at most I8042_KBD_QUEUE_SIZE). */
  kbd: Uint8Array;
}

export const I8042_KBD_QUEUE_SIZE = KBD_QUEUE_SIZE;

const SAVED_SLOTS = [
  ['status', S_STATUS, 0, 0xff],
  ['ctr', S_CTR, 0, 0xff],
  ['outport', S_OUTPORT, 0, 0xff],
  ['obuf', S_OBUF, -1, 0xff],
  ['obufFromKbd', S_OBUF_FROM_KBD, 0, 1],
  ['ctrlReply', S_CTRL_REPLY, -1, 0xff],
  ['pendingCmd', S_PENDING_CMD, 0, 0xff],
  ['kbdPendingCmd', S_KBD_PENDING_CMD, 0, 0xff],
  ['xlateBreak', S_XLATE_BREAK, 0, 1],
] as const;

export class I8042 implements BusDevice {
  private readonly s: Int32Array;
  private readonly mutex: SharedMutex;
  private pendingEdge = false;
  private pendingReset = false;

  static createState(): SharedArrayBuffer {
    const sab = new SharedArrayBuffer(STATE_SLOTS * 4);
    const s = new Int32Array(sab);
    s[S_STATUS] = STR_SYSFLAG;
    s[S_CTR] = CTR_DEFAULT;
    s[S_OUTPORT] = OUTPORT_DEFAULT;
    s[S_OBUF] = -1;
    s[S_CTRL_REPLY] = -1;
    return sab;
  }

  constructor(
    state: SharedArrayBuffer,
    private readonly sinks: I8042Sinks,
  ) {
    if (state.byteLength !== STATE_SLOTS * 4) throw new Error('not an I8042 state buffer');
    this.s = new Int32Array(state);
    this.mutex = new SharedMutex(this.s, S_LOCK);
  }

  read(offset: number, data: Uint8Array): void {
    this.locked(() => {
      const s = this.s;
      if (data.length !== 1 || (offset !== I8042_DATA_OFFSET && offset !== I8042_COMMAND_OFFSET)) {
        s[S_UNKNOWN]! += 1;
        data.fill(0xff);
        return;
      }
      if (offset === I8042_COMMAND_OFFSET) {
        data[0] = s[S_STATUS]! | STR_KEYLOCK | (s[S_OBUF]! >= 0 ? STR_OBF : 0);
        return;
      }
      // Reading an empty buffer returns the last byte on hardware; 0 is as good for drivers.
      data[0] = Math.max(s[S_OBUF]!, 0);
      s[S_OBUF] = -1;
      this.refill();
    });
  }

  write(offset: number, data: Uint8Array): void {
    this.locked(() => {
      const v = data[0];
      if (data.length !== 1 || v === undefined) {
        this.s[S_UNKNOWN]! += 1;
      } else if (offset === I8042_COMMAND_OFFSET) {
        this.s[S_STATUS] = this.s[S_STATUS]! | STR_CMDDAT;
        this.command(v);
      } else if (offset === I8042_DATA_OFFSET) {
        this.s[S_STATUS] = this.s[S_STATUS]! & ~STR_CMDDAT;
        this.data(v);
      } else {
        this.s[S_UNKNOWN]! += 1;
      }
    });
  }

  /**
   * Queues Ctrl-Alt-Del (press and release) from the control plane, from any thread. Returns
   * false, queueing nothing, when the keyboard buffer lacks room for the whole sequence.
   */
  sendCtrlAltDel(): boolean {
    return this.locked(() => {
      if (KBD_QUEUE_SIZE - this.kbdLength() < CTRL_ALT_DEL_SET2.length) return false;
      for (const b of CTRL_ALT_DEL_SET2) this.kbdPush(b);
      this.refill();
      return true;
    });
  }

  stats(): I8042Counters {
    return this.mutex.with(() => ({
      resets: this.s[S_RESETS]!,
      unknownAccesses: this.s[S_UNKNOWN]!,
      interrupts: this.s[S_IRQS]!,
    }));
  }

  /** The state a snapshot keeps (no lock word or counters). */
  saveState(): I8042SavedState {
    return this.mutex.with(() => {
      const n = this.kbdLength();
      const kbd = new Uint8Array(n);
      const head = this.s[S_KBD_HEAD]!;
      for (let i = 0; i < n; i++) kbd[i] = this.s[S_KBD_QUEUE + ((head + i) % KBD_QUEUE_SIZE)]!;
      const o: Record<string, number> = {};
      for (const [k, slot] of SAVED_SLOTS) o[k] = this.s[slot]!;
      return { ...(o as Omit<I8042SavedState, 'kbd'>), kbd };
    });
  }

  /**
   * Puts saved state into this controller (a fresh state buffer, before any vCPU runs). Throws
   * on an out-of-range value; nothing is changed then.
   */
  restoreState(o: I8042SavedState): void {
    for (const [k, _slot, min, max] of SAVED_SLOTS) {
      const v = o[k];
      if (!Number.isInteger(v) || v < min || v > max)
        throw new Error(`i8042: saved ${k} ${String(v)} is out of range (${min}..${max})`);
    }
    if (!(o.kbd instanceof Uint8Array) || o.kbd.length > KBD_QUEUE_SIZE)
      throw new Error(
        `i8042: saved keyboard queue of ${o.kbd?.length} bytes, at most ${KBD_QUEUE_SIZE}`,
      );
    this.mutex.with(() => {
      for (const [k, slot] of SAVED_SLOTS) this.s[slot] = o[k];
      o.kbd.forEach((b, i) => (this.s[S_KBD_QUEUE + i] = b));
      this.s[S_KBD_HEAD] = 0;
      this.s[S_KBD_TAIL] = o.kbd.length;
    });
  }

  private locked<T>(fn: () => T): T {
    let r: T;
    this.mutex.lock();
    try {
      r = fn();
    } finally {
      this.mutex.unlock();
    }
    const edge = this.pendingEdge;
    const reset = this.pendingReset;
    this.pendingEdge = false;
    this.pendingReset = false;
    if (edge) this.sinks.irq.trigger();
    if (reset) this.sinks.onReset();
    return r;
  }

  // ---- everything below runs with the lock held ----

  private command(cmd: number): void {
    const s = this.s;
    s[S_PENDING_CMD] = 0;
    switch (cmd) {
      case CMD_READ_CTR:
        return this.reply(s[S_CTR]!);
      case CMD_WRITE_CTR:
      case CMD_WRITE_OUTPORT:
      case CMD_WRITE_KBD_OBUF:
      case CMD_WRITE_AUX_OBUF:
      case CMD_WRITE_AUX:
        s[S_PENDING_CMD] = cmd;
        return;
      case CMD_AUX_DISABLE:
        s[S_CTR] = s[S_CTR]! | CTR_AUXDIS;
        return;
      case CMD_AUX_ENABLE:
        s[S_CTR] = s[S_CTR]! & ~CTR_AUXDIS;
        return;
      case CMD_AUX_TEST:
        // "Clock line stuck high": there is no AUX port. Linux's i8042_check_aux() then gives
        // up on AUX at once instead of timing out.
        return this.reply(0x02);
      case CMD_SELF_TEST:
        s[S_STATUS] = s[S_STATUS]! | STR_SYSFLAG;
        return this.reply(0x55);
      case CMD_KBD_TEST:
        return this.reply(0x00);
      case CMD_KBD_DISABLE:
        s[S_CTR] = s[S_CTR]! | CTR_KBDDIS;
        return;
      case CMD_KBD_ENABLE:
        s[S_CTR] = s[S_CTR]! & ~CTR_KBDDIS;
        return this.refill();
      case CMD_READ_INPORT:
        return this.reply(0x80); // keyboard not inhibited
      case CMD_READ_OUTPORT:
        return this.reply(s[S_OUTPORT]! | (s[S_OBUF]! >= 0 ? 0x10 : 0));
      case CMD_READ_TESTIN:
        return this.reply(0x00);
      default:
        // 0xF0-0xFF pulse output-port bits whose command bit is 0; bit 0 is the CPU reset line
        // (0xFE is the usual reset). 0x21-0x3F / 0x61-0x7F are internal RAM we do not keep.
        if ((cmd & 0xf0) === 0xf0) {
          if ((cmd & 0x01) === 0) this.reset();
          return;
        }
        if (cmd > CMD_READ_CTR && cmd < 0x40) return this.reply(0x00);
        if (cmd > CMD_WRITE_CTR && cmd < 0x80) return;
        s[S_UNKNOWN]! += 1;
    }
  }

  private data(v: number): void {
    const s = this.s;
    const cmd = s[S_PENDING_CMD]!;
    s[S_PENDING_CMD] = 0;
    switch (cmd) {
      case CMD_WRITE_CTR:
        s[S_CTR] = v;
        s[S_STATUS] = (s[S_STATUS]! & ~STR_SYSFLAG) | (v & CTR_SYSFLAG ? STR_SYSFLAG : 0);
        return this.refill();
      case CMD_WRITE_OUTPORT:
        s[S_OUTPORT] = v;
        if ((v & 0x01) === 0) this.reset();
        return;
      case CMD_WRITE_KBD_OBUF:
        this.kbdPush(v);
        return this.refill();
      case CMD_WRITE_AUX_OBUF:
        // Linux's AUX loop test: answering on the keyboard side (no AUX-data status bit) tells
        // it at once that there is no AUX port.
        return this.reply(v);
      case CMD_WRITE_AUX:
        return; // no AUX device: dropped
      default:
        return this.keyboard(v);
    }
  }

  /** A byte for the keyboard itself. Like a real keyboard, a command flushes its buffer. */
  private keyboard(v: number): void {
    const s = this.s;
    const pending = s[S_KBD_PENDING_CMD]!;
    s[S_KBD_PENDING_CMD] = 0;
    this.kbdClear();
    if (pending !== 0 && v < 0xed) {
      // The parameter of SET_LEDS / SCANCODE_SET / SET_REP.
      this.kbdPush(KBD_ACK);
      if (pending === KBD_SCANCODE_SET && v === 0) this.kbdPush(0x02); // we speak set 2
      return this.refill();
    }
    this.kbdPush(v === KBD_ECHO ? KBD_ECHO : KBD_ACK);
    switch (v) {
      case KBD_SET_LEDS:
      case KBD_SCANCODE_SET:
      case KBD_SET_REP:
        s[S_KBD_PENDING_CMD] = v;
        break;
      case KBD_GET_ID:
        this.kbdPush(0xab);
        this.kbdPush(0x83);
        break;
      case KBD_RESET:
        this.kbdPush(KBD_BAT_OK);
        break;
      default: // ENABLE, RESET_DIS, set defaults, typematic modes, resend: ACK only
    }
    this.refill();
  }

  private reply(v: number): void {
    // A controller command supersedes whatever the driver did not read yet.
    this.s[S_CTRL_REPLY] = v;
    this.s[S_OBUF] = -1;
    this.refill();
  }

  private reset(): void {
    this.s[S_RESETS]! += 1;
    this.pendingReset = true;
  }

  /** Moves the next byte into an empty output buffer; keyboard bytes raise IRQ 1. */
  private refill(): void {
    const s = this.s;
    if (s[S_OBUF]! >= 0) return;
    const ctl = s[S_CTRL_REPLY]!;
    if (ctl >= 0) {
      s[S_OBUF] = ctl;
      s[S_OBUF_FROM_KBD] = 0;
      s[S_CTRL_REPLY] = -1;
      return;
    }
    const ctr = s[S_CTR]!;
    if (ctr & CTR_KBDDIS) return;
    while (this.kbdLength() > 0) {
      let b = this.kbdPop();
      if (ctr & CTR_XLATE) {
        if (b === 0xf0) {
          s[S_XLATE_BREAK] = 1; // set 2 break prefix: becomes bit 7 of the next code
          continue;
        }
        b = XLATE.get(b) ?? b;
        if (s[S_XLATE_BREAK]) b |= 0x80;
        s[S_XLATE_BREAK] = 0;
      }
      s[S_OBUF] = b;
      s[S_OBUF_FROM_KBD] = 1;
      if (ctr & CTR_KBDINT) {
        this.pendingEdge = true;
        s[S_IRQS]! += 1;
      }
      return;
    }
  }

  private kbdLength(): number {
    return this.s[S_KBD_TAIL]! - this.s[S_KBD_HEAD]!;
  }

  private kbdPush(b: number): void {
    if (this.kbdLength() >= KBD_QUEUE_SIZE) return; // a full keyboard drops, as hardware does
    const tail = this.s[S_KBD_TAIL]!;
    this.s[S_KBD_QUEUE + (tail % KBD_QUEUE_SIZE)] = b;
    this.s[S_KBD_TAIL] = tail + 1;
  }

  private kbdPop(): number {
    const head = this.s[S_KBD_HEAD]!;
    const b = this.s[S_KBD_QUEUE + (head % KBD_QUEUE_SIZE)]!;
    // Indices restart from 0 whenever the queue empties, so they never grow without bound.
    if (head + 1 === this.s[S_KBD_TAIL]) {
      this.s[S_KBD_HEAD] = 0;
      this.s[S_KBD_TAIL] = 0;
    } else {
      this.s[S_KBD_HEAD] = head + 1;
    }
    return b;
  }

  private kbdClear(): void {
    this.s[S_KBD_HEAD] = 0;
    this.s[S_KBD_TAIL] = 0;
    this.s[S_XLATE_BREAK] = 0;
  }
}

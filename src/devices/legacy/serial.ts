import type { BusDevice, IrqLine } from '../bus.js';
import { SharedMutex } from '../../util/shared-mutex.js';
import {
  BUCKET_STATE_SLOTS,
  TokenBucket,
  bucketEnabled,
  checkBucketConfig,
  processMonotonicMs,
  type TokenBucketConfig,
} from '../virtio/rate-limiter.js';

/**
 * A 16550A UART (COM1: 8 byte-wide registers at 0x3f8, IRQ 4), as Linux's 8250 driver probes
 * and drives it (drivers/tty/serial/8250/8250_port.c: autoconfig(), autoconfig_16550a(),
 * serial8250_do_startup()'s THRE re-assertion test).
 *
 * Threads: every vCPU worker builds its own Serial16550 over the SAME SharedArrayBuffer
 * (createState(), made once by the main thread and posted to the workers); the main thread
 * builds one too and feeds console input with pushInput(). All register state lives in the
 * buffer and every access runs under one SharedMutex; output and IRQ callbacks run after the
 * lock is released.
 *
 * Model: transmission is instantaneous (THR/TX FIFO always empty, LSR.THRE|TEMT always set), so
 * each THR write pulses THRE: the interrupt line drops and rises again, which is one edge (the
 * IrqLine is an edge irqfd; real hardware makes the same edge). With FIFOs on (FCR bit 0) and a
 * thread running the hold timer (startHoldTimer, the main thread), THRE's interrupt for a burst
 * of bytes is held until the driver is done writing (releaseThre): one edge per burst, not per
 * byte, as a real FIFO gives. Received bytes come from a
 * 4 KiB ring that stands in for the RX FIFO; the RDA interrupt is raised while it holds data
 * (no trigger levels or character timeouts: Linux treats IIR 0x04 and 0x0c alike).
 * The interrupt is not gated by MCR.OUT2 (QEMU and Firecracker do not gate it either).
 *
 * Output rate limit (PUT /serial's rate_limiter, Firecracker's semantics): one token bucket of
 * bytes, shared by every thread (its state is in the buffer, changed under the lock, on a clock
 * all threads share). A THR byte that finds no token is dropped and counted
 * (rate_limiter_dropped_bytes); the guest still sees it sent. So the guest never waits for the
 * limit, nothing is buffered for it, and no timer runs: the bucket refills when it is next used.
 */

/** Register offsets (16550 datasheet; Linux include/uapi/linux/serial_reg.h). */
const RBR_THR_DLL = 0;
const IER_DLM = 1;
const IIR_FCR = 2;
const LCR = 3;
const MCR = 4;
const LSR = 5;
const MSR = 6;
const SCR = 7;
export const SERIAL_RANGE_SIZE = 8;

const IER_RDI = 0x01; // received data available
const IER_THRI = 0x02; // THR empty
const IER_RLSI = 0x04; // receiver line status
const IER_MSI = 0x08; // modem status
const IER_MASK = 0x0f; // upper bits read 0 (autoconfig writes 0x0f and UUE 0x40 and checks)

const IIR_NO_INT = 0x01;
const IIR_MSI = 0x00;
const IIR_THRI = 0x02;
const IIR_RDI = 0x04;
const IIR_RLSI = 0x06;
const IIR_FIFO_ENABLED = 0xc0; // bits 7:6 = 11 on a 16550A with FIFOs on; bit 5 (64-byte) stays 0

const FCR_ENABLE_FIFO = 0x01;
const FCR_CLEAR_RCVR = 0x02;
/** A 16550A's transmit FIFO, bytes. */
const TX_FIFO_BYTES = 16;
/**
 * How long THRE's interrupt is held at most when the guest does not touch the UART again
 * (startHoldTimer): a driver that fills the FIFO and then only waits for the interrupt gets it
 * after THRE_HOLD_MS once the timer has seen it wait (a 16550 at 115200 baud takes 1.4 ms to
 * send 16 bytes). While the guest ends its holds itself (Linux), the timer's period doubles up
 * to THRE_HOLD_MAX_MS, so that a guest printing all the time wakes the timer's thread seldom.
 */
export const THRE_HOLD_MS = 1;
export const THRE_HOLD_MAX_MS = 64;
/** How long the hold timer's stop tries for the lock (teardown: no vCPU should hold it). */
const STOP_LOCK_WAIT_MS = 20;

const LCR_DLAB = 0x80;

const MCR_DTR = 0x01;
const MCR_RTS = 0x02;
const MCR_OUT1 = 0x04;
const MCR_OUT2 = 0x08;
const MCR_LOOP = 0x10;
const MCR_MASK = 0x1f;

const LSR_DR = 0x01;
const LSR_OE = 0x02;
const LSR_THRE = 0x20;
const LSR_TEMT = 0x40;

const MSR_CTS = 0x10;
const MSR_DSR = 0x20;
const MSR_RI = 0x40;
const MSR_DCD = 0x80;
/** Outside loopback the other end is always "there": carrier, data set ready, clear to send. */
const MSR_CONNECTED = MSR_DCD | MSR_DSR | MSR_CTS;

/** 115200 / 12 = 9600 baud, the usual power-on divisor. */
const DEFAULT_DIVISOR = 12;

/** Input ring capacity in bytes (a power of two). */
export const SERIAL_RX_RING_SIZE = 4096;

// Int32 slots of the shared state.
const S_LOCK = 0;
const S_IER = 1;
const S_LCR = 2;
const S_MCR = 3;
const S_SCR = 4;
const S_DLL = 5;
const S_DLM = 6;
const S_FCR = 7;
const S_THRE_PENDING = 8;
const S_LINE = 9; // interrupt line level last computed (0/1)
const S_MSR_DELTA = 10; // MSR bits 3:0, cleared by reading MSR
const S_LSR_ERRORS = 11; // LSR error bits, cleared by reading LSR
const S_RX_HEAD = 12; // consumer index (free-running, wraps as int32)
const S_RX_TAIL = 13; // producer index
const S_RX_SPACE_WAITER = 14; // 1 while a producer waits in waitForInputSpace()
const S_TX_HELD = 15; // bytes sent in FIFO mode whose THRE indication is held (releaseThre)
const S_HOLD_OWNER = 16; // 1 while a thread runs the hold timer (startHoldTimer): holding is on
const S_HOLD_ARMED = 17; // 1 from a hold that asked for the timer until the timer ran
const S_HOLD_WAKE = 18; // bumped to wake the hold timer's thread (Atomics.notify)
const S_HOLD_ENDS = 19; // holds the guest ended itself (releaseThre), a free-running count
const S_TX_LEN = 20; // bytes in the transmit buffer (sent during a hold, written out at its end)
const INT32_SLOTS = 24;
// Float64 counters (exact to 2^53), changed only under the lock.
const COUNTERS_BYTE_OFFSET = INT32_SLOTS * 4;
const C_BYTES_OUT = 0;
const C_BYTES_IN = 1;
const C_UNKNOWN = 2;
const C_IRQS = 3;
const C_OVERRUNS = 4;
const C_RATE_DROPPED = 5;
const C_HOLD_TIMER_RUNS = 6;
const C_HOLDS_TIMER_ENDED = 7;
const COUNTER_COUNT = 8;
// The output bucket: its configuration (size 0: none), then its state (TokenBucket's slots).
const LIMIT_BYTE_OFFSET = COUNTERS_BYTE_OFFSET + COUNTER_COUNT * 8;
const L_SIZE = 0;
const L_REFILL_TIME = 1;
const L_ONE_TIME_BURST = 2;
const LIMIT_CONFIG_SLOTS = 3;
const LIMIT_SLOTS = LIMIT_CONFIG_SLOTS + BUCKET_STATE_SLOTS;
const RING_BYTE_OFFSET = LIMIT_BYTE_OFFSET + LIMIT_SLOTS * 8;
/** The transmit buffer: what one hold sent (a FIFO's worth and the byte that overran it). */
const TX_BUFFER_BYTES = 32;
const TX_BYTE_OFFSET = RING_BYTE_OFFSET + SERIAL_RX_RING_SIZE;
const STATE_BYTES = TX_BYTE_OFFSET + TX_BUFFER_BYTES;

export interface SerialSinks {
  /** Bytes the guest transmitted (one access at a time). Not called with the lock held. */
  output(bytes: Uint8Array): void;
  /** IRQ 4, edge-triggered. Not called with the lock held. */
  irq: IrqLine;
}

export interface SerialCounters {
  bytesOut: number;
  bytesIn: number; // accepted by pushInput (or looped back)
  unknownAccesses: number;
  interrupts: number; // edges raised
  overruns: number; // loopback bytes dropped on a full ring (host input never is)
  rateLimiterDroppedBytes: number; // output bytes the rate limiter dropped
  holdTimerRuns: number; // expiries of the THRE hold timer (startHoldTimer)
  holdsEndedByTimer: number; // THRE holds the guest left alone, ended by that timer
}

export interface SerialOptions {
  /** The clock of the output bucket, in ms; every thread's must agree (default: CLOCK_MONOTONIC). */
  now?: () => number;
}

type WaitAsync = (
  a: Int32Array,
  i: number,
  v: number,
) => { async: false; value: string } | { async: true; value: Promise<string> };

/** What a snapshot keeps of a UART (legacy-state.ts encodes it): registers and pending input. */
export interface SerialSavedState {
  ier: number;
  lcr: number;
  mcr: number;
  scr: number;
  dll: number;
  dlm: number;
  fcr: number;
  threPending: number;
  line: number;
  msrDelta: number;
  lsrErrors: number;
  /** Received bytes the guest has not read yet, oldest first (at most SERIAL_RX_RING_SIZE). */
  rx: Uint8Array;
}

/** The saved registers: name, slot, largest value the device itself can hold there. */
const SAVED_REGISTERS = [
  ['ier', S_IER, IER_MASK],
  ['lcr', S_LCR, 0xff],
  ['mcr', S_MCR, MCR_MASK],
  ['scr', S_SCR, 0xff],
  ['dll', S_DLL, 0xff],
  ['dlm', S_DLM, 0xff],
  ['fcr', S_FCR, 0xff],
  ['threPending', S_THRE_PENDING, 1],
  ['line', S_LINE, 1],
  ['msrDelta', S_MSR_DELTA, 0x0f],
  ['lsrErrors', S_LSR_ERRORS, 0xff],
] as const;

/** For legacy-state.ts's codec: the largest valid value of each saved register. */
export const SERIAL_SAVED_MAX = Object.fromEntries(
  SAVED_REGISTERS.map(([k, , max]) => [k, max]),
) as Record<(typeof SAVED_REGISTERS)[number][0], number>;

export class Serial16550 implements BusDevice {
  private readonly s: Int32Array;
  private readonly counters: Float64Array;
  private readonly ring: Uint8Array;
  private readonly mutex: SharedMutex;
  // Effects decided under the lock, carried out after it.
  private pendingEdge = false;
  private pendingOut = -1;
  /** Bytes a hold's end took from the transmit buffer, written after the lock. */
  private readonly pendingBurst = new Uint8Array(TX_BUFFER_BYTES);
  private pendingBurstLen = 0;
  private pendingHoldWake = false;
  private readonly txBuffer: Uint8Array;
  /** The output bucket over the shared state, if one is configured. */
  private readonly bucket: TokenBucket | undefined;
  private readonly now: () => number;

  /**
   * The shared state for one UART, in its power-on state. Post it to every worker.
   * `rateLimiter`: the output's token bucket (bytes); size 0 or refill_time 0 is none. Throws
   * RangeError on a value that is not a non-negative integer.
   */
  static createState(rateLimiter?: TokenBucketConfig, opts: SerialOptions = {}): SharedArrayBuffer {
    const sab = new SharedArrayBuffer(STATE_BYTES);
    const s = new Int32Array(sab, 0, INT32_SLOTS);
    s[S_DLL] = DEFAULT_DIVISOR;
    s[S_LCR] = 0x03; // 8N1
    if (rateLimiter !== undefined) checkBucketConfig(rateLimiter, 'serial rate_limiter');
    if (bucketEnabled(rateLimiter)) {
      const limit = new Float64Array(sab, LIMIT_BYTE_OFFSET, LIMIT_SLOTS);
      // Checks the values and fills the bucket's state (full, with its one-time burst).
      new TokenBucket(rateLimiter, (opts.now ?? processMonotonicMs)(), {
        slots: limit.subarray(LIMIT_CONFIG_SLOTS),
      });
      limit[L_SIZE] = rateLimiter.size;
      limit[L_REFILL_TIME] = rateLimiter.refill_time;
      limit[L_ONE_TIME_BURST] = rateLimiter.one_time_burst ?? 0;
    }
    return sab;
  }

  constructor(
    state: SharedArrayBuffer,
    private readonly sinks: SerialSinks,
    opts: SerialOptions = {},
  ) {
    if (state.byteLength !== STATE_BYTES) throw new Error('not a Serial16550 state buffer');
    this.s = new Int32Array(state, 0, INT32_SLOTS);
    this.counters = new Float64Array(state, COUNTERS_BYTE_OFFSET, COUNTER_COUNT);
    this.ring = new Uint8Array(state, RING_BYTE_OFFSET, SERIAL_RX_RING_SIZE);
    this.txBuffer = new Uint8Array(state, TX_BYTE_OFFSET, TX_BUFFER_BYTES);
    this.mutex = new SharedMutex(this.s, S_LOCK);
    this.now = opts.now ?? processMonotonicMs;
    const limit = new Float64Array(state, LIMIT_BYTE_OFFSET, LIMIT_SLOTS);
    const config = {
      size: limit[L_SIZE]!,
      refill_time: limit[L_REFILL_TIME]!,
      one_time_burst: limit[L_ONE_TIME_BURST]!,
    };
    this.bucket = bucketEnabled(config)
      ? new TokenBucket(config, 0, { slots: limit.subarray(LIMIT_CONFIG_SLOTS), attach: true })
      : undefined;
  }

  /** The output bucket's configuration, if any. */
  rateLimiter(): TokenBucketConfig | undefined {
    const b = this.bucket;
    return b && { size: b.size, refill_time: b.refillTime, one_time_burst: b.initialBurst };
  }

  read(offset: number, data: Uint8Array): void {
    this.mutex.lock();
    try {
      this.releaseThre();
      const v = data.length === 1 ? this.readRegister(offset) : -1;
      if (v < 0) {
        this.counters[C_UNKNOWN]! += 1;
        data.fill(0xff);
      } else {
        data[0] = v;
      }
      this.updateLine();
    } finally {
      this.mutex.unlock();
    }
    this.flushEffects();
  }

  write(offset: number, data: Uint8Array): void {
    this.mutex.lock();
    try {
      const v = data[0];
      if (offset !== RBR_THR_DLL || this.s[S_LCR]! & LCR_DLAB) this.releaseThre();
      if (data.length !== 1 || v === undefined || !this.writeRegister(offset, v)) {
        this.counters[C_UNKNOWN]! += 1;
      }
      this.updateLine();
    } finally {
      this.mutex.unlock();
    }
    this.flushEffects();
  }

  /**
   * Host -> guest bytes (console input), from any thread. Returns how many were accepted; when
   * the ring is full the rest are NOT taken and the caller keeps them and retries (see
   * waitForInputSpace()). Raises the RDA interrupt if the guest enabled it.
   */
  pushInput(bytes: Uint8Array): number {
    let n = 0;
    this.mutex.lock();
    try {
      n = Math.min(bytes.length, SERIAL_RX_RING_SIZE - this.rxLength());
      let tail = this.s[S_RX_TAIL]!;
      for (let i = 0; i < n; i++) {
        this.ring[tail & (SERIAL_RX_RING_SIZE - 1)] = bytes[i]!;
        tail = (tail + 1) | 0;
      }
      Atomics.store(this.s, S_RX_TAIL, tail);
      this.counters[C_BYTES_IN]! += n;
      this.updateLine(n > 0);
    } finally {
      this.mutex.unlock();
    }
    this.flushEffects();
    return n;
  }

  /**
   * True while the guest driver has the receive interrupt on (the port is open). Console input
   * is held back until then: the driver's startup clears the FIFO, which would drop it.
   */
  receiverEnabled(): boolean {
    // RDI alone is not enough: Linux's autoconfig probe sets IER to 0x0f for a moment, and its
    // startup then reads RBR "for luck" twice, which would eat bytes pushed in that window.
    // The port is really open once OUT2 (the PC's IRQ enable) is set outside loopback and RDI
    // is on, which startup does last.
    const mcr = Atomics.load(this.s, S_MCR);
    return (
      (Atomics.load(this.s, S_IER) & IER_RDI) !== 0 &&
      (mcr & MCR_OUT2) !== 0 &&
      (mcr & MCR_LOOP) === 0
    );
  }

  /** Free bytes in the input ring now. */
  inputSpace(): number {
    return this.mutex.with(() => SERIAL_RX_RING_SIZE - this.rxLength());
  }

  /**
   * Resolves once the guest has drained at least one byte since the ring was seen full (or at
   * once if there is room). Uses Atomics.waitAsync, so the main thread's event loop keeps going.
   */
  waitForInputSpace(): Promise<void> {
    Atomics.store(this.s, S_RX_SPACE_WAITER, 1);
    const head = Atomics.load(this.s, S_RX_HEAD);
    if (this.inputSpace() > 0) return Promise.resolve();
    const waitAsync = (Atomics as unknown as { waitAsync: WaitAsync }).waitAsync;
    const r = waitAsync(this.s, S_RX_HEAD, head);
    return r.async ? r.value.then(() => undefined) : Promise.resolve();
  }

  stats(): SerialCounters {
    return this.mutex.with(() => ({
      bytesOut: this.counters[C_BYTES_OUT]!,
      bytesIn: this.counters[C_BYTES_IN]!,
      unknownAccesses: this.counters[C_UNKNOWN]!,
      interrupts: this.counters[C_IRQS]!,
      overruns: this.counters[C_OVERRUNS]!,
      rateLimiterDroppedBytes: this.counters[C_RATE_DROPPED]!,
      holdTimerRuns: this.counters[C_HOLD_TIMER_RUNS]!,
      holdsEndedByTimer: this.counters[C_HOLDS_TIMER_ENDED]!,
    }));
  }

  /** The state a snapshot keeps (no lock word, waiter flag or counters). */
  saveState(): SerialSavedState {
    return this.mutex.with(() => {
      const n = this.rxLength();
      const rx = new Uint8Array(n);
      const head = this.s[S_RX_HEAD]!;
      for (let i = 0; i < n; i++) rx[i] = this.ring[(head + i) & (SERIAL_RX_RING_SIZE - 1)]!;
      const o: Record<string, number> = {};
      for (const [k, slot] of SAVED_REGISTERS) o[k] = this.s[slot]!;
      // A held THRE (releaseThre) is saved as pending. With the line low that pair shows in no
      // other state (every access leaves the line at its level): restoreState holds it again,
      // and the restored VM's hold timer ends it. With the line high (another interrupt waits)
      // the guest's handler finds THRE when it looks.
      if (this.s[S_TX_HELD]! > 0 && this.s[S_IER]! & IER_THRI) o.threPending = 1;
      return { ...(o as Omit<SerialSavedState, 'rx'>), rx };
    });
  }

  /**
   * Puts saved state into this UART (a fresh state buffer, before any vCPU runs). Throws on a
   * value no guest could have produced (each register is a byte, the flags 0 or 1, the input
   * at most one ring); nothing is changed then.
   */
  restoreState(o: SerialSavedState): void {
    for (const [k, , max] of SAVED_REGISTERS) {
      const v = o[k];
      if (!Number.isInteger(v) || v < 0 || v > max)
        throw new Error(`serial: saved ${k} ${String(v)} is out of range (0..${max})`);
    }
    if (!(o.rx instanceof Uint8Array) || o.rx.length > SERIAL_RX_RING_SIZE)
      throw new Error(
        `serial: saved input of ${o.rx?.length} bytes, at most ${SERIAL_RX_RING_SIZE}`,
      );
    this.mutex.with(() => {
      for (const [k, slot] of SAVED_REGISTERS) this.s[slot] = o[k];
      this.ring.set(o.rx, 0);
      Atomics.store(this.s, S_RX_HEAD, 0);
      Atomics.store(this.s, S_RX_TAIL, o.rx.length);
      // A held THRE (see saveState): held again, for the hold timer to end. (The bytes of a
      // hold were the source VM's console's, not the restored one's.)
      this.s[S_TX_HELD] = 0;
      this.s[S_TX_LEN] = 0;
      if (o.threPending === 1 && o.line === 0 && o.ier & IER_THRI) {
        this.s[S_THRE_PENDING] = 0;
        this.s[S_TX_HELD] = 1;
        this.s[S_HOLD_ARMED] = 1;
        Atomics.add(this.s, S_HOLD_WAKE, 1);
        Atomics.notify(this.s, S_HOLD_WAKE);
      }
    });
  }

  // ---- everything below runs with the lock held ----

  private readRegister(offset: number): number {
    const s = this.s;
    const dlab = (s[S_LCR]! & LCR_DLAB) !== 0;
    switch (offset) {
      case RBR_THR_DLL:
        return dlab ? s[S_DLL]! : this.popRx();
      case IER_DLM:
        return dlab ? s[S_DLM]! : s[S_IER]!;
      case IIR_FCR: {
        const id = this.interruptId();
        // Reading IIR while it reports THRE clears that indication (16550 datasheet, table 4).
        if (id === IIR_THRI) s[S_THRE_PENDING] = 0;
        return id | (s[S_FCR]! & FCR_ENABLE_FIFO ? IIR_FIFO_ENABLED : 0);
      }
      case LCR:
        return s[S_LCR]!;
      case MCR:
        return s[S_MCR]!;
      case LSR: {
        const v = (this.rxLength() > 0 ? LSR_DR : 0) | s[S_LSR_ERRORS]! | LSR_THRE | LSR_TEMT;
        s[S_LSR_ERRORS] = 0;
        return v;
      }
      case MSR: {
        const v = this.modemStatus() | s[S_MSR_DELTA]!;
        s[S_MSR_DELTA] = 0;
        return v;
      }
      case SCR:
        return s[S_SCR]!;
      default:
        return -1;
    }
  }

  /** False for an access the UART has no register for. */
  private writeRegister(offset: number, v: number): boolean {
    const s = this.s;
    const dlab = (s[S_LCR]! & LCR_DLAB) !== 0;
    switch (offset) {
      case RBR_THR_DLL:
        if (dlab) s[S_DLL] = v;
        else this.transmit(v);
        return true;
      case IER_DLM: {
        if (dlab) {
          s[S_DLM] = v;
          return true;
        }
        const old = s[S_IER]!;
        const ier = v & IER_MASK;
        s[S_IER] = ier;
        // A real 16550 re-asserts THRE whenever THRI is enabled with the THR empty; Linux's
        // startup test toggles IER.THRI and expects the IIR to show it again.
        if ((ier ^ old) & IER_THRI) s[S_THRE_PENDING] = ier & IER_THRI ? 1 : 0;
        return true;
      }
      case IIR_FCR: {
        const wasOn = s[S_FCR]! & FCR_ENABLE_FIFO;
        // On hardware, changing the FIFO enable clears both FIFOs, as does FCR bit 1 for the
        // receiver. Here the ring holds console input the host has not yet put "on the wire":
        // Linux's 8250 startup disables the FIFO and set_termios re-enables it AFTER turning the
        // receive interrupt on, so clearing would silently drop what the user typed or piped.
        // Only loopback bytes (the driver's own self-test data) are discarded.
        const clear = v & FCR_CLEAR_RCVR || (v & FCR_ENABLE_FIFO) !== wasOn;
        if (clear && s[S_MCR]! & MCR_LOOP) this.clearRx();
        s[S_FCR] = v & (FCR_ENABLE_FIFO | 0xc0);
        return true;
      }
      case LCR:
        s[S_LCR] = v;
        return true;
      case MCR: {
        const before = this.modemStatus();
        s[S_MCR] = v & MCR_MASK;
        this.noteModemChange(before, this.modemStatus());
        return true;
      }
      case LSR:
      case MSR:
        return true; // factory-test writes: ignored, as on most parts
      case SCR:
        s[S_SCR] = v;
        return true;
      default:
        return false;
    }
  }

  private transmit(v: number): void {
    const s = this.s;
    // The write empties... then fills THR: the line drops here, and rises again below once the
    // byte is "sent", which gives the guest one THRE edge per byte, as hardware does.
    s[S_THRE_PENDING] = 0;
    this.updateLine();
    if (s[S_MCR]! & MCR_LOOP) {
      // Loopback: the transmitter feeds the receiver; nothing leaves the UART.
      if (this.rxLength() < SERIAL_RX_RING_SIZE) {
        const tail = s[S_RX_TAIL]!;
        this.ring[tail & (SERIAL_RX_RING_SIZE - 1)] = v;
        Atomics.store(s, S_RX_TAIL, (tail + 1) | 0);
        this.counters[C_BYTES_IN]! += 1;
      } else {
        s[S_LSR_ERRORS] = s[S_LSR_ERRORS]! | LSR_OE;
        this.counters[C_OVERRUNS]! += 1;
      }
    } else {
      const holding = s[S_FCR]! & FCR_ENABLE_FIFO && s[S_HOLD_OWNER] === 1;
      // Bytes of a hold that ended with holding turned off (teardown) go out first, in order.
      if (!holding && s[S_TX_LEN]! > 0) this.takeBurst();
      // Counted as written either way (Firecracker's write_count counts a dropped byte too).
      this.counters[C_BYTES_OUT]! += 1;
      const dropped = this.bucket !== undefined && this.bucket.reduce(1, this.now()).kind !== 'ok';
      if (dropped) this.counters[C_RATE_DROPPED]! += 1;
      if (holding) {
        // FIFO mode: the byte is sent, but it is written out, and THRE's interrupt raised, when
        // the driver is done writing: its next access to another register (releaseThre), the
        // hold timer, or the byte after a full FIFO.
        if (!dropped) this.txBuffer[s[S_TX_LEN]!] = v;
        if (!dropped) s[S_TX_LEN] = s[S_TX_LEN]! + 1;
        const held = s[S_TX_HELD]! + 1;
        if (held <= TX_FIFO_BYTES) {
          s[S_TX_HELD] = held;
          if (s[S_IER]! & IER_THRI && s[S_HOLD_ARMED] === 0) {
            s[S_HOLD_ARMED] = 1;
            this.pendingHoldWake = true;
          }
          return;
        }
        s[S_TX_HELD] = 0;
        this.takeBurst();
      } else if (!dropped) {
        this.pendingOut = v;
      }
    }
    s[S_THRE_PENDING] = s[S_IER]! & IER_THRI ? 1 : 0;
  }

  /** The transmit buffer's bytes become this thread's to write out (after the lock). */
  private takeBurst(): void {
    const n = this.s[S_TX_LEN]!;
    this.pendingBurst.set(this.txBuffer.subarray(0, n), this.pendingBurstLen);
    this.pendingBurstLen += n;
    this.s[S_TX_LEN] = 0;
  }

  /**
   * THRE's indication for bytes sent in FIFO mode, held since (transmit): set now. A driver
   * with FIFOs on (Linux's 8250 among them) writes up to 16 bytes per THRE interrupt and then
   * reads IIR or LSR, or writes IER, before it expects the next one; one edge per byte (the
   * line drops at each THR write and rises as the byte leaves) would make the interrupt
   * controller inject each of them while the driver is still filling the FIFO. So the line
   * rises when the driver is done writing: at its next access to another register, whose
   * updateLine() then makes the edge (none when that access is the IIR read that clears it).
   */
  private releaseThre(): void {
    const s = this.s;
    if (s[S_TX_LEN]! > 0) this.takeBurst();
    if (s[S_TX_HELD] === 0) return;
    s[S_TX_HELD] = 0;
    s[S_HOLD_ENDS] = (s[S_HOLD_ENDS]! + 1) | 0;
    s[S_THRE_PENDING] = s[S_IER]! & IER_THRI ? 1 : 0;
  }

  private popRx(): number {
    if (this.rxLength() === 0) return 0;
    const head = this.s[S_RX_HEAD]!;
    const v = this.ring[head & (SERIAL_RX_RING_SIZE - 1)]!;
    this.setRxHead((head + 1) | 0);
    return v;
  }

  private clearRx(): void {
    if (this.rxLength() > 0) this.setRxHead(this.s[S_RX_TAIL]!);
  }

  private setRxHead(head: number): void {
    Atomics.store(this.s, S_RX_HEAD, head);
    if (Atomics.load(this.s, S_RX_SPACE_WAITER) !== 0) {
      Atomics.store(this.s, S_RX_SPACE_WAITER, 0);
      Atomics.notify(this.s, S_RX_HEAD);
    }
  }

  private rxLength(): number {
    return (this.s[S_RX_TAIL]! - this.s[S_RX_HEAD]!) | 0;
  }

  /** MSR bits 7:4. In loopback they follow MCR (CTS=RTS, DSR=DTR, RI=OUT1, DCD=OUT2). */
  private modemStatus(): number {
    const mcr = this.s[S_MCR]!;
    if (!(mcr & MCR_LOOP)) return MSR_CONNECTED;
    return (
      (mcr & MCR_RTS ? MSR_CTS : 0) |
      (mcr & MCR_DTR ? MSR_DSR : 0) |
      (mcr & MCR_OUT1 ? MSR_RI : 0) |
      (mcr & MCR_OUT2 ? MSR_DCD : 0)
    );
  }

  private noteModemChange(before: number, after: number): void {
    const changed = before ^ after;
    let delta = 0;
    if (changed & MSR_CTS) delta |= 0x01; // DCTS
    if (changed & MSR_DSR) delta |= 0x02; // DDSR
    if (before & MSR_RI && !(after & MSR_RI)) delta |= 0x04; // TERI: trailing edge only
    if (changed & MSR_DCD) delta |= 0x08; // DDCD
    this.s[S_MSR_DELTA] = this.s[S_MSR_DELTA]! | delta;
  }

  /** IIR bits 3:0 by priority: line status > received data > THR empty > modem status. */
  private interruptId(): number {
    const s = this.s;
    const ier = s[S_IER]!;
    if (ier & IER_RLSI && s[S_LSR_ERRORS]! !== 0) return IIR_RLSI;
    if (ier & IER_RDI && this.rxLength() > 0) return IIR_RDI;
    if (ier & IER_THRI && s[S_THRE_PENDING]! !== 0) return IIR_THRI;
    if (ier & IER_MSI && s[S_MSR_DELTA]! !== 0) return IIR_MSI;
    return IIR_NO_INT;
  }

  /** Recomputes the interrupt line; a rise becomes an edge to send after unlocking. */
  /**
   * Recomputes the interrupt line. An edge goes out when it rises, or when `reassert` says new
   * data arrived while it was already high: the IRQ is an edge-triggered irqfd pulse, and an
   * edge the guest missed (its IOAPIC pin masked during the 8250 driver's startup tests) must not
   * leave the receiver stuck forever. A spurious interrupt is harmless; a lost one is not.
   */
  private updateLine(reassert = false): void {
    const level = this.interruptId() === IIR_NO_INT ? 0 : 1;
    if (level === 1 && (this.s[S_LINE] === 0 || reassert)) {
      this.pendingEdge = true;
      this.counters[C_IRQS]! += 1;
    }
    this.s[S_LINE] = level;
  }

  private flushEffects(): void {
    this.flushOutput();
    const edge = this.pendingEdge;
    this.pendingEdge = false;
    if (edge) this.sinks.irq.trigger();
    if (this.pendingHoldWake) {
      this.pendingHoldWake = false;
      Atomics.add(this.s, S_HOLD_WAKE, 1);
      Atomics.notify(this.s, S_HOLD_WAKE);
    }
  }

  /**
   * The output decided under the lock. A vCPU thread writes it after the lock: the guest sends
   * nothing more until that access returns. The hold timer's thread writes it before unlocking:
   * after, a vCPU could send and write newer bytes first (seen in the lab: the console read
   * "YPERVISOR-BOOT-OK\nT", the T of a hold the timer ended).
   */
  private flushOutput(): void {
    const out = this.pendingOut;
    this.pendingOut = -1;
    if (this.pendingBurstLen > 0) {
      const n = this.pendingBurstLen;
      this.pendingBurstLen = 0;
      this.sinks.output(this.pendingBurst.subarray(0, n));
    }
    if (out >= 0) this.sinks.output(Uint8Array.of(out));
  }

  /**
   * One thread (the main thread) runs the timer that ends a hold the guest does not end itself
   * (a driver that writes a few bytes and then only waits for THRE's interrupt): a period after
   * a hold asked for it (THRE_HOLD_MS, doubling up to THRE_HOLD_MAX_MS while every hold it finds
   * was ended by the guest), the held indication is set and its edge raised. Sleeps on the
   * state's wake slot otherwise (no timer runs while the guest sends nothing); nothing here keeps
   * the process alive. Holding is on only while this runs. Returns the function that stops it
   * (at teardown, before the interrupt's eventfd closes: a hold still in place is left).
   */
  startHoldTimer(minMs = THRE_HOLD_MS, maxMs = THRE_HOLD_MAX_MS): () => void {
    let stopped = false;
    let timer: NodeJS.Timeout | undefined;
    let period = minMs;
    const waitAsync = (Atomics as unknown as { waitAsync: WaitAsync }).waitAsync;
    let ends = 0;
    /**
     * One expiry: a hold the guest has left alone since the last one (no hold of its ended
     * meanwhile) is ended here, and the short period follows; while the guest ends its holds
     * itself (a driver still filling the FIFO, or done with it), the period doubles.
     */
    const expire = (): void => {
      // Never waits for the lock on this thread (a vCPU thread given up on could hold it): a
      // busy lock is left for the next expiry, the period and the hold unchanged.
      if (!this.mutex.tryLock()) return;
      try {
        const s = this.s;
        const held = s[S_TX_HELD]! > 0;
        const active = s[S_HOLD_ENDS] !== ends;
        this.counters[C_HOLD_TIMER_RUNS]! += 1;
        if (held && !active) {
          this.counters[C_HOLDS_TIMER_ENDED]! += 1;
          this.releaseThre();
          this.updateLine();
          period = minMs;
        } else {
          period = Math.min(period * 2, maxMs);
        }
        // Still holding (a burst under way): the timer looks again; else it sleeps until asked.
        s[S_HOLD_ARMED] = s[S_TX_HELD]! > 0 ? 1 : 0;
        ends = s[S_HOLD_ENDS]!;
        this.flushOutput(); // under the lock: before any byte the guest sends next
      } finally {
        this.mutex.unlock();
      }
      this.flushEffects();
    };
    Atomics.store(this.s, S_HOLD_OWNER, 1);
    const loop = async () => {
      while (!stopped) {
        const seen = Atomics.load(this.s, S_HOLD_WAKE);
        if (Atomics.load(this.s, S_HOLD_ARMED) === 0 && Atomics.load(this.s, S_TX_HELD) === 0) {
          const r = waitAsync(this.s, S_HOLD_WAKE, seen);
          if (r.async) await r.value;
          continue;
        }
        ends = Atomics.load(this.s, S_HOLD_ENDS);
        await new Promise<void>((r) => {
          timer = setTimeout(r, period);
          timer.unref();
        });
        if (stopped) break;
        expire();
      }
    };
    void loop();
    return () => {
      if (stopped) return;
      stopped = true;
      if (timer) clearTimeout(timer);
      Atomics.store(this.s, S_HOLD_OWNER, 0);
      Atomics.add(this.s, S_HOLD_WAKE, 1);
      Atomics.notify(this.s, S_HOLD_WAKE);
      // What the guest sent during a hold it never ended is written out now (no edge: the VM
      // is going away, and the interrupt's eventfd with it). The lock is tried for a moment
      // only: a vCPU thread given up on could hold it, and then the bytes stay unwritten.
      if (!this.mutex.tryLockFor(STOP_LOCK_WAIT_MS)) return;
      try {
        if (this.s[S_TX_LEN]! > 0) this.takeBurst();
        this.flushOutput();
      } finally {
        this.mutex.unlock();
      }
      this.flushEffects();
    };
  }
}

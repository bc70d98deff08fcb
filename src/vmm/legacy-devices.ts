/**
 * The legacy devices every VM has (16550 COM1, i8042, CMOS RTC, ACPI PM registers, the boot
 * marker port) and the buses that route vCPU exits to them. State lives in SharedArrayBuffers
 * created once by the main thread; each thread attaches its own device objects to it.
 * The UART's output goes to the console through ConsoleOutput (console-output.ts): non-blocking,
 * bounded, dropped and counted when the reader does not keep up.
 */
import {
  ACPI_PM_BASE,
  BOOT_MARKER_MMIO_ADDR,
  BOOT_MARKER_PORT,
  I8042_DATA_PORT,
  I8042_IRQ,
  RTC_PORT,
  SERIAL_COM1_IRQ,
  SERIAL_COM1_PORT,
} from '../arch/x86_64/layout.js';
import { Bus, type BusDevice, type IrqLine } from '../devices/bus.js';
import { AcpiPm, ACPI_PM_WINDOW_SIZE } from '../devices/legacy/acpi-pm.js';
import { I8042, I8042_RANGE_SIZE } from '../devices/legacy/i8042.js';
import { RtcCmos, RTC_RANGE_SIZE } from '../devices/legacy/rtc.js';
import { Serial16550, SERIAL_RANGE_SIZE } from '../devices/legacy/serial.js';
import type { TokenBucketConfig } from '../devices/virtio/rate-limiter.js';
import { UnhandledAccesses, type UnhandledAccessInfo } from '../devices/legacy/unhandled.js';
import type { Vm } from '../kvm/kvm.js';
import { EFD_NONBLOCK, native } from '../kvm/native.js';
import type { BootTimerLine } from './boot-timer.js';
import { ConsoleOutput, openConsoleOutput, type ConsoleOutputState } from './console-output.js';

/** Structured-clone friendly: posted to every vCPU worker. */
export interface LegacyDeviceState {
  serial: SharedArrayBuffer;
  i8042: SharedArrayBuffer;
  rtc: SharedArrayBuffer;
  unhandled: SharedArrayBuffer;
  serialIrqFd: number;
  i8042IrqFd: number;
  /** Where the UART's output goes (see console-output.ts). */
  console: ConsoleOutputState;
  /** --boot-timer: the line the thread that takes the boot marker logs (boot-timer.ts). */
  bootTimer?: BootTimerLine;
}

export interface LegacyDeviceOptions {
  /** Capacity of the console output ring (what the reader does not take at once). */
  consoleBufferBytes?: number;
  /** PUT /serial's rate_limiter: a token bucket of output bytes (over it, bytes are dropped). */
  serialRateLimiter?: TokenBucketConfig;
  /** --boot-timer's line, logged by the vCPU thread that takes the marker. */
  bootTimer?: BootTimerLine;
}

/** The legacy devices' part of a build's options. */
export function legacyOptions(o: {
  serialRateLimiter?: TokenBucketConfig;
  bootTimer?: BootTimerLine;
}): LegacyDeviceOptions {
  return {
    ...(o.serialRateLimiter ? { serialRateLimiter: o.serialRateLimiter } : {}),
    ...(o.bootTimer ? { bootTimer: o.bootTimer } : {}),
  };
}

/**
 * Main thread: creates the shared state and wires the devices' interrupts to KVM irqfds.
 * Console output goes to `consoleFd` (a private non-blocking description of it when it is a
 * pipe, FIFO or terminal: closeLegacyDeviceState closes that).
 */
export function createLegacyDeviceState(
  vm: Vm,
  consoleFd = 1,
  opts: LegacyDeviceOptions = {},
): LegacyDeviceState {
  const n = native();
  // First: it checks the rate limiter's values (throws before any descriptor is open).
  const serial = Serial16550.createState(opts.serialRateLimiter);
  const consoleOut = openConsoleOutput(consoleFd, opts.consoleBufferBytes);
  const serialIrqFd = n.eventfd(0, EFD_NONBLOCK);
  const i8042IrqFd = n.eventfd(0, EFD_NONBLOCK);
  const state: LegacyDeviceState = {
    serial,
    i8042: I8042.createState(),
    rtc: RtcCmos.createState(),
    unhandled: UnhandledAccesses.createState(),
    serialIrqFd,
    i8042IrqFd,
    console: consoleOut,
    ...(opts.bootTimer ? { bootTimer: opts.bootTimer } : {}),
  };
  try {
    vm.registerIrqfd(serialIrqFd, SERIAL_COM1_IRQ);
    vm.registerIrqfd(i8042IrqFd, I8042_IRQ);
  } catch (e) {
    closeLegacyDeviceState(state);
    throw e;
  }
  return state;
}

/**
 * Main thread, once no vCPU runs: a last non-blocking flush of the console output, then the
 * file descriptors the state holds are closed.
 */
export function closeLegacyDeviceState(state: LegacyDeviceState): void {
  new ConsoleOutput(state.console).close();
  for (const fd of [state.serialIrqFd, state.i8042IrqFd]) {
    try {
      native().close(fd);
    } catch {
      // already closed
    }
  }
}

export function eventfdIrq(fd: number): IrqLine {
  return { trigger: () => native().eventfdWrite(fd, 1) };
}

export interface LegacyHooks {
  /** Console output (serial THR); by default the console (the state's ConsoleOutput). */
  output?(bytes: Uint8Array): void;
  onPowerOff(): void;
  onReset(): void;
  /** The guest wrote the boot marker port. */
  onBootMarker(): void;
  log(message: string): void;
}

export interface AttachedDevices {
  pio: Bus;
  mmio: Bus;
  unhandled: UnhandledAccesses;
  serial: Serial16550;
  i8042: I8042;
  /** The UART's output path (its counters; the main thread's flusher). */
  console: ConsoleOutput;
}

/** Any thread: device objects over the shared state, on fresh buses. */
export function attachLegacyDevices(state: LegacyDeviceState, hooks: LegacyHooks): AttachedDevices {
  const consoleOut = new ConsoleOutput(state.console);
  const serial = new Serial16550(state.serial, {
    output: hooks.output ?? ((bytes) => consoleOut.write(bytes)),
    irq: eventfdIrq(state.serialIrqFd),
  });
  const i8042 = new I8042(state.i8042, {
    irq: eventfdIrq(state.i8042IrqFd),
    onReset: hooks.onReset,
  });
  const marker: BusDevice = { read: (_o, d) => d.fill(0), write: () => hooks.onBootMarker() };
  const pio = new Bus();
  pio.insert(SERIAL_COM1_PORT, SERIAL_RANGE_SIZE, serial);
  pio.insert(I8042_DATA_PORT, I8042_RANGE_SIZE, i8042);
  pio.insert(RTC_PORT, RTC_RANGE_SIZE, new RtcCmos(state.rtc));
  pio.insert(BOOT_MARKER_PORT, 1, marker);
  const mmio = new Bus();
  mmio.insert(BOOT_MARKER_MMIO_ADDR, 8, marker);
  mmio.insert(
    ACPI_PM_BASE,
    ACPI_PM_WINDOW_SIZE,
    new AcpiPm({ onPowerOff: hooks.onPowerOff, onReset: hooks.onReset, log: hooks.log }),
  );
  const unhandled = new UnhandledAccesses(state.unhandled, (i: UnhandledAccessInfo) =>
    hooks.log(
      `unhandled ${i.space} ${i.write ? 'write' : 'read'} of ${i.size} bytes at 0x${i.addr.toString(16)} (${i.write ? 'dropped' : 'answered with all-ones'}; further ones only counted)`,
    ),
  );
  return { pio, mmio, unhandled, serial, i8042, console: consoleOut };
}

/**
 * The legacy devices every VM has (16550 COM1, i8042, CMOS RTC, ACPI PM registers, the boot
 * marker port) and the buses that route vCPU exits to them. State lives in SharedArrayBuffers
 * created once by the main thread; each thread attaches its own device objects to it.
 */
import { writeSync } from 'node:fs';
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
import { UnhandledAccesses, type UnhandledAccessInfo } from '../devices/legacy/unhandled.js';
import type { Vm } from '../kvm/kvm.js';
import { EFD_NONBLOCK, native } from '../kvm/native.js';

/** Structured-clone friendly: posted to every vCPU worker. */
export interface LegacyDeviceState {
  serial: SharedArrayBuffer;
  i8042: SharedArrayBuffer;
  rtc: SharedArrayBuffer;
  unhandled: SharedArrayBuffer;
  serialIrqFd: number;
  i8042IrqFd: number;
}

/** Main thread: creates the shared state and wires the devices' interrupts to KVM irqfds. */
export function createLegacyDeviceState(vm: Vm): LegacyDeviceState {
  const n = native();
  const serialIrqFd = n.eventfd(0, EFD_NONBLOCK);
  const i8042IrqFd = n.eventfd(0, EFD_NONBLOCK);
  vm.registerIrqfd(serialIrqFd, SERIAL_COM1_IRQ);
  vm.registerIrqfd(i8042IrqFd, I8042_IRQ);
  return {
    serial: Serial16550.createState(),
    i8042: I8042.createState(),
    rtc: RtcCmos.createState(),
    unhandled: UnhandledAccesses.createState(),
    serialIrqFd,
    i8042IrqFd,
  };
}

export function eventfdIrq(fd: number): IrqLine {
  return { trigger: () => native().eventfdWrite(fd, 1) };
}

/** Writes all of `bytes` to a file descriptor, waiting out EAGAIN on a non-blocking pipe. */
export function writeAllSync(fd: number, bytes: Uint8Array): void {
  let off = 0;
  const pause = new Int32Array(new SharedArrayBuffer(4));
  while (off < bytes.length) {
    try {
      off += writeSync(fd, bytes, off, bytes.length - off);
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'EAGAIN') return; // console gone: drop output
      Atomics.wait(pause, 0, 0, 1);
    }
  }
}

export interface LegacyHooks {
  /** Console output (serial THR). */
  output(bytes: Uint8Array): void;
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
}

/** Any thread: device objects over the shared state, on fresh buses. */
export function attachLegacyDevices(state: LegacyDeviceState, hooks: LegacyHooks): AttachedDevices {
  const serial = new Serial16550(state.serial, {
    output: hooks.output,
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
  return { pio, mmio, unhandled, serial, i8042 };
}

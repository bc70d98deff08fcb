/**
 * The boot timer's line (Firecracker's boot timer pseudo-device, devices/pseudo/boot_timer.rs
 * there): when the guest first writes the boot marker, one log line with the wall and process
 * CPU time since the build began. The thread that runs the marker's exit (a vCPU worker, or the
 * hub of the native vCPU threads) writes it at once, as Firecracker's vCPU thread does: no wait
 * for the main thread, which may be busy answering InstanceStart then (it took 1-3.5 ms to wake
 * to the marker). Pure and small: it is in every vCPU thread's bundle.
 */
import { writeSync } from 'node:fs';
import { native } from '../kvm/native.js';
import { epochMs } from '../util/clock.js';

/**
 * What a vCPU thread needs to write the line itself (structured-clone friendly). Made by the
 * main thread when the build begins, only when the line would be written as it is (the log
 * level lets Info through, no show_log_origin: that names the caller's file).
 */
export interface BootTimerLine {
  /** The log's descriptor (the log_path file or FIFO, else stderr). */
  fd: number;
  /** The line's prefix after its time stamp, e.g. `[id:fc_vcpu 0]`. */
  head: string;
  /** When the build began: monoMs() (util/clock.ts). */
  startMs: number;
  /** The process's CPU time then, us (processCpuUs). */
  startCpuUs: number;
}

const pad = (n: number, w = 2) => String(n).padStart(w, '0');

/**
 * Firecracker's timestamp (utils::time::LocalTime): local time, `YYYY-MM-DDTHH:MM:SS.nnnnnnnnn`.
 * `epochMs` may carry a fraction (util/clock.ts epochMs()).
 */
export function fcTimestamp(epochMs: number): string {
  const whole = Math.floor(epochMs);
  const d = new Date(whole);
  const ns = (whole % 1000) * 1_000_000 + Math.floor((epochMs - whole) * 1_000_000);
  return (
    `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}` +
    `T${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}.${pad(ns, 9)}`
  );
}

/**
 * Firecracker's boot timer message: the wall and CPU times, right-aligned to 6 digits in us,
 * then whole ms.
 */
export function bootTimeLine(wallUs: number, cpuUs: number): string {
  const w = Math.floor(wallUs);
  const c = Math.floor(cpuUs);
  return (
    `Guest-boot-time = ${String(w).padStart(6)} us ${Math.floor(w / 1000)} ms, ` +
    `${String(c).padStart(6)} CPU us ${Math.floor(c / 1000)} CPU ms`
  );
}

/** The process's CPU time (all threads), us: a clock every thread's seccomp filter allows. */
export function processCpuUs(): number {
  return native().processCpuUs();
}

/** The message for a marker written at `markerMs` (monoMs()), with the CPU time now. */
export function bootTimeMessage(t: Omit<BootTimerLine, 'fd' | 'head'>, markerMs: number): string {
  const wallUs = Math.max(0, Math.round((markerMs - t.startMs) * 1000));
  return bootTimeLine(wallUs, Math.max(0, processCpuUs() - t.startCpuUs));
}

/**
 * Writes the line for a marker written at `markerMs`, in one write (a pipe takes it whole).
 * False when it could not be written (a full non-blocking FIFO): the main thread then writes
 * it through the logger, which counts a line it cannot write.
 */
export function writeBootTimerLine(t: BootTimerLine, markerMs: number): boolean {
  const now = epochMs();
  try {
    writeSync(t.fd, `${fcTimestamp(now)} ${t.head} ${bootTimeMessage(t, markerMs)}\n`);
    return true;
  } catch {
    return false;
  }
}

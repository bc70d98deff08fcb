/**
 * The control block shared by the main thread and the vCPU workers (a SharedArrayBuffer).
 * The main thread writes COMMAND and kicks; each worker owns its own STATE slot.
 * Requests to a parked vCPU (save its state) go in that vCPU's REQUEST slot; the main thread
 * rings DOORBELL after writing one (and after every command change), so a parked worker that
 * waits on DOORBELL wakes for either without a lost wake-up (see waitDoorbell).
 */
import { writeBootTimerLine, type BootTimerLine } from './boot-timer.js';

export const enum Command {
  Run = 0,
  Pause = 1,
  Stop = 2,
}

export const enum VcpuState {
  Starting = 0,
  Running = 1,
  Paused = 2,
  Exited = 3,
}

/** What the main thread asks of one parked vCPU (its REQUEST slot). */
export const enum VcpuRequest {
  None = 0,
  /** Save the vCPU's state and post it ('saved' message), then stay parked. */
  Save = 1,
}

const MAX_VCPUS = 64; // as arch/x86_64/layout.ts MAX_VCPUS
const COMMAND = 0;
const DOORBELL = 1; // bumped after every command or request change
const BOOT_FLAG = 2; // a BootMark (waited on by the boot timer)
const BOOT_CLAIM = 3; // 1 once a thread took the boot marker (the first of the vCPUs to see it)
const STATE_BASE = 8;
const REQUEST_BASE = STATE_BASE + MAX_VCPUS * 2; // state and exit count low word per vCPU
const KIND_BASE = REQUEST_BASE + MAX_VCPUS; // exits by kind, EXIT_KINDS per vCPU
const EXIT_KINDS = 4;
const INT_SLOTS = KIND_BASE + MAX_VCPUS * EXIT_KINDS;

/** The exits counted by kind (Firecracker's vcpu metrics: exit_io_in, exit_io_out, ...). */
export const enum ExitKind {
  IoIn = 0,
  IoOut = 1,
  MmioRead = 2,
  MmioWrite = 3,
}
/** BOOT_FLAG's values. */
const enum BootMark {
  None = 0,
  Written = 1,
  /** Written, and the vCPU thread logged the boot timer's line itself (boot-timer.ts). */
  LineLogged = 2,
}
const F64_SLOTS = 4; // [0] boot marker time (ms since process start), [1] first instruction time

type WaitAsync = (
  a: Int32Array,
  i: number,
  v: number,
) => { async: false; value: string } | { async: true; value: Promise<string> };

export class VcpuControl {
  readonly ints: Int32Array;
  readonly times: Float64Array;

  constructor(
    readonly sab: SharedArrayBuffer = new SharedArrayBuffer(INT_SLOTS * 4 + F64_SLOTS * 8),
  ) {
    this.ints = new Int32Array(sab, 0, INT_SLOTS);
    this.times = new Float64Array(sab, INT_SLOTS * 4, F64_SLOTS);
  }

  get command(): Command {
    return Atomics.load(this.ints, COMMAND) as Command;
  }
  setCommand(c: Command): void {
    Atomics.store(this.ints, COMMAND, c);
    Atomics.notify(this.ints, COMMAND);
    this.ring();
  }
  /** Blocks the calling worker while the command is `c` (or until timeoutMs). */
  waitWhile(c: Command, timeoutMs = Infinity): void {
    Atomics.wait(this.ints, COMMAND, c, timeoutMs);
  }

  /** The doorbell's current value, to pass to waitDoorbell after checking command and requests. */
  get doorbell(): number {
    return Atomics.load(this.ints, DOORBELL);
  }
  private ring(): void {
    Atomics.add(this.ints, DOORBELL, 1);
    Atomics.notify(this.ints, DOORBELL);
  }
  /**
   * Blocks until the doorbell moves from `seen` (or timeoutMs). Read `seen` before checking the
   * command and requests: a change made after that read has moved the doorbell, so the wait
   * returns at once instead of sleeping through it.
   */
  waitDoorbell(seen: number, timeoutMs = Infinity): void {
    Atomics.wait(this.ints, DOORBELL, seen, timeoutMs);
  }

  /** Main thread: asks parked vCPU `vcpu` to do `r`, and wakes it. */
  request(vcpu: number, r: VcpuRequest): void {
    Atomics.store(this.ints, REQUEST_BASE + vcpu, r);
    this.ring();
  }
  /** Worker: takes (and clears) its pending request. */
  takeRequest(vcpu: number): VcpuRequest {
    return Atomics.exchange(this.ints, REQUEST_BASE + vcpu, VcpuRequest.None) as VcpuRequest;
  }

  state(vcpu: number): VcpuState {
    return Atomics.load(this.ints, STATE_BASE + vcpu * 2) as VcpuState;
  }
  setState(vcpu: number, s: VcpuState): void {
    Atomics.store(this.ints, STATE_BASE + vcpu * 2, s);
    Atomics.notify(this.ints, STATE_BASE + vcpu * 2);
  }
  countExit(vcpu: number): void {
    Atomics.add(this.ints, STATE_BASE + vcpu * 2 + 1, 1);
  }
  /** Worker: one more exit of this kind (only the vCPU's own thread writes its slots). */
  countExitKind(vcpu: number, kind: ExitKind): void {
    Atomics.add(this.ints, KIND_BASE + vcpu * EXIT_KINDS + kind, 1);
  }
  /** The exits of a kind so far (wraps at 2^32, as the total does). */
  exitsOfKind(vcpu: number, kind: ExitKind): number {
    return Atomics.load(this.ints, KIND_BASE + vcpu * EXIT_KINDS + kind) >>> 0;
  }
  exits(vcpu: number): number {
    return Atomics.load(this.ints, STATE_BASE + vcpu * 2 + 1) >>> 0;
  }

  /**
   * Records the first boot-marker time (monoMs(), util/clock.ts: the same clock in every thread);
   * with `line`, that thread also logs the boot timer's line, before it wakes the waiters.
   */
  markBoot(ms: number, line?: BootTimerLine): void {
    if (Atomics.compareExchange(this.ints, BOOT_CLAIM, 0, 1) !== 0) return;
    this.times[0] = ms;
    const logged = line !== undefined && writeBootTimerLine(line, ms);
    Atomics.store(this.ints, BOOT_FLAG, logged ? BootMark.LineLogged : BootMark.Written);
    Atomics.notify(this.ints, BOOT_FLAG);
  }
  /** The vCPU thread that took the marker logged the boot timer's line. */
  get bootLineLogged(): boolean {
    return Atomics.load(this.ints, BOOT_FLAG) === BootMark.LineLogged;
  }
  get bootMarkerMs(): number {
    return this.times[0] ?? 0;
  }
  /**
   * Resolves as soon as the boot marker is written (at once if it was), without polling: the
   * boot timer reads the process CPU time then, as close to the write as the main thread can
   * (the vCPU thread's filter has no getrusage). Never resolves if the guest never writes it.
   */
  async waitBootMarker(): Promise<void> {
    while (Atomics.load(this.ints, BOOT_FLAG) === BootMark.None) {
      const w = (Atomics as unknown as { waitAsync: WaitAsync }).waitAsync(
        this.ints,
        BOOT_FLAG,
        BootMark.None,
      );
      if (w.async) await w.value;
    }
  }

  /** Records when the boot vCPU first entered the guest (monoMs(), as markBoot). */
  markFirstEntry(ms: number): void {
    if (this.times[1] === 0) this.times[1] = ms;
  }
  get firstEntryMs(): number {
    return this.times[1] ?? 0;
  }
}

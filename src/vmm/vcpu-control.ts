/**
 * The control block shared by the main thread and the vCPU workers (a SharedArrayBuffer).
 * The main thread writes COMMAND and kicks; each worker owns its own STATE slot.
 */
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

const COMMAND = 0;
const STATE_BASE = 8;
const INT_SLOTS = STATE_BASE + 64 * 2; // state and exit count low word per vCPU
const F64_SLOTS = 4; // [0] boot marker time (ms since process start), [1] first instruction time

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
  }
  /** Blocks the calling worker while the command is `c` (or until timeoutMs). */
  waitWhile(c: Command, timeoutMs = Infinity): void {
    Atomics.wait(this.ints, COMMAND, c, timeoutMs);
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
  exits(vcpu: number): number {
    return Atomics.load(this.ints, STATE_BASE + vcpu * 2 + 1) >>> 0;
  }

  /** Records the first boot-marker time (ms on the performance clock shared by all threads). */
  markBoot(ms: number): void {
    if (this.times[0] === 0) this.times[0] = ms;
  }
  get bootMarkerMs(): number {
    return this.times[0] ?? 0;
  }

  /** Records when the boot vCPU first entered the guest (epoch ms, as markBoot). */
  markFirstEntry(ms: number): void {
    if (this.times[1] === 0) this.times[1] = ms;
  }
  get firstEntryMs(): number {
    return this.times[1] ?? 0;
  }
}

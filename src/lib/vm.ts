/**
 * One VM in the calling process: its lifecycle (start, pause, resume, stop, wait), its console
 * streams and its events. Made by VmHost.createVm (host.ts).
 */
import { EventEmitter } from 'node:events';
import { Socket } from 'node:net';
import { Writable, type Readable } from 'node:stream';
import type { BuiltVm, VmExitEvent } from '../vmm/index.js';
import { fail, ok, toVmError, VmError, type Result } from './errors.js';

/**
 * Where a VM is in its life. `created`: built, vCPUs parked before the guest's first
 * instruction; `running`; `paused`; `stopping`: a stop was asked for; `stopped`: every vCPU is
 * out and the VM's devices are closed (its last descriptors may still be closing: VmHost.drain).
 */
export type VmState = 'created' | 'running' | 'paused' | 'stopping' | 'stopped';

/** How a VM ended (`vm.wait()`, the 'exit' event). */
export interface VmExit {
  /**
   * `poweroff` (the guest powered off: ACPI S5), `reset` (the guest asked for a reset or a
   * reboot: a microVM ends there, as Firecracker's does), `stopped` (you called stop()), `fatal`
   * (the guest or the VMM failed: a triple fault, a KVM error; see `message`).
   */
  reason: 'poweroff' | 'reset' | 'stopped' | 'fatal';
  /** For `fatal`: what happened, in one line. */
  message?: string;
  /** Milliseconds from createVm() to the guest's first write of the boot marker port (0x3f0), if any. */
  bootMarkerMs?: number;
  /** VM exits handled, per vCPU. */
  exits: number[];
}

/** The guest's serial console (COM1) as streams. */
export interface VmConsole {
  /**
   * What the guest writes. Ends when the VM has stopped. Consume it (or destroy it): output
   * nobody reads is held up to the pipe's and the stream's buffers, then dropped by the VM
   * (counted) rather than stalling the guest; a stream nobody has started reading by the time
   * the VM stops is destroyed then.
   */
  output: Readable;
  /**
   * What the guest reads. Bytes wait (back-pressure: write() returns false) while the guest's
   * receive buffer is full; bytes written after the VM stopped are discarded.
   */
  input: Writable;
}

/** The events a Vm emits (EventEmitter; `events.on(vm, 'state')` gives an async iterator). */
export interface VmEvents {
  /** The state changed. */
  state: [state: VmState, previous: VmState];
  /** The VM ended (once; `wait()` resolves with the same value). */
  exit: [exit: VmExit];
  /**
   * Something went wrong outside the guest's own exit (a console stream failed). Emitted only
   * while someone listens: an 'error' with no listener would throw in the embedding program.
   */
  error: [error: VmError];
}

/** What the host gives a VM to run with. */
export interface VmParts {
  built: BuiltVm;
  id: string;
  createdAt: number;
  /** Built running (CreateVmOptions.start). */
  started?: boolean;
  consoleReadFd?: number;
}

let serial = 0;

export class Vm extends EventEmitter<VmEvents> {
  /** A process-unique id (also the default vCPU thread names' suffix). */
  readonly id: string;
  /** The console streams; undefined when created with `console: 'none'` or an fd of yours. */
  readonly console: VmConsole | undefined;
  private _state: VmState = 'created';
  private readonly built: BuiltVm;
  private readonly exitP: Promise<VmExit>;
  private exitInfo: VmExit | undefined;
  private readonly createdAt: number;

  /** @internal Made by VmHost.createVm. */
  constructor(p: VmParts) {
    super();
    this.id = p.id || `vm${++serial}`;
    this.built = p.built;
    this.createdAt = p.createdAt;
    if (p.started) this._state = 'running';
    this.console = p.consoleReadFd !== undefined ? this.makeConsole(p.consoleReadFd) : undefined;
    this.exitP = p.built.vmm.exited.then((ev) => this.ended(ev));
  }

  get state(): VmState {
    return this._state;
  }

  /** Runs the guest (from `created`). */
  async start(): Promise<Result<void>> {
    if (this._state !== 'created')
      return fail('INVALID_STATE', `cannot start VM ${this.id}: it is ${this._state}`);
    this.built.vmm.resume();
    this.setState('running');
    return ok(undefined);
  }

  /**
   * Pauses the vCPUs and the devices' data plane. `TIMEOUT` when a vCPU does not park in time:
   * the VM is then left running.
   */
  async pause(): Promise<Result<void>> {
    if (this._state !== 'running')
      return fail('INVALID_STATE', `cannot pause VM ${this.id}: it is ${this._state}`);
    try {
      await this.built.vmm.pauseAll(this.built.deviceWorker);
    } catch (e) {
      if (this.isOver()) return fail('INVALID_STATE', `VM ${this.id} stopped while pausing`);
      return { ok: false, error: toVmError(e, 'TIMEOUT') };
    }
    if (this.isOver()) return fail('INVALID_STATE', `VM ${this.id} stopped while pausing`);
    this.setState('paused');
    return ok(undefined);
  }

  /** Resumes a paused VM. */
  async resume(): Promise<Result<void>> {
    if (this._state !== 'paused')
      return fail('INVALID_STATE', `cannot resume VM ${this.id}: it is ${this._state}`);
    try {
      await this.built.vmm.resumeAll(this.built.deviceWorker);
    } catch (e) {
      return { ok: false, error: toVmError(e) };
    }
    if (this.isOver()) return fail('INVALID_STATE', `VM ${this.id} stopped while resuming`);
    this.setState('running');
    return ok(undefined);
  }

  /**
   * Stops the VM (from any state; nothing more to do once stopping) and resolves with how it
   * ended: `stopped`, or what ended it first. Never rejects.
   */
  stop(): Promise<VmExit> {
    if (this._state !== 'stopped' && this._state !== 'stopping') {
      this.built.vmm.requestStop();
      this.setState('stopping');
    }
    return this.exitP;
  }

  /**
   * Resolves when the VM has ended, whatever ended it. Never rejects. The guest's last console
   * bytes may still be on their way through the output pipe then: the output's 'end' says they
   * have all arrived.
   */
  wait(): Promise<VmExit> {
    return this.exitP;
  }

  /** How it ended, once it has (else undefined). */
  get exit(): VmExit | undefined {
    return this.exitInfo;
  }

  /** Counters: VM exits per vCPU, console bytes in and out, console bytes dropped. */
  stats(): { exits: number[]; serial: Record<string, number>; console: Record<string, number> } {
    const { devices } = this.built;
    return {
      exits: this.exitCounts(),
      serial: { ...devices.serial.stats() } as unknown as Record<string, number>,
      console: { ...devices.console.stats() } as unknown as Record<string, number>,
    };
  }

  private exitCounts(): number[] {
    const vmm = this.built.vmm;
    return Array.from({ length: vmm.vcpuCount }, (_, i) => vmm.control.exits(i));
  }

  private isOver(): boolean {
    return this._state === 'stopped' || this._state === 'stopping' || this.built.vmm.stopping;
  }

  private setState(s: VmState): void {
    const prev = this._state;
    if (prev === s) return;
    this._state = s;
    this.emit('state', s, prev);
  }

  private ended(ev: VmExitEvent): VmExit {
    const marker = this.built.vmm.control.bootMarkerMs;
    const info: VmExit = {
      reason: ev.kind,
      ...(ev.kind === 'fatal' ? { message: ev.message } : {}),
      ...(marker > 0 ? { bootMarkerMs: marker - this.createdAt } : {}),
      exits: this.exitCounts(),
    };
    this.exitInfo = info;
    if (this._state !== 'stopping') this.setState('stopping');
    this.setState('stopped');
    const out = this.console?.output;
    // Nobody ever read it: nobody will see its end either (and its descriptor must go).
    if (out && out.readableFlowing === null && !out.destroyed) out.destroy();
    this.emit('exit', info);
    return info;
  }

  private reportError(e: VmError): void {
    if (this.listenerCount('error') > 0) this.emit('error', e);
  }

  private makeConsole(readFd: number): VmConsole {
    const output = new Socket({ fd: readFd, readable: true, writable: false });
    output.on('error', (e) =>
      this.reportError(new VmError('INTERNAL', `console output: ${e.message}`)),
    );
    const serialDev = this.built.devices.serial;
    const input = new Writable({
      highWaterMark: 16 * 1024,
      write: (chunk: Buffer, _enc, cb) => {
        let rest: Uint8Array = chunk;
        const pump = (): void => {
          while (rest.length > 0) {
            if (this.isOver()) return cb(); // the VM is gone: dropped
            const n = serialDev.pushInput(rest);
            rest = rest.subarray(n);
            if (n === 0) {
              // The guest's receive ring is full: wait for it to take a byte (or for the end).
              void Promise.race([serialDev.waitForInputSpace(), this.exitP]).then(pump, () => cb());
              return;
            }
          }
          cb();
        };
        pump();
      },
    });
    return { output, input };
  }
}

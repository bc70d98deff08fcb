/**
 * The run loop of one vCPU, as an explicit state machine (running -> paused -> running ... ->
 * exited). Runs inside the vCPU's worker thread; every exit that needs the VMM is handled here
 * without a cross-thread round trip (an exit handed to another thread costs ~400 µs in the lab).
 */
import * as C from '../kvm/constants.js';
import { Vcpu } from '../kvm/kvm.js';
import { RUN } from '../kvm/structs.js';
import type { Bus } from '../devices/bus.js';
import type { UnhandledAccesses } from '../devices/legacy/unhandled.js';
import { Command, ExitKind, VcpuControl, VcpuRequest, VcpuState } from './vcpu-control.js';
import { monoMs } from '../util/clock.js';

/** Why a vCPU stopped the VM. */
export type VmExitEvent =
  | { kind: 'poweroff' }
  | { kind: 'reset' }
  | { kind: 'stopped' } // the main thread asked
  | { kind: 'fatal'; message: string };

export interface ExitHandlers {
  pio: Bus;
  mmio: Bus;
  /** An access no device claims: answer safely (reads all-ones), count, log once. */
  unhandled(space: 'pio' | 'mmio', addr: number, data: Uint8Array, isWrite: boolean): void;
}

/** The exit handlers over a thread's attached devices (legacy-devices.ts attachLegacyDevices). */
export function exitHandlersOf(devices: {
  pio: Bus;
  mmio: Bus;
  unhandled: UnhandledAccesses;
}): ExitHandlers {
  const u = devices.unhandled;
  return {
    pio: devices.pio,
    mmio: devices.mmio,
    unhandled: (space, addr, data, isWrite) =>
      isWrite ? u.write(space, addr, data) : u.read(space, addr, data),
  };
}

/** What the worker does for requests made to its parked vCPU (see VcpuControl.request). */
export interface ParkedRequestHandlers {
  /** Save the vCPU's state and reply; runs in the parked loop, between two waits. */
  save(): void;
  /** A request the pause ended before it was served (resume or stop raced it): reply so. */
  dropped(r: VcpuRequest): void;
}

export class VcpuLoop {
  private readonly u8: Uint8Array;
  /** view()'s last view of each length (1-8); index 0 unused. */
  private readonly views: (Uint8Array | undefined)[] = new Array<Uint8Array | undefined>(9).fill(
    undefined,
  );
  /** Set by a device (reset, poweroff) to end the loop after the current exit. */
  pendingEvent: VmExitEvent | undefined;

  constructor(
    private readonly id: number,
    private readonly vcpu: Vcpu,
    private readonly control: VcpuControl,
    private readonly handlers: ExitHandlers,
    private readonly requests?: ParkedRequestHandlers,
  ) {
    this.u8 = new Uint8Array(vcpu.run.buffer);
  }

  /** Runs until the VM ends or the main thread says stop. Never throws for guest behaviour. */
  run(): VmExitEvent {
    const { control, vcpu, id } = this;
    control.setState(id, VcpuState.Running);
    // The first real guest entry (a VM started paused, a restored one, parks first).
    let first = id === 0;
    for (;;) {
      const cmd = control.command;
      if (cmd === Command.Stop) return this.finish({ kind: 'stopped' });
      if (cmd === Command.Pause) {
        this.park();
        continue;
      }
      if (first) {
        first = false;
        control.markFirstEntry(monoMs());
      }
      if (!vcpu.runOnce()) {
        // Kicked (EINTR). A pause or stop is handled at the top of the loop; a kick that found
        // the command back at Run (a resume raced it) must not leave immediate_exit set.
        if (control.command === Command.Run) vcpu.immediateExit = false;
        continue;
      }
      control.countExit(id);
      const event = this.handleExit();
      if (event) return this.finish(event);
    }
  }

  /**
   * Pause: re-enter KVM_RUN once with immediate_exit still set so that a half-done MMIO/PIO
   * exit completes inside KVM, tell kvmclock (KVM_KVMCLOCK_CTRL), then wait until the command is no longer Pause, serving the
   * main thread's requests (save) meanwhile: the vCPU is outside KVM_RUN and its state is whole.
   */
  private park(): void {
    const { control, vcpu, id } = this;
    vcpu.immediateExit = true;
    vcpu.runOnce();
    // Tell the guest's kvmclock it was stopped (so its soft-lockup watchdog does not fire on
    // resume). Best effort: KVM refuses (EINVAL) when the guest does not use kvmclock.
    try {
      vcpu.kvmclockCtrl();
    } catch {
      // an unexpected refusal must not stop the pause
    }
    control.setState(id, VcpuState.Paused);
    for (;;) {
      const seen = control.doorbell; // before the checks: see VcpuControl.waitDoorbell
      if (control.command !== Command.Pause) break;
      const r = control.takeRequest(id);
      if (r === VcpuRequest.Save) {
        if (this.requests) this.requests.save();
        else throw new Error(`vCPU ${id}: a save request but no request handlers`);
      }
      control.waitDoorbell(seen, 1000);
    }
    const late = control.takeRequest(id);
    if (late !== VcpuRequest.None) this.requests?.dropped(late);
    vcpu.immediateExit = false;
    control.setState(id, VcpuState.Running);
  }

  private finish(e: VmExitEvent): VmExitEvent {
    this.control.setState(this.id, VcpuState.Exited);
    return e;
  }

  /**
   * Handles the exit KVM just reported in this vCPU's kvm_run (the vCPU is outside KVM_RUN):
   * what run() does after each KVM_RUN, and what the native runner's JS thread calls
   * (vcpu-threads.ts). An event ends the VM.
   */
  handleExit(): VmExitEvent | undefined {
    const run = this.vcpu.run;
    const reason = this.vcpu.exitReason;
    switch (reason) {
      case C.KVM_EXIT_IO: {
        const isWrite = run.getUint8(RUN.ioDirection) === C.KVM_EXIT_IO_OUT;
        this.control.countExitKind(this.id, isWrite ? ExitKind.IoOut : ExitKind.IoIn);
        const size = run.getUint8(RUN.ioSize);
        const port = run.getUint16(RUN.ioPort, true);
        const count = run.getUint32(RUN.ioCount, true);
        // A u64 read as two u32s: no BigInt made per exit.
        const off =
          run.getUint32(RUN.ioDataOffset, true) +
          run.getUint32(RUN.ioDataOffset + 4, true) * 0x1_0000_0000;
        // KVM guarantees data_offset + size*count lies inside the kvm_run mapping; check anyway.
        if (size === 0 || off + size * count > this.u8.length) {
          return {
            kind: 'fatal',
            message: `KVM reported a malformed I/O exit (port 0x${port.toString(16)})`,
          };
        }
        for (let i = 0; i < count; i++) {
          this.dispatch('pio', this.handlers.pio, port, this.view(off + i * size, size), isWrite);
        }
        return this.pendingEvent;
      }
      case C.KVM_EXIT_MMIO: {
        const addr =
          run.getUint32(RUN.mmioPhysAddr, true) +
          run.getUint32(RUN.mmioPhysAddr + 4, true) * 0x1_0000_0000;
        const len = run.getUint32(RUN.mmioLen, true);
        const isWrite = run.getUint8(RUN.mmioIsWrite) !== 0;
        this.control.countExitKind(this.id, isWrite ? ExitKind.MmioWrite : ExitKind.MmioRead);
        if (len === 0 || len > 8)
          return { kind: 'fatal', message: `KVM reported an MMIO exit of ${len} bytes` };
        this.dispatch('mmio', this.handlers.mmio, addr, this.view(RUN.mmioData, len), isWrite);
        return this.pendingEvent;
      }
      case C.KVM_EXIT_HLT:
        // With the in-kernel LAPIC a halt never reaches us unless every interrupt is masked.
        return { kind: 'fatal', message: 'the guest halted with interrupts disabled' };
      case C.KVM_EXIT_SHUTDOWN:
        return {
          kind: 'fatal',
          message: `the guest triple-faulted (KVM_EXIT_SHUTDOWN) on vCPU ${this.id}${this.cpuState()}`,
        };
      case C.KVM_EXIT_SYSTEM_EVENT: {
        const type = run.getUint32(RUN.systemEventType, true);
        if (type === C.KVM_SYSTEM_EVENT_SHUTDOWN) return { kind: 'poweroff' };
        if (type === C.KVM_SYSTEM_EVENT_RESET) return { kind: 'reset' };
        return { kind: 'fatal', message: `the guest crashed (KVM system event ${type})` };
      }
      case C.KVM_EXIT_INTERNAL_ERROR: {
        const sub = run.getUint32(RUN.internalSuberror, true);
        const what =
          ['', 'emulation failure', 'simultaneous exceptions', 'delivery event error'][sub] ??
          `suberror ${sub}`;
        const hint = sub === 1 ? ' (a PVM host cannot run stock kernels: see `npm run lab`)' : '';
        return { kind: 'fatal', message: `KVM internal error on vCPU ${this.id}: ${what}${hint}` };
      }
      case C.KVM_EXIT_FAIL_ENTRY: {
        const hw = run.getBigUint64(RUN.failEntryReason, true);
        return {
          kind: 'fatal',
          message: `KVM could not enter the guest (hardware reason 0x${hw.toString(16)})`,
        };
      }
      case C.KVM_EXIT_INTR:
      case C.KVM_EXIT_IRQ_WINDOW_OPEN:
        return undefined;
      default:
        return {
          kind: 'fatal',
          message: `unexpected KVM exit ${C.EXIT_REASON_NAMES[reason] ?? reason} on vCPU ${this.id}`,
        };
    }
  }

  /** Where the vCPU stood, for a fatal exit's message (best effort: '' if KVM refuses). */
  private cpuState(): string {
    try {
      const r = this.vcpu.getRegs();
      const sr = this.vcpu.getSregs();
      const h = (v: bigint | number) => `0x${v.toString(16)}`;
      // On AMD, KVM reinitializes the vCPU at a shutdown (the VMCB is undefined after one): the
      // registers then read back in their reset state and say nothing about the fault.
      if (r.rip === 0xfff0n && sr.cs.selector === 0xf000)
        return ' (this host reports the vCPU in its reset state: no registers at the fault)';
      return (
        `: rip ${h(r.rip)} rsp ${h(r.rsp)} rflags ${h(r.rflags)} cr0 ${h(sr.cr0)} cr2 ${h(sr.cr2)} ` +
        `cr3 ${h(sr.cr3)} cr4 ${h(sr.cr4)} efer ${h(sr.efer)} idt ${h(sr.idt.base)}/${h(sr.idt.limit)} ` +
        `cs ${h(sr.cs.selector)}`
      );
    } catch {
      return '';
    }
  }

  /**
   * The kvm_run bytes [off, off+len) as a view, made once per length and place: KVM puts an
   * exit's data at the same offset every time (MMIO in the struct, port I/O one page after it),
   * so an exit allocates nothing. Devices read or fill the view during the call and keep no
   * reference to it (BusDevice's contract).
   */
  private view(off: number, len: number): Uint8Array {
    const v = this.views[len];
    if (v !== undefined && v.byteOffset === off) return v;
    const made = this.u8.subarray(off, off + len);
    this.views[len] = made;
    return made;
  }

  private dispatch(
    space: 'pio' | 'mmio',
    bus: Bus,
    addr: number,
    data: Uint8Array,
    isWrite: boolean,
  ): void {
    if (!bus.access(addr, data, isWrite)) this.handlers.unhandled(space, addr, data, isWrite);
  }
}

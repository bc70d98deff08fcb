/**
 * vCPUs on native runner threads (issue 18 part B): each vCPU's KVM_RUN loop is a pthread of the
 * native shim (vcpuRunnerStart: it only runs KVM_RUN and sleeps), and ONE JavaScript thread, the
 * hub (a Node worker running this file), serves the exits of all of them: it reads each vCPU's
 * kvm_run mapping and reuses VcpuLoop.handleExit and the same device buses as a vCPU worker, so
 * devices do not change. The per-vCPU cost is a thread (a 64 KiB stack) instead of a V8 isolate.
 *
 * Hand-off, per vCPU (three words in a SharedArrayBuffer, see RunnerWord): the hub stores RUN
 * (vcpuRunnerGo: a futex wake); the runner enters KVM_RUN; on return it stores EXITED and the
 * errno, and writes the hub's eventfd; the hub, blocked in read(eventfd), wakes, scans the words,
 * handles each exit and says RUN again. Every exit costs two thread switches, so exit-heavy
 * guests with few vCPUs run faster on per-vCPU workers (vcpu-worker.ts): see chooseVcpuThreads.
 *
 * Lifecycle, driven by the same VcpuControl block as the workers (the main thread also rings the
 * eventfd after each command or request, see Vmm): Pause re-enters KVM_RUN once with
 * immediate_exit set (so a half-done MMIO/PIO completes), tells kvmclock, and parks the vCPU in
 * the hub (the runner sleeps); a save request is served by the hub itself with the vCPU ioctls
 * (legal from any thread while the vCPU is outside KVM_RUN); Stop asks every runner to quit and
 * joins it before the hub ends. Kicks (immediate_exit + the kick signal) come from the main
 * thread through vcpuRunnerKick, as for workers.
 */
import { Kvm, Vcpu } from '../kvm/kvm.js';
import { isSyscallError, native } from '../kvm/native.js';
import { installWorkerFilter, runnerProgram } from '../sandbox/seccomp/install.js';
import type { GuestRamLayout } from './guest-ram.js';
import { attachLegacyDevices, type LegacyDeviceState } from './legacy-devices.js';
import { Command, VcpuControl, VcpuRequest, VcpuState } from './vcpu-control.js';
import { VcpuLoop, type ParkedRequestHandlers, type VmExitEvent } from './vcpu-loop.js';
import type { TransportSlot } from './virtio-transport.js';
import type { VcpuWorkerMessage } from './vcpu-worker.js';

/** The runner's words (native/typervisor.c "vCPU runner threads"), WORDS per vCPU. */
export const enum RunnerWord {
  Idle = 0,
  Run = 1,
  Exited = 2,
  Quit = 3,
  Dead = 4,
}
const WORDS = 4; // state, errno, runs, (padding)
const EINTR = 4;
const EAGAIN = 11;

export interface VcpuHubData {
  vcpus: Array<{ id: number; vcpuFd: number }>;
  mmapSize: number;
  ram: GuestRamLayout;
  control: SharedArrayBuffer;
  legacy: LegacyDeviceState;
  virtio: { slots: TransportSlot[]; controlFd: number };
  /** A blocking eventfd the hub sleeps on; the runners and the main thread write it. */
  eventFd: number;
  /** MSRs a snapshot saves besides KVM's list: the CPU template's (vcpu-worker.ts). */
  extraMsrs?: number[];
}

export interface VcpuHubStart {
  type: 'start-hub';
  data: VcpuHubData;
}

/** What the hub posts besides the vCPU worker's messages (vcpu-worker.ts VcpuWorkerMessage). */
export type VcpuHubMessage =
  /** The runner handles, by position in VcpuHubData.vcpus, for vcpuRunnerKick. */
  | { type: 'runners'; handles: number[] }
  /** A vCPU ended the VM (poweroff, reset, fatal): the main thread stops the rest. */
  | { type: 'event'; event: VmExitEvent };

interface HubVcpu {
  id: number;
  vcpu: Vcpu;
  loop: VcpuLoop;
  requests: ParkedRequestHandlers;
  base: number;
  handle: number;
  /** The runner was asked to run and has not reported back yet. */
  inGuest: boolean;
  /** The current KVM_RUN is the pause's last pass (immediate_exit set). */
  parking: boolean;
  parked: boolean;
  done: boolean;
}

/**
 * Runs the hub until the VM ends or is stopped, then joins every runner and posts 'exit'.
 * `saveHandlers` is the vCPU worker's (save and reply for one vCPU).
 */
export async function runHub(
  d: VcpuHubData,
  post: (m: VcpuWorkerMessage, transfer?: ArrayBuffer[]) => void,
  saveHandlers: (
    id: number,
    vcpu: Vcpu,
    kvm: Kvm,
    post: (m: VcpuWorkerMessage, transfer: ArrayBuffer[]) => void,
  ) => ParkedRequestHandlers,
): Promise<void> {
  const n = native();
  const mappings: Array<() => void> = [];
  const vs: HubVcpu[] = [];
  const words = new Int32Array(new SharedArrayBuffer(Math.max(1, d.vcpus.length) * WORDS * 4));
  let event: VmExitEvent | undefined;
  /** Blocks in read(eventfd) until a runner or the main thread rings (a signal: look again). */
  const sleep = () => {
    try {
      n.eventfdRead(d.eventFd);
    } catch (e) {
      if (!isSyscallError(e, 'EINTR')) throw e;
    }
  };
  const fail = (e: VmExitEvent) => {
    if (!event) post({ type: 'event', event: e } satisfies VcpuHubMessage);
    event ??= e;
  };
  try {
    const kickSignal = n.installKickHandler();
    const control = new VcpuControl(d.control);
    // No mapping of guest RAM: nothing on this thread reads it (as in the vCPU worker).
    // Opened now: a save reads KVM's MSR list from /dev/kvm, and the filter allows no open.
    const kvm = Kvm.open();
    mappings.push(() => kvm.close());
    let current: VcpuLoop | undefined;
    const devices = attachLegacyDevices(d.legacy, {
      onPowerOff: () => current && (current.pendingEvent ??= { kind: 'poweroff' }),
      onReset: () => current && (current.pendingEvent ??= { kind: 'reset' }),
      onBootMarker: () =>
        control.markBoot(performance.timeOrigin + performance.now(), d.legacy.bootTimer),
      log: (message) => post({ type: 'log', message }),
    });
    if (d.virtio.slots.length > 0) {
      const { attachVirtioTransports } = await import('./virtio-transport.js');
      attachVirtioTransports(d.virtio.slots, d.virtio.controlFd, devices.mmio);
    }
    const handlers = {
      pio: devices.pio,
      mmio: devices.mmio,
      unhandled: (space: 'pio' | 'mmio', addr: number, data: Uint8Array, isWrite: boolean) =>
        isWrite
          ? devices.unhandled.write(space, addr, data)
          : devices.unhandled.read(space, addr, data),
    };
    const program = runnerProgram();
    d.vcpus.forEach(({ id, vcpuFd }, i) => {
      const vcpu = new Vcpu(vcpuFd, d.mmapSize);
      mappings.push(() => n.munmap(vcpu.run.buffer as ArrayBuffer));
      const base = i * WORDS;
      const handle = n.vcpuRunnerStart(
        vcpuFd,
        words,
        base,
        d.eventFd,
        kickSignal,
        `tv-vrun${id}`,
        program,
      );
      vs.push({
        id,
        vcpu,
        loop: new VcpuLoop(id, vcpu, control, handlers),
        requests: saveHandlers(id, vcpu, kvm, post),
        base,
        handle,
        inGuest: false,
        parking: false,
        parked: false,
        done: false,
      });
    });
    post({ type: 'runners', handles: vs.map((v) => v.handle) } satisfies VcpuHubMessage);
    // From here on this thread only serves exits: the vCPU role's filter (the runners made
    // theirs, a smaller one, each on itself).
    installWorkerFilter('vcpu', 'tv-vcpuhub');

    const go = (v: HubVcpu) => {
      v.inGuest = true;
      n.vcpuRunnerGo(v.handle);
    };
    let first = true;
    for (const v of vs) control.setState(v.id, VcpuState.Running);
    for (;;) {
      const cmd = control.command;
      if (cmd === Command.Stop) break;
      let live = 0;
      for (const v of vs) {
        if (v.done) continue;
        if (v.inGuest) {
          const s = Atomics.load(words, v.base);
          if (s === RunnerWord.Run) {
            live++;
            continue;
          }
          v.inGuest = false;
          if (s !== RunnerWord.Exited) {
            v.done = true;
            control.setState(v.id, VcpuState.Exited);
            fail({ kind: 'fatal', message: `vCPU ${v.id}: its runner thread ended` });
            continue;
          }
          const err = Atomics.load(words, v.base + 1);
          if (err === 0) {
            control.countExit(v.id);
            current = v.loop;
            const ev = v.loop.handleExit();
            current = undefined;
            if (ev) {
              v.done = true;
              control.setState(v.id, VcpuState.Exited);
              fail(ev);
              continue;
            }
            // A real exit in the pause's last pass: complete it with one more pass.
            if (v.parking && cmd === Command.Pause) {
              live++;
              go(v);
              continue;
            }
          } else if (err === EINTR || err === EAGAIN) {
            if (cmd === Command.Run && !v.parked) v.vcpu.immediateExit = false;
          } else {
            v.done = true;
            control.setState(v.id, VcpuState.Exited);
            fail({ kind: 'fatal', message: `vCPU ${v.id}: KVM_RUN failed (errno ${err})` });
            continue;
          }
          if (v.parking) {
            v.parking = false;
            try {
              v.vcpu.kvmclockCtrl();
            } catch {
              // an unexpected refusal must not stop the pause
            }
            v.parked = true;
            control.setState(v.id, VcpuState.Paused);
          }
        }
        live++;
        // The hub owns the vCPU here: decide its next step.
        if (cmd === Command.Run) {
          if (v.parked) {
            v.parked = false;
            const late = control.takeRequest(v.id);
            if (late !== VcpuRequest.None) v.requests.dropped(late);
            v.vcpu.immediateExit = false;
            control.setState(v.id, VcpuState.Running);
          }
          if (first && v.id === 0) {
            first = false;
            control.markFirstEntry(performance.timeOrigin + performance.now());
          }
          go(v);
        } else if (cmd === Command.Pause) {
          if (!v.parked) {
            v.parking = true;
            v.vcpu.immediateExit = true;
            go(v);
          } else if (control.takeRequest(v.id) === VcpuRequest.Save) {
            v.requests.save();
          }
        }
      }
      if (live === 0) break;
      sleep(); // until a runner or the main thread rings
    }
  } catch (e) {
    fail({ kind: 'fatal', message: `vCPU hub: ${(e as Error).message}` });
  } finally {
    // Every runner ends before its words and mappings go: ask, then wait (the main thread kicks
    // the ones still in KVM_RUN: it got the Stop or the 'event'), then join.
    for (const v of vs) {
      try {
        n.vcpuRunnerQuit(v.handle);
      } catch {
        // already gone
      }
    }
    for (;;) {
      const left = vs.filter((v) => Atomics.load(words, v.base) !== RunnerWord.Dead);
      if (left.length === 0) break;
      sleep();
    }
    for (const v of vs) n.vcpuRunnerJoin(v.handle);
    const control = new VcpuControl(d.control);
    for (const v of vs) control.setState(v.id, VcpuState.Exited);
    for (const unmap of mappings) unmap();
  }
  post({ type: 'exit', event: event ?? { kind: 'stopped' } });
}

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
import { installWorkerFilter, runnerProgram, watcherProgram } from '../sandbox/seccomp/install.js';
import { cpusAllowed } from '../util/cpus.js';
import type { GuestRamLayout } from './guest-ram.js';
import { attachLegacyDevices, type LegacyDeviceState } from './legacy-devices.js';
import { Command, VcpuControl, VcpuRequest, VcpuState } from './vcpu-control.js';
import {
  VcpuLoop,
  exitHandlersOf,
  type ParkedRequestHandlers,
  type VmExitEvent,
} from './vcpu-loop.js';
import type { TransportSlot } from './virtio-transport.js';
import type { VcpuWorkerMessage } from './vcpu-worker.js';
import { monoMs } from '../util/clock.js';

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
  /**
   * The first vCPU is run by the hub's own thread while its event loop is idle (loopRunnerStart,
   * `--vcpu-threads loop`), not by a runner thread. Only with the hub on the main thread.
   */
  loopFirst?: boolean;
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
  /** Run by this thread's event loop (loopRunnerStart), not by a runner thread. */
  onLoop: boolean;
  parked: boolean;
  done: boolean;
}

type SaveHandlersFor = (
  id: number,
  vcpu: Vcpu,
  kvm: Kvm,
  post: (m: VcpuWorkerMessage, transfer: ArrayBuffer[]) => void,
) => ParkedRequestHandlers;

type AttachVirtio = (typeof import('./virtio-transport.js'))['attachVirtioTransports'];

/**
 * The hub's state and its steps, driven either by a worker that blocks in read(eventfd) between
 * passes (runHub) or by the main thread's event loop (startHubOnThisThread: the eventfd watched
 * with fdWatch, one pass per wake-up). Each step is synchronous and never blocks.
 */
export class VcpuHub {
  private readonly n = native();
  private readonly vs: HubVcpu[] = [];
  private readonly words: Int32Array;
  private readonly mappings: Array<() => void> = [];
  private readonly control: VcpuControl;
  private event: VmExitEvent | undefined;
  private current: VcpuLoop | undefined;
  private first = true;
  private finished = false;
  /**
   * Exits of runner threads served by the last pass (the loop's vCPU's are not counted: see
   * nextExitSoon).
   */
  served = 0;
  /** vCPUs on runner threads (not on this thread's loop). */
  private threadRunners = 0;
  /**
   * Messages posted so far: the loop's run of steps (startHubOnThisThread) ends after an exit
   * that posted, whose receiver may have left JS work that runs when the callback returns.
   */
  posts = 0;
  private readonly post: (m: VcpuWorkerMessage, transfer?: ArrayBuffer[]) => void;

  constructor(
    private readonly d: VcpuHubData,
    post: (m: VcpuWorkerMessage, transfer?: ArrayBuffer[]) => void,
    private readonly saveHandlers: SaveHandlersFor,
  ) {
    this.post = (m, transfer) => {
      this.posts++;
      post(m, transfer);
    };
    this.words = new Int32Array(new SharedArrayBuffer(Math.max(1, d.vcpus.length) * WORDS * 4));
    this.control = new VcpuControl(d.control);
  }

  /**
   * Attaches the devices and starts one runner per vCPU, then posts their handles. With
   * `loopFirst`, the first vCPU is run by this thread's loop, which calls `onLoopExit` after
   * each of its KVM_RUNs (its handle is posted as -1: nothing to kick from this thread).
   */
  start(attachVirtio: AttachVirtio | undefined, onLoopExit?: (status: number) => void): void {
    const { d, n, control } = this;
    const kickSignal = n.installKickHandler();
    // No mapping of guest RAM: nothing on this thread reads it (as in the vCPU worker).
    // Opened now: a save reads KVM's MSR list from /dev/kvm, and a worker's filter allows no open.
    const kvm = Kvm.open();
    this.mappings.push(() => kvm.close());
    const devices = attachLegacyDevices(d.legacy, {
      onPowerOff: () => this.current && (this.current.pendingEvent ??= { kind: 'poweroff' }),
      onReset: () => this.current && (this.current.pendingEvent ??= { kind: 'reset' }),
      onBootMarker: () => control.markBoot(monoMs(), d.legacy.bootTimer),
      log: (message) => this.post({ type: 'log', message }),
    });
    if (d.virtio.slots.length > 0) {
      if (!attachVirtio) throw new Error('virtio transports to attach but no module for them');
      attachVirtio(d.virtio.slots, d.virtio.controlFd, devices.mmio);
    }
    const handlers = exitHandlersOf(devices);
    const program = runnerProgram();
    d.vcpus.forEach(({ id, vcpuFd }, i) => {
      const vcpu = new Vcpu(vcpuFd, d.mmapSize);
      this.mappings.push(() => n.munmap(vcpu.run.buffer as ArrayBuffer));
      const base = i * WORDS;
      const onLoop = i === 0 && d.loopFirst === true;
      if (onLoop && !onLoopExit)
        throw new Error('a vCPU on the loop but no callback for its exits');
      const handle = onLoop
        ? n.loopRunnerStart(
            vcpuFd,
            vcpu.run.buffer as ArrayBuffer,
            this.words,
            base,
            kickSignal,
            onLoopExit!,
            watcherProgram(),
          )
        : n.vcpuRunnerStart(
            vcpuFd,
            this.words,
            base,
            d.eventFd,
            kickSignal,
            `tv-vrun${id}`,
            program,
            waits ? RUNNER_SPIN : 0,
          );
      if (!onLoop) this.threadRunners++;
      this.vs.push({
        onLoop,
        id,
        vcpu,
        loop: new VcpuLoop(id, vcpu, control, handlers),
        requests: this.saveHandlers(id, vcpu, kvm, this.post),
        base,
        handle,
        inGuest: false,
        parking: false,
        parked: false,
        done: false,
      });
    });
    this.post({
      type: 'runners',
      handles: this.vs.map((v) => (v.onLoop ? -1 : v.handle)),
    } satisfies VcpuHubMessage);
    for (const v of this.vs) control.setState(v.id, VcpuState.Running);
  }

  /** The first reason the VM ends is posted once (the main thread then stops the rest). */
  fail(e: VmExitEvent): void {
    if (!this.event) this.post({ type: 'event', event: e } satisfies VcpuHubMessage);
    this.event ??= e;
  }

  /** Lets vCPU `v` enter the guest (a method, not a closure made per pass: a pass per exit). */
  private go(v: HubVcpu): void {
    v.inGuest = true;
    // The loop's vCPU after an exit: its word from EXITED to RUN here, as loopRunnerGo does,
    // without a native call per exit; any other state goes through the shim's checks.
    if (v.onLoop) {
      if (
        Atomics.compareExchange(this.words, v.base, RunnerWord.Exited, RunnerWord.Run) !==
        RunnerWord.Exited
      )
        this.n.loopRunnerGo(v.handle);
    } else this.n.vcpuRunnerGo(v.handle);
  }

  /**
   * One pass over every vCPU: serves the exits its runners reported, and says RUN, parks or
   * saves as the command says. False once there is nothing left to serve (Stop, or no vCPU
   * left running).
   */
  serve(): boolean {
    const { control, words } = this;
    const cmd = control.command;
    if (cmd === Command.Stop) return false;
    let live = 0;
    this.served = 0;
    for (const v of this.vs) {
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
          this.fail({ kind: 'fatal', message: `vCPU ${v.id}: its runner thread ended` });
          continue;
        }
        const err = Atomics.load(words, v.base + 1);
        if (err === 0) {
          if (!v.onLoop) this.served++;
          control.countExit(v.id);
          this.current = v.loop;
          const ev = v.loop.handleExit();
          this.current = undefined;
          if (ev) {
            v.done = true;
            control.setState(v.id, VcpuState.Exited);
            this.fail(ev);
            continue;
          }
          // A real exit in the pause's last pass: complete it with one more pass.
          if (v.parking && cmd === Command.Pause) {
            live++;
            this.go(v);
            continue;
          }
        } else if (err === EINTR || err === EAGAIN) {
          if (cmd === Command.Run && !v.parked) v.vcpu.immediateExit = false;
        } else {
          v.done = true;
          control.setState(v.id, VcpuState.Exited);
          this.fail({ kind: 'fatal', message: `vCPU ${v.id}: KVM_RUN failed (errno ${err})` });
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
        if (this.first && v.id === 0) {
          this.first = false;
          control.markFirstEntry(monoMs());
        }
        this.go(v);
      } else if (cmd === Command.Pause) {
        if (!v.parked) {
          v.parking = true;
          v.vcpu.immediateExit = true;
          this.go(v);
        } else if (control.takeRequest(v.id) === VcpuRequest.Save) {
          v.requests.save();
        }
      }
    }
    return live > 0;
  }

  /**
   * Asks every runner to end. One inside KVM_RUN ends when it returns: the main thread kicks
   * those (it got the Stop or the 'event').
   */
  quitAll(): void {
    for (const v of this.vs) {
      try {
        if (v.onLoop) this.n.loopRunnerQuit(v.handle);
        else this.n.vcpuRunnerQuit(v.handle);
      } catch {
        // already gone
      }
    }
  }

  /** The handle of the vCPU on this thread's loop (loopRunnerStart), or -1. */
  get loopHandle(): number {
    const v = this.vs[0];
    return v?.onLoop ? v.handle : -1;
  }

  /** A runner thread has reported since the last pass (its word is no longer RUN). */
  anyReported(): boolean {
    for (const v of this.vs)
      if (!v.onLoop && v.inGuest && Atomics.load(this.words, v.base) !== RunnerWord.Run)
        return true;
    return false;
  }

  /**
   * After a pass that served exits: watches the runners' words for up to POLL_MS (exits come
   * in bursts, and a sleeping thread is slow to wake). True when a runner reported meanwhile.
   */
  nextExitSoon(): boolean {
    // The loop's vCPU reports only when this thread returns to its loop: never wait for it, nor
    // after a pass that served only its exit (in a loop VM of 2 or more vCPUs every exit of
    // vCPU 0 waited POLL_MS for idle runners: 100,000 port writes ran at a third of the rate).
    if (this.served === 0 || this.threadRunners === 0) return false;
    const until = monoMs() + POLL_MS;
    while (!this.anyReported() && monoMs() < until);
    return this.anyReported();
  }

  /** Every runner has ended (its word says DEAD): finish() will not wait. */
  allDead(): boolean {
    return this.vs.every((v) => Atomics.load(this.words, v.base) === RunnerWord.Dead);
  }

  /** Once allDead(): joins every runner, releases the mappings and posts 'exit'. Once. */
  finish(): void {
    if (this.finished) return;
    this.finished = true;
    for (const v of this.vs) {
      if (v.onLoop) this.n.loopRunnerJoin(v.handle);
      else this.n.vcpuRunnerJoin(v.handle);
    }
    for (const v of this.vs) this.control.setState(v.id, VcpuState.Exited);
    for (const unmap of this.mappings) unmap();
    this.post({ type: 'exit', event: this.event ?? { kind: 'stopped' } });
  }
}

/**
 * A worker as the hub: runs it until the VM ends or is stopped, sleeping in read(eventfd)
 * between passes, then joins every runner and posts 'exit'. `saveHandlers` is the vCPU
 * worker's (save and reply for one vCPU).
 */
export async function runHub(
  d: VcpuHubData,
  post: (m: VcpuWorkerMessage, transfer?: ArrayBuffer[]) => void,
  saveHandlers: SaveHandlersFor,
): Promise<void> {
  const n = native();
  /** Blocks in read(eventfd) until a runner or the main thread rings (a signal: look again). */
  const sleep = () => {
    try {
      n.eventfdRead(d.eventFd);
    } catch (e) {
      if (!isSyscallError(e, 'EINTR')) throw e;
    }
  };
  const hub = new VcpuHub(d, post, saveHandlers);
  try {
    const attach =
      d.virtio.slots.length > 0
        ? (await import('./virtio-transport.js')).attachVirtioTransports
        : undefined;
    hub.start(attach);
    // From here on this thread only serves exits: the vCPU role's filter (the runners made
    // theirs, a smaller one, each on itself).
    installWorkerFilter('vcpu', 'tv-vcpuhub');
    while (hub.serve()) if (!hub.nextExitSoon()) sleep(); // until a runner or main rings
  } catch (e) {
    hub.fail({ kind: 'fatal', message: `vCPU hub: ${(e as Error).message}` });
  } finally {
    // Every runner ends before its words and mappings go: ask, then wait, then join.
    hub.quitAll();
    while (!hub.allDead()) sleep();
  }
  hub.finish();
}

/**
 * Whether the threads on either side of an exit wait a moment for each other before sleeping:
 * only with two CPUs or more to run on (on one, a wait only keeps the other side off the CPU:
 * 100,000 exits pinned to one CPU took 11.9 s with the waits against 2.9 s without).
 */
const waits = cpusAllowed() > 1;
/** The runner's wait for the hub's answer, in pause instructions (tens of microseconds). */
const RUNNER_SPIN = 2000;
/** How long the hub waits for a runner's next exit after serving one, ms. */
const POLL_MS = waits ? 0.05 : 0;
/** The longest the main thread serves exits before the event loop's other work, ms. */
const TURN_MS = 2;
/**
 * Exits of the loop's vCPU served in one callback from the loop (its first, then steps run from
 * JS): the loop gets a turn (its microtasks and ticks, then its poll) at least that often,
 * besides whenever it has work.
 */
const LOOP_STEPS = 256;

/**
 * The hub on the calling thread (the main thread: one isolate fewer than a hub worker), driven
 * by its event loop: `eventFd` (non-blocking) is watched with fdWatch, and every wake-up, from a
 * runner or from the main thread's own ring after a command, drains it and runs one pass. When
 * the hub is done it asks the runners to end, and once all have, joins them, stops watching and
 * posts 'exit'. Messages are delivered by calling `post` (nothing is copied). Returns a function
 * that says whether every runner has ended (the eventfd may be closed only then).
 */
export function startHubOnThisThread(
  d: VcpuHubData,
  post: (m: VcpuWorkerMessage) => void,
  saveHandlers: SaveHandlersFor,
  attachVirtio: AttachVirtio | undefined,
): { runnersEnded(): boolean } {
  const n = native();
  const hub = new VcpuHub(d, post, saveHandlers);
  let phase: 'serving' | 'quitting' | 'done' = 'serving';
  let watch = -1;
  const quit = () => {
    phase = 'quitting';
    hub.quitAll();
  };
  const wake = (status = 0, drain = true) => {
    if (drain) {
      try {
        n.eventfdRead(d.eventFd); // non-blocking: -1n when already drained
      } catch {
        // nothing to drain
      }
    }
    if (status < 0 && phase !== 'done') {
      // The watch stopped (a poll error, never seen): end the VM, and look for the runners'
      // end on a timer instead.
      hub.fail({ kind: 'fatal', message: `vCPU hub: polling its eventfd failed (${status})` });
      if (phase === 'serving') quit();
      const poll = () => (wake(), phase !== 'done' && setTimeout(poll, 10));
      setTimeout(poll, 10);
      return;
    }
    if (phase === 'serving') {
      try {
        // Serve exits while they come in a burst (nextExitSoon), but give the event loop its
        // turn after TURN_MS: the runners' rings wake it again. The clock is read only once a
        // burst goes on (not for each exit of the loop's vCPU: a read costs ~2.7 us in the lab).
        let turnEnd = -1;
        for (;;) {
          if (!hub.serve()) {
            quit();
            break;
          }
          if (!hub.nextExitSoon()) break;
          const now = monoMs();
          if (turnEnd < 0) turnEnd = now + TURN_MS;
          else if (now > turnEnd) break;
        }
      } catch (e) {
        hub.fail({ kind: 'fatal', message: `vCPU hub: ${(e as Error).message}` });
        quit();
      }
    }
    if (phase === 'quitting' && hub.allDead()) {
      phase = 'done';
      if (watch >= 0) n.fdUnwatch(watch);
      watch = -1;
      hub.finish();
    }
  };
  /**
   * After an exit of the loop's vCPU (nothing in the eventfd to drain then): serves it, then runs
   * the vCPU from here (loopRunnerStep) and serves each further exit, as a vCPU worker's loop
   * does: a JS -> native call per exit (~15 ns on a host) instead of the loop's C++ -> JS
   * callback and its callback scope (~0.2 us on a host; in the lab they held vCPU 0 to 0.58x a
   * worker's exit rate). The step returns 0 when the loop has work (an fd, a timer, an
   * immediate) or the vCPU is not to run; the run also ends after an exit that posted a message
   * (its receiver may have queued microtasks or ticks: they run when this callback returns), the
   * first one included, and after LOOP_STEPS exits.
   */
  const onLoopExit = () => {
    const posts = hub.posts;
    wake(0, false);
    const handle = hub.loopHandle;
    for (let i = 1; i < LOOP_STEPS && phase === 'serving' && hub.posts === posts; i++) {
      if (n.loopRunnerStep(handle) === 0) break;
      wake(0, false);
    }
  };
  watch = n.fdWatch(d.eventFd, wake);
  try {
    hub.start(attachVirtio, d.loopFirst ? onLoopExit : undefined);
  } catch (e) {
    hub.fail({ kind: 'fatal', message: `vCPU hub: ${(e as Error).message}` });
    quit();
  }
  wake(); // the first pass: every vCPU told to run (or to park, for a VM started paused)
  return { runnersEnded: () => phase === 'done' || hub.allDead() };
}

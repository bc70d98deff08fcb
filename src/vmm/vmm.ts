/**
 * A running VM seen from the main thread: its vCPU workers, their control block, and the
 * lifecycle actions (pause, resume, stop). Building the VM is builder.ts's job.
 *
 * Every action ends within a bound, in a state that is true (issue 12):
 *  - pause: all vCPUs parked within PAUSE_TIMEOUT_MS, or the pause is undone (the command goes
 *    back to Run), the VM is still "running", and the caller gets an error naming the vCPUs that
 *    did not park; resume and stop work as before;
 *  - stop: all vCPUs out within STOP_TIMEOUT_MS; a worker still in after that is terminated (one
 *    that had not reached its loop yet, still loading, never ran the guest: the VM ends
 *    'stopped'), and one whose thread cannot be ended (blocked in a system call) is given up on
 *    after TERMINATE_GRACE_MS: `exited` resolves with a fatal event saying which vCPU, so the
 *    process reports one line and exits instead of hanging;
 *  - teardown: each step gets TEARDOWN_STEP_TIMEOUT_MS.
 */
import type { Worker } from 'node:worker_threads';
import { EFD_NONBLOCK, native, MAP_SHARED, PROT_READ, PROT_WRITE } from '../kvm/native.js';
import { RUN } from '../kvm/structs.js';
import { log } from '../util/log.js';
import { monoMs } from '../util/clock.js';
import type { VmExitEvent } from './vcpu-loop.js';
import { Command, VcpuControl, VcpuRequest, VcpuState } from './vcpu-control.js';
import type { VcpuWorkerData, VcpuWorkerMessage, VcpuWorkerStart } from './vcpu-worker.js';
import { takeVcpuWorkers } from './vcpu-pool.js';
import { chooseHubPlace, chooseVcpuThreads, type HubPlace, type VcpuThreads } from './vcpu-mode.js';
import { saveHandlers } from './vcpu-save.js';
import { startHubOnThisThread, type VcpuHubData, type VcpuHubStart } from './vcpu-threads.js';
import type { DeviceWorkerHandle } from './device-worker-handle.js';

/** What pauseAll and resumeAll need of the device worker. */
export type DataPlane = Pick<DeviceWorkerHandle, 'request'>;

const KICK_RETRY_MS = 5;
export const PAUSE_TIMEOUT_MS = 3000;
export const STOP_TIMEOUT_MS = 5000;
const TERMINATE_GRACE_MS = 1000;
const TEARDOWN_STEP_TIMEOUT_MS = 3000;
const SAVE_TIMEOUT_MS = 5000;

type SaveReply = Extract<VcpuWorkerMessage, { type: 'saved' | 'save-failed' }>;

interface VcpuHandle {
  id: number;
  /** Its worker; none for a runner whose hub is the main thread. */
  worker?: Worker;
  /** The worker runs this vCPU's loop itself (not a hub serving native runner threads). */
  ownWorker?: boolean;
  thread?: bigint;
  /** Native mode: the runner thread's handle (vcpuRunnerKick), once the hub sent it. */
  runner?: number;
  /** The main thread's own mapping of this vCPU's kvm_run, to set immediate_exit. */
  run: DataView;
  runBuffer: ArrayBuffer;
  exited: boolean;
  /** The worker posted why it ended (its thread ends right after). */
  reported?: boolean;
  /** It did not stop in time and was terminated. */
  terminated?: boolean;
  /**
   * Terminated while its thread had not reached the vCPU loop (state Starting: a worker still
   * loading, e.g. on a host short of CPU): it never ran the guest, so the stop is a stop.
   */
  neverRan?: boolean;
}

export type VmState = 'running' | 'paused' | 'stopped';

/**
 * Where a VM's vCPU workers come from when not from the process's prewarm pool (vcpu-pool.ts):
 * the library's warm pool (src/lib/). Its workers are started for reuse (VcpuWorkerStart.reuse):
 * one whose vCPU ended and reported is handed back with give() for the next VM; one that failed,
 * or was terminated, is not (the source sees it exit). Used in 'worker' mode only.
 */
export interface VcpuWorkerSource {
  take(n: number): Worker[];
  give(w: Worker): void;
}

/**
 * The VMs of this process that have not ended. At the process's exit (process.exit(), or the
 * event loop running out) each is asked to stop first: Node then ends every worker thread and
 * waits for it, and a vCPU worker inside KVM_RUN cannot end until KVM_RUN returns, which a
 * guest that makes no exits (a busy loop) never does by itself. Measured in the lab: a program
 * that called process.exit() with a spinning guest's VM running took 75 s to end (0.3 s with a
 * guest that made exits); a test file whose failed test left such VMs never ended. requestStop()
 * does its first kick synchronously (immediate_exit set, the thread signalled, the command
 * Stop), so the workers leave the guest before Node terminates them.
 */
const liveVmms = new Set<Vmm>();
let stopAtExitHooked = false;

function stopLiveVmmsAtExit(): void {
  for (const v of liveVmms) v.requestStop();
}

export class Vmm {
  readonly control = new VcpuControl();
  private readonly vcpus: VcpuHandle[] = [];
  private kickSignal = 0;
  private firstEvent: VmExitEvent | undefined;
  private resolveExit!: (e: VmExitEvent) => void;
  /** Resolves once with the event that ended the VM (all vCPU workers have exited). */
  readonly exited: Promise<VmExitEvent>;
  state: VmState = 'running';
  /** A stop was asked for (it cannot be taken back: from then on pause and resume do nothing). */
  stopping = false;
  /** When the stop was asked (monoMs), for the teardown's debug line. */
  private stopAskedMs: number | undefined;
  private pausing: Promise<void> | undefined;
  private readonly cleanups: Array<() => void | Promise<void>> = [];
  /** How the vCPUs run (set by start). */
  mode: VcpuThreads = 'worker';
  /** Native mode: the hub's eventfd, rung after every command or request. */
  private hubEventFd = -1;

  constructor(private readonly vcpuMmapSize: number) {
    this.exited = new Promise((r) => (this.resolveExit = r));
  }

  /** Registers a teardown step, run (in reverse order) once every vCPU has exited. */
  onTeardown(f: () => void | Promise<void>): void {
    this.cleanups.push(f);
  }

  /**
   * Starts one worker per vCPU. `data(id)` gives each worker its boot configuration. With
   * `paused` (a restored VM that is not to run yet) the command is Pause before any worker
   * starts: each parks at once without entering the guest (park() runs KVM_RUN with
   * immediate_exit set), and the VM is 'paused' until resume().
   *
   * `vcpuThreads` (default: TYPERVISOR_VCPU_THREADS, else by vCPU count, see vcpu-mode.ts):
   * 'native' runs each vCPU on a runner thread of the native shim, all served by one hub: the
   * main thread (`vcpuHub` 'main', the default) or a worker of its own ('worker'); default
   * TYPERVISOR_VCPU_HUB, see vcpu-mode.ts.
   */
  start(
    vcpuFds: number[],
    data: (id: number) => Omit<VcpuWorkerData, 'control'>,
    opts: {
      paused?: boolean;
      vcpuThreads?: VcpuThreads;
      vcpuHub?: HubPlace;
      workers?: VcpuWorkerSource;
    } = {},
  ): void {
    this.mode =
      opts.vcpuThreads ?? chooseVcpuThreads(vcpuFds.length, process.env.TYPERVISOR_VCPU_THREADS);
    const hub = opts.vcpuHub ?? chooseHubPlace(process.env.TYPERVISOR_VCPU_HUB);
    // Stopped at the process's exit while its vCPUs run (liveVmms); forgotten once it ended.
    liveVmms.add(this);
    void this.exited.then(() => liveVmms.delete(this));
    if (!stopAtExitHooked) {
      stopAtExitHooked = true;
      process.on('exit', stopLiveVmmsAtExit);
    }
    if (opts.paused) {
      this.control.setCommand(Command.Pause);
      this.state = 'paused';
    }
    const external = [...this.cleanups];
    try {
      this.launch(vcpuFds, data, opts, hub);
    } catch (e) {
      this.abortStart(external);
      throw e;
    }
  }

  /**
   * start() threw partway (a vCPU's kvm_run mapping, a worker source's take()): the caller
   * (buildVm) undoes its own steps, so the teardown steps it registered must not run again.
   * Workers taken but not started go back (or end: they got nothing); what did start is stopped
   * the usual way, which also unmaps this thread's kvm_run mappings (each pins the VM in the
   * kernel) and resolves `exited`, so the VM leaves the exit hook's set (it stayed there, with
   * those mappings, before 2026-12-04).
   */
  private abortStart(external: Array<() => void | Promise<void>>): void {
    for (let i = this.cleanups.length - 1; i >= 0; i--)
      if (external.includes(this.cleanups[i]!)) this.cleanups.splice(i, 1);
    for (const worker of this.unstarted) this.giveBack(worker);
    this.unstarted.clear();
    if (this.vcpus.length > 0) return this.requestStop();
    // Nothing to stop: this VM's own steps (a hub's eventfd) run, and `exited` resolves.
    this.firstEvent ??= { kind: 'fatal', message: 'the VM did not start' };
    void this.teardown();
  }

  /** Workers taken for this VM that have not been sent 'start' yet. */
  private readonly unstarted = new Set<Worker>();
  /** Where an unstarted worker goes if start() throws: back to its source, or ended. */
  private giveBack: (w: Worker) => void = (w) => void w.terminate();

  private launch(
    vcpuFds: number[],
    data: (id: number) => Omit<VcpuWorkerData, 'control'>,
    opts: { vcpuThreads?: VcpuThreads; workers?: VcpuWorkerSource },
    hub: HubPlace,
  ): void {
    const n = native();
    this.kickSignal = n.installKickHandler();
    // hybrid: vCPU 0 (the boot vCPU, which takes most of a boot's exits) on a worker of its
    // own, the others on native runner threads. loop: vCPU 0 run by this thread's event loop,
    // the others on runner threads, all served here (the hub is always this thread).
    const ids = vcpuFds.map((_, id) => id);
    const onWorkers = this.mode === 'worker' ? ids : this.mode === 'hybrid' ? ids.slice(0, 1) : [];
    const onRunners = ids.slice(onWorkers.length);
    const source = this.mode === 'worker' ? opts.workers : undefined;
    if (source) return this.startReused(source, vcpuFds, data);
    const hubWorker = onRunners.length > 0 && hub === 'worker' && this.mode !== 'loop';
    const workers = takeVcpuWorkers(onWorkers.length + (hubWorker ? 1 : 0));
    for (const w of workers) this.unstarted.add(w);
    onWorkers.forEach((id) => {
      const worker = workers[id]!;
      const h = this.workerHandle(id, worker, vcpuFds[id]!);
      this.vcpus.push(h);
      const start: VcpuWorkerStart = {
        type: 'start',
        data: { ...data(id), control: this.control.sab },
      };
      this.started(worker);
      worker.postMessage(start);
      worker.on('message', (m: VcpuWorkerMessage) => this.onMessage(h, m));
      worker.on('error', (e) =>
        this.onVcpuEvent({ kind: 'fatal', message: `vCPU ${id} worker failed: ${e.message}` }),
      );
      // A worker that ends without saying why (it always posts 'exit' first) is a VMM bug,
      // unless we terminated it because it did not stop in time.
      worker.on('exit', () =>
        this.onWorkerGone(
          h,
          h.reported
            ? { kind: 'stopped' }
            : h.terminated
              ? this.terminatedEvent(h)
              : { kind: 'fatal', message: `vCPU ${id} worker ended unexpectedly` },
        ),
      );
    });
    if (hubWorker) this.startNative(onRunners, vcpuFds, data, workers.at(-1)!);
    else if (onRunners.length > 0)
      this.startNativeHere(onRunners, vcpuFds, data, this.mode === 'loop');
  }

  /** `worker` is about to be sent its start: from here on it is this VM's to stop. */
  private started(worker: Worker): void {
    this.unstarted.delete(worker);
  }

  /** The handle of a vCPU run by a worker of its own, with this thread's map of its kvm_run. */
  private workerHandle(id: number, worker: Worker, vcpuFd: number): VcpuHandle {
    const runBuffer = this.mapRun(vcpuFd);
    return { id, worker, ownWorker: true, run: new DataView(runBuffer), runBuffer, exited: false };
  }

  /** This thread's shared mapping of a vCPU fd's kvm_run. */
  private mapRun(vcpuFd: number): ArrayBuffer {
    return native().mmap(this.vcpuMmapSize, PROT_READ | PROT_WRITE, MAP_SHARED, vcpuFd, 0);
  }

  /**
   * A worker per vCPU from `source`, each told to stay after this VM: its 'exit' message is
   * this VM's end for that vCPU (the thread lives on), and it goes back to the source.
   */
  private startReused(
    source: VcpuWorkerSource,
    vcpuFds: number[],
    data: (id: number) => Omit<VcpuWorkerData, 'control'>,
  ): void {
    const workers = source.take(vcpuFds.length);
    this.giveBack = (w) => source.give(w);
    for (const w of workers) this.unstarted.add(w);
    vcpuFds.forEach((fd, id) => {
      const worker = workers[id]!;
      const h = this.workerHandle(id, worker, fd);
      this.vcpus.push(h);
      const detach = () => {
        worker.off('message', onMessage);
        worker.off('error', onError);
        worker.off('exit', onExit);
      };
      const onMessage = (m: VcpuWorkerMessage) => {
        if (m.type !== 'exit') return this.onMessage(h, m);
        // The vCPU's mappings are released before 'exit' is posted: the thread is free.
        h.reported = true;
        detach();
        this.onWorkerGone(h, m.event);
        source.give(worker);
      };
      const onError = (e: Error) =>
        this.onVcpuEvent({ kind: 'fatal', message: `vCPU ${id} worker failed: ${e.message}` });
      const onExit = () => {
        detach();
        this.onWorkerGone(
          h,
          h.terminated
            ? this.terminatedEvent(h)
            : { kind: 'fatal', message: `vCPU ${id} worker ended unexpectedly` },
        );
      };
      worker.on('message', onMessage);
      worker.on('error', onError);
      worker.on('exit', onExit);
      const start: VcpuWorkerStart = {
        type: 'start',
        data: { ...data(id), control: this.control.sab },
        reuse: true,
      };
      this.started(worker);
      worker.postMessage(start);
    });
  }

  /** The hub's data: the runners' vCPUs and what vCPU `ids[0]`'s worker would get. */
  private hubData(
    ids: number[],
    vcpuFds: number[],
    data: (id: number) => Omit<VcpuWorkerData, 'control'>,
    eventFd: number,
  ): VcpuHubData {
    const d0 = data(ids[0]!);
    return {
      vcpus: ids.map((id) => ({ id, vcpuFd: vcpuFds[id]! })),
      mmapSize: d0.mmapSize,
      ram: d0.ram,
      control: this.control.sab,
      legacy: d0.legacy,
      virtio: d0.virtio,
      eventFd,
      ...(d0.extraMsrs ? { extraMsrs: d0.extraMsrs } : {}),
    };
  }

  /**
   * The main thread's own mapping of each runner's kvm_run (immediate_exit), as handles: all of
   * them or none (a failed mmap unmaps the ones made and throws), so the VM never holds a handle
   * whose runner will not be started.
   */
  private runnerHandles(ids: number[], vcpuFds: number[], worker?: Worker): VcpuHandle[] {
    const n = native();
    const hs: VcpuHandle[] = [];
    try {
      for (const id of ids) {
        const runBuffer = this.mapRun(vcpuFds[id]!);
        const h: VcpuHandle = { id, run: new DataView(runBuffer), runBuffer, exited: false };
        if (worker) h.worker = worker;
        hs.push(h);
      }
    } catch (e) {
      for (const h of hs) n.munmap(h.runBuffer);
      throw e;
    }
    this.vcpus.push(...hs);
    return hs;
  }

  /**
   * Native runner threads served by the main thread itself (vcpu-threads.ts
   * startHubOnThisThread): no isolate for the hub. Its eventfd is watched on this thread's event
   * loop; every exit is one wake-up of this loop. The virtio register windows' module is loaded
   * first when there are virtio devices.
   */
  private startNativeHere(
    ids: number[],
    vcpuFds: number[],
    data: (id: number) => Omit<VcpuWorkerData, 'control'>,
    loopFirst = false,
  ): void {
    const n = native();
    const efd = n.eventfd(0, EFD_NONBLOCK);
    this.hubEventFd = efd;
    let runnersEnded = () => true;
    this.cleanups.unshift(() => {
      this.hubEventFd = -1;
      // A runner that never ended (given up on at stop) may still write it: never reuse the number.
      if (runnersEnded()) n.close(efd);
      else log('warn', 'vCPU hub: a runner thread did not end; its eventfd stays open');
    });
    const d = this.hubData(ids, vcpuFds, data, efd);
    if (loopFirst) d.loopFirst = true;
    const hs = this.runnerHandles(ids, vcpuFds);
    const gone = (e: VmExitEvent) => {
      for (const h of hs) this.onWorkerGone(h, e);
    };
    const onMessage = (m: VcpuWorkerMessage) => {
      if (m.type === 'runners') m.handles.forEach((r, i) => hs[i] && (hs[i].runner = r));
      else if (m.type === 'event') this.onVcpuEvent(m.event);
      else if (m.type === 'exit') {
        for (const h of hs) h.reported = true;
        this.onVcpuEvent(m.event);
        gone({ kind: 'stopped' });
      } else this.onMessage(hs[0]!, m);
    };
    const start = (attach?: Parameters<typeof startHubOnThisThread>[3]) => {
      if (this.stopping) {
        // Stopped while the module loaded: no runner is started.
        for (const h of hs) h.reported = true;
        return gone({ kind: 'stopped' });
      }
      runnersEnded = startHubOnThisThread(
        d,
        onMessage,
        (id, vcpu, kvm, post) => saveHandlers(id, vcpu, kvm, post, d.extraMsrs),
        attach,
      ).runnersEnded;
    };
    if (d.virtio.slots.length === 0) return start();
    import('./virtio-transport.js').then(
      (m) => start(m.attachVirtioTransports),
      (e: Error) => {
        this.onVcpuEvent({ kind: 'fatal', message: `vCPU hub: ${e.message}` });
        gone({ kind: 'fatal', message: `vCPU hub: ${e.message}` });
      },
    );
  }

  /** One worker (the hub, vcpu-threads.ts) serving a native runner thread per vCPU. */
  private startNative(
    ids: number[],
    vcpuFds: number[],
    data: (id: number) => Omit<VcpuWorkerData, 'control'>,
    worker: Worker,
  ): void {
    const n = native();
    const efd = n.eventfd(0, 0); // blocking: the hub sleeps in read()
    this.hubEventFd = efd;
    this.cleanups.unshift(() => {
      this.hubEventFd = -1;
      n.close(efd);
    });
    // The handles first: if a mapping fails, the hub has not been sent its start (start()
    // then gives it back, unstarted) and no runner thread exists.
    const hs = this.runnerHandles(ids, vcpuFds, worker);
    const start: VcpuHubStart = { type: 'start-hub', data: this.hubData(ids, vcpuFds, data, efd) };
    this.started(worker);
    worker.postMessage(start);
    worker.on('message', (m: VcpuWorkerMessage) => {
      if (m.type === 'runners') m.handles.forEach((r, i) => hs[i] && (hs[i].runner = r));
      else if (m.type === 'event') this.onVcpuEvent(m.event);
      else if (m.type === 'exit') {
        for (const h of hs) h.reported = true;
        this.onVcpuEvent(m.event);
      } else this.onMessage(hs[0]!, m);
    });
    worker.on('error', (e) =>
      this.onVcpuEvent({ kind: 'fatal', message: `vCPU hub worker failed: ${e.message}` }),
    );
    worker.on('exit', () => {
      for (const h of hs) {
        this.onWorkerGone(
          h,
          h.reported
            ? { kind: 'stopped' }
            : h.terminated
              ? {
                  kind: 'fatal',
                  message: `vCPU ${h.id} did not stop within ${STOP_TIMEOUT_MS} ms; its thread was terminated`,
                }
              : { kind: 'fatal', message: `the vCPU hub worker ended unexpectedly` },
        );
      }
    });
  }

  /** Sets the command; wakes the hub (native mode) to see it. */
  private command(c: Command): void {
    this.control.setCommand(c);
    this.ringHub();
  }

  private ringHub(): void {
    if (this.hubEventFd < 0) return;
    try {
      native().eventfdWrite(this.hubEventFd, 1);
    } catch {
      // closed at teardown
    }
  }

  private onMessage(h: VcpuHandle, m: VcpuWorkerMessage): void {
    if (m.type === 'thread') h.thread = m.thread;
    else if (m.type === 'log') log('info', m.message);
    else if (m.type === 'exit') {
      h.reported = true;
      this.onVcpuEvent(m.event);
    } else if (m.type === 'saved' || m.type === 'save-failed') this.saveReplies?.get(m.id)?.(m);
  }

  /** A vCPU ended the VM (or acknowledged a stop): the first real reason wins; stop the rest. */
  private onVcpuEvent(e: VmExitEvent): void {
    if (!this.firstEvent && e.kind !== 'stopped') this.firstEvent = e;
    this.requestStop();
  }

  /** The worker thread is gone (its mappings are released before it posts 'exit'). */
  private onWorkerGone(h: VcpuHandle, e: VmExitEvent): void {
    if (h.exited) return;
    h.exited = true;
    this.onVcpuEvent(e);
    if (this.vcpus.every((v) => v.exited)) void this.teardown();
  }

  private async teardown(): Promise<void> {
    this.state = 'stopped';
    const t0 = monoMs();
    if (this.stopAskedMs !== undefined)
      log(
        'debug',
        `VM stop: every vCPU ended ${(t0 - this.stopAskedMs).toFixed(1)} ms after the stop was asked`,
      );
    for (const h of this.vcpus) {
      if (h.runBuffer.byteLength > 0) native().munmap(h.runBuffer);
    }
    for (const f of this.cleanups.reverse()) {
      let timer: NodeJS.Timeout | undefined;
      const t = monoMs();
      try {
        await Promise.race([
          f(),
          new Promise((_, reject) => {
            timer = setTimeout(
              () => reject(new Error(`a step took more than ${TEARDOWN_STEP_TIMEOUT_MS} ms`)),
              TEARDOWN_STEP_TIMEOUT_MS,
            );
          }),
        ]);
      } catch (e) {
        // teardown is best effort: the process is about to report and exit
        log('warn', `VM teardown: ${(e as Error).message}; going on`);
      } finally {
        clearTimeout(timer);
        log('debug', `VM teardown: a step took ${(monoMs() - t).toFixed(1)} ms`);
      }
    }
    log('debug', `VM teardown: ${(monoMs() - t0).toFixed(1)} ms in all`);
    this.resolveExit(this.firstEvent ?? { kind: 'stopped' });
  }

  /** Ends the VM from the main thread for a reason of its own (e.g. the device worker died). */
  fail(message: string): void {
    this.onVcpuEvent({ kind: 'fatal', message });
  }

  /**
   * Sets immediate_exit on every live vCPU and signals its thread, until `done()` holds or
   * `timeoutMs` pass (then `onTimeout()`, once).
   */
  private kickUntil(done: () => boolean, timeoutMs: number, onTimeout: () => void): void {
    const started = Date.now();
    const tick = () => {
      if (done()) return;
      if (Date.now() - started > timeoutMs) return onTimeout();
      for (const h of this.vcpus) {
        if (h.exited || h.runBuffer.byteLength === 0) continue;
        h.run.setUint8(RUN.immediateExit, 1);
        if (h.runner !== undefined) native().vcpuRunnerKick(h.runner);
        else if (h.thread !== undefined) {
          try {
            native().kick(h.thread, this.kickSignal);
          } catch {
            // the thread may have just exited; its 'exit' event will arrive
          }
        }
      }
      setTimeout(tick, KICK_RETRY_MS);
    };
    tick();
  }

  /**
   * Asks every vCPU to stop; `exited` resolves when they have, or, for a vCPU that does not,
   * within STOP_TIMEOUT_MS + TERMINATE_GRACE_MS with a fatal event naming it. Idempotent.
   */
  requestStop(): void {
    if (this.stopping) return;
    this.stopping = true;
    this.stopAskedMs = monoMs();
    this.command(Command.Stop);
    this.kickUntil(
      () => this.vcpus.every((v) => v.exited),
      STOP_TIMEOUT_MS,
      () => this.forceStop(),
    );
  }

  /** The vCPUs still running after STOP_TIMEOUT_MS: terminate them, then stop waiting. */
  private forceStop(): void {
    const stuck = this.vcpus.filter((h) => !h.exited);
    for (const h of stuck) {
      h.terminated = true;
      // Read before terminate(): the loop stores Running before it first reads the command,
      // so a vCPU seen Starting now has not entered the guest (and would have stopped there).
      h.neverRan = h.ownWorker === true && this.control.state(h.id) === VcpuState.Starting;
      if (h.neverRan)
        log(
          'info',
          `vCPU ${h.id} had not started within ${STOP_TIMEOUT_MS} ms; its worker was ended`,
        );
      void h.worker?.terminate();
    }
    // terminate() cannot end a thread blocked in a system call: after the grace period the VM
    // is torn down without it (the process then reports and exits; the kernel ends the thread).
    setTimeout(() => {
      for (const h of stuck) {
        this.onWorkerGone(h, {
          kind: 'fatal',
          message: `vCPU ${h.id} did not stop within ${STOP_TIMEOUT_MS} ms and its thread could not be ended (blocked in a system call)`,
        });
      }
    }, TERMINATE_GRACE_MS);
  }

  /** How a terminated vCPU worker's end reads: a stop when it never ran the guest. */
  private terminatedEvent(h: VcpuHandle): VmExitEvent {
    return h.neverRan
      ? { kind: 'stopped' }
      : {
          kind: 'fatal',
          message: `vCPU ${h.id} did not stop within ${STOP_TIMEOUT_MS} ms; its thread was terminated`,
        };
  }

  /**
   * Pauses every vCPU; resolves once all are parked (at once when paused already, and when the
   * VM is stopping or stopped: nothing to pause). Rejects, with the VM left running (the pause
   * undone), when a vCPU has not parked within PAUSE_TIMEOUT_MS, and when a stop overtakes it.
   */
  pause(): Promise<void> {
    if (this.state !== 'running' || this.stopping) return Promise.resolve();
    if (this.pausing) return this.pausing;
    this.command(Command.Pause);
    const p = new Promise<void>((resolve, reject) => {
      // A vCPU worker still loading (Starting) counts as parked: its loop stores Running before
      // it first reads the command, so once it runs it sees Pause (or what came after) and
      // parks before it enters the guest. It never ran the guest, and will not until resumed.
      const parked = (v: VcpuHandle) => {
        const st = this.control.state(v.id);
        return (
          v.exited || st === VcpuState.Paused || (v.ownWorker === true && st === VcpuState.Starting)
        );
      };
      this.kickUntil(
        () => {
          if (this.stopping) {
            reject(new Error('the VM stopped before it paused'));
            return true;
          }
          if (!this.vcpus.every(parked)) return false;
          this.state = 'paused';
          resolve();
          return true;
        },
        PAUSE_TIMEOUT_MS,
        () => {
          const late = this.vcpus.filter((v) => !parked(v)).map((v) => v.id);
          // Undo the pause: the vCPUs that parked run again, the late ones never park. The
          // state stays "running", which is what the VM is doing.
          this.command(Command.Run);
          reject(
            new Error(
              `vCPU ${late.join(', ')} did not pause within ${PAUSE_TIMEOUT_MS} ms (busy outside the guest); the pause was undone and the VM keeps running`,
            ),
          );
        },
      );
    });
    this.pausing = p;
    const clear = () => {
      if (this.pausing === p) this.pausing = undefined;
    };
    p.then(clear, clear);
    return p;
  }

  /**
   * Resumes a paused VM; nothing to do when it runs, and nothing once a stop was asked for (the
   * Stop command must not be overwritten).
   */
  resume(): void {
    if (this.state !== 'paused' || this.stopping) return;
    this.command(Command.Run);
    this.state = 'running';
  }

  /**
   * Pauses the vCPUs (pause()), then the device worker's data plane, so that neither the guest
   * nor a device (net RX, block reads) writes guest RAM afterwards: what a snapshot needs while
   * memory is written out. Firecracker's Pause stops only the vCPUs. Nothing to do when the VM is
   * stopping or stopped. If the device worker does not pause, the vCPUs are resumed again (the
   * VM keeps running, as for a pause that times out) and the error is passed on.
   */
  async pauseAll(dw?: DataPlane): Promise<void> {
    const wasRunning = this.state === 'running';
    await this.pause();
    if (!dw || this.state !== 'paused' || this.stopping) return;
    try {
      await dw.request({ op: 'pause' });
    } catch (e) {
      if (wasRunning) this.resume();
      throw new Error(`the devices did not pause: ${(e as Error).message}`);
    }
  }

  /**
   * Resumes a paused VM: the device worker first (its resume serves what arrived meanwhile and
   * kicks every queue, so requests in flight at a snapshot are served), then the vCPUs. If the
   * device worker does not resume, the vCPUs stay paused (the state stays true) and the error is
   * passed on. Nothing to do when running, stopping or stopped.
   */
  async resumeAll(dw?: DataPlane): Promise<void> {
    if (this.state !== 'paused' || this.stopping) return;
    if (dw) {
      try {
        await dw.request({ op: 'resume' });
      } catch (e) {
        throw new Error(`the devices did not resume: ${(e as Error).message}`);
      }
    }
    this.resume();
  }

  /** Answers awaited by saveVcpus, by vCPU id; set only while a save is under way. */
  private saveReplies: Map<number, (m: SaveReply) => void> | undefined;

  /**
   * Each vCPU's state as VcpuStateV1 bytes, in vCPU id order. The VM must be paused: each
   * parked worker, woken through its request slot, reads its own vCPU (vCPU ioctls stay on the
   * thread that runs it; the vCPU is outside KVM_RUN, any half-done exit completed).
   */
  async saveVcpus(): Promise<Uint8Array[]> {
    if (this.state !== 'paused')
      throw new Error(`cannot save vCPU state: the VM must be paused (it is ${this.state})`);
    if (this.saveReplies) throw new Error('cannot save vCPU state: a save is already under way');
    const gone = this.vcpus.find((h) => h.exited || h.reported);
    if (gone) throw new Error(`cannot save vCPU state: vCPU ${gone.id} has exited`);
    const replies = new Map<number, (m: SaveReply) => void>();
    const timers: NodeJS.Timeout[] = [];
    this.saveReplies = replies;
    try {
      return await Promise.all(
        this.vcpus.map(
          (h) =>
            new Promise<Uint8Array>((resolve, reject) => {
              const what = `cannot save vCPU ${h.id}`;
              timers.push(
                setTimeout(
                  () => reject(new Error(`${what}: no answer within ${SAVE_TIMEOUT_MS} ms`)),
                  SAVE_TIMEOUT_MS,
                ),
              );
              replies.set(h.id, (m) =>
                m.type === 'saved' ? resolve(m.state) : reject(new Error(`${what}: ${m.message}`)),
              );
              this.control.request(h.id, VcpuRequest.Save);
              this.ringHub();
            }),
        ),
      );
    } finally {
      timers.forEach(clearTimeout);
      this.saveReplies = undefined;
    }
  }

  get vcpuCount(): number {
    return this.vcpus.length;
  }
}

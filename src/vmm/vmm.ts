/**
 * A running VM seen from the main thread: its vCPU workers, their control block, and the
 * lifecycle actions (pause, resume, stop). Building the VM is builder.ts's job.
 */
import type { Worker } from 'node:worker_threads';
import { native, MAP_SHARED, PROT_READ, PROT_WRITE } from '../kvm/native.js';
import { RUN } from '../kvm/structs.js';
import { log } from '../util/log.js';
import type { VmExitEvent } from './vcpu-loop.js';
import { Command, VcpuControl, VcpuRequest, VcpuState } from './vcpu-control.js';
import type { VcpuWorkerData, VcpuWorkerMessage, VcpuWorkerStart } from './vcpu-worker.js';
import { takeVcpuWorkers } from './vcpu-pool.js';

const KICK_RETRY_MS = 5;
const STOP_TIMEOUT_MS = 5000;
const SAVE_TIMEOUT_MS = 5000;

type SaveReply = Extract<VcpuWorkerMessage, { type: 'saved' | 'save-failed' }>;

interface VcpuHandle {
  id: number;
  worker: Worker;
  thread?: bigint;
  /** The main thread's own mapping of this vCPU's kvm_run, to set immediate_exit. */
  run: DataView;
  runBuffer: ArrayBuffer;
  exited: boolean;
  /** The worker posted why it ended (its thread ends right after). */
  reported?: boolean;
}

export type VmState = 'running' | 'paused' | 'stopped';

export class Vmm {
  readonly control = new VcpuControl();
  private readonly vcpus: VcpuHandle[] = [];
  private kickSignal = 0;
  private firstEvent: VmExitEvent | undefined;
  private resolveExit!: (e: VmExitEvent) => void;
  /** Resolves once with the event that ended the VM (all vCPU workers have exited). */
  readonly exited: Promise<VmExitEvent>;
  state: VmState = 'running';
  private readonly cleanups: Array<() => void | Promise<void>> = [];

  constructor(private readonly vcpuMmapSize: number) {
    this.exited = new Promise((r) => (this.resolveExit = r));
  }

  /** Registers a teardown step, run (in reverse order) once every vCPU has exited. */
  onTeardown(f: () => void | Promise<void>): void {
    this.cleanups.push(f);
  }

  /** Starts one worker per vCPU. `data(id)` gives each worker its boot configuration. */
  start(vcpuFds: number[], data: (id: number) => Omit<VcpuWorkerData, 'control'>): void {
    const n = native();
    this.kickSignal = n.installKickHandler();
    const workers = takeVcpuWorkers(vcpuFds.length);
    vcpuFds.forEach((fd, id) => {
      const runBuffer = n.mmap(this.vcpuMmapSize, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
      const worker = workers[id]!;
      const start: VcpuWorkerStart = {
        type: 'start',
        data: { ...data(id), control: this.control.sab },
      };
      worker.postMessage(start);
      const h: VcpuHandle = { id, worker, run: new DataView(runBuffer), runBuffer, exited: false };
      worker.on('message', (m: VcpuWorkerMessage) => this.onMessage(h, m));
      worker.on('error', (e) =>
        this.onVcpuEvent({ kind: 'fatal', message: `vCPU ${id} worker failed: ${e.message}` }),
      );
      // A worker that ends without saying why (it always posts 'exit' first) is a VMM bug.
      worker.on('exit', () =>
        this.onWorkerGone(
          h,
          h.reported
            ? { kind: 'stopped' }
            : { kind: 'fatal', message: `vCPU ${id} worker ended unexpectedly` },
        ),
      );
      this.vcpus.push(h);
    });
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
    if (this.control.command !== Command.Stop) this.requestStop();
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
    for (const h of this.vcpus) {
      if (h.runBuffer.byteLength > 0) native().munmap(h.runBuffer);
    }
    for (const f of this.cleanups.reverse()) {
      try {
        await f();
      } catch {
        // teardown is best effort: the process is about to report and exit
      }
    }
    this.resolveExit(this.firstEvent ?? { kind: 'stopped' });
  }

  /** Ends the VM from the main thread for a reason of its own (e.g. the device worker died). */
  fail(message: string): void {
    this.onVcpuEvent({ kind: 'fatal', message });
  }

  /** Sets immediate_exit on every live vCPU and signals its thread, until `done()` holds. */
  private kickUntil(done: () => boolean, onTimeout: () => void): void {
    const started = Date.now();
    const tick = () => {
      if (done()) return;
      if (Date.now() - started > STOP_TIMEOUT_MS) return onTimeout();
      for (const h of this.vcpus) {
        if (h.exited || h.runBuffer.byteLength === 0) continue;
        h.run.setUint8(RUN.immediateExit, 1);
        if (h.thread !== undefined) {
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

  /** Asks every vCPU to stop; `exited` resolves when they have. */
  requestStop(): void {
    this.control.setCommand(Command.Stop);
    this.kickUntil(
      () => this.vcpus.every((v) => v.exited),
      () => {
        for (const h of this.vcpus) if (!h.exited) void h.worker.terminate();
      },
    );
  }

  /** Pauses every vCPU; resolves once all are parked. */
  pause(): Promise<void> {
    if (this.state !== 'running') return Promise.resolve();
    this.control.setCommand(Command.Pause);
    return new Promise((resolve, reject) => {
      const allParked = () =>
        this.vcpus.every((v) => v.exited || this.control.state(v.id) === VcpuState.Paused);
      this.kickUntil(
        () => {
          if (!allParked()) return false;
          this.state = 'paused';
          resolve();
          return true;
        },
        () => reject(new Error('vCPUs did not pause in time')),
      );
    });
  }

  resume(): void {
    if (this.state !== 'paused') return;
    this.control.setCommand(Command.Run);
    this.state = 'running';
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

/**
 * The main thread's handle on the device worker: starts it, asks it things through the mailbox
 * (device-worker-protocol.ts), and stops it.
 */
import { MessageChannel, Worker } from 'node:worker_threads';
import { newWorker } from '../util/worker-argv.js';
import { native } from '../kvm/native.js';
import {
  DEVICE_WORKER_ROLE,
  WORKER_CONTROL,
  type DeviceReport,
  type DeviceWorkerData,
  type DeviceWorkerStart,
  type DeviceWorkerMessage,
  type MailboxReply,
  type WorkerReplies,
  type WorkerRequest,
} from './device-worker-protocol.js';
import type { GuestRamLayout } from './guest-ram.js';
import type { VirtioPlan } from './virtio-plan.js';
import { takeDeviceWorker } from './vcpu-pool.js';
import { workerEntry } from '../util/bundle.js';

/** A request the worker does not answer within this is failed (the worker is stuck or gone). */
const REQUEST_TIMEOUT_MS = 10_000;
/**
 * The same for a request sent before the worker has answered anything: a fresh worker loads
 * its modules first (~0.1 s on a host; over 10 s was seen in the lab's emulated machine, where
 * a snapshot load's first "pause" failed on it).
 */
const FIRST_REQUEST_TIMEOUT_MS = 60_000;

export interface DeviceWorkerHandle {
  /** Asks the worker to finish and waits for it. Idempotent. */
  stop(): Promise<void>;
  /** Resolves when the worker thread has exited (for any reason). */
  readonly exited: Promise<void>;
  /** One mailbox round trip. Rejects with the worker's error, or when it is gone or stuck. */
  request<R extends WorkerRequest>(r: R): Promise<WorkerReplies[R['op']]>;
  /** Every device's counters: asked of the worker, or its last report once it has ended. */
  counters(): Promise<DeviceReport[]>;
}

export interface DeviceWorkerOptions {
  /** The worker's log lines (`level` 'warn' for what a user should see by default, else info). */
  log?: (message: string, level?: 'warn') => void;
  /** The worker failed (an exception outside any request): the VM should stop. */
  onFatal?: (message: string) => void;
}

/** Main thread: starts the data-plane worker over the plan's devices. */
export function startDeviceWorker(
  plan: VirtioPlan,
  ram: GuestRamLayout,
  opts: DeviceWorkerOptions = {},
): DeviceWorkerHandle {
  const log = opts.log ?? (() => undefined);
  const control = new SharedArrayBuffer(WORKER_CONTROL.$count * 4);
  const c = new Int32Array(control);
  const { port1, port2 } = new MessageChannel();
  const data = {
    role: DEVICE_WORKER_ROLE,
    ram,
    controlFd: plan.controlFd,
    control,
    slots: plan.slots,
    mailbox: port2,
  } satisfies DeviceWorkerData;
  const prewarmed = takeDeviceWorker();
  if (prewarmed)
    prewarmed.postMessage({ type: 'start', data } satisfies DeviceWorkerStart, [port2]);
  const worker =
    prewarmed ??
    newWorker(workerEntry('device-worker', new URL('./device-worker.js', import.meta.url)), {
      workerData: data,
      transferList: [port2],
    });
  let last: DeviceReport[] = [];
  let gone = false;
  worker.on('message', (m: DeviceWorkerMessage) => {
    if (m.type === 'log') log(m.message, m.level);
    else if (m.type === 'final-counters') last = m.counters;
    else if (m.type === 'fatal') opts.onFatal?.(`device worker: ${m.message}`);
    // 'ready': a prewarmed worker taken before it had loaded (vcpu-pool.ts)
  });
  worker.on('error', (e) => opts.onFatal?.(`device worker failed: ${e.message}`));
  const exited = new Promise<void>((resolve) => worker.once('exit', () => resolve()));

  const pending = new Map<number, { resolve(v: unknown): void; reject(e: Error): void }>();
  let seq = 0;
  let answered = false;
  port1.on('message', (r: MailboxReply) => {
    answered = true;
    const p = pending.get(r.seq);
    if (!p) return;
    pending.delete(r.seq);
    if (r.ok) p.resolve(r.value);
    else p.reject(new Error(r.error));
  });
  port1.unref(); // the worker keeps the process alive while it runs, not the mailbox
  void exited.then(() => {
    gone = true;
    for (const p of pending.values()) p.reject(new Error('the device worker has ended'));
    pending.clear();
    port1.close();
  });

  const request = <R extends WorkerRequest>(r: R): Promise<WorkerReplies[R['op']]> => {
    if (gone) return Promise.reject(new Error('the device worker has ended'));
    const id = ++seq;
    return new Promise((resolve, reject) => {
      const timer = setTimeout(
        () => {
          if (pending.delete(id)) reject(new Error(`the device worker did not answer "${r.op}"`));
        },
        answered ? REQUEST_TIMEOUT_MS : FIRST_REQUEST_TIMEOUT_MS,
      );
      timer.unref();
      pending.set(id, {
        resolve: (v) => {
          clearTimeout(timer);
          resolve(v as WorkerReplies[R['op']]);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
      });
      port1.postMessage({ ...r, seq: id });
      native().eventfdWrite(plan.controlFd, 1);
    });
  };

  return {
    exited,
    request,
    async counters() {
      if (gone) return last;
      try {
        last = await request({ op: 'counters' });
      } catch {
        // ended meanwhile: its final report (if any) is in `last`
      }
      return last;
    },
    async stop() {
      Atomics.store(c, WORKER_CONTROL.stop, 1);
      if (!gone) native().eventfdWrite(plan.controlFd, 1);
      await exited;
    },
  };
}

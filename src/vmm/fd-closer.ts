/**
 * A thread that closes VMs' descriptors off the main thread (BuildOptions.closeFds): the
 * library's warm path (src/lib/), where back-to-back VMs would otherwise wait ~10-15 ms each
 * for the kernel to destroy the previous VM. The backlog is bounded: `pending` says how many
 * VMs wait to be closed, and the library waits (`whenBelow`) before building more.
 */
import { Worker } from 'node:worker_threads';
import { newWorker } from '../util/worker-argv.js';
import type { CloseReply, CloseRequest } from './fd-closer-worker.js';

export interface FdCloser {
  /** Hands a VM's descriptors over; they are closed in order, on the closer's thread. */
  close(fds: number[]): void;
  /** Batches handed over and not closed yet. */
  readonly pending: number;
  /** Resolves once fewer than `n` batches are pending (at once if so already). */
  whenBelow(n: number): Promise<void>;
  /** Ends the thread after closing what it was given (anything given later is closed here). */
  stop(): Promise<void>;
}

export function startFdCloser(threads = 1): FdCloser {
  const workers: Worker[] = [];
  for (let i = 0; i < threads; i++) workers.push(startOne());
  let next = 0;
  const closers = workers.map((w) => wrap(w));
  return {
    close(fds) {
      const live = closers.filter((c) => c.alive);
      if (live.length === 0) return closers[0]!.close(fds);
      live[next++ % live.length]!.close(fds);
    },
    get pending() {
      return closers.reduce((a, c) => a + c.pending, 0);
    },
    whenBelow(n) {
      return new Promise((resolve) => {
        const check = () => {
          if (this.pending < n) return resolve();
          void Promise.race(
            closers.filter((c) => c.pending > 0).map((c) => c.whenBelow(c.pending)),
          ).then(check);
        };
        check();
      });
    },
    async stop() {
      await Promise.all(closers.map((c) => c.stop()));
    },
  };
}

function startOne(): Worker {
  return newWorker(new URL('./fd-closer-worker.js', import.meta.url), {});
}

function wrap(w: Worker): FdCloser & { readonly alive: boolean } {
  let worker: Worker | undefined = w;
  let seq = 0;
  let done = 0;
  const waiters: Array<{ n: number; resolve(): void }> = [];
  const closeHere = async (fds: number[]) => {
    const { native } = await import('../kvm/native.js');
    for (const fd of fds) {
      try {
        native().close(fd);
      } catch {
        // already closed
      }
    }
  };
  const settle = () => {
    for (let i = waiters.length - 1; i >= 0; i--) {
      if (seq - done < waiters[i]!.n) {
        waiters[i]!.resolve();
        waiters.splice(i, 1);
      }
    }
    if (seq === done) worker?.unref();
  };
  const sent = new Map<number, number[]>();
  const onGone = () => {
    // The thread ended (stop(), or a failure): what it had not closed is closed here.
    worker = undefined;
    for (const fds of sent.values()) void closeHere(fds);
    done = seq;
    sent.clear();
    settle();
  };
  worker.on('message', (r: CloseReply) => {
    sent.delete(r.seq);
    done = Math.max(done, r.seq);
    settle();
  });
  worker.on('error', onGone);
  worker.on('exit', onGone);
  worker.unref(); // after on('message'), which refs the worker again
  return {
    get alive() {
      return worker !== undefined;
    },
    close(fds) {
      if (!worker) return void closeHere(fds);
      seq++;
      sent.set(seq, fds);
      worker.ref(); // the process waits for the VM to be released
      worker.postMessage({ seq, fds } satisfies CloseRequest);
    },
    get pending() {
      return seq - done;
    },
    whenBelow(n) {
      if (seq - done < n) return Promise.resolve();
      return new Promise((resolve) => waiters.push({ n, resolve }));
    },
    async stop() {
      const w = worker;
      if (!w) return;
      await this.whenBelow(1);
      await w.terminate();
    },
  };
}

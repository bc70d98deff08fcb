/**
 * The descriptor closer's thread (fd-closer.ts): closes the descriptors it is sent, one batch
 * (one VM) at a time, and says when a batch is done. Closing a VM's last descriptor makes the
 * kernel destroy the VM (~10-15 ms measured, issue 18), which this thread spends instead of
 * the main thread.
 */
import { parentPort } from 'node:worker_threads';
import { native } from '../kvm/native.js';
import { installWorkerFilter } from '../sandbox/seccomp/install.js';

/** A batch to close (main thread -> closer). */
export interface CloseRequest {
  seq: number;
  fds: number[];
}
/** The batch is closed; `failed` counts descriptors that were not open any more. */
export interface CloseReply {
  seq: number;
  failed: number;
}

const n = native();
// From here on the thread only closes descriptors and waits for messages: the vcpu role's
// filter is the smallest that allows that (close, and what any Node thread needs).
installWorkerFilter('vcpu', 'tv-closer');
parentPort!.on('message', (r: CloseRequest) => {
  let failed = 0;
  for (const fd of r.fds) {
    try {
      n.close(fd);
    } catch {
      failed++;
    }
  }
  parentPort!.postMessage({ seq: r.seq, failed } satisfies CloseReply);
});

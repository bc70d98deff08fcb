/**
 * Child process for seccomp-kill.test.ts: installs one role's filter the way the VMM does, on
 * the thread that role runs on, then makes one system call. Prints "before" when the filter is
 * in place and "after" if the call came back (so a kill is told apart from a crash earlier).
 * Usage: node seccomp-child.js CASE, CASE one of:
 *   main-clone-process  main thread, process filter (TSYNC), then spawnSync: clone without
 *                       CLONE_THREAD (a new process) -> SIGSYS
 *   main-inet-socket    main thread, then a TCP listener: socket(AF_INET*) -> SIGSYS
 *   main-allowed        main thread, then allowed work (a file read, a Worker thread)
 *   main-tsync          a Worker started before the install reports its seccomp mode after it
 *   vcpu-socket         a vCPU-role Worker (stacked on the process filter): socket() -> SIGSYS
 *   vcpu-open           the same, openat (allowed by the process filter, not by vcpu): refused
 *                       with EACCES, not a kill (glibc's malloc opens a /proc file; roles.ts)
 *   vcpu-allowed        the same, a KVM ioctl and an eventfd write: allowed
 *   device-memfd        a device-role Worker: memfd_create -> SIGSYS
 *   device-inet-socket  the same, socket(AF_INET) (only AF_UNIX is allowed) -> SIGSYS
 *   device-allowed      the same, socket(AF_UNIX) and an eventfd: allowed
 */
import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { createSocket } from 'node:dgram';
// Loaded before any filter: loading it starts c-ares, which calls uname (outside the device
// role's list), and dgram's bind would load it after the filter.
import 'node:dns';
import { createServer } from 'node:net';
import { isMainThread, parentPort, Worker, workerData } from 'node:worker_threads';
import { native } from '../../src/kvm/native.js';
import { installProcessFilter, installWorkerFilter } from '../../src/sandbox/seccomp/install.js';

const say = (s: string) => process.stdout.write(s + '\n');

/** The worker side: install the role's filter, then do the case's call. */
function workerMain({ c, ack }: { c: string; ack: SharedArrayBuffer }): void {
  const n = native();
  if (c === 'tsync') {
    parentPort!.once('message', () => parentPort!.postMessage(n.seccompMode()));
    return;
  }
  const role = c.startsWith('vcpu') ? 'vcpu' : 'device';
  const kvm = role === 'vcpu' ? n.open('/dev/kvm', 2, 0) : -1; // before the filter, as the VMM
  installWorkerFilter(role);
  parentPort!.postMessage('before');
  // The kill ends the whole process: wait until the main thread has printed "before".
  Atomics.wait(new Int32Array(ack), 0, 0, 5_000);
  switch (c) {
    case 'vcpu-socket':
      n.unixSocket();
      break;
    case 'vcpu-open':
      try {
        n.close(n.open('/dev/null', 0, 0));
        parentPort!.postMessage('opened');
      } catch (e) {
        parentPort!.postMessage(`refused ${(e as { code?: string }).code ?? (e as Error).message}`);
      }
      break;
    case 'vcpu-allowed': {
      const KVM_GET_API_VERSION = 0xae00;
      if (n.ioctl(kvm, KVM_GET_API_VERSION, 0) !== 12) throw new Error('KVM API version');
      break;
    }
    case 'device-memfd':
      n.memfdCreate('x', 0);
      break;
    case 'device-inet-socket':
      // No shim call makes an AF_INET socket: Node's own does (node:dns loaded above, so that
      // its resolver's uname is not the first refused call).
      createSocket('udp4').bind(0, '127.0.0.1');
      return; // the kill comes asynchronously, from this thread's loop
    case 'device-allowed': {
      n.close(n.unixSocket());
      const e = n.eventfd(0, 0);
      n.eventfdWrite(e, 1);
      n.close(e);
      break;
    }
  }
  parentPort!.postMessage('after');
}

async function mainThread(c: string): Promise<void> {
  if (c.startsWith('vcpu') || c.startsWith('device')) {
    installProcessFilter({ mode: 'default' });
    const ack = new SharedArrayBuffer(4);
    const w = new Worker(new URL(import.meta.url), { workerData: { c, ack } });
    w.on('message', (m) => {
      say(String(m));
      Atomics.store(new Int32Array(ack), 0, 1);
      Atomics.notify(new Int32Array(ack), 0);
    });
    w.on('error', (e) => say(`error ${e.message}`));
    return;
  }
  if (c === 'main-tsync') {
    const ack = new SharedArrayBuffer(4);
    const w = new Worker(new URL(import.meta.url), { workerData: { c: 'tsync', ack } });
    await new Promise((r) => w.once('online', r));
    const before = native().seccompMode();
    installProcessFilter({ mode: 'default' });
    w.postMessage('mode?');
    const mode = await new Promise((r) => w.once('message', r));
    say(JSON.stringify({ mainBefore: before, main: native().seccompMode(), worker: mode }));
    await w.terminate();
    return;
  }
  installProcessFilter({ mode: 'default' });
  say('before');
  switch (c) {
    case 'main-clone-process':
      // stdio 'ignore': no pipes to make (a socketpair, itself outside the list, would come
      // first), so clone is the first call the filter refuses.
      spawnSync('true', { stdio: 'ignore' });
      break;
    case 'main-inet-socket':
      createServer().listen(0, '127.0.0.1');
      await new Promise((r) => setTimeout(r, 500));
      break;
    case 'main-allowed': {
      readFileSync(new URL(import.meta.url));
      const w = new Worker('require("node:worker_threads").parentPort.postMessage(1)', {
        eval: true,
      });
      await new Promise((r) => w.once('message', r));
      await w.terminate();
      break;
    }
    default:
      throw new Error(`unknown case ${c}`);
  }
  say('after');
}

if (isMainThread) await mainThread(process.argv[2]!);
else workerMain(workerData as { c: string; ack: SharedArrayBuffer });

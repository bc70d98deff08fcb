/**
 * Entry point of a vCPU worker thread: maps its kvm_run itself, attaches the legacy
 * devices to the shared state, and runs the vCPU loop until the VM ends or is stopped.
 * The vCPU was configured (CPUID, MSRs, registers) by the main thread before this starts.
 */
import { parentPort } from 'node:worker_threads';
import { Kvm, Vcpu } from '../kvm/kvm.js';
import { native } from '../kvm/native.js';
import { installWorkerFilter } from '../sandbox/seccomp/install.js';
import type { GuestRamLayout } from './guest-ram.js';
import { attachLegacyDevices, type LegacyDeviceState } from './legacy-devices.js';
import { VcpuControl } from './vcpu-control.js';
import { VcpuLoop, exitHandlersOf, type VmExitEvent } from './vcpu-loop.js';
import { saveHandlers } from './vcpu-save.js';
import type { TransportSlot } from './virtio-transport.js';
import type { VcpuHubMessage, VcpuHubStart } from './vcpu-threads.js';
import { monoMs } from '../util/clock.js';

export interface VcpuWorkerData {
  id: number;
  vcpuFd: number;
  mmapSize: number;
  ram: GuestRamLayout;
  control: SharedArrayBuffer;
  /** The legacy devices' shared state, the console output's among them (never blocks). */
  legacy: LegacyDeviceState;
  /** The virtio-mmio register windows this vCPU answers (no data plane here). */
  virtio: { slots: TransportSlot[]; controlFd: number };
  /** MSRs a snapshot saves besides KVM's list: the CPU template's (as Firecracker does). */
  extraMsrs?: number[];
}

/** What the main thread sends a (possibly prewarmed) worker to start it. */
export interface VcpuWorkerStart {
  type: 'start';
  data: VcpuWorkerData;
  /**
   * The worker stays after its VM ends and waits for another 'start' (the library's warm pool,
   * src/lib/): what a thread sets up once (the kick handler, /dev/kvm, the virtio transport's
   * modules, its seccomp filter) is kept; what belongs to the VM (its kvm_run mapping) is not.
   */
  reuse?: boolean;
}

/**
 * Sent to an idle reusable worker (the library's warm pool, VmHost.collectGarbage): a full
 * garbage collection of its isolate, when the process runs with --expose-gc (the daemon does,
 * src/daemon/heap.ts); answered with 'collected' either way.
 */
export interface VcpuWorkerCollect {
  type: 'collect';
}

/**
 * What a reusable worker set up on its first VM and keeps for the next: the kick handler (a
 * sigaction, which the vcpu role's filter refuses afterwards), /dev/kvm (an open, refused too),
 * and whether its filter is installed (filters stack: installed once).
 */
const kept: { kvm?: Kvm; kick?: boolean; filtered?: boolean } = {};

export type VcpuWorkerMessage =
  | VcpuHubMessage
  /** Posted once, when the worker has loaded its modules and listens for 'start'. */
  | { type: 'ready' }
  /** The answer to 'collect': whether this isolate collected (false: no gc exposed). */
  | { type: 'collected'; collected: boolean }
  | { type: 'thread'; thread: bigint }
  | { type: 'log'; message: string }
  | { type: 'exit'; event: VmExitEvent }
  /** The answer to a save request: VcpuStateV1 bytes (transferred, not copied). */
  | { type: 'saved'; id: number; state: Uint8Array }
  | { type: 'save-failed'; id: number; message: string };

async function main(d: VcpuWorkerData, reuse = false): Promise<void> {
  const port = parentPort!;
  const post = (m: VcpuWorkerMessage) => port.postMessage(m);
  let event: VmExitEvent;
  // Every mapping of a vCPU fd pins the VM in the kernel: unmap ours whatever happens.
  const mappings: Array<() => void> = [];
  try {
    const n = native();
    if (!reuse || !kept.kick) n.installKickHandler(); // also unblocks the kick signal here
    if (reuse) kept.kick = true;
    post({ type: 'thread', thread: n.threadSelf() });
    const control = new VcpuControl(d.control);
    // Guest RAM is not mapped here: nothing on this thread reads it (the legacy devices and the
    // virtio register windows do not; KVM reaches it through the memory slots). An ArrayBuffer
    // over all of it would cost a V8 mark-compact at start-up (>= 64 MiB external memory).
    const vcpu = new Vcpu(d.vcpuFd, d.mmapSize);
    mappings.push(() => n.munmap(vcpu.run.buffer as ArrayBuffer));
    // Opened now: a save reads KVM's MSR list from /dev/kvm, and the filter allows no open.
    let kvm: Kvm;
    if (reuse) kvm = kept.kvm ??= Kvm.open();
    else {
      const own = Kvm.open();
      mappings.push(() => own.close());
      kvm = own;
    }
    let loop: VcpuLoop | undefined;
    const devices = attachLegacyDevices(d.legacy, {
      onPowerOff: () => loop && (loop.pendingEvent ??= { kind: 'poweroff' }),
      onReset: () => loop && (loop.pendingEvent ??= { kind: 'reset' }),
      onBootMarker: () => control.markBoot(monoMs(), d.legacy.bootTimer),
      log: (message) => post({ type: 'log', message }),
    });
    // Loaded only when there are virtio devices: it is a large part of a worker's start-up. A
    // reusable worker loads it before its filter goes in (a later VM may have devices, and
    // loading a module opens files, which the filter refuses).
    if (d.virtio.slots.length > 0 || (reuse && !kept.filtered)) {
      const { attachVirtioTransports } = await import('./virtio-transport.js');
      if (d.virtio.slots.length > 0)
        attachVirtioTransports(d.virtio.slots, d.virtio.controlFd, devices.mmio);
    }
    loop = new VcpuLoop(
      d.id,
      vcpu,
      control,
      exitHandlersOf(devices),
      saveHandlers(d.id, vcpu, kvm, (m, transfer) => port.postMessage(m, transfer), d.extraMsrs),
    );
    // From here on this thread only runs the vCPU: its seccomp filter (docs/security.md).
    if (!reuse || !kept.filtered) installWorkerFilter('vcpu', reuse ? 'tv-vcpu' : `tv-vcpu${d.id}`);
    if (reuse) kept.filtered = true;
    event = loop.run();
  } catch (e) {
    event = { kind: 'fatal', message: `vCPU ${d.id}: ${(e as Error).message}` };
  } finally {
    for (const unmap of mappings) unmap();
  }
  post({ type: 'exit', event });
}

// A worker runs one vCPU ('start'), or serves the native runner threads of many ('start-hub',
// vcpu-threads.ts: loaded only then). A reusable one ('start' with reuse) keeps listening and
// runs one VM's vCPU after another; any other ends with its VM (nothing keeps its loop alive).
const onStart = (m: VcpuWorkerStart | VcpuHubStart | VcpuWorkerCollect) => {
  if (m.type === 'collect') {
    const gc = (globalThis as { gc?: () => void }).gc;
    gc?.();
    return void parentPort!.postMessage({
      type: 'collected',
      collected: gc !== undefined,
    } satisfies VcpuWorkerMessage);
  }
  if (m.type === 'start' && m.reuse) return void main(m.data, true);
  parentPort!.off('message', onStart);
  if (m.type === 'start') return void main(m.data);
  const port = parentPort!;
  void import('./vcpu-threads.js').then(({ runHub }) =>
    runHub(
      m.data,
      (msg, transfer) => port.postMessage(msg, transfer ?? []),
      (id, vcpu, kvm, post) => saveHandlers(id, vcpu, kvm, post, m.data.extraMsrs),
    ),
  );
};
parentPort!.on('message', onStart);
parentPort!.postMessage({ type: 'ready' } satisfies VcpuWorkerMessage);

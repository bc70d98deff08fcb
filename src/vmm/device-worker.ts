/**
 * Entry point of the device worker thread: the data plane (docs/architecture.md). It maps guest
 * RAM itself and wraps the main thread's mappings of device memory (pmem files, the virtio-mem
 * region: a guest may put any virtio buffer there), builds each device from its registry descriptor over the slot's shared register
 * file, and runs a synchronous epoll loop over eventfds:
 * - the control eventfd: vCPU workers write it on DRIVER_OK and on the reset of an activated
 *   device; the main thread writes it after posting a mailbox request or setting the stop flag;
 * - one eventfd per queue: KVM signals it on the guest's QueueNotify write (KVM_IOEVENTFD);
 * - whatever host fds the backends watch (a TAP, vsock sockets);
 * - interrupts raise each device's GSI with KVM_IRQ_LINE (device-loop.ts; its irqfd if that fails).
 * While paused it waits on a second epoll set holding only the control eventfd, so no queue or
 * host socket is served and nothing spins (kicks stay counted in their eventfds).
 *
 * Each backend gets the loop through guardedLoop(): an exception out of one of its fds or timers
 * breaks that device (VirtioDevice.guard: DEVICE_NEEDS_RESET, logged once, counted), never the
 * worker; queue kicks go through the same guard.
 */
import { isMainThread, parentPort, receiveMessageOnPort, workerData } from 'node:worker_threads';
import { BalloonDevice } from '../devices/virtio/balloon/balloon.js';
import { BLK_CONFIG_CAPACITY, BlockDevice, fdBlockFile } from '../devices/virtio/block/block.js';
import { VirtioDevice } from '../devices/virtio/device.js';
import { NetDevice } from '../devices/virtio/net/net.js';
import { RngDevice } from '../devices/virtio/rng/rng.js';
import { PmemDevice } from '../devices/virtio/pmem/pmem.js';
import { MemDevice } from '../devices/virtio/mem/mem.js';
import { MmdsResponder } from '../mmds/responder.js';
import type { CreatedBackend } from '../devices/virtio/descriptor.js';
import { deviceType } from '../devices/virtio/registry.js';
import { EventLoop } from '../events/event-loop.js';
import { native } from '../kvm/native.js';
import { installWorkerFilter } from '../sandbox/seccomp/install.js';
import { mapGuestRam } from './guest-ram.js';
import { deviceEnvironment, guardedLoop, watchQueue } from './device-loop.js';
import { netWarmupRounds, warmNetInSlices } from './net-warmup.js';
import { deviceMemoryViews, kvmSlotControl } from './device-memory.js';
import { useRegisterPages } from './register-pages.js';
import {
  DEVICE_WORKER_ROLE,
  WORKER_CONTROL,
  type DeviceReport,
  type DeviceWorkerData,
  type DeviceWorkerStart,
  type DeviceWorkerMessage,
  type MailboxReply,
  type MailboxRequest,
  type SavedDevice,
  type WorkerRequest,
} from './device-worker-protocol.js';
import type { VirtioSlot } from './virtio-plan.js';

interface RunningDevice {
  slot: VirtioSlot;
  group: string;
  device: VirtioDevice;
  created: CreatedBackend;
  /** Raises the device's interrupt as its queues do (deviceEnvironment): config changes. */
  interrupt: () => void;
}

/**
 * The order saved devices are restored in: virtio-mem first, so that its plugged blocks are
 * reachable (GuestRegion.allows) when the other devices' restored queues are checked against
 * guest memory (a ring in hotplugged memory); the others as saved.
 */
export function restoreOrder<T extends { kind: string }>(devices: readonly T[]): T[] {
  return [...devices.filter((d) => d.kind === 'mem'), ...devices.filter((d) => d.kind !== 'mem')];
}

/** Resets a (non-blocking) eventfd's counter. */
function drain(fd: number): void {
  native().eventfdRead(fd);
}

function main(d: DeviceWorkerData): void {
  const port = parentPort!;
  const post = (m: DeviceWorkerMessage) => port.postMessage(m);
  const log = (message: string, level?: 'warn') =>
    post({ type: 'log', message, ...(level ? { level } : {}) });
  const control = new Int32Array(d.control);
  const stopping = () => Atomics.load(control, WORKER_CONTROL.stop) !== 0;
  const n = native();
  // virtio-mem's region: device access only to the blocks its device has plugged (bound below,
  // once the device is built; nothing is plugged before).
  const plugged = new Map<VirtioSlot, MemDevice>();
  const ram = mapGuestRam(
    d.ram,
    deviceMemoryViews(d.slots, (slot) =>
      slot.kind === 'mem'
        ? (addr, len) => plugged.get(slot)?.isPluggedRange(addr, len) === true
        : undefined,
    ),
  );
  const onError = (e: unknown) =>
    log(`device worker: internal error: ${(e as Error).stack ?? String(e)}`);
  const loop = new EventLoop(onError);
  const idle = new EventLoop(onError);
  let devices: RunningDevice[] = [];
  let paused = false;

  const report = (): DeviceReport[] =>
    devices.map(({ slot, group, device, created }) => ({
      kind: slot.kind,
      id: slot.id,
      name: slot.name,
      group,
      transport: device.state.counters(),
      device: { ...created.metrics?.(), ...device.metrics() },
    }));

  const serve = (r: WorkerRequest): unknown => {
    switch (r.op) {
      case 'counters':
        return report();
      case 'pause':
        paused = true;
        Atomics.store(control, WORKER_CONTROL.paused, 1);
        // Queues served outside this thread (vhost) stop touching guest memory too.
        for (const dev of devices) dev.device.pause();
        return undefined;
      case 'resume':
        paused = false;
        Atomics.store(control, WORKER_CONTROL.paused, 0);
        // Kicks and activations that arrived while paused are served now.
        for (const dev of devices) {
          dev.device.resume();
          dev.device.onLifecycle();
          // Rate limits may have changed while paused: sleeping queues try again now.
          dev.device.wakeThrottled();
          dev.device.kickAll();
        }
        return undefined;
      case 'save':
        if (!paused) throw new Error('device state can be saved only while the devices are paused');
        // Catch up with a DRIVER_OK or reset whose eventfd the loop has not read yet (the vCPUs
        // are paused, so none can arrive now); a device still mid-change cannot be saved.
        for (const x of devices)
          if (!x.device.quiesce())
            throw new Error(
              `${x.slot.kind} device "${x.slot.id}" cannot be saved: a lifecycle change is still pending`,
            );
        // A snapshot follows: every active queue's rings and held buffers are device-dirty
        // (no-op unless dirty pages are tracked).
        for (const x of devices) {
          const st = x.device.deviceState;
          if (st.kind === 'active') for (const q of st.queues) q?.markForSnapshot();
        }
        return devices.map((x): SavedDevice => ({
          kind: x.slot.kind,
          id: x.slot.id,
          state: x.device.save(),
        }));
      case 'restore': {
        if (!paused)
          throw new Error('device state can be restored only while the devices are paused');
        const key = (k: string, id: string) => `${k}/${id}`;
        const have = new Map(devices.map((x) => [key(x.slot.kind, x.slot.id), x]));
        if (r.devices.length !== devices.length)
          throw new Error(
            `the saved state has ${r.devices.length} devices; this VM has ${devices.length}`,
          );
        for (const s of r.devices)
          if (!have.has(key(s.kind, s.id)))
            throw new Error(`the saved state has a ${s.kind} device "${s.id}" this VM lacks`);
        // Into a fresh VM only (snapshot load): a failure part-way leaves that VM unusable, and
        // the caller discards it.
        for (const s of restoreOrder(r.devices)) {
          const done = have.get(key(s.kind, s.id))!.device.restore(s.state);
          if (!done.ok) throw new Error(`${s.kind} device "${s.id}": ${done.error.message}`);
        }
        return undefined;
      }
      case 'update-block': {
        const x = devices.find((d) => d.slot.kind === 'block' && d.slot.id === r.id);
        const backend = x?.created.backend;
        if (!x || !(backend instanceof BlockDevice))
          throw new Error(`this VM has no block device "${r.id}"`);
        const field = backend.swapImage(fdBlockFile(r.fd, n), r.capacity);
        if (x.device.state.changeConfig(BLK_CONFIG_CAPACITY, field)) x.interrupt();
        return undefined;
      }
      case 'update-rate-limiter': {
        const t = r.target;
        const x = devices.find((d) => d.slot.kind === t.kind && d.slot.id === t.id);
        const backend = x?.created.backend;
        if (t.kind === 'block' && backend instanceof BlockDevice)
          backend.updateRateLimiter(t.limiter);
        else if (t.kind === 'rng' && backend instanceof RngDevice)
          backend.updateRateLimiter(t.limiter);
        else if (t.kind === 'pmem' && backend instanceof PmemDevice)
          backend.updateRateLimiter(t.limiter);
        else if (t.kind === 'net' && backend instanceof NetDevice)
          backend.updateRateLimiters(t.rx, t.tx);
        else throw new Error(`this VM has no ${t.kind} device "${t.id}"`);
        // Queues asleep on the old limits try again under the new ones (not while paused).
        if (!paused) x!.device.wakeThrottled();
        return undefined;
      }
      case 'balloon': {
        const x = devices.find((d) => d.slot.kind === 'balloon');
        const backend = x?.created.backend;
        if (!x || !(backend instanceof BalloonDevice))
          throw new Error('this VM has no balloon device');
        const out = backend.control(r.request, x.device.state.config);
        if (out.config && x.device.state.changeConfig(out.config.offset, out.config.bytes))
          x.interrupt();
        return out.value;
      }
      case 'mmds-data':
        for (const x of devices) {
          const b = x.created.backend;
          if (b instanceof NetDevice && b.interceptor instanceof MmdsResponder)
            b.interceptor.setData(r.json);
        }
        return undefined;
    }
  };

  const onControl = () => {
    drain(d.controlFd);
    if (stopping()) return;
    for (let m = receiveMessageOnPort(d.mailbox); m; m = receiveMessageOnPort(d.mailbox)) {
      const req = m.message as MailboxRequest;
      let reply: MailboxReply;
      try {
        reply = { seq: req.seq, ok: true, value: serve(req) };
      } catch (e) {
        reply = { seq: req.seq, ok: false, error: (e as Error).message };
      }
      d.mailbox.postMessage(reply);
    }
    if (!paused) for (const dev of devices) dev.device.onLifecycle();
  };

  let stopWarmup: (() => void) | undefined;
  // Register pages (vmm/register-pages.ts) are the main thread's mappings: wrap them.
  useRegisterPages();
  try {
    devices = d.slots.map((slot): RunningDevice => {
      const type = deviceType(slot.kind);
      let device: VirtioDevice | undefined;
      // The loop runs nothing before every device is built, so `device` is set by then.
      const ops = guardedLoop(loop, () => device!);
      // One way for all of the device's interrupts (its queues' and its config changes'), so
      // that no two raise its GSI at once by different paths.
      const env = deviceEnvironment(
        loop,
        ram.memory,
        slot.irqFd,
        log,
        slot.vmFd === undefined ? undefined : { vmFd: slot.vmFd, gsi: slot.gsi },
      );
      const config = {
        read: (offset: number, length: number) =>
          device!.state.config.slice(offset, offset + length),
        change: (offset: number, bytes: Uint8Array) => {
          if (device!.state.changeConfig(offset, bytes)) env.interrupt();
        },
      };
      const created = type.create(slot.host as never, {
        name: slot.name,
        sys: n,
        loop: ops,
        log,
        ram: { memory: ram.memory, shared: ram.memfd !== undefined },
        config,
        ...(slot.kvmSlots ? { memorySlots: kvmSlotControl(slot.kvmSlots) } : {}),
        queueFds: slot.queueFds,
      });
      const dev = new VirtioDevice(slot.state, created.backend, env);
      // InterruptACK = 1 without an exit (virtio-plan.ts `ackFd`): applied before the next raise.
      const ackFd = slot.ackFd;
      if (ackFd !== undefined) dev.state.setAckSource(() => (n.eventfdRead(ackFd) > 0n ? 1 : 0));
      device = dev;
      if (created.backend instanceof MemDevice) plugged.set(slot, created.backend);
      // The balloon changes its config space on its own (a hinting run's DONE).
      if (created.backend instanceof BalloonDevice)
        created.backend.onConfig = (c) => {
          if (dev.state.changeConfig(c.offset, c.bytes)) env.interrupt();
        };
      // Queues served by another party (vhost) are kicked there: their eventfds are its to poll.
      slot.queueFds.forEach((fd, q) => {
        if (!created.backend.offloaded?.includes(q)) watchQueue(loop, dev, q, fd);
      });
      return { slot, group: type.metricsGroup, device: dev, created, interrupt: env.interrupt };
    });
    loop.add(d.controlFd, { process: onControl });
    idle.add(d.controlFd, { process: onControl });
    // Issue 17: a scratch virtio-net plays a ping's path in slices of the loop while the guest
    // boots, so that V8 has compiled it by the guest's first frames (net-warmup.ts).
    const warm = netWarmupRounds();
    if (warm.ignored) log(`device worker: ${warm.ignored}`);
    stopWarmup =
      warm.rounds > 0 && devices.some((x) => x.slot.kind === 'net')
        ? warmNetInSlices(loop, warm.rounds, log)
        : undefined;
    // Devices built, fds open: from here on the data plane runs under its filter.
    installWorkerFilter('device');
    Atomics.store(control, WORKER_CONTROL.running, 1);
    Atomics.notify(control, WORKER_CONTROL.running);
    // Devices activated before this worker started (or kicks it missed) are caught up now.
    for (const dev of devices) dev.device.onLifecycle();
    while (!stopping()) (paused ? idle : loop).runOnce(-1);
  } catch (e) {
    post({ type: 'fatal', message: (e as Error).stack ?? String(e) });
  } finally {
    try {
      post({ type: 'final-counters', counters: report() });
    } catch {
      // reporting is best effort
    }
    for (const x of devices) {
      try {
        x.created.close?.();
      } catch (e) {
        onError(e);
      }
    }
    stopWarmup?.();
    loop.close();
    idle.close();
    ram.unmap();
    Atomics.store(control, WORKER_CONTROL.running, 0);
  }
}

const wd = isMainThread ? undefined : (workerData as Partial<DeviceWorkerData> | null);
if (wd?.role === DEVICE_WORKER_ROLE) {
  // A prewarmed worker (vcpu-pool.ts) gets its data in a 'start' message once a VM needs it.
  if (wd.deferred) {
    parentPort!.once('message', (m: DeviceWorkerStart) => main(m.data));
    parentPort!.postMessage({ type: 'ready' } satisfies DeviceWorkerMessage);
  } else main(wd as DeviceWorkerData);
}

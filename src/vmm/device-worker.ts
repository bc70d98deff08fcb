/**
 * Entry point of the device worker thread: the data plane (DESIGN.md, "The shape"). It maps
 * guest RAM itself, builds one VirtioDevice per slot over the slot's shared register file, and
 * runs a synchronous epoll loop over eventfds:
 * - one control eventfd: the vCPU workers write it on DRIVER_OK and on the reset of an
 *   activated device; the main thread writes it (after setting the stop flag) to end the worker;
 * - one eventfd per queue: KVM signals it on the guest's QueueNotify write (KVM_IOEVENTFD);
 * - interrupts leave through each device's irqfd (KVM_IRQFD).
 * It blocks in epoll_wait, so it never handles 'message' events; it only posts log lines.
 */
import { isMainThread, parentPort, workerData } from 'node:worker_threads';
import { BlockDevice, fdBlockFile } from '../devices/virtio/block/block.js';
import { VirtioDevice, type VirtioBackend } from '../devices/virtio/device.js';
import { RngDevice } from '../devices/virtio/rng/rng.js';
import { NetDevice, type TapIo } from '../devices/virtio/net/net.js';
import { VsockDevice, type VsockHost } from '../devices/virtio/vsock/vsock.js';
import { EventLoop } from '../events/event-loop.js';
import {
  EPOLLERR,
  EPOLLHUP,
  EPOLLIN,
  EPOLLOUT,
  SHUT_WR,
  TUNSETOFFLOAD,
  native,
} from '../kvm/native.js';
import { mapGuestRam, type GuestRamLayout } from './guest-ram.js';

/** Int32 slots of the worker's control block. */
export const W_STOP = 0;
export const W_RUNNING = 1;
export const WORKER_CONTROL_SLOTS = 4;

export type DeviceWorkerDevice = {
  name: string;
  state: SharedArrayBuffer;
  irqFd: number;
  queueFds: number[];
} & (
  | { kind: 'rng' }
  | { kind: 'block'; fd: number; capacity: number; readOnly: boolean; serial: Uint8Array }
  | { kind: 'net'; tapFd: number }
  | { kind: 'vsock'; listenFd: number; cid: number; uds: string }
);

/** The TAP as virtio-net sees it: readv/writev on the fd, EPOLLIN interest toggled on the loop. */
function tapIo(loop: EventLoop, fd: number, onReadable: () => void): TapIo {
  const n = native();
  const tag = loop.add(fd, { process: () => onReadable() }, 0);
  return {
    readv: (bufs) => n.readv(fd, bufs),
    writev: (bufs) => n.writev(fd, bufs),
    setOffload: (flags) => void n.ioctl(fd, TUNSETOFFLOAD, flags),
    setReadInterest: (on) => loop.modify(tag, on ? EPOLLIN : 0),
  };
}

/** Unix sockets for virtio-vsock, each watched on the loop and reported to `dev()`. */
function vsockHost(loop: EventLoop, listenFd: number, dev: () => VsockDevice): VsockHost {
  const n = native();
  const tags = new Map<number, number>();
  return {
    connect(path) {
      const fd = n.unixSocket();
      try {
        if (n.connect(fd, path) < 0)
          throw new Error(`connect ${path}: the listener's backlog is full`);
      } catch (e) {
        n.close(fd);
        throw e;
      }
      return fd;
    },
    accept: () => n.accept(listenFd),
    read: (fd, bufs) => n.readv(fd, bufs),
    write: (fd, bufs) => n.sendv(fd, bufs),
    shutdownWrite: (fd) => n.shutdown(fd, SHUT_WR),
    after: (ms, fn) => void loop.setTimer(ms, fn),
    close(fd) {
      this.unwatch(fd);
      n.close(fd);
    },
    watch(fd, read, write) {
      const events = (read ? EPOLLIN : 0) | (write ? EPOLLOUT : 0);
      const tag = tags.get(fd);
      if (tag !== undefined) {
        loop.modify(tag, events);
        return;
      }
      tags.set(
        fd,
        loop.add(
          fd,
          {
            process: (ev) =>
              dev().onSocket(
                fd,
                (ev & EPOLLIN) !== 0,
                (ev & EPOLLOUT) !== 0,
                (ev & (EPOLLHUP | EPOLLERR)) !== 0,
              ),
          },
          events,
        ),
      );
    },
    unwatch(fd) {
      const tag = tags.get(fd);
      if (tag === undefined) return;
      tags.delete(fd);
      loop.remove(tag);
    },
  };
}

export const DEVICE_WORKER_ROLE = 'virtio-device-worker';

export interface DeviceWorkerData {
  /** Marks the thread as the device worker (this module is also imported for its types). */
  role: typeof DEVICE_WORKER_ROLE;
  ram: GuestRamLayout;
  controlFd: number;
  control: SharedArrayBuffer;
  devices: DeviceWorkerDevice[];
}

export type DeviceWorkerMessage =
  { type: 'log'; message: string } | { type: 'fatal'; message: string };

/** Resets a (non-blocking) eventfd's counter. */
function drain(fd: number): void {
  native().eventfdRead(fd);
}

function main(): void {
  const port = parentPort!;
  const d = workerData as DeviceWorkerData;
  const log = (message: string) =>
    port.postMessage({ type: 'log', message } satisfies DeviceWorkerMessage);
  const control = new Int32Array(d.control);
  const ram = mapGuestRam(d.ram);
  const loop = new EventLoop((e) =>
    log(`device worker: internal error: ${(e as Error).stack ?? String(e)}`),
  );
  try {
    const devices = d.devices.map((dev) => {
      let backend: VirtioBackend;
      if (dev.kind === 'block') {
        backend = new BlockDevice({
          name: dev.name,
          file: fdBlockFile(dev.fd),
          capacity: dev.capacity,
          readOnly: dev.readOnly,
          serial: dev.serial,
          log,
        });
      } else if (dev.kind === 'net') {
        const net: NetDevice = new NetDevice(
          dev.name,
          tapIo(loop, dev.tapFd, () => net.onTapReadable()),
          log,
        );
        backend = net;
      } else if (dev.kind === 'vsock') {
        const vsock: VsockDevice = new VsockDevice(
          dev.name,
          dev.cid,
          dev.uds,
          vsockHost(loop, dev.listenFd, () => vsock),
          log,
        );
        loop.add(dev.listenFd, { process: () => vsock.onListen() });
        backend = vsock;
      } else backend = new RngDevice();
      const device = new VirtioDevice(dev.state, backend, {
        mem: ram.memory,
        interrupt: () => native().eventfdWrite(dev.irqFd, 1),
        log,
      });
      dev.queueFds.forEach((fd, q) =>
        loop.add(fd, {
          process: () => {
            drain(fd);
            device.onKick(q);
          },
        }),
      );
      return device;
    });
    loop.add(d.controlFd, {
      process: () => {
        drain(d.controlFd);
        if (Atomics.load(control, W_STOP) !== 0) return;
        for (const dev of devices) dev.onLifecycle();
      },
    });
    Atomics.store(control, W_RUNNING, 1);
    Atomics.notify(control, W_RUNNING);
    // Devices activated before this worker started (or kicks it missed) are caught up now.
    for (const dev of devices) dev.onLifecycle();
    loop.run(() => Atomics.load(control, W_STOP) !== 0);
  } catch (e) {
    port.postMessage({
      type: 'fatal',
      message: (e as Error).stack ?? String(e),
    } satisfies DeviceWorkerMessage);
  } finally {
    loop.close();
    ram.unmap();
    Atomics.store(control, W_RUNNING, 0);
  }
}

if (!isMainThread && (workerData as Partial<DeviceWorkerData> | null)?.role === DEVICE_WORKER_ROLE)
  main();

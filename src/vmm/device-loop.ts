/**
 * How a virtio device meets the device worker's loop: the loop as its backend sees it, its
 * queues' kick eventfds, and the VirtioDevice's environment. The device worker and the virtio-net
 * warm-up (net-warmup.ts) both build their devices with these, so the warm-up runs the very
 * code (down to the closures) that the guest's frames run.
 */
import type { EventOps } from '../devices/virtio/descriptor.js';
import type { DeviceEnvironment, VirtioDevice } from '../devices/virtio/device.js';
import type { EventLoop } from '../events/event-loop.js';
import { native } from '../kvm/native.js';
import type { GuestMemory } from '../memory/guest-memory.js';

/**
 * The loop as one device's backend sees it. Its subscribers and timers run under the device's
 * guard(); a subscriber that threw while its device is not active (so breaking the device
 * stopped nothing) has its interest cleared, so a readable fd cannot make the loop spin on an
 * exception; the backend's next modify() of that registration sets it again.
 */
export function guardedLoop(loop: EventLoop, device: () => VirtioDevice): EventOps {
  return {
    add(fd, subscriber, events) {
      const what = `host fd ${fd}`;
      const tag: number = loop.add(
        fd,
        {
          process: (ev) => {
            const dev = device();
            const failures = dev.counters.failures;
            dev.guard(what, () => subscriber.process(ev));
            if (dev.counters.failures !== failures && dev.deviceState.kind !== 'active')
              loop.modify(tag, 0);
          },
        },
        events,
      );
      return tag;
    },
    modify: (tag, events) => loop.modify(tag, events),
    remove: (tag) => loop.remove(tag),
    setTimer: (ms, fn) => loop.setTimer(ms, () => device().guard('timer', fn)),
  };
}

/**
 * Queue `q`'s kick eventfd (KVM's ioeventfd for the guest's QueueNotify write) on the loop: the
 * counter is reset, then the queue is served under the device's guard.
 */
export function watchQueue(loop: EventLoop, dev: VirtioDevice, q: number, fd: number): void {
  const n = native();
  const what = `queue ${q}`;
  loop.add(fd, {
    process: () => {
      n.eventfdRead(fd);
      dev.guard(what, () => dev.onKick(q));
    },
  });
}

/** A device's environment on the loop: interrupts are writes of its irqfd (KVM_IRQFD). */
export function deviceEnvironment(
  loop: EventLoop,
  mem: GuestMemory,
  irqFd: number,
  log: (m: string) => void,
): DeviceEnvironment {
  const n = native();
  return {
    mem,
    interrupt: () => n.eventfdWrite(irqFd, 1),
    log,
    defer: (fn) => loop.setTimer(0, fn),
    after: (ms, fn) => loop.setTimer(ms, fn),
    round: () => loop.rounds,
  };
}

/**
 * How a virtio device meets the device worker's loop: the loop as its backend sees it, its
 * queues' kick eventfds, and the VirtioDevice's environment. The device worker and the virtio-net
 * warm-up (net-warmup.ts) both build their devices with these, so the warm-up runs the very
 * code (down to the closures) that the guest's frames run.
 */
import type { EventOps } from '../devices/virtio/descriptor.js';
import type { DeviceEnvironment, VirtioDevice } from '../devices/virtio/device.js';
import type { EventLoop } from '../events/event-loop.js';
import { KVM_IRQ_LINE } from '../kvm/constants.js';
import { EPOLLET, EPOLLIN, native } from '../kvm/native.js';
import { encodeIrqLevel } from '../kvm/structs.js';
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
 * Queue `q`'s kick eventfd (KVM's ioeventfd for the guest's QueueNotify write) on the loop,
 * edge-triggered: every write after the loop last reported the fd reports it again (an eventfd
 * wakes its waiters on every write, and epoll puts an edge-triggered fd back on its ready list
 * at each wake-up), so the counter is never read: one system call less per kick, and in the lab
 * a call out of JavaScript costs 1-13 µs (docs/bench.md, "What a call costs in the lab"). The
 * counter only grows; the kernel's eventfd_signal() (KVM's writes) stops at its maximum and
 * still wakes, and 2^64 - 1 kicks are out of reach.
 */
export function watchQueue(loop: EventLoop, dev: VirtioDevice, q: number, fd: number): void {
  const what = `queue ${q}`;
  loop.add(fd, { process: () => dev.guard(what, () => dev.onKick(q)) }, EPOLLIN | EPOLLET);
}

/**
 * A device's environment on the loop. Interrupts are writes of its irqfd (KVM_IRQFD), or, given
 * the VM's fd and the device's GSI (`line`), an edge raised on the GSI with KVM_IRQ_LINE (level 1,
 * then 0: what KVM's irqfd does with a write).
 *
 * Issue 17 (ping): KVM injects an irqfd's interrupt for an IOAPIC pin from a kernel worker
 * (kworker) of the writing thread's CPU, which runs only once that CPU is free: in the lab that
 * was 0.2-0.45 ms between our write and the GSI going up, while the device worker finished its
 * turn. KVM_IRQ_LINE raises it inside the call, as QEMU's main loop does. If the ioctl fails,
 * the device goes back to its irqfd for good, with a log line.
 */
export function deviceEnvironment(
  loop: EventLoop,
  mem: GuestMemory,
  irqFd: number,
  log: (m: string) => void,
  line?: { vmFd: number; gsi: number },
): DeviceEnvironment {
  const n = native();
  let interrupt = () => n.eventfdWrite(irqFd, 1);
  if (line) {
    const up = encodeIrqLevel(line.gsi, 1);
    const down = encodeIrqLevel(line.gsi, 0);
    const viaIrqfd = interrupt;
    interrupt = () => {
      try {
        n.ioctl(line.vmFd, KVM_IRQ_LINE, up);
        n.ioctl(line.vmFd, KVM_IRQ_LINE, down);
      } catch (e) {
        interrupt = viaIrqfd;
        log(
          `GSI ${line.gsi}: KVM_IRQ_LINE failed (${(e as Error).message}): interrupts go through the irqfd from now on`,
        );
        viaIrqfd();
      }
    };
  }
  return {
    mem,
    interrupt: () => interrupt(),
    log,
    defer: (fn) => loop.setTimer(0, fn),
    after: (ms, fn) => loop.setTimer(ms, fn),
    round: () => loop.rounds,
  };
}

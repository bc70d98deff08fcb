/**
 * A device's interrupt (deviceEnvironment): an edge on its GSI raised with KVM_IRQ_LINE when the
 * VM's fd is given (checked in the in-kernel PIC's request register: needs /dev/kvm), else a
 * write of its irqfd, and back to the irqfd for good when the ioctl fails. A queue's kick
 * eventfd (watchQueue): edge-triggered, never read.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { EventLoop } from '../events/event-loop.js';
import { Kvm } from '../kvm/kvm.js';
import { EFD_NONBLOCK, native } from '../kvm/native.js';
import { IRQCHIP } from '../kvm/structs.js';
import { GuestMemory } from '../memory/guest-memory.js';
import type { VirtioDevice } from '../devices/virtio/device.js';
import { deviceEnvironment, watchQueue } from './device-loop.js';

const GSI = 5; // the first virtio GSI: bit 5 of the master PIC

/** The eventfd's counter (reading resets it); 0 when nothing was written. */
function drained(fd: number): bigint {
  const v = native().eventfdRead(fd);
  return v < 0n ? 0n : v; // -1: EAGAIN
}

function setup(): { loop: EventLoop; mem: GuestMemory; irqFd: number; logs: string[] } {
  return {
    loop: new EventLoop(() => {}),
    mem: GuestMemory.anonymous([{ base: 0, size: 4096 }]),
    irqFd: native().eventfd(0, EFD_NONBLOCK),
    logs: [],
  };
}

test('without the VM fd, an interrupt is a write of the irqfd', () => {
  const { loop, mem, irqFd, logs } = setup();
  const env = deviceEnvironment(loop, mem, irqFd, (m) => logs.push(m));
  env.interrupt();
  env.interrupt();
  assert.equal(drained(irqFd), 2n);
  native().close(irqFd);
});

test(
  "with the VM fd, an interrupt raises the GSI's edge with KVM_IRQ_LINE and leaves the irqfd alone",
  { skip: existsSync('/dev/kvm') ? false : 'no /dev/kvm' },
  () => {
    const { loop, mem, irqFd, logs } = setup();
    const kvm = Kvm.open();
    const vm = kvm.createVm();
    try {
      vm.createIrqchip();
      const irr = () => vm.getIrqchip(0)[IRQCHIP.picIrr]!;
      assert.equal(irr() & (1 << GSI), 0);
      const env = deviceEnvironment(loop, mem, irqFd, (m) => logs.push(m), {
        vmFd: vm.fd,
        gsi: GSI,
      });
      env.interrupt();
      assert.equal(irr() & (1 << GSI), 1 << GSI, 'the edge is latched in the PIC');
      assert.equal(
        vm.getIrqchip(0)[IRQCHIP.picLastIrr]! & (1 << GSI),
        0,
        'and the line is low again (last_irr)',
      );
      assert.equal(drained(irqFd), 0n);
      assert.deepEqual(logs, []);
    } finally {
      vm.close();
      kvm.close();
      native().close(irqFd);
    }
  },
);

test('a failing KVM_IRQ_LINE sends that interrupt and every later one through the irqfd, logged once', () => {
  const { loop, mem, irqFd, logs } = setup();
  const notVm = native().eventfd(0, EFD_NONBLOCK); // ioctl on it: ENOTTY
  const env = deviceEnvironment(loop, mem, irqFd, (m) => logs.push(m), { vmFd: notVm, gsi: GSI });
  env.interrupt();
  env.interrupt();
  assert.equal(drained(irqFd), 2n);
  assert.equal(logs.length, 1);
  assert.match(logs[0]!, /GSI 5: KVM_IRQ_LINE failed .*irqfd/);
  native().close(notVm);
  native().close(irqFd);
});

test('a kick eventfd is edge-triggered: each round with new kicks serves the queue once, a round without none; its counter is never read', () => {
  const loop = new EventLoop((e) => {
    throw e;
  });
  const n = native();
  const fd = n.eventfd(0, EFD_NONBLOCK);
  const kicks: number[] = [];
  const dev = {
    guard: (_what: string, f: () => void) => f(),
    onKick: (q: number) => kicks.push(q),
  } as unknown as VirtioDevice;
  try {
    watchQueue(loop, dev, 1, fd);
    assert.equal(loop.runOnce(0), 0, 'no kick yet');
    for (let i = 0; i < 3; i++) n.eventfdWrite(fd, 1);
    assert.equal(loop.runOnce(0), 1);
    assert.deepEqual(kicks, [1], 'three kicks before a round: one turn');
    // Level-triggered, an unread counter would report the fd again in every round (a busy loop).
    assert.equal(loop.runOnce(0), 0, 'nothing new: not reported again');
    assert.equal(loop.runOnce(0), 0);
    n.eventfdWrite(fd, 1);
    assert.equal(loop.runOnce(0), 1, 'a kick after the report is reported');
    assert.deepEqual(kicks, [1, 1]);
    assert.equal(n.eventfdRead(fd), 4n, 'the counter holds every kick: nothing read it');
  } finally {
    loop.close();
    n.close(fd);
  }
});

/**
 * A device's interrupt (deviceEnvironment): an edge on its GSI raised with KVM_IRQ_LINE when the
 * VM's fd is given (checked in the in-kernel PIC's request register: needs /dev/kvm), else a
 * write of its irqfd, and back to the irqfd for good when the ioctl fails.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { EventLoop } from '../events/event-loop.js';
import { Kvm } from '../kvm/kvm.js';
import { EFD_NONBLOCK, native } from '../kvm/native.js';
import { IRQCHIP } from '../kvm/structs.js';
import { GuestMemory } from '../memory/guest-memory.js';
import { deviceEnvironment } from './device-loop.js';

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

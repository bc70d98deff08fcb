/**
 * The vCPU side of virtio-mmio: one MmioTransport per device on the worker's MMIO bus, answering
 * register accesses from the shared register file. Imports only the transport, never the data
 * plane: a vCPU worker must start fast and stay small.
 */
import type { Bus } from '../devices/bus.js';
import { MmioTransport } from '../devices/virtio/mmio.js';
import { setRegisterPageMapper } from '../devices/virtio/mmio-state.js';
import { VIRTIO_MMIO_SIZE } from '../arch/x86_64/layout.js';
import { native } from '../kvm/native.js';

export interface TransportSlot {
  addr: number;
  state: SharedArrayBuffer;
  queueFds: number[];
}

export function attachVirtioTransports(
  slots: readonly TransportSlot[],
  controlFd: number,
  mmio: Bus,
): MmioTransport[] {
  // A device's register page (vmm/register-pages.ts) is the main thread's mapping: wrap it.
  setRegisterPageMapper((addr, length) => native().viewAddress(addr, length));
  return slots.map((s) => {
    const t = new MmioTransport(s.state, {
      // DRIVER_OK or the reset of an active device: the device worker catches up.
      lifecycle: () => native().eventfdWrite(controlFd, 1),
      // QueueNotify reached us (KVM's ioeventfd did not take it): forward the kick.
      notify: (q) => {
        const fd = s.queueFds[q];
        if (fd !== undefined) native().eventfdWrite(fd, 1);
      },
    });
    mmio.insert(s.addr, VIRTIO_MMIO_SIZE, t);
    return t;
  });
}

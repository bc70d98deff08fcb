import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Bus, type BusDevice } from '../devices/bus.js';
import * as C from '../kvm/constants.js';
import type { Vcpu } from '../kvm/kvm.js';
import { RUN } from '../kvm/structs.js';
import { VcpuControl } from './vcpu-control.js';
import { VcpuLoop } from './vcpu-loop.js';

/** A kvm_run buffer (header page + port-I/O data page) and a VcpuLoop over it, no KVM. */
function setup() {
  const run = new DataView(new ArrayBuffer(8192));
  const vcpu = {
    run,
    get exitReason() {
      return run.getUint32(RUN.exitReason, true);
    },
  } as unknown as Vcpu;
  const seen: { kind: string; offset: number; bytes: number[] }[] = [];
  const dev: BusDevice = {
    read: (offset, data) => {
      seen.push({ kind: 'read', offset, bytes: [...data] });
      for (let i = 0; i < data.length; i++) data[i] = 0x10 + i + offset;
    },
    write: (offset, data) => void seen.push({ kind: 'write', offset, bytes: [...data] }),
  };
  const pio = new Bus();
  pio.insert(0x100, 8, dev);
  const mmio = new Bus();
  mmio.insert(0x1_0000_1000, 0x100, dev); // above 4 GiB: the address's high half counts
  const unclaimed: string[] = [];
  const loop = new VcpuLoop(0, vcpu, new VcpuControl(), {
    pio,
    mmio,
    unhandled: (space, addr, data, isWrite) => {
      unclaimed.push(`${space} ${isWrite ? 'w' : 'r'} 0x${addr.toString(16)}/${data.length}`);
      if (!isWrite) data.fill(0xff);
    },
  });
  const u8 = new Uint8Array(run.buffer);
  const io = (port: number, out: boolean, size: number, count: number, dataOffset = 4096) => {
    run.setUint32(RUN.exitReason, C.KVM_EXIT_IO, true);
    run.setUint8(RUN.ioDirection, out ? C.KVM_EXIT_IO_OUT : C.KVM_EXIT_IO_IN);
    run.setUint8(RUN.ioSize, size);
    run.setUint16(RUN.ioPort, port, true);
    run.setUint32(RUN.ioCount, count, true);
    run.setBigUint64(RUN.ioDataOffset, BigInt(dataOffset), true);
  };
  const mm = (addr: number, len: number, write: boolean) => {
    run.setUint32(RUN.exitReason, C.KVM_EXIT_MMIO, true);
    run.setBigUint64(RUN.mmioPhysAddr, BigInt(addr), true);
    run.setUint32(RUN.mmioLen, len, true);
    run.setUint8(RUN.mmioIsWrite, write ? 1 : 0);
  };
  return { loop, seen, unclaimed, u8, io, mm };
}

test('port I/O: each element of a string exit reaches the device at its own place', () => {
  const t = setup();
  t.u8.set([1, 2, 3, 4, 5, 6], 4096);
  t.io(0x102, true, 2, 3); // rep outsw, 3 words
  assert.equal(t.loop.handleExit(), undefined);
  t.io(0x104, false, 1, 2, 5000); // rep insb, 2 bytes, another data offset
  assert.equal(t.loop.handleExit(), undefined);
  t.io(0x104, false, 4, 1); // a 4-byte read at the first offset again
  t.loop.handleExit();
  assert.deepEqual(t.seen, [
    { kind: 'write', offset: 2, bytes: [1, 2] },
    { kind: 'write', offset: 2, bytes: [3, 4] },
    { kind: 'write', offset: 2, bytes: [5, 6] },
    { kind: 'read', offset: 4, bytes: [0] },
    { kind: 'read', offset: 4, bytes: [0] },
    { kind: 'read', offset: 4, bytes: [1, 2, 3, 4] },
  ]);
  assert.deepEqual([...t.u8.subarray(5000, 5002)], [0x14, 0x14]);
  assert.deepEqual([...t.u8.subarray(4096, 4100)], [0x14, 0x15, 0x16, 0x17]);
});

test('MMIO above 4 GiB reaches its device; reads land in kvm_run; sizes change', () => {
  const t = setup();
  t.mm(0x1_0000_1008, 4, false);
  t.loop.handleExit();
  assert.deepEqual([...t.u8.subarray(RUN.mmioData, RUN.mmioData + 4)], [0x18, 0x19, 0x1a, 0x1b]);
  t.u8.set([9, 8], RUN.mmioData);
  t.mm(0x1_0000_1010, 2, true);
  t.loop.handleExit();
  assert.deepEqual(t.seen.at(-1), { kind: 'write', offset: 0x10, bytes: [9, 8] });
  // The same address 4 GiB lower is nobody's.
  t.mm(0x1008, 8, false);
  t.loop.handleExit();
  assert.deepEqual(t.unclaimed, ['mmio r 0x1008/8']);
  assert.deepEqual([...t.u8.subarray(RUN.mmioData, RUN.mmioData + 8)], Array(8).fill(0xff));
});

test('malformed exits end the VM with a reason, not an exception', () => {
  const t = setup();
  t.io(0x100, true, 4, 2000); // data would run past the kvm_run mapping
  assert.equal(t.loop.handleExit()?.kind, 'fatal');
  t.io(0x100, true, 1, 1, 2 ** 32 + 4096); // a data offset past 4 GiB
  assert.equal(t.loop.handleExit()?.kind, 'fatal');
  t.mm(0x1_0000_1000, 9, false);
  assert.equal(t.loop.handleExit()?.kind, 'fatal');
  assert.deepEqual(t.seen, []);
});

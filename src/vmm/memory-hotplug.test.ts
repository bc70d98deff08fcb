/** virtio-mem's host side over a real memfd (the device's own tests are in devices/virtio/mem). */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { memDevice } from '../devices/virtio/mem/descriptor.js';
import { MEM_CFG, MemDevice, REQ_PLUG, REQ_UNPLUG } from '../devices/virtio/mem/mem.js';
import { harness } from '../devices/virtio/testing/harness.js';
import { native } from '../kvm/native.js';

const MIB = 1024 * 1024;

test('virtio-mem over a real memfd: one region per slot; unplug gives the pages back', () => {
  const n = native();
  const opened = memDevice.open(
    { kind: 'mem', id: 'hp', totalMib: 256, blockMib: 2, slotMib: 128 },
    { sys: n, claim: () => undefined, allocateGuestMemory: () => 0x2_0000_0000 },
  );
  try {
    assert.deepEqual(
      opened.memory?.map((m) => [m.guestAddr, m.size, m.offset]),
      [
        [0x2_0000_0000, 128 * MIB, 0],
        [0x2_0000_0000 + 128 * MIB, 128 * MIB, 128 * MIB],
      ],
    );
    const cfg = new Uint8Array(opened.identity.config);
    const created = memDevice.create(opened.host, {
      name: 'hp',
      sys: n,
      loop: {} as never,
      log: () => undefined,
      config: {
        read: (o, l) => cfg.slice(o, o + l),
        change: (o, b) => cfg.set(b, o),
      },
    });
    const dev = created.backend as MemDevice;
    // The guest's view: write a block's memory through a mapping of the memfd.
    const view = n.mmap(4 * MIB, 3, 1, opened.host.memfd, 0);
    try {
      new DataView(cfg.buffer).setBigUint64(MEM_CFG.requestedSize, BigInt(4 * MIB), true);
      const h = harness(opened.identity, dev);
      const [q] = h.start();
      const req = (type: number, addr: number, nb: number) => {
        const r = h.alloc.alloc(24);
        const v = h.mem.view(r, 24);
        const d = new DataView(v.buffer, v.byteOffset, 24);
        d.setUint16(0, type, true);
        d.setBigUint64(8, BigInt(addr), true);
        d.setUint16(16, nb, true);
        q!.addChain([
          { addr: r, len: 24 },
          { addr: h.alloc.alloc(16), len: 10, write: true },
        ]);
        h.kick();
      };
      req(REQ_PLUG, 0x2_0000_0000, 2);
      assert.equal(
        new DataView(cfg.buffer).getBigUint64(MEM_CFG.pluggedSize, true),
        BigInt(4 * MIB),
      );
      new Uint8Array(view).fill(0xab);
      req(REQ_UNPLUG, 0x2_0000_0000 + 2 * MIB, 1);
      const bytes = new Uint8Array(view);
      assert.equal(bytes[0], 0xab); // still plugged
      assert.equal(bytes[2 * MIB], 0); // punched: reads back as zero
      assert.equal(bytes[4 * MIB - 1], 0);
      assert.equal(created.metrics?.().unplug_bytes, 2 * MIB);
    } finally {
      n.munmap(view);
    }
  } finally {
    opened.close();
  }
});

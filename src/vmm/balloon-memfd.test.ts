/**
 * virtio-balloon over a real shared memfd mapping (guest RAM as a booted VM has it): inflated
 * pages leave the memfd (MADV_REMOVE punches the hole), so the host gets the memory back.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { closeSync, fstatSync, ftruncateSync } from 'node:fs';
import { GuestMemory } from '../memory/guest-memory.js';
import { native, MAP_SHARED, PROT_READ, PROT_WRITE } from '../kvm/native.js';
import { harness } from '../devices/virtio/testing/harness.js';
import {
  BalloonDevice,
  balloonIdentity,
  type BalloonOptions,
} from '../devices/virtio/balloon/balloon.js';
import { balloonDevice, MADV_REMOVE } from '../devices/virtio/balloon/descriptor.js';

const BASE: BalloonOptions = {
  amountMib: 1,
  deflateOnOom: true,
  statsPollingIntervalS: 0,
  freePageHinting: false,
  freePageReporting: false,
};

const pfnBuf = (h: ReturnType<typeof harness>, pfns: number[]) => {
  const a = h.alloc.alloc(pfns.length * 4);
  const v = new DataView(h.mem.regions[0]!.bytes.buffer);
  pfns.forEach((p, i) => v.setUint32(a + i * 4, p, true));
  return { addr: a, len: pfns.length * 4 };
};

test('balloon: MADV_REMOVE on a shared memfd mapping gives the pages back to the host', () => {
  const n = native();
  const size = 4 * 1024 * 1024;
  const fd = n.memfdCreate('balloon-test', 0);
  try {
    ftruncateSync(fd, size);
    const buf = n.mmap(size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    try {
      new Uint8Array(buf).fill(1);
      const before = fstatSync(fd).blocks * 512;
      assert.ok(before >= size, `the memfd holds ${before} bytes`);
      const logs: string[] = [];
      const created = balloonDevice.create(
        { ...BASE },
        {
          name: 'b',
          sys: n as never,
          loop: {
            add: () => 0,
            modify: () => undefined,
            remove: () => undefined,
            setTimer: () => () => undefined,
          },
          log: (m) => logs.push(m),
          ram: {
            memory: new GuestMemory([{ base: 0, size, bytes: new Uint8Array(buf) }]),
            shared: true,
          },
        },
      );
      const dev = created.backend as BalloonDevice;
      const h = harness(balloonIdentity(BASE), dev);
      const [inflate] = h.start();
      // 2 MiB of pages: PFNs 0x100..0x2ff of the memfd-backed RAM.
      inflate!.addChain([
        pfnBuf(
          h,
          Array.from({ length: 512 }, (_, i) => 0x100 + i),
        ),
      ]);
      h.kick(0);
      const after = fstatSync(fd).blocks * 512;
      assert.equal(before - after, 2 * 1024 * 1024, 'the memfd lost exactly the inflated pages');
      assert.ok(new Uint8Array(buf, 0x100000, 0x200000).every((b) => b === 0));
      assert.equal(new Uint8Array(buf)[0], 1);
      assert.deepEqual(logs, []);
      assert.equal(MADV_REMOVE, 9);
    } finally {
      n.munmap(buf);
    }
  } finally {
    closeSync(fd);
  }
});

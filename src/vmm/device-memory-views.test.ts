/**
 * The device worker's view of device memory over real mappings: the main thread maps a region
 * MAP_SHARED (as attachDeviceMemory does), a worker thread wraps its address (mapGuestRam's
 * `device` views), and both see the same bytes; a read-only mapping is never written (the worker
 * would fault); device writes there are not marked dirty; the worker's unmap only drops views.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Worker } from 'node:worker_threads';
import { ftruncateSync } from 'node:fs';
import { MAP_SHARED, PROT_READ, PROT_WRITE, native } from '../kvm/native.js';
import { countDirty } from '../memory/dirty-pages.js';
import { KVM_MEM_READONLY, deviceMemoryViews } from './device-memory.js';
import { GuestMemory } from '../memory/guest-memory.js';
import {
  createGuestRam,
  deviceDirtyPages,
  trackDeviceWrites,
  viewDeviceMemory,
  type DeviceMemoryView,
} from './guest-ram.js';
import type { VirtioSlot } from './virtio-plan.js';
import { restoreOrder } from './device-worker.js';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;

test('a worker reaches device memory through the main thread mapping; read-only stays so', async () => {
  const n = native();
  const layout = createGuestRam([{ base: 0, size: 1 * MiB }]);
  trackDeviceWrites(layout);
  const fd = n.memfdCreate('device-memory-test', 0);
  ftruncateSync(fd, 4 * MiB);
  const rw = n.mmap(2 * MiB, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
  const ro = n.mmap(2 * MiB, PROT_READ, MAP_SHARED, fd, 2 * MiB);
  const rwBytes = new Uint8Array(rw);
  const roBytes = new Uint8Array(ro);
  try {
    // The file's second half through a writable mapping of our own: what the ro view shows.
    const other = n.mmap(2 * MiB, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 2 * MiB);
    new Uint8Array(other).fill(0x77, 0, 64);
    n.munmap(other);
    const device: DeviceMemoryView[] = [
      { guestAddr: 4 * GiB, size: 2 * MiB, hostAddr: n.bufferAddress(rw), readOnly: false },
      {
        guestAddr: 4 * GiB + 2 * MiB,
        size: 2 * MiB,
        hostAddr: n.bufferAddress(ro),
        readOnly: true,
      },
    ];
    const worker = new Worker(
      `const { parentPort, workerData } = require('node:worker_threads');
       import(workerData.url).then(({ mapGuestRam }) => {
         const ram = mapGuestRam(workerData.layout, workerData.device);
         const m = ram.memory;
         m.writeU32(0x1_0000_0000 + 64, 0xfeedf00d);
         // What a virtqueue does with a writable buffer it hands out: mark its view.
         m.deviceWrites.markView(m.view(0x1_0000_0000 + 4096, 16));
         const read = m.readU8(0x1_0000_0000 + 2 * 1024 * 1024 + 1);
         let refused = '';
         try { m.writeU8(0x1_0000_0000 + 2 * 1024 * 1024, 1); } catch (e) { refused = e.message; }
         const roView = m.tryView(0x1_0000_0000 + 2 * 1024 * 1024, 16);
         const device = m.deviceRegions.length;
         const ramRegions = m.regions.length;
         ram.unmap();
         parentPort.postMessage({ read, refused, roView: roView === undefined, device, ramRegions,
           afterUnmap: m.deviceRegions[0].bytes.length });
       }).catch((e) => parentPort.postMessage({ error: String(e && e.stack || e) }));`,
      {
        eval: true,
        workerData: { url: new URL('./guest-ram.js', import.meta.url).href, layout, device },
      },
    );
    const reply = await new Promise<Record<string, unknown>>((res) => worker.once('message', res));
    await worker.terminate();
    assert.equal(reply.error, undefined);
    assert.equal(reply.device, 2);
    assert.equal(reply.ramRegions, 1);
    assert.equal(new DataView(rw).getUint32(64, true), 0xfeedf00d, 'the main mapping sees it');
    assert.equal(reply.read, 0x77);
    assert.match(String(reply.refused), /read-only device memory/);
    assert.equal(reply.roView, true);
    assert.equal(roBytes[0], 0x77);
    assert.equal(reply.afterUnmap, 0, "the worker's views are detached");
    // Still mapped here: the worker released its views, it unmapped nothing.
    rwBytes[0] = 1;
    assert.equal(rwBytes[0], 1);
    // Device memory is not in the RAM bitmap (and marking a view of it is harmless).
    assert.equal(countDirty(deviceDirtyPages(layout)!.region(0)), 0);
  } finally {
    n.munmap(rw);
    n.munmap(ro);
    n.close(fd);
    n.close(layout.memfd);
  }
});

test('device memory larger than one view (4 GiB: V8) is wrapped in several', () => {
  const n = native();
  // Views of at most 1 MiB here (DEVICE_VIEW_MAX in the worker) over a real 3 MiB mapping.
  const buf = n.mmap(3 * MiB, PROT_READ | PROT_WRITE, 0x02 | 0x20, -1, 0); // private anonymous
  try {
    const bytes = new Uint8Array(buf);
    const dev = viewDeviceMemory(
      [{ guestAddr: 8 * GiB, size: 3 * MiB, hostAddr: n.bufferAddress(buf), readOnly: true }],
      1 * MiB,
    );
    const mem = new GuestMemory(
      [{ base: 0, size: 4096, bytes: new Uint8Array(4096) }],
      dev.regions,
    );
    assert.deepEqual(
      mem.deviceRegions.map((r) => [r.base, r.size, r.readOnly]),
      [
        [8 * GiB, 1 * MiB, true],
        [8 * GiB + 1 * MiB, 1 * MiB, true],
        [8 * GiB + 2 * MiB, 1 * MiB, true],
      ],
    );
    bytes[2 * MiB + 5] = 0x99;
    assert.equal(mem.readU8(8 * GiB + 2 * MiB + 5), 0x99);
    assert.equal(mem.isValidRange(8 * GiB + 1 * MiB - 8, 16, 'read'), false, 'not joined');
    dev.release();
    assert.equal(mem.deviceRegions[0]!.bytes.length, 0, 'released');
    assert.equal(bytes[2 * MiB + 5], 0x99, 'still mapped');
  } finally {
    n.munmap(buf);
  }
});

test("deviceMemoryViews: every KVM slot of every device, read-only as KVM's, gated per device", () => {
  const slot = (kind: string, flags: number[], base: number) =>
    ({
      kind,
      id: kind,
      kvmSlots: flags.map((f, i) => ({
        vmFd: 3,
        slot: i,
        guestAddr: base + i * 128 * MiB,
        size: 128 * MiB,
        hostAddr: BigInt(0x7f00_0000_0000 + i * 128 * MiB),
        flags: f,
        present: kind !== 'mem',
      })),
    }) as unknown as VirtioSlot;
  const gate = () => true;
  const views = deviceMemoryViews(
    [
      { kind: 'block', id: 'b' } as unknown as VirtioSlot,
      slot('pmem', [KVM_MEM_READONLY], 4 * GiB),
      slot('mem', [0, 0], 5 * GiB),
    ],
    (s) => (s.kind === 'mem' ? gate : undefined),
  );
  assert.deepEqual(
    views.map((v) => [v.guestAddr, v.size, v.readOnly, v.allows === gate]),
    [
      [4 * GiB, 128 * MiB, true, false],
      [5 * GiB, 128 * MiB, false, true],
      [5 * GiB + 128 * MiB, 128 * MiB, false, true],
    ],
  );
  assert.equal(views[1]!.hostAddr, BigInt(0x7f00_0000_0000));
});

test('a snapshot load restores virtio-mem first: its plugged blocks are there for the queues of the others', () => {
  const saved = [
    { kind: 'block', id: 'a' },
    { kind: 'net', id: 'n' },
    { kind: 'mem', id: 'memory-hotplug' },
    { kind: 'block', id: 'b' },
  ];
  assert.deepEqual(
    restoreOrder(saved).map((d) => d.id),
    ['memory-hotplug', 'a', 'n', 'b'],
  );
});

/**
 * Virtio buffers in device memory (pmem files, the virtio-mem region), as the device worker's
 * GuestMemory has them: a virtio-blk device reads into and writes from them like RAM, never
 * writes into read-only device memory, and reaches hotplugged memory only where virtio-mem has
 * plugged blocks.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { GuestMemory, type GuestRegion } from '../../memory/guest-memory.js';
import { harness, RAM_BASE, RAM_SIZE } from './testing/harness.js';
import { BlockDevice, blockIdentity, type BlockFile } from './block/block.js';
import { MemDevice, memIdentity, REQ_PLUG, REQ_UNPLUG, RESP_ACK } from './mem/mem.js';

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
const SECTORS = 64;
const T_IN = 0;
const T_OUT = 1;
const S_OK = 0;

const PMEM = 4 * GiB;
const PMEM_RO = 4 * GiB + 128 * MiB;
const HOTPLUG = 5 * GiB;
const geometry = { addr: HOTPLUG, regionSize: 8 * MiB, blockSize: 2 * MiB };

function memFile(): BlockFile & { bytes: Uint8Array } {
  const bytes = new Uint8Array(SECTORS * 512);
  for (let s = 0; s < SECTORS; s++) new DataView(bytes.buffer).setUint32(s * 512, s, true);
  return {
    bytes,
    read: (buf, pos) => buf.set(bytes.subarray(pos, pos + buf.length)),
    write: (buf, pos) => bytes.set(buf, pos),
    flush: () => undefined,
  };
}

function setup(gate?: (addr: number, len: number) => boolean) {
  const region = (base: number, size: number, extra: Partial<GuestRegion> = {}): GuestRegion => ({
    base,
    size,
    bytes: new Uint8Array(size),
    ...extra,
  });
  const pmem = region(PMEM, 2 * MiB);
  const ro = region(PMEM_RO, 2 * MiB, { readOnly: true });
  const hot = region(HOTPLUG, geometry.regionSize, gate ? { allows: gate } : {});
  const mem = new GuestMemory([region(RAM_BASE, RAM_SIZE)], [pmem, ro, hot]);
  const file = memFile();
  const dev = new BlockDevice({
    name: 'blk',
    file,
    capacity: SECTORS,
    readOnly: false,
    serial: new Uint8Array(),
    log: () => undefined,
  });
  const h = harness(blockIdentity(SECTORS, false), dev, { mem });
  const [q] = h.start();
  /** One request with its data buffer at `data` (header and status in RAM): [status, used.len]. */
  const req = (type: number, sector: number, data: number, len: number): [number, number] => {
    const hdr = h.alloc.alloc(16);
    h.mem.writeU32(hdr, type);
    h.mem.writeU64(hdr + 8, BigInt(sector));
    const st = h.alloc.alloc(1, 1);
    h.mem.writeU8(st, 0xee);
    q!.addChain([
      { addr: hdr, len: 16 },
      { addr: data, len, write: type === T_IN },
      { addr: st, len: 1, write: true },
    ]);
    h.kick();
    const used = q!.takeUsed();
    assert.equal(used.length, 1);
    return [h.mem.readU8(st), used[0]!.len];
  };
  return { h, req, file, pmem, ro, hot };
}

test('virtio-blk: a data buffer in pmem (device memory) is read into and written from', () => {
  const { req, file, pmem } = setup();
  assert.deepEqual(req(T_IN, 5, PMEM + 4096, 1024), [S_OK, 1025]);
  const v = new DataView(pmem.bytes.buffer);
  assert.equal(v.getUint32(4096, true), 5);
  assert.equal(v.getUint32(4096 + 512, true), 6);
  pmem.bytes.fill(0xab, 8192, 8192 + 512);
  assert.deepEqual(req(T_OUT, 9, PMEM + 8192, 512), [S_OK, 1]);
  assert.ok(file.bytes.subarray(9 * 512, 10 * 512).every((b) => b === 0xab));
});

test('virtio-blk: read-only device memory is read from, a read into it is refused', () => {
  const { h, req, file, ro } = setup();
  ro.bytes.fill(0x5a, 0, 512);
  // A write request: the device reads the buffer.
  assert.deepEqual(req(T_OUT, 3, PMEM_RO, 512), [S_OK, 1]);
  assert.ok(file.bytes.subarray(3 * 512, 4 * 512).every((b) => b === 0x5a));
  // A read request would have the device write it: a bad chain, used.len 0, nothing written.
  const [status, len] = req(T_IN, 4, PMEM_RO, 512);
  assert.equal(len, 0);
  assert.equal(status, 0xee, 'the status byte untouched');
  assert.ok(ro.bytes.subarray(0, 512).every((b) => b === 0x5a));
  assert.ok(h.logs.some((l) => /buffer \[0x108000000, \+512\) in read-only device memory/.test(l)));
});

test('virtio-blk: hotplugged memory is reachable only where virtio-mem has plugged blocks', () => {
  let mem: MemDevice | undefined;
  const blk = setup((addr, len) => mem?.isPluggedRange(addr, len) === true);
  // The virtio-mem device of the same guest (its queue in RAM, as the blk harness's).
  const cfg = { requested: 8 * MiB };
  mem = new MemDevice(
    'mem',
    geometry,
    { requestedSize: () => cfg.requested, setPluggedSize: () => undefined },
    () => undefined,
  );
  const hm = harness(memIdentity(geometry), mem, { mem: blk.h.mem, alloc: blk.h.alloc });
  const [mq] = hm.start();
  const send = (type: number, addr: number, nb: number) => {
    const r = hm.alloc.alloc(24);
    hm.mem.writeU16(r, type);
    hm.mem.writeU64(r + 8, BigInt(addr));
    hm.mem.writeU16(r + 16, nb);
    const resp = hm.alloc.alloc(16);
    mq!.addChain([
      { addr: r, len: 24 },
      { addr: resp, len: 10, write: true },
    ]);
    hm.kick();
    assert.equal(mq!.takeUsed().length, 1);
    return hm.mem.readU16(resp);
  };

  const second = HOTPLUG + 2 * MiB;
  // Nothing plugged: refused.
  assert.equal(blk.req(T_IN, 1, second, 512)[1], 0);
  assert.equal(send(REQ_PLUG, second, 1), RESP_ACK);
  assert.deepEqual(blk.req(T_IN, 1, second + 4096, 512), [S_OK, 513]);
  assert.equal(new DataView(blk.hot.bytes.buffer).getUint32(2 * MiB + 4096, true), 1);
  // Across into the next block (not plugged), and in the first one: refused.
  assert.equal(blk.req(T_IN, 1, HOTPLUG + 4 * MiB - 256, 512)[1], 0);
  assert.equal(blk.req(T_IN, 1, HOTPLUG, 512)[1], 0);
  // Unplugged again: refused again.
  assert.equal(send(REQ_UNPLUG, second, 1), RESP_ACK);
  assert.equal(blk.req(T_IN, 2, second + 4096, 512)[1], 0);
  assert.ok(blk.h.logs.some((l) => /in device memory the guest does not have now/.test(l)));
});

test('virtio-mem isPluggedRange: whole blocks, inside the region only', () => {
  const mem = new MemDevice(
    'mem',
    geometry,
    { requestedSize: () => 8 * MiB, setPluggedSize: () => undefined },
    () => undefined,
  );
  mem.restore(Uint8Array.from([1, 4, 0, 0, 0, 0, 1, 1, 0]));
  const B = 2 * MiB;
  assert.equal(mem.isPluggedRange(HOTPLUG, 1), false);
  assert.equal(mem.isPluggedRange(HOTPLUG + B, 0), true);
  assert.equal(mem.isPluggedRange(HOTPLUG + B, 2 * B), true);
  assert.equal(mem.isPluggedRange(HOTPLUG + B, 2 * B + 1), false);
  assert.equal(mem.isPluggedRange(HOTPLUG + B - 1, 2), false);
  assert.equal(mem.isPluggedRange(HOTPLUG - 1, 1), false);
  assert.equal(mem.isPluggedRange(HOTPLUG + 4 * B, 0), false);
  assert.equal(mem.isPluggedRange(HOTPLUG + 3 * B, B), false);
});

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { harness } from '../testing/harness.js';
import { DEVICE_ID_MEM } from '../constants.js';
import { checkMemSizes } from './descriptor.js';
import {
  MEM_CFG,
  MemDevice,
  REQ_PLUG,
  REQ_STATE,
  REQ_UNPLUG,
  REQ_UNPLUG_ALL,
  RESP_ACK,
  RESP_ERROR,
  RESP_NACK,
  STATE_MIXED,
  STATE_PLUGGED,
  STATE_UNPLUGGED,
  memIdentity,
  savedPluggedBlocks,
} from './mem.js';

const MIB = 1024 * 1024;
const BASE = 0x1_0000_0000;
const geometry = { addr: BASE, regionSize: 16 * MIB, blockSize: 2 * MIB };

/** The config space as the register file holds it, for a device outside a VM. */
function configSpace(requested: number) {
  const cfg = { requested, plugged: -1, changes: 0 };
  return {
    cfg,
    access: {
      requestedSize: () => cfg.requested,
      setPluggedSize: (b: number) => {
        cfg.plugged = b;
        cfg.changes++;
      },
    },
  };
}

function setup(requested: number) {
  const { cfg, access } = configSpace(requested);
  const discards: Array<[number, number]> = [];
  const dev = new MemDevice('mem', geometry, access, (o, l) => discards.push([o, l]));
  const h = harness(memIdentity(geometry), dev);
  const [q] = h.start();
  const send = (type: number, addr = 0, nb = 0) => {
    const req = h.alloc.alloc(24);
    const v = h.mem.view(req, 24);
    const d = new DataView(v.buffer, v.byteOffset, 24);
    d.setUint16(0, type, true);
    d.setBigUint64(8, BigInt(addr), true);
    d.setUint16(16, nb, true);
    const resp = h.alloc.alloc(16);
    h.mem.view(resp, 16).fill(0xee);
    q!.addChain([
      { addr: req, len: 24 },
      { addr: resp, len: 10, write: true },
    ]);
    h.kick();
    const used = q!.takeUsed();
    assert.equal(used.length, 1);
    assert.equal(used[0]!.len, 10);
    const r = h.mem.view(resp, 10);
    const rv = new DataView(r.buffer, r.byteOffset, 10);
    return { type: rv.getUint16(0, true), state: rv.getUint16(8, true) };
  };
  return { dev, cfg, discards, send, h, q: q! };
}

test('virtio-mem identity: device 24, config space block size, address, region sizes', () => {
  const id = memIdentity(geometry);
  assert.equal(id.deviceId, DEVICE_ID_MEM);
  const v = new DataView(id.config.buffer);
  assert.equal(v.getBigUint64(MEM_CFG.blockSize, true), BigInt(2 * MIB));
  assert.equal(v.getBigUint64(MEM_CFG.addr, true), BigInt(BASE));
  assert.equal(v.getBigUint64(MEM_CFG.regionSize, true), BigInt(16 * MIB));
  assert.equal(v.getBigUint64(MEM_CFG.usableRegionSize, true), BigInt(16 * MIB));
  assert.equal(v.getBigUint64(MEM_CFG.pluggedSize, true), 0n);
  assert.equal(v.getBigUint64(MEM_CFG.requestedSize, true), 0n);
});

test('virtio-mem plugs up to the requested size, NACKs beyond, answers state, unplugs', () => {
  const t = setup(6 * MIB);
  assert.deepEqual(t.send(REQ_PLUG, BASE, 2), { type: RESP_ACK, state: 0 });
  assert.equal(t.cfg.plugged, 4 * MIB);
  // Over the requested size: NACK, nothing changes.
  assert.equal(t.send(REQ_PLUG, BASE + 4 * MIB, 2).type, RESP_NACK);
  assert.equal(t.dev.pluggedSize, 4 * MIB);
  // Plugging a plugged block: ERROR.
  assert.equal(t.send(REQ_PLUG, BASE + 2 * MIB, 1).type, RESP_ERROR);
  assert.equal(t.send(REQ_PLUG, BASE + 4 * MIB, 1).type, RESP_ACK);
  assert.deepEqual(t.send(REQ_STATE, BASE, 2), { type: RESP_ACK, state: STATE_PLUGGED });
  assert.deepEqual(t.send(REQ_STATE, BASE + 4 * MIB, 2), { type: RESP_ACK, state: STATE_MIXED });
  assert.deepEqual(t.send(REQ_STATE, BASE + 8 * MIB, 4), {
    type: RESP_ACK,
    state: STATE_UNPLUGGED,
  });
  // Unplug of a range not all plugged: ERROR; of a plugged one: ACK, its pages discarded.
  assert.equal(t.send(REQ_UNPLUG, BASE + 2 * MIB, 2).type, RESP_ACK);
  assert.deepEqual(t.discards, [[2 * MIB, 4 * MIB]]);
  assert.equal(t.send(REQ_UNPLUG, BASE + 2 * MIB, 1).type, RESP_ERROR);
  assert.equal(t.cfg.plugged, 2 * MIB);
  assert.equal(t.dev.counters.plugs, 2);
  assert.equal(t.dev.counters.unplugs, 1);
});

test('virtio-mem refuses misaligned, out-of-region and empty ranges, and unknown types', () => {
  const t = setup(16 * MIB);
  for (const [addr, nb] of [
    [BASE + 4096, 1], // not block aligned
    [BASE - 2 * MIB, 1], // below the region
    [BASE + 14 * MIB, 2], // runs past the end
    [BASE, 0], // no blocks
    [BASE + 2 ** 53, 1], // far outside
  ] as Array<[number, number]>) {
    assert.equal(t.send(REQ_PLUG, addr, nb).type, RESP_ERROR, `${addr.toString(16)}+${nb}`);
    assert.equal(t.send(REQ_STATE, addr, nb).type, RESP_ERROR);
  }
  assert.equal(t.send(9, BASE, 1).type, RESP_ERROR);
  assert.equal(t.dev.pluggedSize, 0);
  assert.equal(t.dev.counters.badRequests, 11);
  // A request too short to parse, or without room for the response.
  const req = t.h.alloc.alloc(24);
  const resp = t.h.alloc.alloc(16);
  t.q.addChain([
    { addr: req, len: 8 },
    { addr: resp, len: 10, write: true },
  ]);
  t.q.addChain([{ addr: req, len: 24 }]);
  t.h.kick();
  assert.deepEqual(
    t.q.takeUsed().map((u) => u.len),
    [10, 0],
  );
});

test('virtio-mem UNPLUG_ALL discards every plugged run; save/restore keeps the bitmap', () => {
  const t = setup(16 * MIB);
  t.send(REQ_PLUG, BASE, 1);
  t.send(REQ_PLUG, BASE + 4 * MIB, 3);
  const saved = t.dev.save();
  assert.equal(t.send(REQ_UNPLUG_ALL).type, RESP_ACK);
  assert.deepEqual(t.discards, [
    [0, 2 * MIB],
    [4 * MIB, 6 * MIB],
  ]);
  assert.equal(t.cfg.plugged, 0);
  const other = setup(16 * MIB);
  other.dev.restore(saved);
  assert.equal(other.dev.pluggedSize, 8 * MIB);
  assert.deepEqual(other.send(REQ_STATE, BASE + 4 * MIB, 3).state, STATE_PLUGGED);
  assert.throws(() => other.dev.restore(saved.subarray(0, 6)), /blocks/);
  const bad = saved.slice();
  bad[7] = 5;
  assert.throws(() => other.dev.restore(bad), /bitmap/);
  // A snapshot load counts the plugged blocks from the saved bytes alone (the Uffd check).
  assert.equal(savedPluggedBlocks(saved), 4);
  assert.equal(savedPluggedBlocks(setup(0).dev.save()), 0);
  assert.throws(() => savedPluggedBlocks(bad), /bitmap/);
  assert.throws(() => savedPluggedBlocks(saved.subarray(0, 7)), /cut/);
  assert.throws(() => savedPluggedBlocks(new Uint8Array([9, 0, 0, 0, 0])), /version/);
});

test('memory hotplug sizes follow Firecracker rules', () => {
  checkMemSizes({ totalMib: 1024, blockMib: 2, slotMib: 128 });
  assert.throws(() => checkMemSizes({ totalMib: 1024, blockMib: 3, slotMib: 128 }), /power of 2/);
  assert.throws(() => checkMemSizes({ totalMib: 1024, blockMib: 1, slotMib: 128 }), /block_size/);
  assert.throws(() => checkMemSizes({ totalMib: 1024, blockMib: 2, slotMib: 64 }), /slot_size/);
  assert.throws(() => checkMemSizes({ totalMib: 1000, blockMib: 2, slotMib: 128 }), /multiple/);
  assert.throws(() => checkMemSizes({ totalMib: 0, blockMib: 2, slotMib: 128 }), /multiple/);
  assert.throws(
    () => checkMemSizes({ totalMib: 128 * 300, blockMib: 2, slotMib: 128 }),
    /at most 256 slots/,
  );
});

/**
 * A device whose region (16 MiB, 2 MiB blocks) is 4 KVM slots of 4 MiB (2 blocks each), over a
 * recorder of slot changes and discards in the order they happen. `refuse(s)`: KVM refuses to
 * change slot s.
 */
function withSlots(requested: number) {
  const { access } = configSpace(requested);
  const events: string[] = [];
  const present = [false, false, false, false]; // as the VMM leaves them: `startsOut`
  const refused = new Set<number>();
  const slots = {
    count: 4,
    isPresent: (i: number) => present[i]!,
    setPresent: (i: number, p: boolean) => {
      if (refused.has(i)) throw new Error('EINVAL');
      assert.notEqual(present[i], p, `slot ${i} set to what it is`);
      present[i] = p;
      events.push(`${p ? '+' : '-'}${i}`);
    },
  };
  const g = { ...geometry, slotSize: 4 * MIB };
  const logs: string[] = [];
  const dev = new MemDevice(
    'mem',
    g,
    access,
    (o, l) => events.push(`discard ${o / MIB}+${l / MIB}`),
    slots,
    (m) => logs.push(m),
  );
  const h = harness(memIdentity(g), dev);
  const [q] = h.start();
  const send = (type: number, block = 0, nb = 0) => {
    const req = h.alloc.alloc(24);
    const v = h.mem.view(req, 24);
    const d = new DataView(v.buffer, v.byteOffset, 24);
    d.setUint16(0, type, true);
    d.setBigUint64(8, BigInt(BASE + block * 2 * MIB), true);
    d.setUint16(16, nb, true);
    const resp = h.alloc.alloc(16);
    q!.addChain([
      { addr: req, len: 24 },
      { addr: resp, len: 10, write: true },
    ]);
    h.kick();
    assert.equal(q!.takeUsed().length, 1);
    return new DataView(h.mem.view(resp, 10).buffer, h.mem.view(resp, 10).byteOffset).getUint16(
      0,
      true,
    );
  };
  return { dev, events, present, refused, logs, send, h, g, slots };
}

test('virtio-mem slots: all out at start; a plug puts its slots back, an unplug takes emptied ones out before the discard', () => {
  const { dev, events, present, send } = withSlots(16 * MIB);
  assert.deepEqual(events, [], 'nothing plugged, no slot made: nothing to do');
  // Blocks 1..4: the second half of slot 0, all of slot 1, the first half of slot 2.
  assert.equal(send(REQ_PLUG, 1, 4), RESP_ACK);
  assert.deepEqual(events, ['+0', '+1', '+2']);
  assert.deepEqual(present, [true, true, true, false]);
  events.length = 0;
  // Unplugging block 1 empties slot 0 (out, then discarded); block 4 leaves slot 2 half full.
  assert.equal(send(REQ_UNPLUG, 1, 1), RESP_ACK);
  assert.deepEqual(events, ['-0', 'discard 2+2']);
  events.length = 0;
  assert.equal(send(REQ_UNPLUG, 2, 2), RESP_ACK);
  assert.deepEqual(events, ['-1', 'discard 4+4']);
  events.length = 0;
  // Plugging into a slot that is in already changes no slot.
  assert.equal(send(REQ_PLUG, 5, 1), RESP_ACK);
  assert.deepEqual(events, []);
  assert.equal(dev.presentSlots, 1);
  // UNPLUG_ALL: every slot out before any page is discarded.
  assert.equal(send(REQ_UNPLUG_ALL), RESP_ACK);
  assert.deepEqual(events, ['-2', 'discard 8+4']);
  assert.deepEqual(present, [false, false, false, false]);
  assert.equal(dev.counters.slotsAdded, 3);
  assert.equal(dev.counters.slotsRemoved, 3);
  // Requests refused before they change anything touch no slot.
  events.length = 0;
  assert.equal(send(REQ_UNPLUG, 0, 1), RESP_ERROR, 'not plugged');
  assert.equal(send(REQ_PLUG, 7, 2), RESP_ERROR, 'past the region');
  assert.deepEqual(events, []);
});

test('virtio-mem slots: a slot KVM refuses fails the plug with ERROR and changes nothing', () => {
  const { dev, events, present, refused, logs, send } = withSlots(16 * MIB);
  events.length = 0;
  refused.add(2);
  // Blocks 3..4 span slots 1 and 2: slot 1 goes in, slot 2 is refused, slot 1 comes out again.
  assert.equal(send(REQ_PLUG, 3, 2), RESP_ERROR);
  assert.deepEqual(events, ['+1', '-1']);
  assert.deepEqual(present, [false, false, false, false]);
  assert.equal(dev.pluggedSize, 0);
  assert.equal(dev.counters.plugFails, 1);
  assert.equal(dev.counters.slotFails, 1);
  assert.equal(logs.length, 1);
  assert.match(logs[0]!, /refused to add memory slot 2/);
  refused.clear();
  events.length = 0;
  assert.equal(send(REQ_PLUG, 3, 2), RESP_ACK);
  assert.deepEqual(events, ['+1', '+2']);
  // A refused removal leaves the slot in (the unplug itself is done; the pages still go).
  refused.add(1);
  events.length = 0;
  assert.equal(send(REQ_UNPLUG, 3, 1), RESP_ACK);
  assert.deepEqual(events, ['discard 6+2']);
  assert.equal(present[1], true);
  assert.equal(dev.counters.slotFails, 2);
  assert.equal(logs.length, 1, 'logged once');
});

test('virtio-mem slots: a restored device puts back the slots of its saved plugged blocks', () => {
  const a = withSlots(16 * MIB);
  assert.equal(a.send(REQ_PLUG, 6, 1), RESP_ACK);
  assert.equal(a.send(REQ_PLUG, 0, 1), RESP_ACK);
  // A load builds a fresh device of the same geometry (every slot out), then restores it.
  const { access } = configSpace(16 * MIB);
  const events: string[] = [];
  const present = [false, false, false, false];
  const dev = new MemDevice('mem', a.g, access, () => undefined, {
    count: 4,
    isPresent: (i) => present[i]!,
    setPresent: (i, p) => {
      present[i] = p;
      events.push(`${p ? '+' : '-'}${i}`);
    },
  });
  events.length = 0;
  dev.restore(a.dev.save());
  assert.deepEqual(events, ['+0', '+3']);
  assert.deepEqual(present, [true, false, false, true]);
  assert.equal(dev.pluggedSize, 4 * MIB);
  // A load whose slot KVM refuses fails, and leaves the device and its slots as they were.
  let refuse = false;
  const slots2 = {
    count: 4,
    isPresent: () => false,
    setPresent: (i: number, p: boolean) => {
      if (refuse && i === 3) throw new Error('ENOMEM');
      events.push(`${p ? '+' : '-'}${i}`);
    },
  };
  const dev2 = new MemDevice('mem', a.g, access, () => undefined, slots2);
  refuse = true;
  events.length = 0;
  assert.throws(() => dev2.restore(a.dev.save()), /KVM refused a memory slot/);
  assert.deepEqual(events, ['+0', '-0']);
  assert.equal(dev2.pluggedSize, 0);
  assert.equal(dev2.presentSlots, 0);
});

test('virtio-mem slots: slots that do not tile the region are a programming error', () => {
  const { access } = configSpace(0);
  const slots = { count: 3, isPresent: () => false, setPresent: () => undefined };
  assert.throws(
    () => new MemDevice('mem', { ...geometry, slotSize: 4 * MIB }, access, () => undefined, slots),
    /do not tile the region/,
  );
  assert.throws(
    () => new MemDevice('mem', geometry, access, () => undefined, { ...slots, count: 4 }),
    /do not tile the region/,
  );
});

test('virtio-mem slots: slots a device is given present (nothing plugged) are taken out at once', () => {
  const { access } = configSpace(0);
  const present = [true, false, true, true];
  const dev = new MemDevice('mem', { ...geometry, slotSize: 4 * MIB }, access, () => undefined, {
    count: 4,
    isPresent: (i) => present[i]!,
    setPresent: (i, p) => void (present[i] = p),
  });
  assert.deepEqual(present, [false, false, false, false]);
  assert.equal(dev.counters.slotsRemoved, 3);
});

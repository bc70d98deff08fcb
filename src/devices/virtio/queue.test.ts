import { test } from 'node:test';
import assert from 'node:assert/strict';
import { GuestMemory } from '../../memory/guest-memory.js';
import {
  VIRTQ_DESC_F_INDIRECT,
  VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_F_WRITE,
  type DescriptorChain,
} from './chain.js';
import { Virtqueue, type PopResult } from './queue.js';
import { GuestAllocator, MockQueue } from './testing/mock-driver.js';
import { Prng } from './testing/prng.js';

const RAM = 1 << 20;

function setup(size = 8, indirect = true) {
  const mem = GuestMemory.anonymous([{ base: 0, size: RAM }]);
  const alloc = new GuestAllocator(0x1000, RAM);
  const mq = new MockQueue(mem, alloc, size);
  const r = Virtqueue.create(
    mem,
    { size, desc: mq.desc, driver: mq.avail, device: mq.used },
    { indirect, maxSize: 256 },
  );
  assert.ok(r.ok);
  return { mem, alloc, mq, q: r.value };
}

function chainOf(p: PopResult): DescriptorChain {
  assert.equal(p.kind, 'chain', JSON.stringify(p));
  return (p as { chain: DescriptorChain }).chain;
}

function badKind(p: PopResult): string {
  assert.equal(p.kind, 'bad-chain', JSON.stringify(p));
  return (p as { error: { kind: string } }).error.kind;
}

test('a direct chain: readable then writable views of guest memory', () => {
  const { mem, mq, q } = setup();
  mem.write(0x8000, Uint8Array.of(1, 2, 3, 4));
  const head = mq.addChain([
    { addr: 0x8000, len: 4 },
    { addr: 0x9000, len: 100, write: true },
    { addr: 0xa000, len: 1, write: true },
  ]);
  const c = chainOf(q.pop());
  assert.equal(c.head, head);
  assert.deepEqual([...c.readable[0]!], [1, 2, 3, 4]);
  assert.equal(c.readableLength, 4);
  assert.equal(c.writableLength, 101);
  c.writable[0]![0] = 0xaa; // zero-copy: writes land in guest RAM
  assert.equal(mem.readU8(0x9000), 0xaa);
  assert.equal(q.pop().kind, 'empty');
  q.pushUsed(c.head, 101);
  assert.deepEqual(mq.takeUsed(), [{ id: head, len: 101 }]);
});

test('an indirect chain', () => {
  const { alloc, mq, q } = setup();
  const table = alloc.alloc(16 * 3);
  const head = mq.addIndirectChain(
    [
      { addr: 0x8000, len: 16 },
      { addr: 0x9000, len: 512, write: true },
      { addr: 0xa000, len: 1, write: true },
    ],
    table,
  );
  const c = chainOf(q.pop());
  assert.equal(c.head, head);
  assert.equal(c.readableLength, 16);
  assert.equal(c.writableLength, 513);
});

test('indices wrap around the ring and the 16-bit counters', () => {
  const { mq, q } = setup(4);
  for (let i = 0; i < 70000; i++) {
    const head = mq.addChain([{ addr: 0x8000, len: 8 }]);
    const c = chainOf(q.pop());
    assert.equal(c.head, head);
    q.pushUsed(c.head, 0);
    assert.equal(mq.takeUsed().length, 1);
  }
  assert.equal(mq.usedIdx(), 70000 & 0xffff);
});

test('malformed chains fail the request, never throw', () => {
  const cases: Array<[string, (s: ReturnType<typeof setup>) => void]> = [
    [
      'index-out-of-range',
      ({ mq }) => {
        mq.writeDescriptor(mq.desc, 0, {
          addr: 0x8000,
          len: 4,
          flags: VIRTQ_DESC_F_NEXT,
          next: 99,
        });
        mq.publish(0);
      },
    ],
    [
      'too-long',
      ({ mq }) => {
        // A loop 0 -> 1 -> 0.
        mq.writeDescriptor(mq.desc, 0, { addr: 0x8000, len: 4, flags: VIRTQ_DESC_F_NEXT, next: 1 });
        mq.writeDescriptor(mq.desc, 1, { addr: 0x8000, len: 4, flags: VIRTQ_DESC_F_NEXT, next: 0 });
        mq.publish(0);
      },
    ],
    [
      'too-long',
      ({ mq }) => {
        mq.writeDescriptor(mq.desc, 3, { addr: 0x8000, len: 4, flags: VIRTQ_DESC_F_NEXT, next: 3 }); // self-loop
        mq.publish(3);
      },
    ],
    [
      'bad-address',
      ({ mq }) => {
        mq.writeDescriptor(mq.desc, 0, { addr: RAM - 2, len: 4, flags: 0, next: 0 }); // crosses the end
        mq.publish(0);
      },
    ],
    [
      'bad-address',
      ({ mq }) => {
        mq.writeDescriptor(mq.desc, 0, {
          addr: 0xffff_ffff_ffff_fff0n,
          len: 0x20,
          flags: 0,
          next: 0,
        }); // wraps u64
        mq.publish(0);
      },
    ],
    [
      'bad-address',
      ({ mq }) => {
        mq.writeDescriptor(mq.desc, 0, { addr: 0x8000, len: 0xffff_ffff, flags: 0, next: 0 });
        mq.publish(0);
      },
    ],
    [
      'order',
      ({ mq }) => {
        mq.writeDescriptor(mq.desc, 0, {
          addr: 0x8000,
          len: 4,
          flags: VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT,
          next: 1,
        });
        mq.writeDescriptor(mq.desc, 1, { addr: 0x9000, len: 4, flags: 0, next: 0 });
        mq.publish(0);
      },
    ],
    [
      'indirect-nested',
      ({ mq, alloc }) => {
        const t1 = alloc.alloc(32);
        const t2 = alloc.alloc(32);
        mq.writeDescriptor(t1, 0, { addr: t2, len: 32, flags: VIRTQ_DESC_F_INDIRECT, next: 0 });
        mq.writeDescriptor(mq.desc, 0, {
          addr: t1,
          len: 32,
          flags: VIRTQ_DESC_F_INDIRECT,
          next: 0,
        });
        mq.publish(0);
      },
    ],
    [
      'indirect-with-next',
      ({ mq, alloc }) => {
        const t1 = alloc.alloc(32);
        mq.writeDescriptor(mq.desc, 0, {
          addr: t1,
          len: 32,
          flags: VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT,
          next: 1,
        });
        mq.publish(0);
      },
    ],
    [
      'indirect-bad-length',
      ({ mq, alloc }) => {
        mq.writeDescriptor(mq.desc, 0, {
          addr: alloc.alloc(32),
          len: 24,
          flags: VIRTQ_DESC_F_INDIRECT,
          next: 0,
        });
        mq.publish(0);
      },
    ],
    [
      'indirect-bad-length',
      ({ mq, alloc }) => {
        mq.writeDescriptor(mq.desc, 0, {
          addr: alloc.alloc(32),
          len: 0,
          flags: VIRTQ_DESC_F_INDIRECT,
          next: 0,
        }); // zero-length table
        mq.publish(0);
      },
    ],
    [
      'indirect-bad-length',
      ({ mq }) => {
        mq.writeDescriptor(mq.desc, 0, {
          addr: 0x10000,
          len: 16 * 100000,
          flags: VIRTQ_DESC_F_INDIRECT,
          next: 0,
        }); // huge
        mq.publish(0);
      },
    ],
    [
      'too-long',
      ({ mq, alloc }) => {
        const t = alloc.alloc(64);
        for (let i = 0; i < 4; i++)
          mq.writeDescriptor(t, i, {
            addr: 0x8000,
            len: 1,
            flags: VIRTQ_DESC_F_NEXT,
            next: (i + 1) % 4,
          });
        mq.writeDescriptor(mq.desc, 0, { addr: t, len: 64, flags: VIRTQ_DESC_F_INDIRECT, next: 0 });
        mq.publish(0);
      },
    ],
    [
      'index-out-of-range',
      ({ mq, alloc }) => {
        const t = alloc.alloc(32);
        mq.writeDescriptor(t, 0, { addr: 0x8000, len: 1, flags: VIRTQ_DESC_F_NEXT, next: 2 }); // table has 2 entries
        mq.writeDescriptor(mq.desc, 0, { addr: t, len: 32, flags: VIRTQ_DESC_F_INDIRECT, next: 0 });
        mq.publish(0);
      },
    ],
  ];
  for (const [kind, make] of cases) {
    const s = setup();
    make(s);
    assert.equal(badKind(s.q.pop()), kind);
    assert.equal(s.q.pop().kind, 'empty'); // the queue goes on
  }
});

test('indirect descriptors are refused unless negotiated', () => {
  const s = setup(8, false);
  s.mq.addIndirectChain([{ addr: 0x8000, len: 4 }], s.alloc.alloc(16));
  assert.equal(badKind(s.q.pop()), 'indirect-not-negotiated');
});

test('zero-length descriptors are legal and contribute nothing', () => {
  const { mq, q } = setup();
  mq.addChain([
    { addr: 0x8000, len: 0 },
    { addr: 0x9000, len: 0, write: true },
    { addr: 0x9000, len: 2, write: true },
  ]);
  const c = chainOf(q.pop());
  assert.equal(c.readable.length, 0);
  assert.equal(c.writableLength, 2);
});

test('an avail.idx jump past the queue size or a bad head breaks the queue', () => {
  const a = setup(8);
  a.mq.setAvailIdx(9);
  assert.equal(a.q.pop().kind, 'broken');
  assert.equal(a.q.pop().kind, 'broken'); // stays broken
  const b = setup(8);
  b.mq.publish(8);
  assert.equal(b.q.pop().kind, 'broken');
});

test('queue setup is validated: size, alignment, inside guest RAM', () => {
  const mem = GuestMemory.anonymous([{ base: 0, size: RAM }]);
  const ok = { size: 8, desc: 0x1000, driver: 0x2000, device: 0x3000 };
  const o = { indirect: false, maxSize: 256 };
  assert.ok(Virtqueue.create(mem, ok, o).ok);
  for (const bad of [
    { ...ok, size: 0 },
    { ...ok, size: 6 },
    { ...ok, size: 512 },
    { ...ok, desc: 0x1008 },
    { ...ok, driver: 0x2001 },
    { ...ok, device: 0x3002 },
    { ...ok, desc: RAM - 64 },
    { ...ok, device: -1 },
  ]) {
    assert.equal(Virtqueue.create(mem, bad, o).ok, false, JSON.stringify(bad));
  }
});

test('NO_INTERRUPT suppresses interrupts', () => {
  const { mq, q } = setup();
  assert.equal(q.needsInterrupt(), true);
  mq.setAvailFlags(1);
  assert.equal(q.needsInterrupt(), false);
});

test('fuzz: arbitrary ring contents never throw, hang or escape guest memory', () => {
  const rng = new Prng(0x5eed);
  const small = 64 * 1024;
  const cases = 4000;
  let chains = 0;
  let bad = 0;
  let broken = 0;
  for (let i = 0; i < cases; i++) {
    const mem = GuestMemory.anonymous([
      { base: 0, size: small },
      { base: 0x10_0000, size: small },
    ]);
    const ram = mem.regions.map((r) => r.bytes);
    const size = rng.pick([1, 2, 4, 8, 16, 64, 256]);
    const desc = 0x1000,
      avail = 0x3000,
      used = 0x4000;
    const q = Virtqueue.create(
      mem,
      { size, desc, driver: avail, device: used },
      { indirect: rng.chance(0.7), maxSize: 256 },
    );
    assert.ok(q.ok);
    // Random rings, biased towards plausible values so that deep paths get exercised.
    const addr = () =>
      rng.chance(0.8)
        ? rng.pick([0, 0x10_0000]) + rng.below(small)
        : rng.chance(0.5)
          ? rng.u32()
          : (BigInt(rng.u32()) << 32n) | BigInt(rng.u32());
    for (let d = 0; d < size; d++) {
      const a = desc + 16 * d;
      mem.writeU64(a, BigInt(addr()));
      mem.writeU32(a + 8, rng.chance(0.8) ? rng.below(4096) : rng.u32());
      mem.writeU16(a + 12, rng.below(8));
      mem.writeU16(a + 14, rng.chance(0.8) ? rng.below(size + 1) : rng.below(65536));
    }
    // Some indirect tables' worth of random bytes elsewhere.
    rng.fill(mem.view(0x8000, 0x2000));
    mem.writeU16(avail, rng.below(2));
    mem.writeU16(avail + 2, rng.chance(0.9) ? rng.below(size + 1) : rng.below(65536));
    for (let e = 0; e < size; e++)
      mem.writeU16(avail + 4 + 2 * e, rng.chance(0.9) ? rng.below(size) : rng.below(65536));
    let pops = 0;
    for (;;) {
      const p = q.value.pop();
      assert.ok(++pops <= size + 1, 'pop must end within queue size');
      if (p.kind === 'empty') break;
      if (p.kind === 'broken') {
        broken++;
        break;
      }
      if (p.kind === 'bad-chain') {
        bad++;
        q.value.pushUsed(p.head, 0);
        continue;
      }
      chains++;
      const c = p.chain;
      for (const v of [...c.readable, ...c.writable]) {
        assert.ok(
          ram.some(
            (r) =>
              r.buffer === v.buffer &&
              v.byteOffset >= r.byteOffset &&
              v.byteOffset + v.length <= r.byteOffset + r.length,
          ),
        );
      }
      assert.ok(c.readable.length + c.writable.length <= size + 1024);
      q.value.pushUsed(c.head, c.writableLength);
    }
  }
  assert.ok(
    chains > 100 && bad > 100 && broken > 10,
    `coverage: ${chains} chains, ${bad} bad, ${broken} broken`,
  );
});

test('position: a queue recreated at a saved position continues the ring, in-flight chains too', () => {
  const { mem, mq, q } = setup(4);
  const heads: number[] = [];
  const add = () => heads.push(mq.addChain([{ addr: 0x8000 + heads.length * 64, len: 8 }]));
  for (let i = 0; i < 4; i++) add();
  // Four taken, three of them returned: one in flight (a backend holds it)...
  const taken = [chainOf(q.pop()), chainOf(q.pop()), chainOf(q.pop()), chainOf(q.pop())];
  for (const c of taken.slice(0, 3)) q.pushUsed(c.head, 1);
  // ...and two more made available (reusing returned descriptors), not taken yet.
  add();
  add();
  assert.deepEqual(q.position(), { nextAvail: 4, nextUsed: 3 });
  const r = Virtqueue.create(
    mem,
    { size: 4, desc: mq.desc, driver: mq.avail, device: mq.used },
    { indirect: true, maxSize: 256 },
    q.position(),
  );
  assert.ok(r.ok);
  const q2 = r.value;
  assert.deepEqual(q2.position(), { nextAvail: 4, nextUsed: 3 });
  q2.pushUsed(taken[3]!.head, 1); // the held chain completes on the new queue
  const rest = [chainOf(q2.pop()), chainOf(q2.pop())];
  assert.equal(q2.pop().kind, 'empty');
  for (const c of rest) q2.pushUsed(c.head, 2);
  assert.deepEqual(
    mq.takeUsed().map((u) => u.id),
    heads,
  );
  assert.deepEqual(q2.position(), { nextAvail: 6, nextUsed: 6 });
});

test('position: u16 wrap, and positions no ring could reach are refused', () => {
  const { mem, mq } = setup(8);
  const a = { size: 8, desc: mq.desc, driver: mq.avail, device: mq.used };
  const opts = { indirect: false, maxSize: 256 };
  mq.setAvailIdx(0xffff);
  mem.writeU16(mq.used + 2, 0xfffe);
  const r = Virtqueue.create(mem, a, opts, { nextAvail: 0xfffe, nextUsed: 0xfffe });
  assert.ok(r.ok);
  mq.writeDescriptor(mq.desc, 5, { addr: 0x8000, len: 8, flags: 0, next: 0 });
  mq.writeDescriptor(mq.desc, 6, { addr: 0x8000, len: 8, flags: 0, next: 0 });
  mem.writeU16(mq.avail + 4 + 2 * (0xfffe % 8), 5);
  mq.publish(6); // slot 0xffff % 8, avail.idx wraps to 0
  assert.equal(chainOf(r.value.pop()).head, 5);
  assert.equal(chainOf(r.value.pop()).head, 6);
  r.value.pushUsed(5, 1);
  r.value.pushUsed(6, 1);
  assert.deepEqual(r.value.position(), { nextAvail: 0, nextUsed: 0 });
  assert.equal(mem.readU16(mq.used + 2), 0);
  for (const bad of [
    { nextAvail: 0x10000, nextUsed: 0 },
    { nextAvail: -1, nextUsed: 0 },
    { nextAvail: 1.5, nextUsed: 0 },
    { nextAvail: 9, nextUsed: 0 }, // 9 chains in flight on a queue of 8
    { nextAvail: 3, nextUsed: 0xfff0 }, // 19 in flight across the wrap
  ]) {
    const b = Virtqueue.create(mem, a, opts, bad);
    assert.ok(!b.ok && /position/.test(b.error), JSON.stringify(bad));
  }
  assert.ok(Virtqueue.create(mem, a, opts, { nextAvail: 4, nextUsed: 0xfffc }).ok);
});

test('unpop gives back the last popped chain, checked against our record, not the ring', () => {
  const { mem, alloc, mq, q } = setup();
  const a = mq.addChain([{ addr: alloc.alloc(16), len: 16, write: true }]);
  const b = mq.addChain([{ addr: alloc.alloc(16), len: 16, write: true }]);
  assert.equal(chainOf(q.pop()).head, a);
  assert.equal(q.unpop(b), false, 'not the last popped chain');
  // The driver rewrites the ring entry of the popped chain (it must not, a hostile one may).
  mem.writeU16(mq.avail + 4, b);
  assert.equal(q.unpop(a), true);
  assert.equal(q.unpop(a), false, 'once');
  // The next pop reads the ring as it is now.
  assert.equal(chainOf(q.pop()).head, b);
  assert.equal(chainOf(q.pop()).head, b);
  assert.equal(q.pop().kind, 'empty');
});

import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  array,
  bool,
  bytes,
  oneOf,
  optional,
  slots,
  string,
  struct,
  u16,
  u32,
  u53,
  u64n,
  u8,
  union,
  versioned,
} from './persist.js';

const Queue = struct({ size: u16, ready: bool, desc: u64n, next: u53 });
const Dev = versioned(
  'test-device',
  3,
  struct({
    name: string(32),
    mode: oneOf(['a', 'b'] as const),
    queues: array(Queue, 8),
    config: bytes(16),
    extra: optional(u8),
    state: union({ idle: {}, busy: { since: u32 } }),
  }),
);

const sample = {
  name: 'dev0',
  mode: 'b' as const,
  queues: [
    { size: 256, ready: true, desc: 0xffff_ffff_0000n, next: 2 ** 40 },
    { size: 1, ready: false, desc: 0n, next: 0 },
  ],
  config: new Uint8Array([1, 2, 3]),
  extra: undefined,
  state: { kind: 'busy' as const, since: 7 },
};

test('a versioned record round-trips to the same bytes', () => {
  const b = Dev.encode(sample);
  const back = Dev.decodeOrThrow(b);
  assert.deepEqual(back, sample);
  assert.deepEqual(Dev.encode(back), b);
});

test('the wrong name, version, truncation and trailing bytes are refused with a message', () => {
  const b = Dev.encode(sample);
  const other = versioned('other', 3, Dev.codec).encode(sample);
  const ro = Dev.decode(other);
  assert.ok(!ro.ok && /"other"/.test(ro.error.message));
  const v4 = versioned('test-device', 4, Dev.codec).encode(sample);
  const r4 = Dev.decode(v4);
  assert.ok(!r4.ok && /version 4/.test(r4.error.message));
  for (let cut = 0; cut < b.length; cut++) assert.equal(Dev.decode(b.subarray(0, cut)).ok, false);
  const longer = new Uint8Array(b.length + 1);
  longer.set(b);
  assert.equal(Dev.decode(longer).ok, false);
});

test('random bytes never throw out of decode', () => {
  let seed = 1;
  const rnd = () => ((seed = (seed * 1103515245 + 12345) >>> 0) >>> 16) & 0xff;
  const good = Dev.encode(sample);
  for (let i = 0; i < 2000; i++) {
    const b = good.slice();
    for (let k = 0; k < 3; k++) b[rnd() % b.length] = rnd();
    const r = Dev.decode(b);
    if (r.ok) assert.deepEqual(Dev.decodeOrThrow(Dev.encode(r.value)), r.value);
  }
});

test('encode refuses values outside their type, naming the field', () => {
  assert.throws(
    () => Dev.encode({ ...sample, queues: [{ ...sample.queues[0]!, size: 70000 }] }),
    /queues\[0\]\.size/,
  );
  assert.throws(() => Dev.encode({ ...sample, config: new Uint8Array(17) }), /config/);
});

test('slots() names Int32 slots in order', () => {
  const s = slots(['lock', 'status', 'epoch'] as const, 2);
  assert.deepEqual([s.lock, s.status, s.epoch, s.$count], [2, 3, 4, 5]);
  assert.throws(() => slots(['a', 'a'] as const));
});

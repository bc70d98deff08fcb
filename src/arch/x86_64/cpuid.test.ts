import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { CpuidEntry } from '../../kvm/types.js';
import { KVM_APIC_BUS_KHZ, cpuVendor, filterCpuid, idBits } from './cpuid.js';

const E = (
  fn: number,
  index: number,
  eax: number,
  ebx = 0,
  ecx = 0,
  edx = 0,
  flags = 0,
): CpuidEntry => ({
  function: fn,
  index,
  flags,
  eax,
  ebx,
  ecx,
  edx,
});
const vendor = (s: string) => {
  const r = (o: number) =>
    s.charCodeAt(o) |
    (s.charCodeAt(o + 1) << 8) |
    (s.charCodeAt(o + 2) << 16) |
    (s.charCodeAt(o + 3) << 24);
  return { ebx: r(0) >>> 0, edx: r(4) >>> 0, ecx: r(8) >>> 0 };
};
function supported(v: string): CpuidEntry[] {
  const s = vendor(v);
  return [
    E(0, 0, 0x1f, s.ebx, s.ecx, s.edx),
    E(1, 0, 0x000806f8, 0x00ff0805, 0x01fa3223, 0x178bfbff),
    E(4, 0, 0x0121, 0, 0, 0, 1), // L1d
    E(4, 2, 0x0143, 0, 0, 0, 1), // L2
    E(4, 3, 0x0163, 0, 0, 0, 1), // L3
    E(4, 4, 0, 0, 0, 0, 1),
    E(6, 0, 0x4 | 0x2, 0, 0x9),
    E(0xa, 0, 0x07300805, 0xff, 0, 0x603),
    E(0xb, 0, 1, 2, 0x100, 7, 1),
    E(0xb, 1, 4, 8, 0x201, 7, 1),
    E(0x1f, 0, 1, 2, 0x100, 7, 1),
    E(0x4000_0000, 0, 0x4000_0001, 0x4b4d564b, 0x564b4d56, 0x4d),
    E(0x4000_0001, 0, 0x01007afb),
    E(0x8000_0000, 0, 0x8000_0021),
    E(0x8000_0008, 0, 0x3030, 0, 0x700f, 0),
    E(0x8000_001e, 0, 7, 0x103, 0x302),
    E(0x1234, 0, 1, 2, 3, 4), // unknown: kept
  ];
}
const find = (es: CpuidEntry[], fn: number, index = 0) =>
  es.filter((e) => e.function === fn && e.index === index);

test('vendor and idBits helpers', () => {
  assert.equal(cpuVendor(supported('GenuineIntel')), 'GenuineIntel');
  assert.deepEqual([1, 2, 3, 4, 5, 64].map(idBits), [0, 1, 2, 2, 3, 6]);
});

test('leaf 1: APIC id, CLFLUSH, logical count, hypervisor bit, HTT', () => {
  const out = filterCpuid(supported('GenuineIntel'), { vcpuId: 2, vcpuCount: 3 });
  const l1 = find(out, 1)[0]!;
  assert.equal(l1.ebx >>> 24, 2);
  assert.equal((l1.ebx >>> 16) & 0xff, 4);
  assert.equal((l1.ebx >>> 8) & 0xff, 8);
  assert.equal(l1.ebx & 0xff, 0x05); // brand index kept
  assert.ok(l1.ecx & (1 << 31));
  assert.ok(l1.edx & (1 << 28));
  const one = find(filterCpuid(supported('GenuineIntel'), { vcpuId: 0, vcpuCount: 1 }), 1)[0]!;
  assert.equal(one.edx & (1 << 28), 0);
  assert.equal((one.ebx >>> 16) & 0xff, 1);
});

test('leaf 1: TSC-deadline set, cleared or kept', () => {
  const s = supported('GenuineIntel');
  const bit = 1 << 24;
  assert.ok(find(filterCpuid(s, { vcpuId: 0, vcpuCount: 1, tscDeadline: true }), 1)[0]!.ecx & bit);
  assert.equal(
    find(filterCpuid(s, { vcpuId: 0, vcpuCount: 1, tscDeadline: false }), 1)[0]!.ecx & bit,
    0,
  );
  assert.equal(find(filterCpuid(s, { vcpuId: 0, vcpuCount: 1 }), 1)[0]!.ecx & bit, s[1]!.ecx & bit);
});

test('leaf 4 cache sharing and cores; leaf 6; leaf 0xa zeroed; unknown kept', () => {
  const out = filterCpuid(supported('GenuineIntel'), { vcpuId: 1, vcpuCount: 4 });
  const l1d = find(out, 4, 0)[0]!;
  const l3 = find(out, 4, 3)[0]!;
  assert.equal((l1d.eax >>> 14) & 0xfff, 0);
  assert.equal((l3.eax >>> 14) & 0xfff, 3);
  assert.equal(l1d.eax >>> 26, 3);
  assert.equal(l1d.eax & 0x3fff, 0x0121);
  assert.equal(find(out, 4, 4)[0]!.eax, 0);
  const l6 = find(out, 6)[0]!;
  assert.equal(l6.eax, 0x4);
  assert.equal(l6.ecx, 0x1);
  assert.deepEqual(find(out, 0xa)[0], E(0xa, 0, 0, 0, 0, 0));
  assert.deepEqual(find(out, 0x1234)[0], E(0x1234, 0, 1, 2, 3, 4));
});

test('leaf 0xb / 0x1f: one thread per core, n cores, x2APIC id', () => {
  const out = filterCpuid(supported('GenuineIntel'), { vcpuId: 5, vcpuCount: 6 });
  for (const leaf of [0xb, 0x1f]) {
    const es = out.filter((e) => e.function === leaf).sort((a, b) => a.index - b.index);
    assert.equal(es.length, 3);
    assert.deepEqual(
      es.map((e) => [e.eax, e.ebx, e.ecx, e.edx, e.flags]),
      [
        [0, 1, 0x100, 5, 1],
        [3, 6, 0x201, 5, 1],
        [0, 0, 2, 5, 1],
      ],
    );
  }
});

test('KVM leaves: signature, features kept, TSC frequency leaf', () => {
  const s = supported('GenuineIntel');
  const plain = filterCpuid(s, { vcpuId: 0, vcpuCount: 1 });
  assert.equal(find(plain, 0x4000_0000)[0]!.eax, 0x4000_0001);
  assert.equal(find(plain, 0x4000_0010).length, 0);
  const out = filterCpuid(s, { vcpuId: 0, vcpuCount: 1, tscKhz: 2_500_000 });
  const sig = find(out, 0x4000_0000)[0]!;
  assert.equal(sig.eax, 0x4000_0010);
  const bytes = Buffer.alloc(12);
  bytes.writeUInt32LE(sig.ebx, 0);
  bytes.writeUInt32LE(sig.ecx, 4);
  bytes.writeUInt32LE(sig.edx, 8);
  assert.equal(bytes.toString('latin1'), 'KVMKVMKVM\0\0\0');
  assert.equal(find(out, 0x4000_0001)[0]!.eax, 0x01007afb);
  const tsc = find(out, 0x4000_0010);
  assert.equal(tsc.length, 1);
  assert.equal(tsc[0]!.eax, 2_500_000);
  assert.equal(tsc[0]!.ebx, KVM_APIC_BUS_KHZ);
  // Without KVM's leaves in the supported list, the TSC leaf brings a signature leaf along.
  const bare = filterCpuid(
    s.filter((e) => e.function < 0x4000_0000 || e.function >= 0x8000_0000),
    {
      vcpuId: 0,
      vcpuCount: 1,
      tscKhz: 1000,
    },
  );
  assert.equal(find(bare, 0x4000_0000)[0]!.eax, 0x4000_0010);
});

test('AMD topology leaves', () => {
  const out = filterCpuid(supported('AuthenticAMD'), { vcpuId: 3, vcpuCount: 4 });
  const l8 = find(out, 0x8000_0008)[0]!;
  assert.equal(l8.ecx & 0xff, 3);
  assert.equal((l8.ecx >>> 12) & 0xf, 2);
  assert.equal(l8.eax, 0x3030);
  const l1e = find(out, 0x8000_001e)[0]!;
  assert.deepEqual([l1e.eax, l1e.ebx, l1e.ecx], [3, 3, 0]);
  // Intel keeps these as reported.
  const intel = filterCpuid(supported('GenuineIntel'), { vcpuId: 3, vcpuCount: 4 });
  assert.equal(find(intel, 0x8000_0008)[0]!.ecx, 0x700f);
});

test('input is not mutated; bad ids throw (programmer error)', () => {
  const s = supported('GenuineIntel');
  const copy = JSON.stringify(s);
  filterCpuid(s, { vcpuId: 1, vcpuCount: 2, tscKhz: 1 });
  assert.equal(JSON.stringify(s), copy);
  assert.throws(() => filterCpuid(s, { vcpuId: 2, vcpuCount: 2 }));
});

test('smt: two threads per core in leaves 4, 0xb/0x1f (Intel) and 0x8000_001d/0x8000_001e (AMD)', () => {
  const intel = filterCpuid(supported('GenuineIntel'), { vcpuId: 3, vcpuCount: 4, smt: true });
  const l1d = find(intel, 4, 0)[0]!;
  assert.equal((l1d.eax >>> 14) & 0xfff, 1); // L1 shared by the core's 2 threads
  assert.equal((find(intel, 4, 3)[0]!.eax >>> 14) & 0xfff, 3); // L3 by all 4
  assert.equal(l1d.eax >>> 26, 1); // 2 cores
  for (const leaf of [0xb, 0x1f]) {
    const es = intel.filter((e) => e.function === leaf).sort((a, b) => a.index - b.index);
    assert.deepEqual(
      es.map((e) => [e.eax, e.ebx, e.ecx, e.edx]),
      [
        [1, 2, 0x100, 3], // SMT level: shift 1, 2 threads
        [2, 4, 0x201, 3], // core level: 4 logical processors
        [0, 0, 2, 3],
      ],
    );
  }
  const s = supported('AuthenticAMD');
  s.push(E(0x8000_001d, 0, 0x121), E(0x8000_001d, 3, 0x163));
  const amd = filterCpuid(s, { vcpuId: 3, vcpuCount: 4, smt: true });
  const l1e = find(amd, 0x8000_001e)[0]!;
  assert.deepEqual([l1e.eax, l1e.ebx & 0xff, (l1e.ebx >>> 8) & 0xff, l1e.ecx], [3, 1, 1, 0]);
  assert.equal((find(amd, 0x8000_001d, 0)[0]!.eax >>> 14) & 0xfff, 1);
  assert.equal((find(amd, 0x8000_001d, 3)[0]!.eax >>> 14) & 0xfff, 3);
  // Without smt, as before: one thread per core.
  const flat = find(filterCpuid(s, { vcpuId: 3, vcpuCount: 4 }), 0x8000_001e)[0]!;
  assert.equal(flat.ebx, 3);
  assert.equal(
    (find(filterCpuid(s, { vcpuId: 3, vcpuCount: 4 }), 0x8000_001d, 0)[0]!.eax >>> 14) & 0xfff,
    0,
  );
});

test('smt with one vCPU changes nothing; with an odd count it is a programmer error', () => {
  const s = supported('GenuineIntel');
  assert.deepEqual(
    filterCpuid(s, { vcpuId: 0, vcpuCount: 1, smt: true }),
    filterCpuid(s, { vcpuId: 0, vcpuCount: 1 }),
  );
  assert.throws(() => filterCpuid(s, { vcpuId: 0, vcpuCount: 3, smt: true }), /even vCPU count/);
});

test('AMD: TOPOEXT set and the topology leaf present even when KVM does not list it', () => {
  const s = supported('AuthenticAMD').filter((e) => e.function !== 0x8000_001e);
  s.push(E(0x8000_0001, 0, 0, 0, 0x1, 0));
  const out = filterCpuid(s, { vcpuId: 1, vcpuCount: 2, smt: true });
  assert.equal(find(out, 0x8000_0001)[0]!.ecx, 0x1 | (1 << 22));
  assert.equal(find(out, 0x8000_0000)[0]!.eax, 0x8000_0021); // already past 0x8000_001e
  const l1e = find(out, 0x8000_001e);
  assert.equal(l1e.length, 1);
  assert.deepEqual([l1e[0]!.eax, l1e[0]!.ebx, l1e[0]!.ecx], [1, 0x100, 0]);
  const low = s.map((e) => (e.function === 0x8000_0000 ? { ...e, eax: 0x8000_0008 } : e));
  assert.equal(
    find(filterCpuid(low, { vcpuId: 0, vcpuCount: 1 }), 0x8000_0000)[0]!.eax,
    0x8000_001e,
  );
  // Intel: none of it.
  const intel = filterCpuid(supported('GenuineIntel'), { vcpuId: 0, vcpuCount: 1 });
  assert.equal(find(intel, 0x8000_0000)[0]!.eax, 0x8000_0021);
  assert.equal(find(intel, 0x8000_001e)[0]!.ebx, 0x103);
});

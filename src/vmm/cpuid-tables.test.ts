import { test } from 'node:test';
import assert from 'node:assert/strict';
import { filterCpuid } from '../arch/x86_64/cpuid.js';
import { encodeCpuid2 } from '../kvm/structs.js';
import type { CpuidEntry } from '../kvm/types.js';
import { cpuidTables } from './cpuid-tables.js';

const E = (fn: number, index: number, eax: number, ebx = 0, ecx = 0, edx = 0, flags = 0) =>
  ({ function: fn, index, flags, eax, ebx, ecx, edx }) satisfies CpuidEntry;
const word = (s: string, o: number) =>
  (s.charCodeAt(o) |
    (s.charCodeAt(o + 1) << 8) |
    (s.charCodeAt(o + 2) << 16) |
    (s.charCodeAt(o + 3) << 24)) >>>
  0;
/** A host's supported list, shaped like KVM's (leaf 0 names the vendor). */
function supported(vendor: string, topologyLeaf: boolean): CpuidEntry[] {
  return [
    E(0, 0, 0x1f, word(vendor, 0), word(vendor, 8), word(vendor, 4)),
    E(1, 0, 0x000806f8, 0x00ff0805, 0x01fa3223, 0x178bfbff),
    E(4, 0, 0x0121, 0, 0, 0, 1),
    E(4, 3, 0x0163, 0, 0, 0, 1),
    E(0xb, 0, 1, 2, 0x100, 7, 1),
    E(0xb, 1, 4, 8, 0x201, 7, 1),
    E(0x1f, 0, 1, 2, 0x100, 7, 1),
    E(0x4000_0000, 0, 0x4000_0001, 0x4b4d564b, 0x564b4d56, 0x4d),
    E(0x8000_0000, 0, 0x8000_0021),
    E(0x8000_0001, 0, 0, 0, 0x1, 0),
    E(0x8000_0008, 0, 0x3030, 0, 0x700f, 0),
    E(0x8000_001d, 0, 0x0121, 0, 0, 0, 1),
    ...(topologyLeaf ? [E(0x8000_001e, 0, 7, 0x103, 0x302)] : []),
  ];
}

test('cpuidTables: every vCPU’s bytes equal filterCpuid’s table encoded, for Intel and AMD, with and without SMT and the TSC leaf', () => {
  let checked = 0;
  for (const vendor of ['GenuineIntel', 'AuthenticAMD', 'HygonGenuine'])
    for (const topologyLeaf of [true, false])
      for (const n of [1, 2, 3, 8, 64, 255])
        for (const smt of [false, true]) {
          if (smt && n > 1 && n % 2 === 1) continue;
          for (const tscKhz of [undefined, 2_450_000]) {
            const s = supported(vendor, topologyLeaf);
            const o = { vcpuCount: n, smt, tscDeadline: true, ...(tscKhz ? { tscKhz } : {}) };
            const t = cpuidTables(s, o);
            assert.deepEqual(t.first, filterCpuid(s, { ...o, vcpuId: 0 }));
            for (const id of new Set([0, 1, n >> 1, n - 1].filter((i) => i < n))) {
              const want = encodeCpuid2(filterCpuid(s, { ...o, vcpuId: id }));
              assert.deepEqual(
                t.encoded(id),
                want,
                `${vendor} ${topologyLeaf} n=${n} smt=${smt} id=${id}`,
              );
              checked++;
            }
          }
        }
  assert.ok(checked > 200);
});

test('cpuidTables: each call gives a copy; a bad id is refused', () => {
  const t = cpuidTables(supported('AuthenticAMD', true), { vcpuCount: 4 });
  const a = t.encoded(2);
  a.fill(0);
  assert.notDeepEqual(t.encoded(2), a);
  for (const bad of [-1, 4, 1.5]) assert.throws(() => t.encoded(bad), /bad vCPU id/);
});

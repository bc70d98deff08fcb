/**
 * The CPUID table of every vCPU of one VM, encoded for KVM_SET_CPUID2 (arch/x86_64/cpuid.ts
 * filterCpuid says what is in it).
 */
import {
  AMD_TOPOLOGY_LEAF,
  amdTopology,
  cpuVendor,
  filterCpuid,
  type CpuidOptions,
} from '../arch/x86_64/cpuid.js';
import { CPUID_ENTRY_SIZE, encodeCpuid2 } from '../kvm/structs.js';
import type { CpuidEntry } from '../kvm/types.js';

/**
 * filterCpuid for each vCPU of one VM, encoded for KVM_SET_CPUID2: the table is made and
 * encoded once (for vCPU 0), and each vCPU's copy differs only where its APIC id goes (leaf 1
 * EBX[31:24], leaves 0xb and 0x1f EDX, AMD's 0x8000_001e). Equal, byte for byte, to
 * encodeCpuid2(filterCpuid(supported, { ...o, vcpuId })) (cpuid.test.ts checks it), without
 * doing that work per vCPU: 64 times over was enough for V8 to optimize it at start-up
 * (~2 MiB of RSS, issue 18).
 */
export function cpuidTables(
  supported: readonly CpuidEntry[],
  o: Omit<CpuidOptions, 'vcpuId'>,
): { first: CpuidEntry[]; encoded(id: number): Uint8Array } {
  const first = filterCpuid(supported, { ...o, vcpuId: 0 });
  const base = encodeCpuid2(first);
  const n = o.vcpuCount;
  const threadBits = o.smt === true && n > 1 ? 1 : 0;
  const vendor = cpuVendor(supported);
  const amd = vendor === 'AuthenticAMD' || vendor === 'HygonGenuine';
  const patched: Array<{ at: number; entry: CpuidEntry }> = [];
  first.forEach((entry, i) => {
    const f = entry.function;
    if (f === 1 || f === 0xb || f === 0x1f || (amd && f === AMD_TOPOLOGY_LEAF))
      patched.push({ at: 8 + i * CPUID_ENTRY_SIZE, entry });
  });
  return {
    first,
    encoded(id: number): Uint8Array {
      if (!Number.isInteger(id) || id < 0 || id >= n)
        throw new Error(`bad vCPU id ${id} / count ${n}`);
      if (id === 0) return base.slice();
      const b = base.slice();
      const v = new DataView(b.buffer);
      for (const { at, entry: e } of patched) {
        if (e.function === 1)
          v.setUint32(at + 16, ((e.ebx & 0x00ff_ffff) | (id << 24)) >>> 0, true);
        else if (e.function === AMD_TOPOLOGY_LEAF) {
          const t = amdTopology(id, threadBits);
          v.setUint32(at + 12, t.eax >>> 0, true);
          v.setUint32(at + 16, t.ebx >>> 0, true);
        } else v.setUint32(at + 24, id >>> 0, true);
      }
      return b;
    },
  };
}

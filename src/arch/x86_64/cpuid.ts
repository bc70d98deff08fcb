/**
 * Per-vCPU CPUID, derived from KVM_GET_SUPPORTED_CPUID the way Firecracker normalizes it: give
 * each vCPU its APIC id, describe a flat topology (one socket of vcpuCount logical processors:
 * one thread per core, or two with `smt`, APIC id bit 0 then being the thread), mark the hypervisor, hide the PMU, and advertise the KVM paravirt leaves (kvmclock)
 * plus the TSC frequency leaf so a guest without PIT/HPET does not hang calibrating the TSC.
 * Leaves not named here are passed through as KVM reports them.
 */
import { CPUID_FLAG_SIGNIFICANT_INDEX, type CpuidEntry } from '../../kvm/types.js';

export interface CpuidOptions {
  /** This vCPU's index, used as its (x2)APIC id: 0..vcpuCount-1, as in the MP table/MADT. */
  vcpuId: number;
  vcpuCount: number;
  /**
   * machine-config smt: two threads per core (vcpuCount must then be 1 or even; with one vCPU it
   * changes nothing, as in Firecracker).
   */
  smt?: boolean;
  /** Guest TSC frequency in kHz: adds leaf 0x40000010 (EAX = TSC kHz, EBX = APIC bus kHz). */
  tscKhz?: number;
  /** Set (true) or clear (false) TSC-deadline in leaf 1 ECX; undefined keeps KVM's value. */
  tscDeadline?: boolean;
}

export const KVM_SIGNATURE_LEAF = 0x4000_0000;
export const KVM_FEATURES_LEAF = 0x4000_0001;
export const TSC_FREQ_LEAF = 0x4000_0010;
/** KVM's local APIC timer ticks once per nanosecond: a 1 GHz bus, in kHz. */
export const KVM_APIC_BUS_KHZ = 1_000_000;
const KVM_SIG = { ebx: 0x4b4d564b, ecx: 0x564b4d56, edx: 0x0000004d }; // "KVMKVMKVM\0\0\0"

const LEAF1_ECX_TSC_DEADLINE = 1 << 24;
const LEAF1_ECX_HYPERVISOR = 1 << 31;
const LEAF1_EDX_HTT = 1 << 28;
/** AMD extended APIC id / core / node leaf, and its feature bit (0x8000_0001 ECX). */
export const AMD_TOPOLOGY_LEAF = 0x8000_001e;
const AMD_ECX_TOPOEXT = 1 << 22;

/** Leaf 0x8000_001e: extended APIC id, core id and threads per core - 1, node 0 of 1. */
export function amdTopology(id: number, threadBits: number) {
  return {
    eax: id,
    ebx: ((id >> threadBits) & 0xff) | (((1 << threadBits) - 1) << 8),
    ecx: 0,
    edx: 0,
  };
}
/** CLFLUSH line size in 8-byte units (64 bytes), leaf 1 EBX[15:8]. */
const CLFLUSH_LINE_QWORDS = 8;

export function cpuVendor(entries: readonly CpuidEntry[]): string {
  const l0 = entries.find((e) => e.function === 0);
  if (!l0) return '';
  let s = '';
  for (const r of [l0.ebx, l0.edx, l0.ecx]) {
    for (let i = 0; i < 4; i++) s += String.fromCharCode((r >>> (8 * i)) & 0xff);
  }
  return s;
}

/** Bits needed to number n ids (ceil(log2 n)); 0 for n <= 1. */
export function idBits(n: number): number {
  let b = 0;
  while (1 << b < n) b++;
  return b;
}

export function filterCpuid(supported: readonly CpuidEntry[], o: CpuidOptions): CpuidEntry[] {
  const { vcpuId: id, vcpuCount: n } = o;
  if (!Number.isInteger(n) || n < 1 || n > 255 || !Number.isInteger(id) || id < 0 || id >= n) {
    throw new Error(`bad vCPU id ${id} / count ${n}`);
  }
  if (o.smt === true && n > 1 && n % 2 === 1)
    throw new Error(`smt needs an even vCPU count (got ${n})`);
  // Bits of the APIC id that number the threads of a core, and threads per core.
  const threadBits = o.smt === true && n > 1 ? 1 : 0;
  const perCore = 1 << threadBits;
  const vendor = cpuVendor(supported);
  const amd = vendor === 'AuthenticAMD' || vendor === 'HygonGenuine';
  const has = (fn: number) => supported.some((e) => e.function === fn);
  const out: CpuidEntry[] = [];

  for (const src of supported) {
    const e = { ...src };
    switch (e.function) {
      case 1:
        e.ebx =
          ((e.ebx & 0xff) |
            (CLFLUSH_LINE_QWORDS << 8) |
            (Math.min(1 << idBits(n), 0xff) << 16) |
            (id << 24)) >>>
          0;
        e.ecx = (e.ecx | LEAF1_ECX_HYPERVISOR) >>> 0;
        if (o.tscDeadline === true) e.ecx = (e.ecx | LEAF1_ECX_TSC_DEADLINE) >>> 0;
        if (o.tscDeadline === false) e.ecx = (e.ecx & ~LEAF1_ECX_TSC_DEADLINE) >>> 0;
        e.edx = (n > 1 ? e.edx | LEAF1_EDX_HTT : e.edx & ~LEAF1_EDX_HTT) >>> 0;
        break;
      case 4: // deterministic cache parameters (Intel)
      case 0x8000_001d: // the AMD equivalent (no cores field)
        if ((e.eax & 0x1f) === 0) break; // no more caches
        {
          const level = (e.eax >>> 5) & 7;
          // L1/L2 shared by a core's threads, L3 by the socket
          const sharing = level <= 2 ? perCore - 1 : n - 1;
          e.eax = ((e.eax & 0x3fff) | ((sharing & 0xfff) << 14)) >>> 0;
          const cores = Math.min(n / perCore, 64);
          if (e.function === 4) e.eax = (e.eax | (((cores - 1) & 0x3f) << 26)) >>> 0;
        }
        break;
      case 6: // thermal and power: no turbo boost, no energy-performance bias MSR
        e.eax = (e.eax & ~(1 << 1)) >>> 0;
        e.ecx = (e.ecx & ~(1 << 3)) >>> 0;
        break;
      case 0xa: // architectural PMU: none
        e.eax = e.ebx = e.ecx = e.edx = 0;
        break;
      case 0xb:
      case 0x1f:
        continue; // replaced below
      case KVM_SIGNATURE_LEAF:
        Object.assign(e, KVM_SIG);
        if (o.tscKhz !== undefined && e.eax < TSC_FREQ_LEAF) e.eax = TSC_FREQ_LEAF;
        break;
      case TSC_FREQ_LEAF:
        if (o.tscKhz !== undefined) continue; // replaced below
        break;
      case 0x8000_0000: // AMD: the extended leaves reach 0x8000_001e (topology, below)
        if (amd && e.eax < AMD_TOPOLOGY_LEAF) e.eax = AMD_TOPOLOGY_LEAF;
        break;
      case 0x8000_0001: // AMD: TOPOEXT, so that Linux reads threads per core from 0x8000_001e
        if (amd) e.ecx = (e.ecx | AMD_ECX_TOPOEXT) >>> 0;
        break;
      case 0x8000_0008:
        if (amd) e.ecx = ((e.ecx & ~0xf0ff) | ((n - 1) & 0xff) | (idBits(n) << 12)) >>> 0;
        break;
      case AMD_TOPOLOGY_LEAF:
        if (amd) Object.assign(e, amdTopology(id, threadBits));
        break;
    }
    out.push(e);
  }
  // As Firecracker: an AMD guest always has the topology leaf (KVM may not list it).
  if (amd && !has(AMD_TOPOLOGY_LEAF))
    out.push({ function: AMD_TOPOLOGY_LEAF, index: 0, flags: 0, ...amdTopology(id, threadBits) });

  for (const leaf of [0xb, 0x1f]) {
    if (has(leaf)) out.push(...extendedTopology(leaf, id, n, threadBits));
  }
  if (o.tscKhz !== undefined) {
    if (!has(KVM_SIGNATURE_LEAF))
      out.push({
        function: KVM_SIGNATURE_LEAF,
        index: 0,
        flags: 0,
        eax: TSC_FREQ_LEAF,
        ...KVM_SIG,
      });
    out.push({
      function: TSC_FREQ_LEAF,
      index: 0,
      flags: 0,
      eax: o.tscKhz >>> 0,
      ebx: KVM_APIC_BUS_KHZ,
      ecx: 0,
      edx: 0,
    });
  }
  return out;
}

/**
 * Leaf 0xb / 0x1f: level 0 = SMT (2^threadBits threads per core, shift = threadBits), level 1
 * = core (n logical processors, shift = bits for n), then an invalid level that ends the
 * enumeration. EDX = x2APIC id.
 */
function extendedTopology(leaf: number, id: number, n: number, threadBits: number): CpuidEntry[] {
  const f = CPUID_FLAG_SIGNIFICANT_INDEX;
  const shift = Math.max(idBits(n), threadBits);
  return [
    {
      function: leaf,
      index: 0,
      flags: f,
      eax: threadBits,
      ebx: 1 << threadBits,
      ecx: 0 | (1 << 8),
      edx: id,
    },
    { function: leaf, index: 1, flags: f, eax: shift, ebx: n, ecx: 1 | (2 << 8), edx: id },
    { function: leaf, index: 2, flags: f, eax: 0, ebx: 0, ecx: 2, edx: id },
  ];
}

/**
 * The Intel MultiProcessor table (MP spec 1.4, chapter 4) at MPTABLE_START, for minimal kernels
 * built without ACPI (CONFIG_X86_MPPARSE). Linux scans the first KiB of the EBDA for the floating
 * pointer, which is where MPTABLE_START is; the configuration table follows it directly.
 *
 *   floating pointer (16) | header (44) | processor x n (20) | bus ISA (8) | IOAPIC (8)
 *   | I/O interrupt x 24 (8) | local interrupt x 2 (8)
 */
import type { GuestMemory } from '../../memory/guest-memory.js';
import { ConfigError } from '../../util/errors.js';
import { type Result, err, ok } from '../../util/result.js';
import { writeChecked } from './boot-params.js';
import { IOAPIC_ADDR, LAPIC_ADDR, MAX_VCPUS, MPTABLE_START, RSDP_ADDR } from './layout.js';

const MPF_SIZE = 16;
const HEADER_SIZE = 44;
const CPU_SIZE = 20;
const ENTRY_SIZE = 8;
const SPEC_REV = 4; // MP spec 1.4
const APIC_VERSION = 0x14;
const IOAPIC_VERSION = 0x11;
export const IOAPIC_PINS = 24;
const CPU_ENABLED = 1;
const CPU_BSP = 2;
/** Processor signature family 6 and feature flags FPU | APIC (only informational for Linux). */
const CPU_SIGNATURE = 0x600;
const CPU_FEATURES = 0x201;
const ISA_BUS_ID = 0;
const ENTRY = { processor: 0, bus: 1, ioapic: 2, ioInterrupt: 3, localInterrupt: 4 } as const;
const INT_TYPE = { int: 0, nmi: 1, extInt: 3 } as const;

export function mptableSize(vcpus: number): number {
  return MPF_SIZE + HEADER_SIZE + vcpus * CPU_SIZE + ENTRY_SIZE * (2 + IOAPIC_PINS + 2);
}

/** The table bytes for `vcpus` processors (APIC ids 0..n-1, the IOAPIC gets id n). */
export function buildMptable(vcpus: number): Result<Uint8Array, ConfigError> {
  if (!Number.isInteger(vcpus) || vcpus < 1 || vcpus > MAX_VCPUS) {
    return err(new ConfigError(`MP table: ${vcpus} vCPUs is not supported (1..${MAX_VCPUS})`));
  }
  const size = mptableSize(vcpus);
  // It must stay below the ACPI area (RSDP at 0xe0000) that another builder fills.
  if (MPTABLE_START + size > RSDP_ADDR) {
    return err(
      new ConfigError(`MP table for ${vcpus} vCPUs does not fit below 0x${RSDP_ADDR.toString(16)}`),
    );
  }
  const b = new Uint8Array(size);
  const dv = new DataView(b.buffer);
  const ascii = (at: number, s: string) => {
    for (let i = 0; i < s.length; i++) b[at + i] = s.charCodeAt(i);
  };
  const cfg = MPF_SIZE; // the configuration table starts right after the floating pointer
  const ioapicId = vcpus;

  // Floating pointer structure (MP spec 4.1).
  ascii(0, '_MP_');
  dv.setUint32(4, MPTABLE_START + cfg, true);
  b[8] = 1; // length in 16-byte units
  b[9] = SPEC_REV;
  // feature bytes 1..5 stay 0: a configuration table is present; no IMCR (virtual wire mode)

  // Configuration table header (MP spec 4.2).
  ascii(cfg, 'PCMP');
  dv.setUint16(cfg + 4, size - MPF_SIZE, true);
  b[cfg + 6] = SPEC_REV;
  ascii(cfg + 8, 'TYPERVSR');
  ascii(cfg + 16, 'TYPERVISOR  ');
  dv.setUint16(cfg + 34, vcpus + 2 + IOAPIC_PINS + 2, true); // entry count
  dv.setUint32(cfg + 36, LAPIC_ADDR, true);

  let p = cfg + HEADER_SIZE;
  for (let id = 0; id < vcpus; id++) {
    b[p] = ENTRY.processor;
    b[p + 1] = id;
    b[p + 2] = APIC_VERSION;
    b[p + 3] = CPU_ENABLED | (id === 0 ? CPU_BSP : 0);
    dv.setUint32(p + 4, CPU_SIGNATURE, true);
    dv.setUint32(p + 8, CPU_FEATURES, true);
    p += CPU_SIZE;
  }
  b[p] = ENTRY.bus;
  b[p + 1] = ISA_BUS_ID;
  ascii(p + 2, 'ISA   ');
  p += ENTRY_SIZE;
  b[p] = ENTRY.ioapic;
  b[p + 1] = ioapicId;
  b[p + 2] = IOAPIC_VERSION;
  b[p + 3] = 1; // enabled
  dv.setUint32(p + 4, IOAPIC_ADDR, true);
  p += ENTRY_SIZE;
  // Identity-map ISA IRQ n to IOAPIC pin n; flags 0 = polarity/trigger conform to the bus.
  for (let irq = 0; irq < IOAPIC_PINS; irq++) {
    b[p] = ENTRY.ioInterrupt;
    b[p + 1] = INT_TYPE.int;
    b[p + 4] = ISA_BUS_ID;
    b[p + 5] = irq;
    b[p + 6] = ioapicId;
    b[p + 7] = irq;
    p += ENTRY_SIZE;
  }
  // LINT0 is ExtINT (the PIC in virtual wire mode), LINT1 the NMI, on every local APIC (0xff).
  for (const [type, lint] of [
    [INT_TYPE.extInt, 0],
    [INT_TYPE.nmi, 1],
  ] as const) {
    b[p] = ENTRY.localInterrupt;
    b[p + 1] = type;
    b[p + 4] = ISA_BUS_ID;
    b[p + 5] = 0;
    b[p + 6] = 0xff;
    b[p + 7] = lint;
    p += ENTRY_SIZE;
  }
  b[cfg + 7] = checksum(b.subarray(cfg));
  b[10] = checksum(b.subarray(0, MPF_SIZE));
  return ok(b);
}

export function writeMptable(mem: GuestMemory, vcpus: number): Result<void, Error> {
  const t = buildMptable(vcpus);
  if (!t.ok) return t;
  return writeChecked(mem, MPTABLE_START, t.value, 'MP table');
}

/** The byte that makes the sum of all bytes 0 mod 256 (the checksum byte itself must be 0). */
function checksum(bytes: Uint8Array): number {
  let s = 0;
  for (const x of bytes) s = (s + x) & 0xff;
  return (256 - s) & 0xff;
}

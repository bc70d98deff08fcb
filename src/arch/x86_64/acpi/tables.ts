/**
 * ACPI tables as byte arrays (ACPI 6.5 §5.2). Pure functions: addresses come in as arguments and
 * index.ts decides where everything goes. Every system description table has the 36-byte header
 * (§5.2.6) and a checksum that makes the sum of all its bytes zero.
 */
import {
  arg,
  concat,
  device,
  eisaId,
  ifOp,
  integer,
  interrupt,
  io,
  lEqual,
  memory32Fixed,
  method,
  name,
  notify,
  pkg,
  resourceTemplate,
  scope,
  string,
  checksumByte,
  ZERO,
  type Aml,
} from './aml.js';

export const OEM_ID = 'TYPVSR';
const OEM_REVISION = 1;
const CREATOR_ID = 'TYPV';
const CREATOR_REVISION = 1;
export const HEADER_SIZE = 36;

function ascii(s: string, len: number): Uint8Array {
  if (s.length !== len || !/^[\x20-\x7e]*$/.test(s))
    throw new Error(`'${s}' is not ${len} ASCII chars`);
  return Uint8Array.from(s, (c) => c.charCodeAt(0));
}

/** Sum of all bytes modulo 256 (0 for a valid table). */
export function byteSum(bytes: Uint8Array): number {
  let sum = 0;
  for (const b of bytes) sum = (sum + b) & 0xff;
  return sum;
}

/** A complete table: header + body, with its length and checksum filled in. */
export function sdt(
  signature: string,
  revision: number,
  oemTableId: string,
  body: Uint8Array,
): Uint8Array {
  const t = new Uint8Array(HEADER_SIZE + body.length);
  const v = new DataView(t.buffer);
  t.set(ascii(signature, 4), 0);
  v.setUint32(4, t.length, true);
  v.setUint8(8, revision);
  // offset 9: checksum, filled last
  t.set(ascii(OEM_ID, 6), 10);
  t.set(ascii(oemTableId, 8), 16);
  v.setUint32(24, OEM_REVISION, true);
  t.set(ascii(CREATOR_ID, 4), 28);
  v.setUint32(32, CREATOR_REVISION, true);
  t.set(body, HEADER_SIZE);
  t[9] = checksumByte(t);
  return t;
}

/** RSDP for ACPI 2.0+ (§5.2.5.3): 36 bytes, checksum over the first 20, extended over all 36. */
export function buildRsdp(xsdtAddr: number): Uint8Array {
  const t = new Uint8Array(36);
  const v = new DataView(t.buffer);
  t.set(ascii('RSD PTR ', 8), 0);
  t.set(ascii(OEM_ID, 6), 9);
  v.setUint8(15, 2); // revision 2: ACPI 2.0 and later
  v.setUint32(16, 0, true); // no RSDT: XSDT only
  v.setUint32(20, 36, true);
  v.setBigUint64(24, BigInt(xsdtAddr), true);
  t[8] = checksumByte(t.subarray(0, 20));
  t[32] = checksumByte(t);
  return t;
}

/** XSDT (§5.2.8): 64-bit addresses of the other tables (not the DSDT, which the FADT names). */
export function buildXsdt(tableAddrs: readonly number[]): Uint8Array {
  const body = new Uint8Array(8 * tableAddrs.length);
  const v = new DataView(body.buffer);
  tableAddrs.forEach((a, i) => v.setBigUint64(8 * i, BigInt(a), true));
  return sdt('XSDT', 1, 'TYPVXSDT', body);
}

// ---- FADT (§5.2.9, Table 5.9): revision 6, 276 bytes ----
export const FADT_SIZE = 276;
/** Field offsets inside the FADT, from the start of the table. */
export const FADT_OFF = {
  firmwareCtrl: 36,
  dsdt: 40,
  sciInt: 46,
  iapcBootArch: 109,
  flags: 112,
  resetReg: 116,
  resetValue: 128,
  minorVersion: 131,
  xFirmwareCtrl: 132,
  xDsdt: 140,
  sleepControlReg: 244,
  sleepStatusReg: 256,
  hypervisorVendorId: 268,
} as const;
/** FADT flags (Table 5.10). */
export const FADT_F_PWR_BUTTON = 1 << 4; // set: no fixed-feature power button
export const FADT_F_SLP_BUTTON = 1 << 5; // set: no fixed-feature sleep button
export const FADT_F_RESET_REG_SUP = 1 << 10;
export const FADT_F_HW_REDUCED_ACPI = 1 << 20;
/** IA-PC boot architecture flags (Table 5.11). */
export const IAPC_8042 = 1 << 1;
export const IAPC_VGA_NOT_PRESENT = 1 << 2;
export const IAPC_CMOS_RTC_NOT_PRESENT = 1 << 5;

/** Generic Address Structure (§5.2.3.2) for a byte-wide register in system memory. */
function gasByteInMemory(v: DataView, off: number, addr: number): void {
  v.setUint8(off, 0); // address space: SystemMemory
  v.setUint8(off + 1, 8); // register bit width
  v.setUint8(off + 2, 0); // bit offset
  v.setUint8(off + 3, 1); // access size: byte
  v.setBigUint64(off + 4, BigInt(addr), true);
}

export interface FadtParams {
  dsdtAddr: number;
  sleepControlAddr: number;
  sleepStatusAddr: number;
  resetAddr: number;
  resetValue: number;
}

/**
 * A hardware-reduced FADT: no PM1/GPE blocks, no SCI, no FACS (Linux's ACPICA accepts a missing
 * FACS when HW_REDUCED_ACPI is set). Sleep goes through SLEEP_CONTROL_REG/SLEEP_STATUS_REG, reboot
 * through RESET_REG. IAPC_BOOT_ARCH: there is an i8042 (without the 8042 flag Linux marks it
 * "firmware absent"), no VGA, and the CMOS RTC *is* present (we emulate it at 0x70; setting
 * CMOS_RTC_NOT_PRESENT would make Linux drop the legacy rtc_cmos device and its wall clock).
 */
export function buildFadt(p: FadtParams): Uint8Array {
  const body = new Uint8Array(FADT_SIZE - HEADER_SIZE);
  const v = new DataView(body.buffer);
  const at = (off: number) => off - HEADER_SIZE;
  // FIRMWARE_CTRL, DSDT (32-bit), SCI_INT, X_FIRMWARE_CTRL stay 0: X_DSDT is used instead of DSDT
  // (the spec wants DSDT zero when X_DSDT is set).
  v.setUint16(at(FADT_OFF.iapcBootArch), IAPC_8042 | IAPC_VGA_NOT_PRESENT, true);
  v.setUint32(
    at(FADT_OFF.flags),
    FADT_F_HW_REDUCED_ACPI | FADT_F_RESET_REG_SUP | FADT_F_PWR_BUTTON | FADT_F_SLP_BUTTON,
    true,
  );
  gasByteInMemory(v, at(FADT_OFF.resetReg), p.resetAddr);
  v.setUint8(at(FADT_OFF.resetValue), p.resetValue);
  v.setUint8(at(FADT_OFF.minorVersion), 5); // ACPI 6.5
  v.setBigUint64(at(FADT_OFF.xDsdt), BigInt(p.dsdtAddr), true);
  gasByteInMemory(v, at(FADT_OFF.sleepControlReg), p.sleepControlAddr);
  gasByteInMemory(v, at(FADT_OFF.sleepStatusReg), p.sleepStatusAddr);
  body.set(ascii('TYPVSR  ', 8), at(FADT_OFF.hypervisorVendorId));
  return sdt('FACP', 6, 'TYPVFACP', body);
}

// ---- MADT (§5.2.12) ----
export const MADT_TYPE_LOCAL_APIC = 0;
export const MADT_TYPE_IOAPIC = 1;
export const MADT_TYPE_INT_SRC_OVERRIDE = 2;
export const MADT_TYPE_LOCAL_APIC_NMI = 4;

export interface MadtParams {
  vcpus: number;
  lapicAddr: number;
  ioapicAddr: number;
  /** Add ISA IRQ0 -> GSI 2 (only when the VMM routes the PIT's GSI 0 to IOAPIC pin 2). */
  irq0ToGsi2: boolean;
}

/**
 * MADT: one enabled Processor Local APIC per vCPU (processor UID = APIC id = index), one I/O APIC
 * (id = vcpus so it never equals a local APIC id, GSI base 0), optionally IRQ0 -> GSI2, and LINT1
 * as NMI on every processor. Flags 0: no PCAT_COMPAT, since a hardware-reduced Linux never uses
 * the 8259s (it installs null_legacy_pic) and x86 Linux does not read the flag anyway.
 */
export function buildMadt(p: MadtParams): Uint8Array {
  const entries: Uint8Array[] = [];
  const fixed = new Uint8Array(8);
  new DataView(fixed.buffer).setUint32(0, p.lapicAddr, true); // flags at 4..7 stay 0
  for (let i = 0; i < p.vcpus; i++) {
    entries.push(Uint8Array.of(MADT_TYPE_LOCAL_APIC, 8, i, i, 1, 0, 0, 0)); // flags: Enabled
  }
  const ioapic = new Uint8Array(12);
  const iv = new DataView(ioapic.buffer);
  iv.setUint8(0, MADT_TYPE_IOAPIC);
  iv.setUint8(1, 12);
  iv.setUint8(2, p.vcpus); // I/O APIC id
  iv.setUint32(4, p.ioapicAddr, true);
  iv.setUint32(8, 0, true); // GSI base
  entries.push(ioapic);
  if (p.irq0ToGsi2) {
    // bus 0 (ISA), source IRQ 0, GSI 2, flags 0 (conforms to the bus: edge, active high)
    entries.push(Uint8Array.of(MADT_TYPE_INT_SRC_OVERRIDE, 10, 0, 0, 2, 0, 0, 0, 0, 0));
  }
  // processor UID 0xFF = all processors, flags 0 (conforms), LINT1
  entries.push(Uint8Array.of(MADT_TYPE_LOCAL_APIC_NMI, 6, 0xff, 0, 0, 1));
  return sdt('APIC', 5, 'TYPVAPIC', concat([fixed, ...entries]));
}

// ---- DSDT (§5.2.11.1) ----
export interface DsdtParams {
  virtio: ReadonlyArray<{ addr: number; size: number; gsi: number }>;
  serial: { port: number; irq: number };
  i8042: { dataPort: number; cmdPort: number; irq: number };
  s5SlpTyp: number;
  /** The VM generation id's guest address and the GSI of the GED that announces a new one. */
  vmgenid?: { addr: number; gsi: number };
}

/**
 * Edge-triggered, active-high, exclusive, as Firecracker declares its devices: our interrupts
 * are KVM irqfds, which pulse a GSI (an edge); a level line would need a resample eventfd and
 * an EOI round trip to lower it.
 */
const EDGE_HIGH: Parameters<typeof interrupt>[0] = {
  consumer: true,
  edge: true,
  activeLow: false,
  shared: false,
};

/**
 * The DSDT (revision 2: 64-bit integers). \_S5_ tells Linux which SLP_TYP means "off"; \_SB_
 * holds COM1 (PNP0501), the i8042 keyboard controller (PNP0303, data port then command port, as
 * Linux's i8042 PNP probe expects) and one LNRO0005 device per virtio-mmio window (the id
 * Linux's virtio_mmio driver matches in its ACPI table).
 */
export function buildDsdt(p: DsdtParams): Uint8Array {
  const com1 = device(
    'COM1',
    name('_HID', eisaId('PNP0501')),
    name('_UID', ZERO),
    name('_DDN', string('COM1')),
    name(
      '_CRS',
      resourceTemplate(io(p.serial.port, p.serial.port, 1, 8), interrupt(EDGE_HIGH, p.serial.irq)),
    ),
  );
  const ps2 = device(
    'PS2_',
    name('_HID', eisaId('PNP0303')),
    name(
      '_CRS',
      resourceTemplate(
        io(p.i8042.dataPort, p.i8042.dataPort, 1, 1),
        io(p.i8042.cmdPort, p.i8042.cmdPort, 1, 1),
        interrupt(EDGE_HIGH, p.i8042.irq),
      ),
    ),
  );
  const virtio = p.virtio.map((d, i) =>
    device(
      `V${i.toString().padStart(3, '0')}`,
      name('_HID', string('LNRO0005')),
      name('_UID', integer(i)),
      name(
        '_CRS',
        resourceTemplate(memory32Fixed(true, d.addr, d.size), interrupt(EDGE_HIGH, d.gsi)),
      ),
    ),
  );
  const aml = concat([
    name('_S5_', pkg(integer(p.s5SlpTyp), ZERO)),
    scope('\\_SB_', com1, ps2, ...virtio, ...(p.vmgenid ? vmgenidDevices(p.vmgenid) : [])),
  ]);
  return sdt('DSDT', 2, 'TYPVDSDT', aml);
}

/**
 * The VM generation id (Microsoft's "Virtual Machine Generation ID" spec, as Firecracker and
 * QEMU declare it): VGEN, matched by Linux's vmgenid driver on _HID "VMGENCTR" or _CID
 * "VM_Gen_Counter", whose ADDR package gives the id's guest address (low, high dword); and a
 * Generic Event Device (ACPI0013, Linux's evged) with one edge GSI whose _EVT does
 * Notify(VGEN, 0x80), upon which the driver re-reads the id and reseeds the guest's RNG.
 */
export function vmgenidDevices(v: { addr: number; gsi: number }): Aml[] {
  if (!Number.isSafeInteger(v.addr) || v.addr < 0 || v.addr % 8 !== 0)
    throw new RangeError(`VMGenID address 0x${v.addr.toString(16)} must be 8-byte aligned`);
  const vgen = device(
    'VGEN',
    name('_HID', string('VMGENCTR')),
    name('_CID', string('VM_Gen_Counter')),
    name('_DDN', string('VM_Gen_Counter')),
    name('ADDR', pkg(integer(v.addr % 0x1_0000_0000), integer(Math.floor(v.addr / 0x1_0000_0000)))),
  );
  const ged = device(
    'GED_',
    name('_HID', string('ACPI0013')),
    name('_CRS', resourceTemplate(interrupt(EDGE_HIGH, v.gsi))),
    method(
      '_EVT',
      1,
      true,
      ifOp(lEqual(arg(0), integer(v.gsi)), notify('\\_SB_.VGEN', integer(0x80))),
    ),
  );
  return [vgen, ged];
}

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { GuestMemory } from '../../../memory/guest-memory.js';
import {
  ACPI_RESET_ADDR,
  ACPI_TABLES_END,
  ACPI_TABLES_START,
  ACPI_SLEEP_CTL_ADDR,
  ACPI_SLEEP_STS_ADDR,
  IOAPIC_ADDR,
  LAPIC_ADDR,
  RSDP_ADDR,
  VMGENID_ADDR,
  VMGENID_GSI,
} from '../layout.js';
import { acpiBootHook, buildAcpiTables, writeAcpiTables } from './index.js';
import {
  FADT_F_HW_REDUCED_ACPI,
  FADT_F_RESET_REG_SUP,
  FADT_OFF,
  FADT_SIZE,
  IAPC_8042,
  IAPC_CMOS_RTC_NOT_PRESENT,
  IAPC_VGA_NOT_PRESENT,
  buildMadt,
  byteSum,
} from './tables.js';

const dv = (b: Uint8Array) => new DataView(b.buffer, b.byteOffset, b.byteLength);
const text = (b: Uint8Array, off: number, len: number) =>
  Buffer.from(b.subarray(off, off + len)).toString('latin1');

function tables(vcpus = 2, virtio = [{ addr: 0xc000_1000, gsi: 5 }]) {
  const r = buildAcpiTables({ vcpus, virtio });
  assert.ok(r.ok);
  const bySig = new Map(r.value.tables.map((t) => [t.signature, t]));
  const get = (sig: string) => {
    const t = bySig.get(sig);
    assert.ok(t, sig);
    return t;
  };
  return { blob: r.value, get };
}

test('every table sums to zero and has a consistent header', () => {
  const { blob } = tables();
  for (const t of blob.tables) {
    if (t.signature === 'RSD PTR ') continue;
    assert.equal(byteSum(t.bytes), 0, `${t.signature} checksum`);
    assert.equal(text(t.bytes, 0, 4), t.signature);
    assert.equal(dv(t.bytes).getUint32(4, true), t.bytes.length, `${t.signature} length`);
    assert.equal(text(t.bytes, 10, 6), 'TYPVSR');
    assert.ok(t.addr >= ACPI_TABLES_START && t.addr + t.bytes.length <= ACPI_TABLES_END);
    assert.equal(t.addr % 8, 0);
  }
});

test('RSDP: signature, revision 2, XSDT address, both checksums', () => {
  const { blob, get } = tables();
  const rsdp = get('RSD PTR ');
  assert.equal(rsdp.addr, RSDP_ADDR);
  assert.equal(blob.rsdpAddr, RSDP_ADDR);
  const b = rsdp.bytes;
  assert.equal(b.length, 36);
  assert.equal(text(b, 0, 8), 'RSD PTR ');
  assert.equal(byteSum(b.subarray(0, 20)), 0, 'ACPI 1.0 checksum');
  assert.equal(byteSum(b), 0, 'extended checksum');
  assert.equal(text(b, 9, 6), 'TYPVSR');
  assert.equal(b[15], 2);
  assert.equal(dv(b).getUint32(16, true), 0, 'no RSDT');
  assert.equal(dv(b).getUint32(20, true), 36);
  assert.equal(Number(dv(b).getBigUint64(24, true)), get('XSDT').addr);
});

test('XSDT lists the FADT and the MADT', () => {
  const { get } = tables();
  const x = get('XSDT').bytes;
  assert.equal(x.length, 36 + 16);
  assert.equal(Number(dv(x).getBigUint64(36, true)), get('FACP').addr);
  assert.equal(Number(dv(x).getBigUint64(44, true)), get('APIC').addr);
});

test('FADT: hardware-reduced, registers and flags at their spec offsets', () => {
  const { get } = tables();
  const f = get('FACP').bytes;
  const v = dv(f);
  assert.equal(f.length, FADT_SIZE);
  assert.equal(f[8], 6, 'revision');
  assert.equal(f[FADT_OFF.minorVersion], 5);
  const flags = v.getUint32(FADT_OFF.flags, true);
  assert.ok(flags & FADT_F_HW_REDUCED_ACPI);
  assert.ok(flags & FADT_F_RESET_REG_SUP);
  assert.equal(flags & (1 << 21), 0, 'not LOW_POWER_S0_IDLE_CAPABLE');
  const boot = v.getUint16(FADT_OFF.iapcBootArch, true);
  assert.equal(boot, IAPC_8042 | IAPC_VGA_NOT_PRESENT);
  assert.equal(boot & IAPC_CMOS_RTC_NOT_PRESENT, 0);
  assert.equal(v.getUint32(FADT_OFF.firmwareCtrl, true), 0, 'no FACS');
  assert.equal(v.getUint32(FADT_OFF.dsdt, true), 0, '32-bit DSDT unused');
  assert.equal(v.getBigUint64(FADT_OFF.xFirmwareCtrl, true), 0n);
  assert.equal(Number(v.getBigUint64(FADT_OFF.xDsdt, true)), get('DSDT').addr);
  const gas = (off: number) => ({
    space: f[off],
    width: f[off + 1],
    offset: f[off + 2],
    access: f[off + 3],
    addr: Number(v.getBigUint64(off + 4, true)),
  });
  const byteReg = (addr: number) => ({ space: 0, width: 8, offset: 0, access: 1, addr });
  assert.deepEqual(gas(FADT_OFF.sleepControlReg), byteReg(ACPI_SLEEP_CTL_ADDR));
  assert.deepEqual(gas(FADT_OFF.sleepStatusReg), byteReg(ACPI_SLEEP_STS_ADDR));
  assert.deepEqual(gas(FADT_OFF.resetReg), byteReg(ACPI_RESET_ADDR));
  assert.equal(ACPI_RESET_ADDR, ACPI_SLEEP_STS_ADDR + 1);
  assert.equal(f[FADT_OFF.resetValue], 1);
  assert.equal(text(f, FADT_OFF.hypervisorVendorId, 8), 'TYPVSR  ');
});

function madtEntries(m: Uint8Array): Array<{ type: number; bytes: Uint8Array }> {
  const out = [];
  for (let off = 44; off < m.length;) {
    const len = m[off + 1]!;
    assert.ok(len >= 2 && off + len <= m.length, 'entry inside the table');
    out.push({ type: m[off]!, bytes: m.subarray(off, off + len) });
    off += len;
  }
  return out;
}

for (const vcpus of [1, 8]) {
  test(`MADT for ${vcpus} vCPU(s): local APICs, one IOAPIC, LINT1 NMI`, () => {
    const { get } = tables(vcpus);
    const m = get('APIC').bytes;
    assert.equal(byteSum(m), 0);
    assert.equal(m.length, 44 + 8 * vcpus + 12 + 6);
    assert.equal(dv(m).getUint32(36, true), LAPIC_ADDR);
    assert.equal(dv(m).getUint32(40, true), 0, 'flags: no PCAT_COMPAT');
    const entries = madtEntries(m);
    const lapics = entries.filter((e) => e.type === 0);
    assert.equal(lapics.length, vcpus);
    lapics.forEach((e, i) => {
      assert.equal(e.bytes.length, 8);
      assert.equal(e.bytes[2], i, 'processor UID');
      assert.equal(e.bytes[3], i, 'APIC id');
      assert.equal(dv(e.bytes).getUint32(4, true), 1, 'enabled');
    });
    const ioapics = entries.filter((e) => e.type === 1);
    assert.equal(ioapics.length, 1);
    const io = ioapics[0]!.bytes;
    assert.equal(io.length, 12);
    assert.equal(io[2], vcpus, 'IOAPIC id after the local APIC ids');
    assert.equal(dv(io).getUint32(4, true), IOAPIC_ADDR);
    assert.equal(dv(io).getUint32(8, true), 0, 'GSI base');
    assert.equal(entries.filter((e) => e.type === 2).length, 0, 'no IRQ0 override by default');
    const nmi = entries.filter((e) => e.type === 4);
    assert.deepEqual([...nmi[0]!.bytes], [4, 6, 0xff, 0, 0, 1]);
  });
}

test('MADT: optional IRQ0 -> GSI2 override', () => {
  const m = buildMadt({
    vcpus: 1,
    lapicAddr: LAPIC_ADDR,
    ioapicAddr: IOAPIC_ADDR,
    irq0ToGsi2: true,
  });
  assert.equal(byteSum(m), 0);
  const iso = madtEntries(m).filter((e) => e.type === 2);
  assert.deepEqual([...iso[0]!.bytes], [2, 10, 0, 0, 2, 0, 0, 0, 0, 0]);
});

test('DSDT names the devices', () => {
  const { get } = tables(1, [
    { addr: 0xc000_1000, gsi: 5 },
    { addr: 0xc000_2000, gsi: 6 },
  ]);
  const d = get('DSDT').bytes;
  assert.equal(d[8], 2, 'revision 2: 64-bit integers');
  const s = Buffer.from(d).toString('latin1');
  assert.equal(s.split('LNRO0005').length - 1, 2);
  for (const n of ['_S5_', '_SB_', 'COM1', 'PS2_', 'V000', 'V001']) assert.ok(s.includes(n), n);
});

test('DSDT: the VMGenID device and the GED that notifies it', () => {
  const d = Buffer.from(tables().get('DSDT').bytes);
  // Linux's vmgenid driver matches the _HID or the _CID (Name(_HID, "VMGENCTR")).
  assert.ok(d.includes(Buffer.from('\x08_HID\x0dVMGENCTR\x00', 'latin1')));
  assert.ok(d.includes(Buffer.from('\x08_CID\x0dVM_Gen_Counter\x00', 'latin1')));
  // Name(ADDR, Package(2) { low dword, high dword }): the id's address.
  const addr = Buffer.concat([
    Buffer.from('\x08ADDR\x12', 'latin1'),
    Buffer.of(8, 2, 0x0c), // PkgLength 8, 2 elements, DWordConst
    Buffer.of(VMGENID_ADDR & 0xff, (VMGENID_ADDR >> 8) & 0xff, VMGENID_ADDR >> 16, 0),
    Buffer.of(0x00), // Zero: below 4 GiB
  ]);
  assert.ok(d.includes(addr), 'ADDR package');
  assert.ok(d.includes(Buffer.from('\x08_HID\x0dACPI0013\x00', 'latin1')));
  // The GED's one interrupt: an Extended Interrupt descriptor with the VMGenID GSI.
  assert.ok(d.includes(Buffer.of(0x89, 6, 0, 0x03, 1, VMGENID_GSI, 0, 0, 0)), 'GED _CRS');
  // _EVT: If (LEqual (Arg0, GSI)) { Notify (\_SB_.VGEN, 0x80) }.
  const notifyVgen = Buffer.concat([
    Buffer.of(0x86, 0x5c, 0x2e),
    Buffer.from('_SB_VGEN', 'latin1'),
    Buffer.of(0x0a, 0x80),
  ]);
  const evt = d.indexOf(Buffer.from('_EVT', 'latin1'));
  assert.ok(evt > 0, '_EVT');
  assert.ok(d.indexOf(Buffer.of(0x93, 0x68, 0x0a, VMGENID_GSI), evt) > evt, 'LEqual(Arg0, GSI)');
  assert.ok(d.indexOf(notifyVgen, evt) > evt, 'Notify(VGEN, 0x80)');
});

test('a virtio device may not take the VMGenID GSI', () => {
  const r = buildAcpiTables({ vcpus: 1, virtio: [{ addr: 0xc000_1000, gsi: VMGENID_GSI }] });
  assert.equal(r.ok, false);
  if (!r.ok) assert.match(r.error.message, /VMGenID/);
});

test('config errors are values', () => {
  const bad = (vcpus: number, virtio: Array<{ addr: number; gsi: number }> = []) => {
    const r = buildAcpiTables({ vcpus, virtio });
    assert.equal(r.ok, false);
    if (!r.ok) assert.equal(r.error.name, 'ConfigError');
  };
  bad(0);
  bad(65);
  bad(1.5);
  bad(1, [{ addr: 0xc000_1000, gsi: 24 }]);
  bad(1, [{ addr: 0xffff_f800, gsi: 5 }]);
  bad(1, [
    { addr: 0xc000_1000, gsi: 5 },
    { addr: 0xc000_2000, gsi: 5 },
  ]);
  assert.ok(buildAcpiTables({ vcpus: 64, virtio: [] }).ok);
});

test('writeAcpiTables puts the RSDP and the tables in guest RAM', () => {
  const mem = GuestMemory.anonymous([{ base: 0, size: 2 << 20 }]);
  const r = writeAcpiTables(mem, { vcpus: 4, virtio: [{ addr: 0xc000_1000, gsi: 5 }] });
  assert.ok(r.ok);
  assert.equal(r.value, RSDP_ADDR);
  const rsdp = mem.view(RSDP_ADDR, 36);
  assert.equal(text(rsdp, 0, 8), 'RSD PTR ');
  // Walk RSDP -> XSDT -> FADT -> DSDT as a guest would.
  const xsdt = Number(mem.readU64(RSDP_ADDR + 24));
  const fadt = Number(mem.readU64(xsdt + 36));
  assert.equal(text(mem.view(fadt, 4), 0, 4), 'FACP');
  const dsdt = Number(mem.readU64(fadt + FADT_OFF.xDsdt));
  const dsdtLen = mem.readU32(dsdt + 4);
  assert.equal(byteSum(mem.view(dsdt, dsdtLen)), 0);

  const small = GuestMemory.anonymous([{ base: 0, size: 0x80000 }]);
  const e = writeAcpiTables(small, { vcpus: 1, virtio: [] });
  assert.equal(e.ok, false);
});

test('acpiBootHook fits boot.ts and returns the RSDP address', () => {
  const mem = GuestMemory.anonymous([{ base: 0, size: 1 << 20 }]);
  const r = acpiBootHook({ vcpus: 1, virtio: [] })(mem);
  assert.deepEqual(r, { ok: true, value: { rsdpAddr: RSDP_ADDR } });
});

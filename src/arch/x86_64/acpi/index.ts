/**
 * Builds the guest's ACPI tables and places them in low memory: the RSDP at RSDP_ADDR (where
 * Linux scans 0xE0000-0xFFFFF for it), then DSDT, FADT, MADT and XSDT packed from
 * ACPI_TABLES_START, each 8-byte aligned, never past ACPI_TABLES_END. The whole
 * [RSDP_ADDR, ACPI_TABLES_END) range must be reserved (not RAM) in the e820 map.
 */
import type { GuestMemory } from '../../../memory/guest-memory.js';
import { ConfigError } from '../../../util/errors.js';
import { type Result, err, ok } from '../../../util/result.js';
import {
  ACPI_RESET_ADDR,
  ACPI_RESET_VALUE,
  ACPI_S5_SLP_TYP,
  ACPI_SLEEP_CTL_ADDR,
  ACPI_SLEEP_STS_ADDR,
  ACPI_TABLES_END,
  ACPI_TABLES_START,
  I8042_CMD_PORT,
  I8042_DATA_PORT,
  I8042_IRQ,
  IOAPIC_ADDR,
  LAPIC_ADDR,
  MAX_VCPUS,
  RSDP_ADDR,
  SERIAL_COM1_IRQ,
  SERIAL_COM1_PORT,
  VIRTIO_MMIO_SIZE,
  VMGENID_ADDR,
  VMGENID_GSI,
} from '../layout.js';
import { buildDsdt, buildFadt, buildMadt, buildRsdp, buildXsdt } from './tables.js';

/** The in-kernel IOAPIC has 24 pins; GSI base 0. */
const IOAPIC_PINS = 24;

export interface AcpiConfig {
  vcpus: number;
  /** One 4 KiB virtio-mmio window each, with its own GSI. */
  virtio: ReadonlyArray<{ addr: number; gsi: number }>;
  /**
   * Declare ISA IRQ0 -> GSI 2 in the MADT. Leave false (the default) with KVM's default GSI
   * routing, which sends the in-kernel PIT's GSI 0 to IOAPIC pin 0.
   */
  irq0ToGsi2?: boolean;
}

export interface AcpiTable {
  signature: string;
  addr: number;
  bytes: Uint8Array;
}

/** Where each table goes and its bytes; `rsdpAddr` is what the boot protocol passes on. */
export interface AcpiBlob {
  rsdpAddr: number;
  tables: AcpiTable[]; // RSDP first
}

function validate(config: AcpiConfig): ConfigError | undefined {
  const { vcpus, virtio } = config;
  if (!Number.isInteger(vcpus) || vcpus < 1 || vcpus > MAX_VCPUS) {
    return new ConfigError(`ACPI: vCPU count ${vcpus} must be between 1 and ${MAX_VCPUS}`);
  }
  const gsis = new Set<number>();
  for (const d of virtio) {
    if (!Number.isInteger(d.addr) || d.addr < 0 || d.addr + VIRTIO_MMIO_SIZE > 0x1_0000_0000) {
      return new ConfigError(
        `ACPI: virtio-mmio window 0x${d.addr.toString(16)} must lie below 4 GiB`,
      );
    }
    if (!Number.isInteger(d.gsi) || d.gsi < 0 || d.gsi >= IOAPIC_PINS) {
      return new ConfigError(
        `ACPI: virtio GSI ${d.gsi} is not an IOAPIC pin (0-${IOAPIC_PINS - 1})`,
      );
    }
    if (gsis.has(d.gsi)) return new ConfigError(`ACPI: virtio GSI ${d.gsi} is used twice`);
    if (d.gsi === VMGENID_GSI)
      return new ConfigError(`ACPI: virtio GSI ${d.gsi} is the VMGenID notification's`);
    gsis.add(d.gsi);
  }
  return undefined;
}

const align8 = (n: number) => (n + 7) & ~7;

/** Build every table at its final address, without touching guest memory. */
export function buildAcpiTables(config: AcpiConfig): Result<AcpiBlob, ConfigError> {
  const bad = validate(config);
  if (bad) return err(bad);

  const placed: AcpiTable[] = [];
  let next = ACPI_TABLES_START;
  const place = (signature: string, bytes: Uint8Array): number => {
    const addr = next;
    placed.push({ signature, addr, bytes });
    next = align8(addr + bytes.length);
    return addr;
  };

  const dsdtAddr = place(
    'DSDT',
    buildDsdt({
      virtio: config.virtio.map((d) => ({ addr: d.addr, size: VIRTIO_MMIO_SIZE, gsi: d.gsi })),
      serial: { port: SERIAL_COM1_PORT, irq: SERIAL_COM1_IRQ },
      i8042: { dataPort: I8042_DATA_PORT, cmdPort: I8042_CMD_PORT, irq: I8042_IRQ },
      s5SlpTyp: ACPI_S5_SLP_TYP,
      vmgenid: { addr: VMGENID_ADDR, gsi: VMGENID_GSI },
    }),
  );
  const fadtAddr = place(
    'FACP',
    buildFadt({
      dsdtAddr,
      sleepControlAddr: ACPI_SLEEP_CTL_ADDR,
      sleepStatusAddr: ACPI_SLEEP_STS_ADDR,
      resetAddr: ACPI_RESET_ADDR,
      resetValue: ACPI_RESET_VALUE,
    }),
  );
  const madtAddr = place(
    'APIC',
    buildMadt({
      vcpus: config.vcpus,
      lapicAddr: LAPIC_ADDR,
      ioapicAddr: IOAPIC_ADDR,
      irq0ToGsi2: config.irq0ToGsi2 ?? false,
    }),
  );
  const xsdtAddr = place('XSDT', buildXsdt([fadtAddr, madtAddr]));

  const last = placed[placed.length - 1]!;
  if (last.addr + last.bytes.length > ACPI_TABLES_END) {
    return err(
      new ConfigError(
        `ACPI tables need ${last.addr + last.bytes.length - ACPI_TABLES_START} bytes but only ` +
          `${ACPI_TABLES_END - ACPI_TABLES_START} fit (${config.vcpus} vCPUs, ${config.virtio.length} virtio devices)`,
      ),
    );
  }
  const rsdp = buildRsdp(xsdtAddr);
  return ok({
    rsdpAddr: RSDP_ADDR,
    tables: [{ signature: 'RSD PTR ', addr: RSDP_ADDR, bytes: rsdp }, ...placed],
  });
}

/** Build the tables and write them into guest RAM. Returns the RSDP's guest address. */
export function writeAcpiTables(mem: GuestMemory, config: AcpiConfig): Result<number, ConfigError> {
  const built = buildAcpiTables(config);
  if (!built.ok) return built;
  if (!mem.isValidRange(RSDP_ADDR, ACPI_TABLES_END - RSDP_ADDR)) {
    return err(
      new ConfigError('ACPI: guest RAM does not cover 0xE0000-0xFFFFF (need at least 1 MiB)'),
    );
  }
  for (const t of built.value.tables) mem.write(t.addr, t.bytes);
  return ok(built.value.rsdpAddr);
}

/** The same, in the shape of boot.ts's `BootOptions.acpi` hook (the e820 map is not needed). */
export function acpiBootHook(
  config: AcpiConfig,
): (mem: GuestMemory) => Result<{ rsdpAddr: number }, ConfigError> {
  return (mem) => {
    const r = writeAcpiTables(mem, config);
    return r.ok ? ok({ rsdpAddr: r.value }) : r;
  };
}

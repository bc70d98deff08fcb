/**
 * The x86_64 guest-physical layout (as Firecracker lays it out; see shared DESIGN.md).
 * Every builder takes its addresses from here so that the layout lives in one place.
 */
export const GDT_ADDR = 0x500;
export const IDT_ADDR = 0x520;
export const PVH_START_INFO_ADDR = 0x6000;
/** PVH memory map entries follow the start_info. */
export const PVH_MEMMAP_ADDR = 0x6040;
export const ZERO_PAGE_ADDR = 0x7000;
export const BOOT_STACK_POINTER = 0x8ff0;
/** PML4 at 0x9000, PDPT at 0xa000, PD at 0xb000 (identity-maps the first 1 GiB with 2 MiB pages). */
export const PML4_ADDR = 0x9000;
export const PDPTE_ADDR = 0xa000;
export const PDE_ADDR = 0xb000;
export const CMDLINE_ADDR = 0x20000;
/** Maximum command-line length we accept (Linux's COMMAND_LINE_SIZE on x86 is 2048). */
export const CMDLINE_MAX_SIZE = 2048;
/** The end of low usable RAM (EBDA starts here) and the legacy region up to 1 MiB. */
export const EBDA_START = 0x9fc00;
/** MP table lives at the start of the EBDA. */
export const MPTABLE_START = 0x9fc00;
/**
 * The VM generation id (ACPI VMGenID, 16 bytes): e820-reserved low memory just below the RSDP,
 * where Firecracker puts it too (its allocator's last fit below 0xe0000). Fixed, so a snapshot
 * needs no record of it. The MP table (at most ~1.4 KiB from MPTABLE_START) ends far below.
 */
export const VMGENID_ADDR = 0xdfff0;
export const VMGENID_SIZE = 16;
/** ACPI: RSDP where the kernel scans for it (0xe0000-0xfffff), tables after it. */
export const RSDP_ADDR = 0xe0000;
export const ACPI_TABLES_START = 0xe0100;
export const ACPI_TABLES_END = 0x100000;
export const HIGH_MEMORY_START = 0x100000; // 1 MiB: kernel load address

/** The 32-bit MMIO hole: RAM stops at 3 GiB and resumes at 4 GiB. */
export const MMIO_HOLE_START = 0xc000_0000;
export const MMIO_HOLE_END = 0x1_0000_0000;
/** virtio-mmio slots of 4 KiB each, from here. */
export const VIRTIO_MMIO_BASE = 0xc000_1000;
export const VIRTIO_MMIO_SIZE = 0x1000;
/** First and last GSI handed to virtio-mmio devices (one each). */
export const VIRTIO_GSI_FIRST = 5;
export const VIRTIO_GSI_LAST = 22;
/**
 * The GSI of the ACPI GED (ACPI0013) whose _EVT notifies the VMGenID device: the VMM pulses it
 * after a snapshot load wrote a new generation id. The last IOAPIC pin, past the virtio range.
 */
export const VMGENID_GSI = 23;
/** ACPI GED / sleep registers (hardware-reduced ACPI), in the MMIO hole. */
export const ACPI_GED_ADDR = 0xfeb0_0000;
/**
 * The power-management register window the FADT points the guest at, served by the AcpiPm
 * device (devices/legacy/acpi-pm.ts, registers at offsets 0, 1, 2). arch does not import
 * devices: the ACPI tables take these values from here, and src/vmm/acpi-pm-contract.test.ts
 * checks that the device acts on them.
 */
export const ACPI_PM_BASE = 0xfeb0_0100;
export const ACPI_SLEEP_CTL_ADDR = ACPI_PM_BASE + 0; // one byte: SLP_TYP | SLP_EN
export const ACPI_SLEEP_STS_ADDR = ACPI_PM_BASE + 1; // one byte: WAK_STS
export const ACPI_RESET_ADDR = ACPI_PM_BASE + 2; // one byte: write ACPI_RESET_VALUE to reset
/** SLP_TYP of S5 (soft off) that the DSDT's \_S5_ package gives the guest. */
export const ACPI_S5_SLP_TYP = 5;
/** The byte the FADT tells the guest to write to the reset register (RESET_VALUE). */
export const ACPI_RESET_VALUE = 0x01;
export const IOAPIC_ADDR = 0xfec0_0000;
export const LAPIC_ADDR = 0xfee0_0000;

/** Legacy I/O ports and IRQs. */
export const SERIAL_COM1_PORT = 0x3f8;
export const SERIAL_COM1_IRQ = 4;
export const I8042_DATA_PORT = 0x60;
export const I8042_CMD_PORT = 0x64;
export const I8042_IRQ = 1;
export const RTC_PORT = 0x70; // index 0x70, data 0x71
/** The boot-marker port tiny guests write to. */
export const BOOT_MARKER_PORT = 0x3f0;
/**
 * The boot marker in MMIO (as Firecracker's boot timer): Linux guests' init writes one byte here
 * with busybox `devmem`, since busybox has no port-I/O tool. The first page of the MMIO hole,
 * claimed by no guest driver, so STRICT_DEVMEM lets /dev/mem reach it.
 */
export const BOOT_MARKER_MMIO_ADDR = 0xc000_0000;

/** Largest vCPU count we support (MADT/MP-table APIC ids fit in a byte with room to spare). */
export const MAX_VCPUS = 64;

/**
 * Device memory (virtio-pmem files, the virtio-mem region): guest-physical space above RAM and
 * above 4 GiB, from the first 1 GiB boundary past the end of RAM, DEVICE_MEMORY_MAX bytes at
 * most. Never RAM in e820: the devices tell the guest where their memory is.
 */
export const DEVICE_MEMORY_ALIGN = 0x4000_0000;
export const DEVICE_MEMORY_MAX = 256 * 0x4000_0000; // 256 GiB: below a 40-bit physical space
export function deviceMemoryBase(memBytes: number): number {
  const ramEnd =
    memBytes <= MMIO_HOLE_START ? MMIO_HOLE_END : MMIO_HOLE_END + memBytes - MMIO_HOLE_START;
  return Math.ceil(ramEnd / DEVICE_MEMORY_ALIGN) * DEVICE_MEMORY_ALIGN;
}

/** Guest RAM regions for a VM of memBytes: split around the MMIO hole. */
export function ramRegions(memBytes: number): Array<{ base: number; size: number }> {
  if (memBytes <= MMIO_HOLE_START) return [{ base: 0, size: memBytes }];
  return [
    { base: 0, size: MMIO_HOLE_START },
    { base: MMIO_HOLE_END, size: memBytes - MMIO_HOLE_START },
  ];
}

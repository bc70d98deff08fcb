import type { BusDevice } from '../bus.js';

/**
 * The hardware-reduced ACPI sleep and reset registers (ACPI 6.5 §4.8.3.7, §4.8.3.6), as three
 * byte-wide MMIO registers in one small window. The FADT points the guest at them:
 *
 *   offset 0  SLEEP_CONTROL_REG  write SLP_TYP (bits 4:2) | SLP_EN (bit 5) to enter a sleep state
 *   offset 1  SLEEP_STATUS_REG   WAK_STS (bit 7); reads 0, writes (clearing WAK_STS) are ignored
 *   offset 2  RESET_REG          write RESET_VALUE to reset the machine
 *
 * Linux powers off by writing (SLP_TYP of \_S5 << 2) | SLP_EN to the control register
 * (acpi_hw_extended_sleep) after writing WAK_STS to the status register; it reboots through
 * acpi_reboot() writing RESET_VALUE to RESET_REG. Anything else is counted and ignored: this is
 * guest-facing and never throws.
 *
 * The FADT and DSDT (arch/x86_64/acpi/) give the guest these addresses and values from
 * arch/x86_64/layout.ts; devices and arch never import each other, and
 * src/vmm/acpi-pm-contract.test.ts checks that the two agree.
 */

/** Register offsets inside the window. */
export const ACPI_PM_SLEEP_CONTROL = 0;
export const ACPI_PM_SLEEP_STATUS = 1;
export const ACPI_PM_RESET = 2;
/** Size of the MMIO window to insert on the bus (offset 3 is reserved and reads 0). */
export const ACPI_PM_WINDOW_SIZE = 4;

/** SLP_TYP value of S5 (soft off); the DSDT's \_S5_ package hands it to the guest. */
export const ACPI_S5_SLP_TYP = 5;
/** The byte the guest writes to RESET_REG (FADT RESET_VALUE). */
export const ACPI_RESET_VALUE = 0x01;

const SLP_EN = 0x20;
const SLP_TYP_SHIFT = 2;
const SLP_TYP_MASK = 0x7;

export interface AcpiPmHandlers {
  /** The guest asked for S5. Called on the vCPU thread that took the exit. */
  onPowerOff(): void;
  /** The guest wrote the reset value. */
  onReset(): void;
  /** Told once, at the first access we do not understand (optional). */
  log?(message: string): void;
}

export class AcpiPm implements BusDevice {
  /** Accesses that were not a known command: wrong register, value or sleep state. */
  unknownAccesses = 0;
  private logged = false;

  constructor(private readonly handlers: AcpiPmHandlers) {}

  read(_offset: number, data: Uint8Array): void {
    // WAK_STS is never set (we never wake the guest from a sleep state), nothing else is readable.
    data.fill(0);
  }

  write(offset: number, data: Uint8Array): void {
    // Each byte of the access goes to its own register, so a wide write still works.
    for (let i = 0; i < data.length; i++) this.writeByte(offset + i, data[i]!);
  }

  private writeByte(reg: number, value: number): void {
    switch (reg) {
      case ACPI_PM_SLEEP_CONTROL: {
        if ((value & SLP_EN) === 0) return; // SLP_TYP without SLP_EN does nothing (wake prep)
        const slpTyp = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
        if (slpTyp === ACPI_S5_SLP_TYP) this.handlers.onPowerOff();
        else this.unknown(`sleep state SLP_TYP=${slpTyp} is not supported`);
        return;
      }
      case ACPI_PM_SLEEP_STATUS:
        return; // clearing WAK_STS before sleeping: nothing to clear
      case ACPI_PM_RESET:
        if (value === ACPI_RESET_VALUE) this.handlers.onReset();
        else this.unknown(`reset register write 0x${value.toString(16)}`);
        return;
      default:
        this.unknown(`write to reserved offset ${reg}`);
    }
  }

  private unknown(what: string): void {
    this.unknownAccesses++;
    if (!this.logged) {
      this.logged = true;
      this.handlers.log?.(`acpi-pm: ignored ${what} (further ones only counted)`);
    }
  }
}

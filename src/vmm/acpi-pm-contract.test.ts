// arch (the ACPI tables) and devices (the AcpiPm device) never import each other, yet the
// guest writes what the FADT and DSDT tell it to the device: vmm, which wires both, checks
// here that the addresses and values of arch/x86_64/layout.ts are what the device acts on.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  ACPI_PM_BASE,
  ACPI_RESET_ADDR,
  ACPI_RESET_VALUE,
  ACPI_S5_SLP_TYP,
  ACPI_SLEEP_CTL_ADDR,
  ACPI_SLEEP_STS_ADDR,
} from '../arch/x86_64/layout.js';
import { AcpiPm, ACPI_PM_WINDOW_SIZE } from '../devices/legacy/acpi-pm.js';

const SLP_EN = 0x20; // ACPI 6.5 §4.8.3.7: SLEEP_CONTROL_REG bit 5
const SLP_TYP_SHIFT = 2; // SLP_TYP is bits 4:2

function device() {
  const calls = { off: 0, reset: 0, logs: [] as string[] };
  const dev = new AcpiPm({
    onPowerOff: () => calls.off++,
    onReset: () => calls.reset++,
    log: (m) => calls.logs.push(m),
  });
  // The bus hands the device offsets from the window base (legacy-devices.ts inserts it there).
  const write = (addr: number, value: number) =>
    dev.write(addr - ACPI_PM_BASE, Uint8Array.of(value));
  return { dev, calls, write };
}

test('the three registers the FADT names lie inside the AcpiPm window', () => {
  for (const addr of [ACPI_SLEEP_CTL_ADDR, ACPI_SLEEP_STS_ADDR, ACPI_RESET_ADDR]) {
    assert.ok(addr >= ACPI_PM_BASE && addr < ACPI_PM_BASE + ACPI_PM_WINDOW_SIZE, addr.toString(16));
  }
});

test('S5 as the DSDT describes it, written where the FADT says, powers off', () => {
  const { dev, calls, write } = device();
  write(ACPI_SLEEP_STS_ADDR, 0x80); // Linux clears WAK_STS first
  write(ACPI_SLEEP_CTL_ADDR, (ACPI_S5_SLP_TYP << SLP_TYP_SHIFT) | SLP_EN);
  assert.deepEqual({ off: calls.off, reset: calls.reset }, { off: 1, reset: 0 });
  assert.equal(dev.unknownAccesses, 0, calls.logs.join('; '));
});

test("the FADT's RESET_VALUE at its RESET_REG resets", () => {
  const { dev, calls, write } = device();
  write(ACPI_RESET_ADDR, ACPI_RESET_VALUE);
  assert.deepEqual({ off: calls.off, reset: calls.reset }, { off: 0, reset: 1 });
  assert.equal(dev.unknownAccesses, 0, calls.logs.join('; '));
});

import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  ACPI_PM_RESET,
  ACPI_PM_SLEEP_CONTROL,
  ACPI_PM_SLEEP_STATUS,
  ACPI_RESET_VALUE,
  AcpiPm,
} from './acpi-pm.js';

function make() {
  const calls = { off: 0, reset: 0, logs: [] as string[] };
  const dev = new AcpiPm({
    onPowerOff: () => calls.off++,
    onReset: () => calls.reset++,
    log: (m) => calls.logs.push(m),
  });
  return { dev, calls };
}
const b = (...v: number[]) => Uint8Array.from(v);

test('SLP_TYP=5 | SLP_EN powers off, as Linux writes it', () => {
  const { dev, calls } = make();
  dev.write(ACPI_PM_SLEEP_STATUS, b(0x80)); // Linux clears WAK_STS first
  dev.write(ACPI_PM_SLEEP_CONTROL, b((5 << 2) | 0x20)); // 0x34
  assert.equal(calls.off, 1);
  assert.equal(calls.reset, 0);
  assert.equal(dev.unknownAccesses, 0);
});

test('the reset value on the reset register resets', () => {
  const { dev, calls } = make();
  dev.write(ACPI_PM_RESET, b(ACPI_RESET_VALUE));
  assert.equal(calls.reset, 1);
  assert.equal(calls.off, 0);
});

test('garbage is counted, logged once and ignored; reads are 0', () => {
  const { dev, calls } = make();
  dev.write(ACPI_PM_SLEEP_CONTROL, b(5 << 2)); // SLP_TYP without SLP_EN: no action, not an error
  dev.write(ACPI_PM_SLEEP_CONTROL, b((3 << 2) | 0x20)); // S3: unsupported
  dev.write(ACPI_PM_RESET, b(0xfe));
  dev.write(3, b(0xff));
  dev.write(100, b(1, 2, 3, 4));
  assert.equal(calls.off, 0);
  assert.equal(calls.reset, 0);
  assert.equal(dev.unknownAccesses, 7);
  assert.equal(calls.logs.length, 1);
  const data = b(0xaa, 0xbb, 0xcc, 0xdd);
  dev.read(0, data);
  assert.deepEqual([...data], [0, 0, 0, 0]);
});

test('a wide write reaches each byte register', () => {
  const { dev, calls } = make();
  // bytes: control=0 (no SLP_EN), status=0x80, reset=1
  dev.write(0, b(0x00, 0x80, ACPI_RESET_VALUE, 0x00));
  assert.equal(calls.reset, 1);
  assert.equal(dev.unknownAccesses, 1); // the reserved byte at offset 3
});

test('no handler for log is fine', () => {
  const dev = new AcpiPm({ onPowerOff: () => {}, onReset: () => {} });
  assert.doesNotThrow(() => dev.write(ACPI_PM_RESET, b(7)));
  assert.equal(dev.unknownAccesses, 1);
});

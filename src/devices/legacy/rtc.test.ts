import { test } from 'node:test';
import assert from 'node:assert/strict';
import { RtcCmos } from './rtc.js';

function rtc(now?: () => number) {
  const dev = new RtcCmos(RtcCmos.createState(), now);
  const reg = (i: number) => {
    dev.write(0, Uint8Array.of(i | 0x80)); // NMI-mask bit set, as Linux's CMOS_READ may do
    const d = new Uint8Array(1);
    dev.read(1, d);
    return d[0]!;
  };
  const set = (i: number, v: number) => {
    dev.write(0, Uint8Array.of(i));
    dev.write(1, Uint8Array.of(v));
  };
  return { dev, reg, set };
}

const bcd = (v: number) => (v >> 4) * 10 + (v & 0x0f);

test('BCD time close to now, status registers', () => {
  const { reg } = rtc();
  assert.equal(reg(0x0a) & 0x80, 0, 'no update in progress');
  assert.equal(reg(0x0b), 0x02, 'BCD, 24-hour');
  assert.equal(reg(0x0d), 0x80, 'VRT');
  assert.equal(reg(0x0c), 0);
  const t = Date.UTC(
    bcd(reg(0x32)) * 100 + bcd(reg(0x09)),
    bcd(reg(0x08)) - 1,
    bcd(reg(0x07)),
    bcd(reg(0x04)),
    bcd(reg(0x02)),
    bcd(reg(0x00)),
  );
  assert.ok(Math.abs(t - Date.now()) < 5000, `RTC ${new Date(t).toISOString()}`);
});

test('binary and 12-hour modes', () => {
  const fixed = Date.UTC(2024, 1, 29, 15, 4, 5); // Thursday
  const { reg, set } = rtc(() => fixed);
  assert.deepEqual(
    [reg(0), reg(2), reg(4), reg(6), reg(7), reg(8), reg(9), reg(0x32)],
    [0x05, 0x04, 0x15, 0x05, 0x29, 0x02, 0x24, 0x20],
  );
  set(0x0b, 0x06); // binary, 24-hour
  assert.deepEqual([reg(0), reg(4), reg(7), reg(9), reg(0x32)], [5, 15, 29, 24, 20]);
  set(0x0b, 0x04); // binary, 12-hour: 3 PM
  assert.equal(reg(4), 0x80 | 3);
  set(0x0b, 0x00); // BCD, 12-hour
  assert.equal(reg(4), 0x80 | 0x03);
});

test('the guest sets its own clock; CMOS bytes are storage', () => {
  let now = Date.UTC(2024, 0, 1, 0, 0, 0);
  const { dev, reg, set } = rtc(() => now);
  set(0x09, 0x30); // year 2030
  set(0x04, 0x12);
  assert.equal(reg(0x09), 0x30);
  assert.equal(reg(0x04), 0x12);
  now += 61_000;
  assert.equal(reg(0x02), 0x01, 'the clock keeps running from the set time');
  set(0x0c, 0xff);
  assert.equal(reg(0x0c), 0, 'C is read-only');
  set(0x40, 0x5a);
  assert.equal(reg(0x40), 0x5a);
  dev.setCmosByte(0x34, 0x12);
  assert.equal(reg(0x34), 0x12);
  assert.throws(() => dev.setCmosByte(0x00, 1));
});

test('a guest clock before 1970 or in years 0-99 reads back what the guest set (found by fuzz)', () => {
  const now = Date.parse('2000-01-01T11:15:08.840Z');
  const { reg, set } = rtc(() => now);
  set(0x32, 0x19); // century 19: 1900
  assert.equal(reg(0x32), 0x19);
  set(0x00, 0x48); // seconds 48, in 1900 (a negative time: its sub-second phase counts too)
  assert.equal(reg(0x00), 0x48);
  const b = rtc(() => now);
  b.set(0x32, 0x00); // century 0: years 0-99, not 1900-1999
  assert.equal(b.reg(0x32), 0x00);
  assert.equal(b.reg(0x09), 0x00);
  b.set(0x09, 0x26);
  assert.deepEqual([b.reg(0x32), b.reg(0x09)], [0x00, 0x26]);
});

test('a time outside years 0000-9999 is refused (found by fuzz)', () => {
  const now = Date.UTC(2026, 0, 1);
  const { reg, set } = rtc(() => now);
  set(0x0b, 0x06); // binary, 24-hour: fields take any byte
  set(0x32, 200); // century 200: year 20026, not representable
  assert.equal(reg(0x32), 20);
  set(0x32, 0);
  set(0x09, 0);
  set(0x07, 0); // day 0 of January, year 0000: the last day of year -1
  assert.deepEqual([reg(0x32), reg(0x09), reg(0x07)], [0, 0, 1]);
});

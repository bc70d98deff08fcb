import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  I8042,
  I8042_COMMAND_OFFSET as CMD,
  I8042_DATA_OFFSET as DATA,
} from '../devices/legacy/i8042.js';
import { RtcCmos } from '../devices/legacy/rtc.js';
import { Serial16550, SERIAL_RX_RING_SIZE } from '../devices/legacy/serial.js';
import type { LegacyDeviceState } from './legacy-devices.js';
import { LegacyStateV1, restoreLegacy, saveLegacy, type LegacyStateData } from './legacy-state.js';

const RBR = 0,
  IER = 1,
  IIR = 2,
  LCR = 3,
  MCR = 4,
  LSR = 5,
  SCR = 7;

/** The three devices over one set of state buffers, as every thread builds them. */
function machine(now: () => number = () => Date.UTC(2024, 5, 1, 12, 0, 0)) {
  const state = {
    serial: Serial16550.createState(),
    i8042: I8042.createState(),
    rtc: RtcCmos.createState(),
  } as LegacyDeviceState;
  const out: number[] = [];
  let serialIrqs = 0;
  const serial = new Serial16550(state.serial, {
    output: (b) => out.push(...b),
    irq: { trigger: () => void serialIrqs++ },
  });
  const kbd = new I8042(state.i8042, {
    irq: { trigger: () => undefined },
    onReset: () => undefined,
  });
  const rtc = new RtcCmos(state.rtc, now);
  const rd = (dev: { read(o: number, d: Uint8Array): void }, off: number) => {
    const d = new Uint8Array(1);
    dev.read(off, d);
    return d[0]!;
  };
  const wr = (dev: { write(o: number, d: Uint8Array): void }, off: number, v: number) =>
    dev.write(off, Uint8Array.of(v));
  const cmos = (i: number) => {
    wr(rtc, 0, i);
    return rd(rtc, 1);
  };
  return { state, serial, kbd, rtc, rd, wr, cmos, out, serialIrqs: () => serialIrqs };
}

type Machine = ReturnType<typeof machine>;

/** Puts every saved part in a non-default state (the ring wrapped, the keyboard queue half read). */
function dirty(m: Machine): void {
  const { serial, kbd, rtc, rd, wr } = m;
  wr(serial, LCR, 0x80); // DLAB
  wr(serial, 0, 0x01); // DLL: 115200 baud
  wr(serial, 1, 0x00);
  wr(serial, LCR, 0x1b); // 8E1, DLAB off
  wr(serial, IER, 0x05); // RDI | RLSI
  wr(serial, 2, 0x01); // FCR: FIFO on
  wr(serial, MCR, 0x0b); // DTR | RTS | OUT2
  wr(serial, SCR, 0x5a);
  // Wrap the ring: fill most of it, read most of it, fill again past the end.
  const a = Uint8Array.from({ length: SERIAL_RX_RING_SIZE - 10 }, (_, i) => i & 0xff);
  assert.equal(serial.pushInput(a), a.length);
  for (let i = 0; i < a.length - 3; i++) rd(serial, RBR);
  const b = Uint8Array.from({ length: 100 }, (_, i) => (200 + i) & 0xff);
  assert.equal(serial.pushInput(b), b.length);
  // i8042: a command byte, then Ctrl-Alt-Del with its first byte read.
  wr(kbd, CMD, 0x60);
  wr(kbd, DATA, 0x45);
  assert.ok(kbd.sendCtrlAltDel());
  rd(kbd, DATA);
  // RTC: the guest sets the year, stores a CMOS byte and leaves the index on register 0x40.
  wr(rtc, 0, 0x09);
  wr(rtc, 1, 0x31);
  wr(rtc, 0, 0x40);
  wr(rtc, 1, 0xa7);
}

test('legacy devices: save -> encode -> decode -> restore into fresh state behaves the same', () => {
  const a = machine();
  dirty(a);
  const saved = saveLegacy(a.state);
  assert.equal(saved.serial.rx.length, 103);
  const queued = saved.i8042.kbd.length;
  assert.ok(queued > 0 && saved.i8042.obuf >= 0, 'Ctrl-Alt-Del half delivered');
  assert.equal(saved.rtc.index, 0x40);
  const bytes = LegacyStateV1.encode(saved);
  const decoded = LegacyStateV1.decodeOrThrow(bytes);
  assert.deepEqual(LegacyStateV1.encode(decoded), bytes, 'encode(decode(x)) === x');

  const b = machine();
  restoreLegacy(b.state, decoded);
  assert.deepEqual(saveLegacy(b.state), saved, 'the restored state saves the same');

  // Both machines answer every register alike, and the input continues in order.
  assert.equal(b.rd(b.rtc, 1), 0xa7, 'the RTC index was restored (0x40)');
  for (const m of [a, b]) {
    m.wr(m.serial, LCR, 0x9b);
    assert.equal(m.rd(m.serial, 0), 0x01, 'DLL');
    m.wr(m.serial, LCR, 0x1b);
  }
  for (const off of [IER, IIR, LCR, MCR, LSR, SCR])
    assert.equal(b.rd(b.serial, off), a.rd(a.serial, off), `serial register ${off}`);
  const rest = (m: Machine) => Array.from({ length: 103 }, () => m.rd(m.serial, RBR));
  const got = rest(b);
  assert.deepEqual(got, rest(a));
  assert.deepEqual(got.slice(0, 3), [
    (SERIAL_RX_RING_SIZE - 13) & 0xff,
    (SERIAL_RX_RING_SIZE - 12) & 0xff,
    (SERIAL_RX_RING_SIZE - 11) & 0xff,
  ]);
  assert.equal(b.rd(b.serial, LSR) & 0x01, 0, 'input drained');
  assert.equal(b.serial.inputSpace(), SERIAL_RX_RING_SIZE);
  for (let i = 0; i <= queued; i++) {
    assert.equal(b.rd(b.kbd, CMD), a.rd(a.kbd, CMD), 'i8042 status');
    assert.equal(b.rd(b.kbd, DATA), a.rd(a.kbd, DATA), `keyboard byte ${i}`);
  }
  for (const m of [a, b]) {
    m.wr(m.kbd, CMD, 0x20);
    assert.equal(m.rd(m.kbd, DATA), 0x45, 'command byte');
  }
  for (const r of [0x09, 0x40, 0x0a, 0x0b])
    assert.equal(b.cmos(r), a.cmos(r), `CMOS 0x${r.toString(16)}`);
  assert.equal(b.cmos(0x09), 0x31, 'the guest-set year survives (the clock offset)');
});

test('the clock offset is kept relative to host time (the RTC does not jump back)', () => {
  let now = Date.UTC(2024, 5, 1, 12, 0, 0);
  const a = machine(() => now);
  a.wr(a.rtc, 0, 0x04);
  a.wr(a.rtc, 1, 0x05); // the guest sets the hour to 05
  const saved = saveLegacy(a.state);
  now += 3_600_000;
  const b = machine(() => now);
  restoreLegacy(b.state, saved);
  assert.equal(b.cmos(0x04), 0x06, 'an hour later on the host is an hour later in the guest');
});

test('power-on state round-trips too', () => {
  const a = machine();
  const saved = saveLegacy(a.state);
  assert.equal(saved.serial.rx.length, 0);
  assert.equal(saved.i8042.obuf, -1);
  const b = machine();
  restoreLegacy(b.state, LegacyStateV1.decodeOrThrow(LegacyStateV1.encode(saved)));
  assert.deepEqual(saveLegacy(b.state), saved);
});

/** Encodes a copy of `d` with one field changed. */
function encodeWith(d: LegacyStateData, patch: (d: LegacyStateData) => void): Uint8Array {
  const copy = structuredClone(d);
  patch(copy);
  return LegacyStateV1.encode(copy);
}

test('decoding refuses out-of-range fields with the field named', () => {
  const m = machine();
  dirty(m);
  const good = saveLegacy(m.state);
  // The encoder refuses them first (a bug of ours can never write such a file).
  assert.throws(
    () => encodeWith(good, (d) => (d.rtc.index = 128)),
    /rtc\.index: 128 is out of range/,
  );
  assert.throws(() => encodeWith(good, (d) => (d.i8042.obuf = 256)), /i8042\.obuf/);
  assert.throws(
    () => encodeWith(good, (d) => (d.serial.ier = 0x10)),
    /serial\.ier: 16 is out of range \(0\.\.15\)/,
  );
  assert.throws(
    () => encodeWith(good, (d) => (d.serial.rx = new Uint8Array(SERIAL_RX_RING_SIZE + 1))),
    /serial\.rx: 4097 bytes, at most 4096/,
  );
  assert.throws(() => encodeWith(good, (d) => (d.rtc.cmos = new Uint8Array(127))), /rtc\.cmos/);
  assert.throws(() => encodeWith(good, (d) => (d.rtc.offsetMs = NaN)), /rtc\.offsetMs/);

  // A hostile file: patch the bytes of a good record. The RTC index is an i32 right before the
  // offset and the CMOS at the end; find it from the end of the record.
  const bytes = LegacyStateV1.encode(good);
  const idxAt = bytes.length - 128 - 4 - 8 - 4; // cmos (len u32 + 128), offset f64, index i32
  assert.equal(new DataView(bytes.buffer).getInt32(idxAt, true), 0x40);
  const bad = bytes.slice();
  new DataView(bad.buffer).setInt32(idxAt, 128, true);
  const r = LegacyStateV1.decode(bad);
  assert.ok(
    !r.ok && /rtc\.index: 128 is out of range \(0\.\.127\)/.test(r.error.message),
    String(!r.ok && r.error.message),
  );
  const nan = bytes.slice();
  new DataView(nan.buffer).setFloat64(idxAt + 4, NaN, true);
  const r2 = LegacyStateV1.decode(nan);
  assert.ok(!r2.ok && /rtc\.offsetMs/.test(r2.error.message));
  const shortCmos = bytes.slice(0, bytes.length - 1);
  assert.ok(!LegacyStateV1.decode(shortCmos).ok, 'a truncated record is refused');
  // Every truncation is refused through the Result, never thrown.
  for (let n = 0; n < bytes.length; n++) assert.ok(!LegacyStateV1.decode(bytes.subarray(0, n)).ok);
});

test('restoreState refuses out-of-range values and changes nothing', () => {
  const m = machine();
  dirty(m);
  const before = saveLegacy(m.state);
  assert.throws(() => m.serial.restoreState({ ...before.serial, line: 2 }), /serial: saved line 2/);
  assert.throws(
    () => m.serial.restoreState({ ...before.serial, mcr: 0x20 }),
    /serial: saved mcr 32 is out of range \(0\.\.31\)/,
  );
  assert.throws(
    () => m.kbd.restoreState({ ...before.i8042, kbd: new Uint8Array(17) }),
    /i8042: saved keyboard queue of 17 bytes/,
  );
  assert.throws(() => m.rtc.restoreState({ ...before.rtc, index: -1 }), /rtc: saved index -1/);
  assert.deepEqual(saveLegacy(m.state), before);
});

/**
 * The legacy devices' registers (src/devices/legacy/): the 16550 UART, the i8042 and the CMOS
 * RTC, each a stream of port reads and writes of every offset (inside and past the device's
 * range), size and value, mixed with host-side events (console input, Ctrl-Alt-Del, a clock
 * anywhere from 1970 to past year 9999). Checks: no exception; the UART writes at most one
 * output byte per THR write, its scratch register reads back, its input ring never takes more
 * than it has room for; the i8042 raises at most one edge and one reset per access and answers
 * its self-test; the RTC reads back a time field the guest set (the clock frozen), and every
 * register read is a byte.
 */
import { I8042 } from '../../src/devices/legacy/i8042.js';
import { RtcCmos } from '../../src/devices/legacy/rtc.js';
import { Serial16550, SERIAL_RX_RING_SIZE } from '../../src/devices/legacy/serial.js';
import { UnhandledAccesses } from '../../src/devices/legacy/unhandled.js';
import { EFD_NONBLOCK, native } from '../../src/kvm/native.js';
import { attachLegacyDevices, type LegacyDeviceState } from '../../src/vmm/legacy-devices.js';
import { openConsoleOutput } from '../../src/vmm/console-output.js';
import { openSync } from 'node:fs';
import { fail, type Prng, type Session, type Target } from '../core.js';

function port(dev: {
  read(o: number, d: Uint8Array): void;
  write(o: number, d: Uint8Array): void;
}) {
  return {
    rd(off: number, size = 1): number {
      const d = new Uint8Array(size);
      dev.read(off, d);
      return d[0]!;
    },
    wr(off: number, v: number, size = 1): void {
      const d = new Uint8Array(size);
      d[0] = v & 0xff;
      if (size > 1) d[1] = (v >> 8) & 0xff;
      dev.write(off, d);
    },
  };
}

const size = (rng: Prng) => (rng.chance(0.95) ? 1 : rng.pick([0, 2, 4]));

export const serialTarget: Target = {
  name: 'serial',
  what: 'legacy/serial.ts 16550 registers, DLAB, FIFO, loopback, console input',
  cases: 100_000,
  session: 2000,
  open(srng: Prng): Session {
    let out = 0;
    let edges = 0;
    const dev = new Serial16550(Serial16550.createState(), {
      output: (b) => void (out += b.length),
      irq: { trigger: () => void edges++ },
    });
    const p = port(dev);
    // Half the sessions hold THRE in FIFO mode, as a VM's main thread has it (startHoldTimer;
    // its timer never fires inside a synchronous case).
    let holds = 0;
    const stopHold = srng.chance(0.5) ? dev.startHoldTimer(60_000) : undefined;
    return {
      run(rng: Prng) {
        const n = 1 + rng.below(64);
        for (let i = 0; i < n; i++) {
          const before = out;
          const k = rng.below(10);
          if (k < 6) {
            const off = rng.chance(0.95) ? rng.below(8) : rng.below(64);
            const sz = size(rng);
            const thr = off === 0 && sz === 1;
            const read = rng.chance(0.5);
            if (read) p.rd(off, sz);
            else
              p.wr(
                off,
                rng.chance(0.7) ? rng.u32() & 0xff : rng.pick([0x80, 0x03, 0x10, 0x0f, 0xc7]),
                sz,
              );
            // One access writes out at most a hold's bytes (a FIFO's worth and the byte that
            // overran it) or, without a hold, the byte it sent.
            if (out - before > (stopHold ? 17 : thr ? 1 : 0))
              fail(
                `serial: ${out - before} output bytes from one access (offset ${off}, size ${sz})`,
              );
            // A held THRE (saved as pending with the line low) never outlives an access to a
            // register other than THR: the guest cannot lose its interrupt that way.
            const st = dev.saveState();
            const held = st.threPending === 1 && st.line === 0 && (st.ier & 0x02) !== 0;
            if (held) holds++;
            if (held && (read || off !== 0 || (st.lcr & 0x80) !== 0))
              fail(`serial: THRE still held after a ${read ? 'read' : 'write'} at offset ${off}`);
            if (held && !stopHold) fail('serial: THRE held without the hold timer');
          } else if (k < 8) {
            const b = new Uint8Array(rng.below(rng.chance(0.1) ? 10_000 : 64));
            const room = dev.inputSpace();
            const took = dev.pushInput(b);
            if (took > room || took > b.length || took < 0)
              fail(`serial: pushInput took ${took} of ${b.length} with ${room} free`);
            if (dev.inputSpace() < 0 || dev.inputSpace() > SERIAL_RX_RING_SIZE)
              fail(`serial: input space ${dev.inputSpace()}`);
          } else if (k === 8) {
            // Scratch register: what is written reads back (LCR.DLAB does not cover it).
            const v = rng.u32() & 0xff;
            p.wr(7, v);
            const r = p.rd(7);
            if (r !== v)
              fail(`serial: scratch register wrote 0x${v.toString(16)}, read 0x${r.toString(16)}`);
          } else {
            dev.receiverEnabled();
            dev.stats();
          }
        }
      },
      close() {
        stopHold?.();
        // Every byte sent is written out by now (a hold's included), none twice.
        const sent = dev.stats().bytesOut;
        if (sent !== out) fail(`serial: ${sent} bytes sent, ${out} written out`);
      },
      stats: () => ({ thre_holds: holds }),
    };
  },
};

export const i8042Target: Target = {
  name: 'i8042',
  what: 'legacy/i8042.ts controller commands, data port, keyboard queue, Ctrl-Alt-Del, resets',
  cases: 100_000,
  session: 2000,
  open(): Session {
    let edges = 0;
    let resets = 0;
    const dev = new I8042(I8042.createState(), {
      irq: { trigger: () => void edges++ },
      onReset: () => void resets++,
    });
    const p = port(dev);
    const CMDS = [
      0x20, 0x60, 0xa7, 0xa8, 0xa9, 0xaa, 0xab, 0xad, 0xae, 0xc0, 0xd0, 0xd1, 0xd2, 0xd3, 0xd4,
      0xf0, 0xfe, 0xff,
    ];
    return {
      run(rng: Prng) {
        const n = 1 + rng.below(64);
        for (let i = 0; i < n; i++) {
          const e0 = edges;
          const r0 = resets;
          const k = rng.below(10);
          if (k < 7) {
            const off = rng.chance(0.9) ? rng.pick([0, 4]) : rng.below(8);
            const sz = size(rng);
            if (rng.chance(0.4)) p.rd(off, sz);
            else p.wr(off, off === 4 && rng.chance(0.7) ? rng.pick(CMDS) : rng.u32() & 0xff, sz);
            if (edges - e0 > 1) fail(`i8042: ${edges - e0} interrupt edges from one access`);
            if (resets - r0 > 1) fail(`i8042: ${resets - r0} resets from one access`);
          } else if (k < 9) {
            dev.sendCtrlAltDel();
          } else {
            // Controller self-test: 0xAA answers 0x55 (after whatever was queued is read).
            for (let j = 0; j < 64 && p.rd(4) & 1; j++) p.rd(0);
            p.wr(4, 0xaa);
            if (p.rd(4) & 1) {
              const v = p.rd(0);
              if (v !== 0x55) fail(`i8042: self-test answered 0x${v.toString(16)}`);
            } else fail('i8042: no answer to the self-test');
          }
        }
        dev.stats();
      },
    };
  },
};

const CLOCKS = [
  0,
  1,
  946_684_799_000,
  Date.UTC(2026, 0, 1),
  Date.UTC(2099, 11, 31, 23, 59, 59),
  253_402_300_799_000,
  8.64e15,
];

export const rtcTarget: Target = {
  name: 'rtc',
  what: 'legacy/rtc.ts CMOS index/data, time fields in BCD/binary/12h, clocks 1970..9999+',
  cases: 100_000,
  session: 2000,
  open(srng: Prng): Session {
    let clock = srng.pick(CLOCKS) + srng.below(86_400_000);
    const dev = new RtcCmos(RtcCmos.createState(), () => clock);
    const p = port(dev);
    const FIELDS = [0, 2, 4, 6, 7, 8, 9, 0x32];
    const bcd = (v: number) => ((Math.floor(v / 10) % 10) << 4) | (v % 10);
    return {
      run(rng: Prng) {
        clock += rng.below(5000); // the host clock moves on (it was chosen per session)
        const n = 1 + rng.below(32);
        for (let i = 0; i < n; i++) {
          const k = rng.below(10);
          if (k < 7) {
            const off = rng.chance(0.95) ? rng.below(2) : rng.below(8);
            const sz = size(rng);
            if (rng.chance(0.5)) p.rd(off, sz);
            else
              p.wr(
                off,
                off === 0 && rng.chance(0.7)
                  ? rng.pick([...FIELDS, 0x0a, 0x0b, 0x0c, 0x0d, rng.below(0x100)])
                  : rng.u32() & 0xff,
                sz,
              );
          } else {
            // Set a field to a valid value and read it back, the clock frozen meanwhile.
            p.wr(0, 0x0b);
            const b = p.rd(1);
            const binary = (b & 0x04) !== 0;
            const h24 = (b & 0x02) !== 0;
            const [reg, max, min] = rng.pick([
              [0x00, 59, 0],
              [0x02, 59, 0],
              [0x04, 23, 0],
              [0x09, 99, 0],
              [0x32, 99, 0],
            ] as const);
            const val = min + rng.below(max - min + 1);
            let raw = binary ? val : bcd(val);
            if (reg === 0x04 && !h24) {
              const h12 = val % 12 || 12;
              raw = (binary ? h12 : bcd(h12)) | (val >= 12 ? 0x80 : 0);
            }
            p.wr(0, reg);
            p.wr(1, raw);
            p.wr(0, reg);
            const got = p.rd(1);
            // Setting a time field is refused when the result is not a date JS can hold.
            const year = new Date(clock).getUTCFullYear();
            if (got !== raw && Number.isFinite(clock) && year > 1970 && year < 9999)
              fail(
                `rtc: register 0x${reg.toString(16)} set to 0x${raw.toString(16)} reads 0x${got.toString(16)} (REG_B 0x${b.toString(16)}, clock ${new Date(clock).toISOString()})`,
              );
          }
        }
        dev.unknownAccesses();
      },
    };
  },
};

/**
 * Every guest port and MMIO access as the vCPU loop dispatches it (vcpu-loop.ts: Bus.access, else
 * the unhandled-access table answers; access() checked against resolve()), over the real wiring
 * (vmm/legacy-devices.ts: serial, i8042, RTC, ACPI PM, boot marker; eventfd interrupt lines).
 * Checks: no exception, reads of unclaimed addresses are all-ones, and the unhandled-access
 * log is bounded (one line per distinct address up to its table, one more when it is full).
 */
export const legacyBusTarget: Target = {
  name: 'legacy-bus',
  what: 'vmm/legacy-devices.ts PIO/MMIO buses: any port or address, any size, unhandled table',
  cases: 100_000,
  session: 5000,
  open(): Session {
    const n = native();
    const state: LegacyDeviceState = {
      serial: Serial16550.createState(),
      i8042: I8042.createState(),
      rtc: RtcCmos.createState(),
      unhandled: UnhandledAccesses.createState(),
      serialIrqFd: n.eventfd(0, EFD_NONBLOCK),
      i8042IrqFd: n.eventfd(0, EFD_NONBLOCK),
      // The output hook below takes the UART's bytes; this is only the state's required sink.
      console: openConsoleOutput(openSync('/dev/null', 'w')),
    };
    let logs = 0;
    const otherLogs = new Map<string, number>();
    let powerOffs = 0;
    const d = attachLegacyDevices(state, {
      output: () => undefined,
      onPowerOff: () => void powerOffs++,
      onReset: () => undefined,
      onBootMarker: () => undefined,
      log: (m) => {
        logs++;
        if (!m.startsWith('unhandled'))
          otherLogs.set(m.slice(0, 60), (otherLogs.get(m.slice(0, 60)) ?? 0) + 1);
      },
    });
    let unclaimedReads = 0;
    let unclaimedWrites = 0;
    const access = (space: 'pio' | 'mmio', addr: number, data: Uint8Array, write: boolean) => {
      const bus = space === 'pio' ? d.pio : d.mmio;
      const claimed = bus.resolve(addr, data.length) !== undefined;
      if (bus.access(addr, data, write) !== claimed)
        fail(`legacy-bus: access() and resolve() disagree on ${space} 0x${addr.toString(16)}`);
      if (claimed) return;
      if (write) {
        unclaimedWrites++;
        d.unhandled.write(space, addr, data);
      } else {
        unclaimedReads++;
        d.unhandled.read(space, addr, data);
        if (data.some((b) => b !== 0xff)) fail(`legacy-bus: unclaimed ${space} read not all-ones`);
      }
    };
    const PORTS = [0x3f8, 0x60, 0x64, 0x70, 0x3f0, 0x2f8, 0xcf8, 0x80];
    return {
      stats: () => ({ log_lines: logs, power_offs: powerOffs }),
      close() {
        n.close(state.serialIrqFd);
        n.close(state.i8042IrqFd);
      },
      run(rng: Prng) {
        for (let i = 0, k = 1 + rng.below(32); i < k; i++) {
          const write = rng.chance(0.5);
          if (rng.chance(0.6)) {
            const addr = rng.chance(0.8) ? rng.pick(PORTS) + rng.below(12) - 2 : rng.below(0x10000);
            const data = new Uint8Array(rng.pick([1, 1, 2, 4]));
            rng.fill(data);
            access('pio', addr, data, write);
          } else {
            const addr = rng.chance(0.7)
              ? 0xfeb0_0100 + rng.below(0x40) - 8
              : rng.chance(0.5)
                ? 0xfeb0_0000 + rng.below(0x10000)
                : rng.u32() * 0x10 + rng.below(16);
            const data = new Uint8Array(rng.pick([1, 2, 4, 8]));
            rng.fill(data);
            access('mmio', addr, data, write);
          }
        }
        // Every unclaimed access is counted (the counters' 32-bit halves carry correctly).
        const st = d.unhandled.stats();
        if (st.reads !== unclaimedReads || st.writes !== unclaimedWrites)
          fail(
            `legacy-bus: unhandled counters ${st.reads}/${st.writes}, expected ${unclaimedReads}/${unclaimedWrites}`,
          );
        // 1024 distinct addresses are logged once each, then one line says the table is full.
        const other = [...otherLogs.values()].reduce((a, b) => a + b, 0);
        if (logs - other > 1024 + 1) fail(`legacy-bus: ${logs - other} unhandled-access log lines`);
        // Every other line a guest can cause is logged once (per kind), not once per access.
        for (const [m, c] of otherLogs) if (c > 16) fail(`legacy-bus: logged ${c} times: ${m}`);
      },
    };
  },
};

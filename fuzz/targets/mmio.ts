/**
 * The virtio-mmio register file (mmio.ts, mmio-state.ts) and the device lifecycle behind it:
 * register accesses of every offset, size and value, mixed with steps of a plausible driver
 * (status bits in and out of order, feature words, queue selection, sizes, ring addresses
 * valid and hostile, QueueReady, notifies, resets), on a virtio-rng and a virtio-vsock (three
 * queues) device. Checks after every access: no exception; MAGIC/VERSION constant; the status
 * never holds DRIVER_OK without FEATURES_OK nor FEATURES_OK without DRIVER; the device is
 * active only while the status says DRIVER_OK; every register a driver may read reads the same
 * from the register page as from the transport; a quiescent device saves and its state
 * restores into a fresh one; a damaged saved state is refused without an exception.
 */
import { VirtioDevice } from '../../src/devices/virtio/device.js';
import { VirtioMmioState } from '../../src/devices/virtio/mmio-state.js';
import { REG } from '../../src/devices/virtio/mmio.js';
import { bit, VIRTIO_F_VERSION_1 } from '../../src/devices/virtio/constants.js';
import { deviceType } from '../../src/devices/virtio/registry.js';
import { fail, type Prng, type Session, type Target } from '../core.js';
import { RAM_A, RAM_B } from '../rig.js';
import { openVirtio, scratchDir } from '../virtio-kinds.js';
import { join } from 'node:path';

const OFFSETS = Object.values(REG);
const S_ACK = 1;
const S_DRIVER = 2;
const S_DRIVER_OK = 4;
const S_FEATURES_OK = 8;
const S_NEEDS_RESET = 64;
const S_FAILED = 128;

let sockNo = 0;

export const mmioTarget: Target = {
  name: 'virtio-mmio',
  what: 'mmio.ts + mmio-state.ts register file and lifecycle (rng, vsock), save/restore',
  cases: 100_000,
  session: 1000,
  open(srng: Prng): Session {
    const kind = srng.chance(0.5) ? 'rng' : 'vsock';
    const v =
      kind === 'rng'
        ? openVirtio('rng', {}, srng)
        : openVirtio(
            'vsock',
            { cid: 3, uds: join(scratchDir(), `m${process.pid}-${sockNo++}.sock`) },
            srng,
          );
    const { rig, host } = v;
    const t = rig.h.transport;
    const dev = rig.h.device;
    const read = (off: number, size = 4): number => {
      const d = new Uint8Array(size);
      t.read(off, d);
      return size === 4 ? new DataView(d.buffer).getUint32(0, true) : d[0]!;
    };
    const write = (off: number, val: number, size = 4) => {
      const d = new Uint8Array(size);
      if (size >= 4) new DataView(d.buffer).setUint32(0, val >>> 0, true);
      else d[0] = val & 0xff;
      t.write(off, d);
      host.settle('virtio-mmio');
    };
    const ringAddr = (rng: Prng): number => {
      switch (rng.below(6)) {
        case 0:
          return RAM_A.size - rng.below(4096);
        case 1:
          return RAM_B.base + RAM_B.size - rng.below(8192);
        case 2:
          return rng.u32();
        case 3:
          return RAM_A.size + rng.below(0x1000);
        default:
          return 0x1000 + 16 * rng.below(0x1f00);
      }
    };
    const step = (rng: Prng) => {
      const st = read(REG.STATUS);
      switch (rng.below(14)) {
        case 0:
          write(REG.STATUS, 0);
          break;
        case 1:
          write(
            REG.STATUS,
            st | rng.pick([S_ACK, S_DRIVER, S_FEATURES_OK, S_DRIVER_OK, S_FAILED, S_NEEDS_RESET]),
          );
          break;
        case 2:
          write(REG.STATUS, rng.u32() & 0xff);
          break;
        case 3:
          write(REG.DEVICE_FEATURES_SEL, rng.below(3));
          read(REG.DEVICE_FEATURES);
          break;
        case 4:
          write(REG.DRIVER_FEATURES_SEL, rng.below(3));
          write(REG.DRIVER_FEATURES, rng.chance(0.5) ? read(REG.DEVICE_FEATURES) : rng.u32());
          break;
        case 5:
          write(REG.QUEUE_SEL, rng.chance(0.9) ? rng.below(4) : rng.u32());
          break;
        case 6:
          write(REG.QUEUE_NUM, rng.pick([0, 1, 3, 16, 256, 257, 1024, rng.u32()]));
          break;
        case 7: {
          const [lo, hi] = rng.pick([
            [REG.QUEUE_DESC_LOW, REG.QUEUE_DESC_HIGH],
            [REG.QUEUE_DRIVER_LOW, REG.QUEUE_DRIVER_HIGH],
            [REG.QUEUE_DEVICE_LOW, REG.QUEUE_DEVICE_HIGH],
          ] as const);
          write(lo, ringAddr(rng));
          write(hi, rng.chance(0.95) ? 0 : rng.u32());
          break;
        }
        case 8:
          write(REG.QUEUE_READY, rng.chance(0.8) ? 1 : rng.pick([0, rng.u32()]));
          break;
        case 9:
          write(REG.QUEUE_NOTIFY, rng.chance(0.9) ? rng.below(4) : rng.u32());
          break;
        case 10:
          write(REG.INTERRUPT_ACK, rng.u32());
          break;
        case 11: {
          // Any register, any size, any value.
          const off = rng.chance(0.7)
            ? rng.pick(OFFSETS) + rng.below(4) * (rng.chance(0.2) ? 1 : 0)
            : rng.below(0x200);
          const size = rng.pick([1, 2, 4, 4, 4, 8]);
          if (rng.chance(0.5)) read(off, size);
          else write(off, rng.u32(), size);
          break;
        }
        case 12: {
          // The whole Linux probe sequence, sometimes with odd queue sizes.
          try {
            rig.ensureRunning(rng);
            write(REG.STATUS, 0);
            rig.start(rng);
          } catch (e) {
            if (!(e instanceof Error) || !/queue|features/.test(e.message)) throw e;
          }
          break;
        }
        default:
          read(rng.pick(OFFSETS));
      }
    };
    // What a driver may read, through the register page (the harness's PageReader fails on any
    // difference from the transport's answer).
    const readable = [
      0x0, 0x4, 0x8, 0xc, 0x10, 0x34, 0x44, 0x60, 0x70, 0xb0, 0xb4, 0xb8, 0xbc, 0xfc,
    ];
    const configLen = v.opened.identity.config.length;
    const check = () => {
      try {
        for (const off of readable) rig.h.driver.read(off);
        for (let off = 0; off + 4 <= configLen; off += 4) rig.h.driver.read(REG.CONFIG + off);
      } catch (e) {
        fail(`virtio-mmio: ${(e as Error).message}`);
      }
      if (read(REG.MAGIC) !== 0x74726976) fail('virtio-mmio: MagicValue changed');
      if (read(REG.VERSION) !== 2) fail('virtio-mmio: Version changed');
      const st = read(REG.STATUS);
      if (st & S_DRIVER_OK && !(st & S_FEATURES_OK))
        fail(`virtio-mmio: status 0x${st.toString(16)}: DRIVER_OK without FEATURES_OK`);
      if (st & S_FEATURES_OK && !(st & S_DRIVER))
        fail(`virtio-mmio: status 0x${st.toString(16)}: FEATURES_OK without DRIVER`);
      if (st & S_DRIVER && !(st & S_ACK))
        fail(`virtio-mmio: status 0x${st.toString(16)}: DRIVER without ACKNOWLEDGE`);
      if (dev.deviceState.kind === 'active' && !(st & S_DRIVER_OK))
        fail(`virtio-mmio: device active with status 0x${st.toString(16)}`);
    };
    let restoresTried = 0;
    let saves = 0;
    return {
      ram: v.ram,
      rig,
      stats: () => ({ saves, damaged_restores: restoresTried }),
      close() {
        v.opened.close();
      },
      run(rng: Prng) {
        const n = 1 + rng.below(40);
        for (let i = 0; i < n; i++) {
          step(rng);
          check();
        }
        if (kind === 'rng' && rng.chance(0.05) && dev.quiesce()) {
          // Save, and restore into a fresh device of the same identity over the same memory.
          const bytes = dev.save();
          saves++;
          const sab = VirtioMmioState.createState(v.opened.identity, bit(VIRTIO_F_VERSION_1));
          const env = { name: 'rng', sys: host.sys, loop: host.loop, log: () => undefined };
          const backend = deviceType('rng').create({}, env).backend;
          const fresh = new VirtioDevice(sab, backend, {
            mem: v.ram.mem,
            interrupt: () => undefined,
            log: () => undefined,
            defer: () => () => undefined,
            after: () => () => undefined,
          });
          const r = fresh.restore(bytes);
          if (!r.ok) fail(`virtio-mmio: a saved device does not restore: ${r.error.message}`);
          if (fresh.deviceState.kind !== dev.deviceState.kind)
            fail(`virtio-mmio: saved ${dev.deviceState.kind}, restored ${fresh.deviceState.kind}`);
          // A damaged snapshot: refused with an error (or restored), never an exception.
          for (let k = 0; k < 8; k++) {
            const bad = bytes.slice(
              0,
              rng.chance(0.2) ? rng.below(bytes.length + 1) : bytes.length,
            );
            for (let j = 1 + rng.below(4); j > 0 && bad.length > 0; j--)
              bad[rng.below(bad.length)] = rng.chance(0.5) ? rng.u32() & 0xff : 0xff;
            const s2 = VirtioMmioState.createState(v.opened.identity, bit(VIRTIO_F_VERSION_1));
            const b2 = deviceType('rng').create({}, env).backend;
            new VirtioDevice(s2, b2, {
              mem: v.ram.mem,
              interrupt: () => undefined,
              log: () => undefined,
              defer: () => () => undefined,
              after: () => () => undefined,
            }).restore(bad);
            restoresTried++;
          }
        }
      },
    };
  },
};

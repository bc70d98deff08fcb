/**
 * virtio-blk requests: headers (type, sector near and past the capacity), data segments (sizes
 * that are and are not sector multiples, aliasing one buffer many times, long indirect
 * chains), status buffers (missing, readable, longer than one byte), plus the chain mutations
 * of the rig. A tmpfs image per session. Oracle for requests written correctly: status OK and
 * used.len = data read + 1 for IN/OUT inside the disk (IOERR for OUT on a read-only disk).
 */
import { closeSync, ftruncateSync, openSync, rmSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { fail, type Prng, type Session, type Target } from '../core.js';
import { checkNoDeviceException, DATA_AREA, type Seg } from '../rig.js';
import { openVirtio, scratchDir } from '../virtio-kinds.js';

const SECTORS = 256 * 1024; // 128 MiB, sparse on tmpfs (aliasing requests fit in it)
const T_IN = 0;
const T_OUT = 1;
const T_FLUSH = 4;
const T_GET_ID = 8;

let imageNo = 0;

export const blockTarget: Target = {
  name: 'virtio-blk',
  what: 'block/ requests through DeviceType.create: headers, sectors, segments, aliasing, status',
  cases: 100_000,
  session: 500,
  open(srng: Prng): Session {
    const path = join(scratchDir(), `disk-${process.pid}-${imageNo++}.img`);
    const fd = openSync(path, 'w');
    ftruncateSync(fd, SECTORS * 512);
    writeSync(fd, new Uint8Array(4096).fill(0x5a), 0, 4096, 0);
    closeSync(fd);
    const readOnly = srng.chance(0.2);
    const v = openVirtio(
      'block',
      { path, readOnly, serial: srng.chance(0.5) ? 'fuzz-serial' : undefined },
      srng,
    );
    const { rig, host } = v;
    const settle = () => host.settle('virtio-blk');
    /**
     * The most host I/O one kick did, with the deferred turns it led to (aliasing asks for much
     * more than the guest's RAM).
     */
    let maxKickIo = 0;
    return {
      ram: v.ram,
      rig,
      stats: () => ({
        chains: rig.chainsPublished,
        resets: rig.resets,
        ...v.created.metrics?.(),
        ...rig.deviceStats(),
        max_kick_io_MiB: Math.round(maxKickIo / 2 ** 20),
      }),
      close() {
        v.opened.close();
        rmSync(path, { force: true });
      },
      run(rng: Prng) {
        rig.ensureRunning(rng);
        rig.resetData();
        const n = 1 + rng.below(4);
        const oracle: Array<
          { status: number; expectLen: number; want: number[]; desc: string } | undefined
        > = [];
        for (let r = 0; r < n; r++) {
          const type = rng.chance(0.9) ? rng.pick([T_IN, T_OUT, T_FLUSH, T_GET_ID]) : rng.u32();
          const sector = rng.chance(0.8)
            ? rng.chance(0.5)
              ? rng.below(64)
              : SECTORS - 64 + rng.below(72)
            : rng.pick([SECTORS - 1, 2 ** 32, 2 ** 53 - 1, 0xffff_ffff_ffff_ffffn]);
          const hdr = rig.alloc(16) ?? DATA_AREA.base;
          rig.ram.mem.writeU32(hdr, type >>> 0);
          rig.ram.mem.writeU32(hdr + 4, rng.chance(0.9) ? 0 : rng.u32());
          rig.ram.mem.writeU64(hdr + 8, BigInt(sector));
          const segs: Seg[] = [
            { addr: hdr, len: rng.chance(0.95) ? 16 : rng.below(32), write: false },
          ];
          const write = type === T_IN || type === T_GET_ID;
          let dataLen = 0;
          if (rng.chance(0.003)) {
            // Aliasing: one buffer many times (a few KiB of guest RAM asking for MiBs of I/O).
            const len = 512 * (1 + rng.below(32));
            const a = rig.alloc(len, 512) ?? 0x20000;
            const count = rng.pick([64, 256, 1000, 1022]);
            for (let i = 0; i < count; i++) segs.push({ addr: a, len, write });
            dataLen = len * count;
          } else {
            const nseg = rng.chance(0.05) ? rng.below(200) : rng.below(4);
            for (let i = 0; i < nseg; i++) {
              const len = rng.chance(0.8) ? 512 * (1 + rng.below(8)) : rng.below(2000);
              const a = rig.alloc(len, 512);
              if (a === undefined) break;
              segs.push({ addr: a, len, write });
              dataLen += len;
            }
          }
          const stLen = rng.chance(0.95) ? 1 : rng.below(4);
          const st = rig.alloc(Math.max(1, stLen)) ?? DATA_AREA.base + 64;
          rig.ram.mem.writeU8(st, 0xee);
          if (stLen > 0) segs.push({ addr: st, len: stLen, write: rng.chance(0.97) });
          const mutate = rng.chance(0.25) ? 1 + rng.below(3) : 0;
          const useIndirect = rig.indirect && (segs.length > 8 || rng.chance(0.3));
          rig.writeChain(rng, 0, segs, mutate, useIndirect);
          const plain =
            mutate === 0 &&
            stLen === 1 &&
            segs.length <= 6 &&
            (useIndirect || segs.length <= rig.queues[0]!.q.size) &&
            segs[0]!.len === 16 &&
            segs[segs.length - 1]!.write &&
            (type === T_IN || type === T_OUT) &&
            dataLen > 0 &&
            dataLen % 512 === 0 &&
            typeof sector === 'number' &&
            sector + dataLen / 512 <= SECTORS;
          // Several requests of one batch may share descriptor slots: only one-request batches
          // have an exact oracle.
          oracle.push(
            plain && n === 1
              ? {
                  status: st,
                  expectLen: type === T_IN ? dataLen + 1 : 1,
                  // A write to a read-only disk: IOERR or UNSUPP (both tell the driver it failed).
                  want: type === T_OUT && readOnly ? [1, 2] : [0],
                  desc: `type ${type} sector ${sector} segs ${segs.map((x) => `${x.write ? 'w' : 'r'}${x.len}@${x.addr.toString(16)}`).join(',')}`,
                }
              : undefined,
          );
        }
        const io = () => {
          const m = v.created.metrics?.() ?? {};
          return (m.read_bytes ?? 0) + (m.write_bytes ?? 0);
        };
        const io0 = io();
        rig.kick(0, settle, false, 'virtio-blk');
        maxKickIo = Math.max(maxKickIo, io() - io0);
        checkNoDeviceException(rig, 'virtio-blk');
        if (rig.racing || rig.broken()) return;
        const used = rig.queues[0]!.q.takeUsed();
        const o = oracle[0];
        if (n === 1 && o && used.length === 1) {
          const got = rig.ram.mem.readU8(o.status);
          if (!o.want.includes(got))
            fail(
              `virtio-blk: a valid request answered status ${got} (want ${o.want}): ${o.desc}; device log: ${v.logs.concat(rig.h.logs).slice(-2).join(' / ')}`,
            );
          if (got === 0 && used[0]!.len !== o.expectLen)
            fail(`virtio-blk: a valid request used.len ${used[0]!.len}, want ${o.expectLen}`);
        }
      },
    };
  },
};

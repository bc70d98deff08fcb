/**
 * virtio-mem and virtio-pmem requests (the guest-facing parsers of the device-memory devices):
 * request types known and unknown, addresses aligned and not, inside, across and far outside the
 * region, block counts up to 0xffff, short requests and short or missing response buffers, plus
 * the chain mutations of the rig. The backends are built directly (their host sides are a
 * memfd and a file the fake host does not model): discards and flushes are counted. Oracles:
 * no exception; plugged size = blocks marked plugged, never above requested at plug time and
 * never outside the region; every discard inside the region and block aligned.
 */
import { fail, type Prng, type Session, type Target } from '../core.js';
import { checkNoDeviceException, DATA_AREA, sharedRam, VirtioRig, type Seg } from '../rig.js';
import { FakeHost } from '../host.js';
import { MemDevice, memIdentity } from '../../src/devices/virtio/mem/mem.js';
import { PmemDevice, pmemIdentity } from '../../src/devices/virtio/pmem/pmem.js';

const MIB = 1024 * 1024;
const BASE = 0x1_0000_0000;

export const memTarget: Target = {
  name: 'virtio-mem/pmem',
  what: 'mem/ plug, unplug, unplug-all, state requests and pmem/ flush requests: ranges, sizes, short buffers',
  cases: 100_000,
  session: 500,
  open(srng: Prng): Session {
    const pmem = srng.chance(0.2);
    const blockSize = srng.pick([2, 4, 128]) * MIB;
    const regionSize = blockSize * (1 + srng.below(512));
    const geometry = { addr: BASE, regionSize, blockSize };
    let requested = 0;
    let plugged = -1;
    let discards = 0;
    let flushes = 0;
    const backend = pmem
      ? new PmemDevice('fuzz-pmem', () => {
          flushes++;
          if (flushes % 97 === 0) throw new Error('EIO (fuzz)');
        })
      : new MemDevice(
          'fuzz-mem',
          geometry,
          { requestedSize: () => requested, setPluggedSize: (b) => (plugged = b) },
          (offset, length) => {
            discards++;
            if (offset % blockSize !== 0 || length % blockSize !== 0 || length <= 0)
              fail(`virtio-mem: discard ${offset}+${length} is not whole blocks`);
            if (offset + length > regionSize)
              fail(
                `virtio-mem: discard ${offset}+${length} runs past the ${regionSize}-byte region`,
              );
          },
        );
    const host = new FakeHost();
    const ram = sharedRam();
    const identity = pmem ? pmemIdentity(BASE, 2 * MIB) : memIdentity(geometry);
    const rig = new VirtioRig(ram, identity, backend, host.loop);
    rig.start(srng);
    const settle = () => host.settle('virtio-mem');
    return {
      ram,
      rig,
      stats: () => ({
        chains: rig.chainsPublished,
        discards,
        flushes,
        ...(backend instanceof MemDevice ? { plug_bytes: backend.counters.plugBytes } : {}),
        ...rig.deviceStats(),
      }),
      run(rng: Prng) {
        rig.ensureRunning(rng);
        rig.resetData();
        if (rng.chance(0.2))
          requested = blockSize * rng.below(Math.floor(regionSize / blockSize) + 2);
        const n = 1 + rng.below(4);
        for (let r = 0; r < n; r++) {
          const reqLen = rng.chance(0.9) ? (pmem ? 4 : 24) : rng.below(40);
          const req = rig.alloc(Math.max(reqLen, 1)) ?? DATA_AREA.base;
          const type = rng.chance(0.9) ? rng.below(pmem ? 2 : 5) : rng.u32() & 0xffff;
          rig.ram.mem.writeU16(req, type);
          if (!pmem && reqLen >= 24) {
            const block = rng.chance(0.8)
              ? rng.below(Math.floor(regionSize / blockSize) + 4)
              : rng.u32();
            const addr = rng.chance(0.9)
              ? BASE + block * blockSize + (rng.chance(0.1) ? rng.below(blockSize) : 0)
              : rng.chance(0.5)
                ? rng.below(BASE)
                : 0xffff_ffff_ffff_f000n;
            rig.ram.mem.writeU64(req + 8, BigInt(addr));
            rig.ram.mem.writeU16(req + 16, rng.chance(0.8) ? 1 + rng.below(8) : rng.u32() & 0xffff);
          }
          const segs: Seg[] = [{ addr: req, len: reqLen, write: false }];
          const respLen = rng.chance(0.9) ? (pmem ? 4 : 10) : rng.below(16);
          const resp = rig.alloc(Math.max(respLen, 1)) ?? DATA_AREA.base + 64;
          if (respLen > 0) segs.push({ addr: resp, len: respLen, write: rng.chance(0.95) });
          const mutate = rng.chance(0.25) ? 1 + rng.below(3) : 0;
          rig.writeChain(rng, 0, segs, mutate, rig.indirect && rng.chance(0.3));
        }
        rig.kick(0, settle, false, 'virtio-mem');
        checkNoDeviceException(rig, 'virtio-mem');
        if (backend instanceof MemDevice) {
          const size = backend.pluggedSize;
          if (size < 0 || size > regionSize || size % blockSize !== 0)
            fail(`virtio-mem: plugged size ${size} outside the ${regionSize}-byte region`);
          if (plugged !== -1 && plugged !== size)
            fail(`virtio-mem: config plugged_size ${plugged}, device ${size}`);
        }
      },
    };
  },
};

/**
 * virtio-balloon through DeviceType.create on the fake host: inflate/deflate PFN arrays (valid,
 * outside RAM, in the hole between the regions, torn, longer than the cap), statistics buffers
 * (whole and torn entries, unknown tags, more entries than the cap), free page reports and
 * hints (ranges of any size and alignment, command ids of this run and others), interleaved
 * with the API's requests (target, polling interval, hinting start/stop/status) and polls.
 * Checks: no exception; every range given back to the host is page aligned and inside RAM (the
 * fake madvise refuses others, which would count as discard_fails); the inflate/deflate queues
 * are used at once; the counters add up (every PFN of a request under the cap is either given
 * back or counted invalid).
 */
import {
  BALLOON_PAGE,
  BalloonDevice,
  BalloonRequestError,
  MAX_PFNS_PER_CHAIN,
  type BalloonRequest,
} from '../../src/devices/virtio/balloon/balloon.js';
import { fail, type Prng, type Session, type Target } from '../core.js';
import { checkNoDeviceException, DATA_AREA, RAM_A, RAM_B, type Seg } from '../rig.js';
import { openVirtio } from '../virtio-kinds.js';

const INFLATE = 0;
const DEFLATE = 1;
const STATS = 2;
const HINT = 3;
const REPORT = 4;

/** A PFN worth trying: in the data area, at a region's edges, in the hole, far away. */
function pfn(rng: Prng): number {
  const page = (a: number) => Math.floor(a / BALLOON_PAGE);
  switch (rng.below(6)) {
    case 0:
    case 1:
      return page(DATA_AREA.base) + rng.below(page(DATA_AREA.end - DATA_AREA.base));
    case 2:
      return page(RAM_B.base) + rng.below(page(RAM_B.size) + 2) - 1;
    case 3:
      return page(RAM_A.size) + rng.below(page(RAM_B.base - RAM_A.size)); // the hole
    case 4:
      return rng.pick([0xffff_ffff, 0x8000_0000, 2 ** 20, page(RAM_B.base + RAM_B.size)]);
    default:
      return rng.u32();
  }
}

export const balloonTarget: Target = {
  name: 'virtio-balloon',
  what: 'balloon/ PFN arrays, statistics, free page reports and hints, API requests',
  cases: 100_000,
  session: 500,
  open(srng: Prng): Session {
    const v = openVirtio(
      'balloon',
      {
        amountMib: srng.below(4),
        deflateOnOom: srng.chance(0.5),
        statsPollingIntervalS: 1,
        freePageHinting: true,
        freePageReporting: true,
      },
      srng,
    );
    const { rig, host } = v;
    const dev = v.created.backend as BalloonDevice;
    const settle = () => host.settle('virtio-balloon');
    let apiRefused = 0;
    return {
      ram: v.ram,
      rig,
      stats: () => ({
        chains: rig.chainsPublished,
        resets: rig.resets,
        ...v.created.metrics?.(),
        ...rig.deviceStats(),
        madvise_calls: host.madvised.calls,
        api_refused: apiRefused,
      }),
      close() {
        v.opened.close();
      },
      run(rng: Prng) {
        rig.ensureRunning(rng);
        rig.resetData();
        const mem = rig.ram.mem;
        const c0 = { ...dev.counters };
        // Inflate or deflate: one chain of PFN arrays (sometimes torn, sometimes past the cap).
        for (const q of [INFLATE, DEFLATE]) {
          if (!rng.chance(0.5)) continue;
          const count = rng.chance(0.02) ? MAX_PFNS_PER_CHAIN + rng.below(64) : rng.below(300);
          const len = count * 4 + (rng.chance(0.05) ? 1 + rng.below(3) : 0);
          const a = rig.alloc(Math.max(len, 1));
          if (a === undefined) continue;
          for (let i = 0; i < count; i++) mem.writeU32(a + i * 4, pfn(rng));
          const segs: Seg[] = [{ addr: a, len, write: false }];
          const mutate = rng.chance(0.1) ? 1 : 0;
          rig.writeChain(rng, q, segs, mutate, rig.indirect && rng.chance(0.2));
          rig.kick(q, settle, false, `virtio-balloon ${q === INFLATE ? 'inflate' : 'deflate'}`);
          if (mutate === 0 && !rig.broken() && !rig.racing && q === INFLATE && count <= 1024) {
            const given = dev.counters.inflated_pages - c0.inflated_pages;
            const bad = dev.counters.invalid_pfns - c0.invalid_pfns;
            const torn = len % 4 !== 0 ? 1 : 0;
            if (given + bad !== count + torn)
              fail(
                `inflate of ${count} PFNs: ${given} given back + ${bad} invalid (len ${len}, inflate_count +${dev.counters.inflate_count - c0.inflate_count}, guest errors ${JSON.stringify(rig.h.device.state.counters())}, status ${rig.status()}) ${rig.h.logs.join(' / ')}`,
              );
          }
        }
        // Statistics: a buffer of entries (sometimes torn, too many, unknown tags).
        if (rng.chance(0.3)) {
          const n = rng.chance(0.05) ? 70 + rng.below(10) : rng.below(17);
          const len = n * 10 + (rng.chance(0.1) ? 1 + rng.below(9) : 0);
          const a = rig.alloc(Math.max(len, 1));
          if (a !== undefined) {
            for (let i = 0; i < n; i++) {
              mem.writeU16(a + i * 10, rng.chance(0.9) ? rng.below(16) : rng.u32() & 0xffff);
              mem.writeU64(a + i * 10 + 2, BigInt(rng.u32()) * BigInt(rng.u32() + 1));
            }
            rig.writeChain(rng, STATS, [{ addr: a, len, write: false }], 0, false);
            rig.kick(STATS, settle, true, 'virtio-balloon stats');
          }
        }
        // Reports and hints: ranges of the guest's (any size, any alignment), command ids.
        for (const q of [HINT, REPORT]) {
          if (!rng.chance(0.4)) continue;
          const segs: Seg[] = [];
          for (let i = 1 + rng.below(4); i > 0; i--) {
            if (q === HINT && rng.chance(0.3)) {
              const a = rig.alloc(4);
              if (a === undefined) break;
              mem.writeU32(a, rng.pick([0, 1, 2, 3, rng.u32()]));
              segs.push({ addr: a, len: 4, write: false });
              continue;
            }
            const len = rng.pick([BALLOON_PAGE, 2 * BALLOON_PAGE, 100, 5000, 0]);
            const a = rig.alloc(len, rng.chance(0.7) ? BALLOON_PAGE : 8);
            if (a === undefined) break;
            segs.push({ addr: a, len, write: rng.chance(0.8) });
          }
          if (segs.length === 0) continue;
          segs.sort((x, y) => Number(x.write) - Number(y.write));
          rig.writeChain(rng, q, segs, rng.chance(0.1) ? 1 : 0, false);
          rig.kick(q, settle, false, `virtio-balloon ${q === HINT ? 'hint' : 'report'}`);
        }
        // The API, and time passing (the statistics poll).
        if (rng.chance(0.2)) {
          const r: BalloonRequest = rng.pick<BalloonRequest>([
            { op: 'set-target', amountMib: rng.chance(0.9) ? rng.below(8) : rng.u32() },
            { op: 'set-stats-interval', seconds: rng.below(3) },
            { op: 'describe' },
            { op: 'hint-start', acknowledgeOnStop: rng.chance(0.5) },
            { op: 'hint-stop' },
            { op: 'hint-status' },
          ]);
          try {
            const out = dev.control(r, rig.h.device.state.config);
            if (out.config) rig.h.device.state.changeConfig(out.config.offset, out.config.bytes);
          } catch (e) {
            if (!(e instanceof BalloonRequestError)) throw e;
            apiRefused++;
          }
        }
        if (rng.chance(0.2)) {
          host.advance(1000);
          settle();
        }
        if (dev.counters.discard_fails !== 0)
          fail(`a range the host refused was given back (${dev.counters.discard_fails})`);
        checkNoDeviceException(rig, 'virtio-balloon');
      },
    };
  },
};

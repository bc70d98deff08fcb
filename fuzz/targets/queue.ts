/**
 * The virtqueue and descriptor chains (queue.ts, chain.ts) through VirtioDevice: batches of
 * chains, valid or mutated (flags, next, lengths, hostile addresses, aliasing, loops, indirect
 * tables of bad length or nested, heads out of range, avail.idx running ahead), served by a
 * backend that checks every chain it is given against what the driver wrote:
 * - a chain the driver wrote correctly arrives exactly (buffers, lengths, order);
 * - every chain's views lie inside guest RAM, readable before writable, lengths add up and fit
 *   a u32, at most max(queue size, 1024) buffers per side;
 * - every chain published is used once (bad chains with len 0) unless the device asked for a
 *   reset; used.len is what the backend returned.
 */
import type { DescriptorChain } from '../../src/devices/virtio/chain.js';
import type { VirtioBackend } from '../../src/devices/virtio/device.js';
import {
  bit,
  QUEUE_BUDGET_CHAINS,
  VIRTIO_F_RING_INDIRECT_DESC,
  VIRTIO_F_VERSION_1,
} from '../../src/devices/virtio/constants.js';
import { fail, type Prng, type Session, type Target } from '../core.js';
import { FakeHost } from '../host.js';
import {
  checkNoDeviceException,
  RAM_A,
  RAM_B,
  sharedRam,
  VirtioRig,
  type Seg,
  type SharedRam,
} from '../rig.js';

interface Expected {
  readable: number[];
  writable: number[];
  addrs: number[];
}

class CheckingBackend implements VirtioBackend {
  readonly name = 'fuzz-checker';
  seen: Array<{ head: number; readable: number[]; writable: number[]; addrs: number[] }> = [];
  maxBuffers = 1024;
  constructor(
    private readonly ram: SharedRam,
    private readonly rng: () => number,
  ) {}
  handle(_queue: number, chain: DescriptorChain): number {
    const addrs: number[] = [];
    const check = (views: Uint8Array[], total: number, side: string) => {
      if (views.length > this.maxBuffers)
        fail(
          `chain ${chain.head}: ${views.length} ${side} buffers (queue/indirect bound ${this.maxBuffers})`,
        );
      let sum = 0;
      for (const v of views) {
        const r = this.ram.sabs.indexOf(v.buffer as SharedArrayBuffer);
        if (r < 0) fail(`chain ${chain.head}: a ${side} view is not guest RAM`);
        const region = r === 0 ? RAM_A : RAM_B;
        if (v.byteOffset + v.byteLength > region.size)
          fail(`chain ${chain.head}: view past its region`);
        if (v.byteLength === 0) fail(`chain ${chain.head}: a zero-length ${side} view`);
        addrs.push(region.base + v.byteOffset);
        sum += v.byteLength;
      }
      if (sum !== total)
        fail(`chain ${chain.head}: ${side} length ${total} but views add up to ${sum}`);
      if (total > 0xffff_ffff) fail(`chain ${chain.head}: ${side} length ${total} > u32`);
    };
    check(chain.readable, chain.readableLength, 'readable');
    check(chain.writable, chain.writableLength, 'writable');
    this.seen.push({
      head: chain.head,
      readable: chain.readable.map((v) => v.byteLength),
      writable: chain.writable.map((v) => v.byteLength),
      addrs,
    });
    return Math.floor(this.rng() * (chain.writableLength + 1));
  }
}

export const queueTarget: Target = {
  name: 'virtqueue',
  what: 'queue.ts + chain.ts via VirtioDevice: mutated rings, indirect tables, hostile addresses',
  cases: 100_000,
  session: 1000,
  open(srng: Prng): Session {
    const ram = sharedRam();
    let caseRng: Prng = srng;
    const backend = new CheckingBackend(ram, () => caseRng.u32() / 0x1_0000_0000);
    const identity = {
      deviceId: 4, // entropy: any id will do for the transport
      features: bit(VIRTIO_F_RING_INDIRECT_DESC) | bit(VIRTIO_F_VERSION_1),
      queueSizes: [256],
      config: new Uint8Array(0),
    };
    const host = new FakeHost();
    const rig = new VirtioRig(ram, identity, backend, host.loop);
    // Both notification modes (issue 17): EVENT_IDX (avail_event/used_event) or the ring flags.
    rig.eventIdxChooser = (r) => r.chance(0.7);
    rig.start(srng);
    /** The guest scribbled on avail_event/used.flags (device-written): its own kicks may stop. */
    let scribbled = false;
    let lastStarts = -1;
    let served = 0;
    return {
      ram,
      rig,
      stats: () => ({
        chains: rig.chainsPublished,
        served: served,
        resets: rig.resets,
        ...rig.deviceStats(),
      }),
      run(rng: Prng) {
        caseRng = rng;
        rig.ensureRunning(rng);
        rig.resetData();
        served += backend.seen.length;
        backend.seen = [];
        const size = rig.queues[0]!.q.size;
        // Sometimes more valid chains than one turn serves (QUEUE_BUDGET_CHAINS): the rest are
        // served by deferred turns, in order.
        const big = size > QUEUE_BUDGET_CHAINS && rng.chance(0.03);
        const batch = big
          ? QUEUE_BUDGET_CHAINS + 1 + rng.below(size - QUEUE_BUDGET_CHAINS)
          : 1 + rng.below(Math.min(size, 8));
        let slot = rng.below(size);
        let slotsUsed = 0;
        const expected: Array<Expected | undefined> = [];
        for (let b = 0; b < batch; b++) {
          const useIndirect = rig.indirect && (big || rng.chance(0.3));
          const nseg = big
            ? useIndirect
              ? rng.below(4)
              : 1
            : rng.chance(0.05)
              ? rng.below(40)
              : rng.below(5);
          const segs: Seg[] = [];
          let writing = false;
          for (let i = 0; i < nseg; i++) {
            writing = writing || rng.chance(0.3);
            const len = rng.chance(0.1) ? 0 : 1 + rng.below(rng.chance(0.1) ? 8192 : 256);
            const addr = rig.alloc(len) ?? 0;
            segs.push({ addr, len, write: writing });
          }
          const mutate = !big && rng.chance(0.35) ? 1 + rng.below(3) : 0;
          const slots = useIndirect ? 1 : Math.max(1, segs.length);
          const clean = mutate === 0 && slotsUsed + slots <= size;
          rig.writeChain(rng, 0, segs, mutate, useIndirect, slot);
          slot = (slot + slots) % size;
          slotsUsed += slots;
          expected.push(
            clean
              ? {
                  readable: segs.filter((s) => !s.write && s.len > 0).map((s) => s.len),
                  writable: segs.filter((s) => s.write && s.len > 0).map((s) => s.len),
                  addrs: segs.filter((s) => s.len > 0).map((s) => Number(s.addr)),
                }
              : undefined,
          );
        }
        // Sometimes the driver asks for no interrupts, or kicks twice.
        const mq = rig.queues[0]!.q;
        if (rng.chance(0.1)) mq.setAvailFlags(1);
        // EVENT_IDX fields: any used_event; rarely, a guest writing the device's avail_event or
        // used.flags (it may only hurt its own kicks; checked below while it has not).
        if (rng.chance(0.1)) mq.setUsedEvent(rng.below(0x10000));
        if (rig.starts !== lastStarts) {
          lastStarts = rig.starts;
          scribbled = false;
        }
        if (rng.chance(0.002)) {
          scribbled = true;
          ram.mem.writeU16(mq.used + 4 + 8 * mq.size, rng.below(0x10000));
          ram.mem.writeU16(mq.used, rng.below(0x10000));
        }
        rig.kick(0, () => host.settle('virtqueue'), false, 'virtqueue');
        if (rng.chance(0.05)) rig.kick(0, () => host.settle('virtqueue'), false, 'virtqueue');
        checkNoDeviceException(rig, 'virtqueue');
        if (rig.racing) return;
        // Drained (nothing pending, no turn of its own scheduled): the driver's next buffer
        // must be kicked, or the guest hangs (a lost wake-up).
        if (!rig.broken() && !scribbled && rig.pending(0) === 0) {
          const availIdx = ram.mem.readU16(mq.avail + 2);
          if (rig.eventIdx && mq.availEvent() !== availIdx)
            fail(
              `virtqueue: drained with avail_event ${mq.availEvent()} != avail.idx ${availIdx}: the next buffer would not be kicked`,
            );
          if (!rig.eventIdx && (mq.usedFlags() & 1) !== 0)
            fail('virtqueue: drained with VIRTQ_USED_F_NO_NOTIFY still set');
        }
        // Only when every chain of the batch was clean is the order of handled chains known.
        if (!rig.broken() && expected.every((e) => e !== undefined)) {
          if (backend.seen.length !== expected.length)
            fail(
              `virtqueue: ${expected.length} valid chains published, ${backend.seen.length} served`,
            );
          expected.forEach((e, i) => {
            const s = backend.seen[i]!;
            const same = (a: number[], b: number[]) =>
              a.length === b.length && a.every((x, j) => x === b[j]);
            if (
              !same(e.readable, s.readable) ||
              !same(e.writable, s.writable) ||
              !same(e.addrs, s.addrs)
            )
              fail(
                `virtqueue: chain ${i} served as r[${s.readable}] w[${s.writable}] @[${s.addrs.map((a) => a.toString(16))}], written as r[${e.readable}] w[${e.writable}] @[${e.addrs.map((a) => a.toString(16))}]`,
              );
          });
        }
      },
    };
  },
};

/**
 * A virtio device under fuzz: the project's test harness (transport + VirtioDevice + mock
 * driver) over a guest memory of two RAM regions with a gap (so "near the end of RAM" and
 * "between regions" exist), in a SharedArrayBuffer (so the racing vCPU can rewrite it), and a
 * chain writer that lays out valid rings and then mutates descriptors, lengths, flags,
 * indirect tables, addresses and the avail ring.
 */
import { GuestMemory } from '../src/memory/guest-memory.js';
import {
  VIRTQ_DESC_F_INDIRECT,
  VIRTQ_DESC_F_NEXT,
  VIRTQ_DESC_F_WRITE,
} from '../src/devices/virtio/chain.js';
import { STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER_OK } from '../src/devices/virtio/constants.js';
import type { VirtioBackend } from '../src/devices/virtio/device.js';
import type { VirtioDeviceIdentity } from '../src/devices/virtio/mmio-state.js';
import type { EventOps } from '../src/devices/virtio/descriptor.js';
import { DeferQueue, harness, type Harness } from '../src/devices/virtio/testing/harness.js';
import { GuestAllocator, MockQueue } from '../src/devices/virtio/testing/mock-driver.js';
import { fail, type Prng } from './core.js';

/**
 * The device's deferred work (a queue's next turn after its budget) on the fake host's loop, as
 * the device worker does it (DeviceEnvironment.defer = the loop's setTimer(0)): it runs once
 * the events ready now have been handled, in the same settle(). Counts the turns that ran.
 */
export class LoopDefer extends DeferQueue {
  turns = 0;
  constructor(private readonly loop: EventOps) {
    super();
  }
  override defer(_name: string, fn: () => void): () => void {
    return this.loop.setTimer(0, () => {
      this.turns++;
      fn();
    });
  }
}

/** Region A: rings and buffers. Region B: after a gap, small, for end-of-RAM addresses. */
export const RAM_A = { base: 0, size: 512 * 1024 };
export const RAM_B = { base: 0x100000, size: 64 * 1024 };
const RING_AREA = { base: 0x1000, end: 0x20000 };
export const DATA_AREA = { base: 0x20000, end: RAM_A.size };

export interface SharedRam {
  mem: GuestMemory;
  /** The SharedArrayBuffers behind regions A and B (for the racing vCPU). */
  sabs: SharedArrayBuffer[];
}

export function sharedRam(): SharedRam {
  const a = new SharedArrayBuffer(RAM_A.size);
  const b = new SharedArrayBuffer(RAM_B.size);
  const mem = new GuestMemory([
    { ...RAM_A, bytes: new Uint8Array(a) },
    { ...RAM_B, bytes: new Uint8Array(b) },
  ]);
  return { mem, sabs: [a, b] };
}

export interface Seg {
  addr: number | bigint;
  len: number;
  write: boolean;
}

/** What the driver side of the fuzzer knows about one queue. */
export interface DriverQueue {
  q: MockQueue;
  /** avail.idx we published (free-running u16). */
  published: number;
  /** used.idx we saw. */
  used: number;
}

export class VirtioRig {
  readonly h: Harness;
  queues: DriverQueue[] = [];
  private data: GuestAllocator;
  chainsPublished = 0;
  /** Device resets the fuzzer did (after DEVICE_NEEDS_RESET or on purpose). */
  resets = 0;
  indirect = true;
  /** VIRTIO_F_RING_EVENT_IDX negotiated at the last start(). */
  eventIdx = true;
  /** A target that wants both notification modes decides per start (default: always offered). */
  eventIdxChooser: ((rng: Prng) => boolean) | undefined;
  /** start() calls so far (a new driver instance each). */
  starts = 0;
  /** A racing vCPU rewrites guest memory: skip the checks that trust the driver's side. */
  racing = false;

  /** The device's deferred queue turns, on the loop of the fake host. */
  readonly turns: LoopDefer;
  /** Device logs and failures already checked by checkNoDeviceException. */
  checkedLogs = 0;
  checkedFailures = 0;

  constructor(
    readonly ram: SharedRam,
    readonly identity: VirtioDeviceIdentity,
    readonly backend: VirtioBackend,
    loop: EventOps,
  ) {
    this.turns = new LoopDefer(loop);
    this.h = harness(identity, backend, {
      mem: ram.mem,
      alloc: new GuestAllocator(RING_AREA.base, RING_AREA.end),
      deferred: this.turns,
      // The driver reads the register page (vmm/register-pages.ts), each read checked against
      // the transport's answer: a page left behind fails the case.
      registerPage: true,
    });
    this.data = new GuestAllocator(DATA_AREA.base, DATA_AREA.end);
  }

  /** Driver setup (reset, features, queues, DRIVER_OK) with rings in fresh memory. */
  start(rng: Prng): void {
    this.ram.mem.fill(RING_AREA.base, RING_AREA.end - RING_AREA.base);
    const alloc = new GuestAllocator(RING_AREA.base, RING_AREA.end);
    const sizes = [1, 2, 4, 8, 16, 64, 128, 256];
    const max = Math.min(...this.identity.queueSizes);
    const queueSize = rng.chance(0.6) ? max : Math.min(max, rng.pick(sizes));
    this.indirect = rng.chance(0.85);
    const d = this.h.driver;
    this.starts++;
    this.eventIdx = this.eventIdxChooser?.(rng) ?? true;
    const mask = (this.indirect ? 0n : 1n << 28n) | (this.eventIdx ? 0n : 1n << 29n);
    if (!d.negotiate((f) => f & ~mask)) fail('the device refused features it offered');
    this.queues = this.identity.queueSizes.map((_max, i) => {
      const q = new MockQueue(this.ram.mem, alloc, queueSize);
      d.setupQueue(i, q);
      return { q, published: 0, used: 0 };
    });
    d.driverOk();
  }

  status(): number {
    return this.h.driver.status();
  }

  /** The device asked for a reset, or is not running: the driver resets and sets up again. */
  ensureRunning(rng: Prng): void {
    const st = this.status();
    if (st & STATUS_DEVICE_NEEDS_RESET || !(st & STATUS_DRIVER_OK) || this.queues.length === 0) {
      this.h.driver.write(0x70, 0);
      this.resets++;
      this.start(rng);
    }
  }

  broken(): boolean {
    return (
      (this.status() & STATUS_DEVICE_NEEDS_RESET) !== 0 ||
      this.h.device.deviceState.kind !== 'active'
    );
  }

  /** Fresh data buffers for this case. */
  resetData(): void {
    this.data = new GuestAllocator(DATA_AREA.base, DATA_AREA.end);
  }

  /** A buffer in the data area, or undefined when the area is used up this case. */
  alloc(len: number, align = 8): number | undefined {
    try {
      return this.data.alloc(len, align);
    } catch {
      return undefined;
    }
  }

  /** A guest address chosen to hurt: near region ends, in the gap, past RAM, >= 2^53. */
  hostileAddr(rng: Prng, len: number): number | bigint {
    switch (rng.below(9)) {
      case 0:
        return RAM_A.size - len + rng.below(8); // straddles the end of region A
      case 1:
        return RAM_B.base + RAM_B.size - len + rng.below(8) - 4; // end of RAM
      case 2:
        return RAM_A.size + rng.below(RAM_B.base - RAM_A.size); // the gap
      case 3:
        return RAM_B.base - rng.below(16); // just before region B
      case 4:
        return 2 ** 53 + rng.below(4096); // not exact in a double
      case 5:
        return BigInt.asUintN(64, BigInt(rng.u32()) << 32n) | BigInt(rng.u32());
      case 6:
        return 0xffff_ffff_ffff_f000n + BigInt(rng.below(4096));
      case 7:
        return rng.below(RING_AREA.end); // over the rings themselves
      default:
        return rng.below(RAM_A.size);
    }
  }

  /**
   * Writes `segs` as a chain of queue `qi` (direct, or indirect when `indirectTable`), applies
   * `mutations` random corruptions, and publishes it. Returns the head.
   */
  writeChain(
    rng: Prng,
    qi: number,
    segs: Seg[],
    mutate: number,
    useIndirect: boolean,
    at?: number,
  ): number {
    const dq = this.queues[qi]!;
    const q = dq.q;
    const size = q.size;
    const direct = !useIndirect || segs.length === 0;
    const n = Math.max(1, segs.length);
    // Descriptor table slots for a direct chain: consecutive from `at` (or a random slot).
    const start = (at ?? rng.below(size)) % size;
    const raw = segs.map((s, i) => ({
      addr: s.addr,
      len: s.len,
      flags: (s.write ? VIRTQ_DESC_F_WRITE : 0) | (i < segs.length - 1 ? VIRTQ_DESC_F_NEXT : 0),
      next: direct ? (start + i + 1) % size : i + 1,
    }));
    if (raw.length === 0) raw.push({ addr: 0, len: 0, flags: 0, next: 0 });
    for (let m = 0; m < mutate; m++) {
      const d = raw[rng.below(raw.length)]!;
      switch (rng.below(10)) {
        case 0:
          d.flags ^= 1 << rng.below(3);
          break;
        case 1:
          d.flags = rng.u32() & 0xffff;
          break;
        case 2:
          d.next = rng.chance(0.5) ? rng.below(size + 2) : rng.u32() & 0xffff;
          break;
        case 3:
          d.len = rng.pick([0, 1, 15, 16, 17, 0x7fff_ffff, 0xffff_ffff, rng.u32()]);
          break;
        case 4:
          d.addr = this.hostileAddr(rng, d.len);
          break;
        case 5: // aliasing: every descriptor on one buffer
          for (const x of raw) x.addr = raw[0]!.addr;
          break;
        case 6: // a self-loop
          d.flags |= VIRTQ_DESC_F_NEXT;
          d.next = direct ? (start + raw.indexOf(d)) % size : raw.indexOf(d);
          break;
        case 7: // nested indirect / indirect in a chain
          d.flags |= VIRTQ_DESC_F_INDIRECT;
          d.len = rng.pick([16, 32, 16 * 1024, 16 * 1025, 24, rng.u32() & 0xfff0]);
          break;
        case 8:
          d.len = (d.len + rng.below(64) - 32) >>> 0;
          break;
        default:
          d.addr = typeof d.addr === 'bigint' ? d.addr : d.addr + rng.below(64) - 32;
      }
    }
    const safeAddr = (a: number | bigint) => (typeof a === 'number' && a < 0 ? 0 : a);
    let head: number;
    if (direct) {
      for (let i = 0; i < raw.length; i++) {
        const d = raw[i]!;
        q.writeDescriptor(q.desc, (start + i) % size, { ...d, addr: safeAddr(d.addr) });
      }
      head = start;
    } else {
      const table = this.alloc(16 * n, 16);
      if (table === undefined) return this.publishHead(rng, qi, start);
      raw.forEach((d, i) => q.writeDescriptor(table, i, { ...d, addr: safeAddr(d.addr) }));
      let tlen = 16 * n;
      let taddr: number | bigint = table;
      if (mutate > 0 && rng.chance(0.2)) tlen = rng.pick([0, 8, tlen + 8, 16 * 1025, tlen * 2]);
      if (mutate > 0 && rng.chance(0.1)) taddr = this.hostileAddr(rng, tlen);
      const flags = VIRTQ_DESC_F_INDIRECT | (mutate > 0 && rng.chance(0.1) ? VIRTQ_DESC_F_NEXT : 0);
      q.writeDescriptor(q.desc, start, { addr: safeAddr(taddr), len: tlen, flags, next: 0 });
      head = start;
    }
    return this.publishHead(rng, qi, head, mutate > 0);
  }

  private publishHead(rng: Prng, qi: number, head: number, mutate = false): number {
    const dq = this.queues[qi]!;
    let h = head;
    if (mutate && rng.chance(0.03))
      h = rng.chance(0.5) ? dq.q.size + rng.below(4) : rng.u32() & 0xffff;
    dq.q.publish(h);
    dq.published = (dq.published + 1) & 0xffff;
    this.chainsPublished++;
    if (mutate && rng.chance(0.01)) {
      // avail.idx runs ahead of what was written (more than a queue's worth, sometimes).
      dq.published = (dq.published + rng.below(2 * dq.q.size + 2)) & 0xffff;
      dq.q.setAvailIdx(dq.published);
    }
    return h;
  }

  /** Chains published and not yet used on queue `qi`. */
  pending(qi: number): number {
    const dq = this.queues[qi]!;
    return (dq.published - dq.q.usedIdx()) & 0xffff;
  }

  /**
   * The guest kicks queue `qi` (through the transport); `settle` runs the worker's loop after,
   * deferred queue turns included (as the real loop runs its 0 ms timers after each batch of
   * wake-ups). Progress: after the kick and the turns it led to, a queue the device serves on
   * kicks (not self-served) has nothing pending, at least one chain was used if any was pending,
   * and every deferred turn used a chain (a turn is only scheduled when the budget ran out with
   * chains left); or the device is broken. Used entries never run ahead of published ones.
   */
  kick(qi: number, settle: () => void, selfServed: boolean, what: string): void {
    if (this.racing) {
      // Another vCPU rewrites the rings: the driver's own bookkeeping means nothing.
      this.h.kick(qi);
      settle();
      return;
    }
    const before = this.queues[qi]!.q.usedIdx();
    const pending = this.pending(qi);
    const turns0 = this.turns.turns;
    this.h.kick(qi);
    settle();
    if (this.broken()) return;
    const used = (this.queues[qi]!.q.usedIdx() - before) & 0xffff;
    const turns = this.turns.turns - turns0;
    if (used > pending)
      fail(`${what}: queue ${qi}: ${used} chains used after a kick with ${pending} pending`);
    if (selfServed) return;
    if (pending > 0 && used === 0)
      fail(
        `${what}: queue ${qi}: a kick with ${pending} chains pending used none after ${turns} deferred turns (device active)`,
      );
    if (this.pending(qi) !== 0)
      fail(
        `${what}: queue ${qi}: ${this.pending(qi)} of ${pending} chains still pending after a kick and ${turns} deferred turns (device active)`,
      );
    if (turns > used)
      fail(
        `${what}: queue ${qi}: ${turns} deferred turns for ${used} chains used (a turn without progress)`,
      );
  }

  /** The generic device's counters (queue_budget_yields, device_failures) and the turns run. */
  deviceStats(): Record<string, number> {
    return { ...this.h.device.metrics(), deferred_turns: this.turns.turns };
  }

  /** Exceptions out of the backend the device counted (device_failures). */
  failures(): number {
    return this.h.device.counters.failures;
  }

  /** Device-side exceptions the VirtioDevice caught (a bug of ours, not the guest's). */
  exceptions(): string[] {
    return this.h.logs.filter((l) => /exception/i.test(l));
  }
}

/**
 * Fails the case when the device logged a caught exception or counted a failure since the last
 * check (a device bug, even if contained), unless `excused`: a host I/O error the fuzzer
 * injected in this case, which breaking the device is the intended answer to (device-failure
 * policy). Logs are logged once per kind, so the counters are what see a second failure.
 */
export function checkNoDeviceException(rig: VirtioRig, what: string, excused = false): void {
  const logs = rig.h.logs.slice(rig.checkedLogs);
  const failures = rig.failures() - rig.checkedFailures;
  rig.checkedLogs = rig.h.logs.length;
  rig.checkedFailures = rig.failures();
  if (excused) return;
  const ex = logs.filter((l) => /exception/i.test(l));
  if (ex.length > 0) fail(`${what}: the device caught an exception: ${ex[0]!.split('\n')[0]}`);
  if (failures > 0)
    fail(
      `${what}: the device counted ${failures} device_failures (first exception logged: ${(rig.exceptions()[0] ?? 'none').split('\n')[0]})`,
    );
  // A transport counter of device failures (whatever its name), if the device keeps one.
  const counters = rig.h.device.state.counters() as unknown as Record<string, number>;
  for (const [k, v] of Object.entries(counters))
    if (/exception|fail/i.test(k) && v > 0) fail(`${what}: the device counted ${v} ${k}`);
}

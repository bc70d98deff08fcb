/**
 * A whole virtio device in one thread, for tests: the transport a vCPU would use, the device
 * the device worker would run, and a mock driver, over anonymous guest memory. Lifecycle events
 * and notifications are delivered synchronously (the device worker's job in production).
 */
import { GuestMemory } from '../../../memory/guest-memory.js';
import { VIRTIO_F_VERSION_1, bit } from '../constants.js';
import { type VirtioBackend, VirtioDevice } from '../device.js';
import type { BusDevice } from '../../bus.js';
import {
  REGISTER_PAGE_BYTES,
  VirtioMmioState,
  setRegisterPageMapper,
  type VirtioDeviceIdentity,
} from '../mmio-state.js';
import { MmioTransport } from '../mmio.js';
import { GuestAllocator, MmioDriver, MockQueue } from './mock-driver.js';

export const RAM_BASE = 0;
export const RAM_SIZE = 4 * 1024 * 1024;

/**
 * The device worker loop's timers, as tests see them: deferred work (a queue's next turn) waits
 * here until the test runs a round. Share one between harnesses to see devices take turns.
 */
export class DeferQueue {
  private pending: Array<{ fn: (() => void) | undefined }> = [];
  /** What ran, in order (each entry the name given to defer()). */
  readonly log: string[] = [];
  defer(name: string, fn: () => void): () => void {
    const t: { fn: (() => void) | undefined } = {
      fn: () => {
        this.log.push(name);
        fn();
      },
    };
    this.pending.push(t);
    return () => {
      t.fn = undefined;
    };
  }
  get size(): number {
    return this.pending.filter((t) => t.fn).length;
  }
  /** Runs the work deferred before this call (work deferred meanwhile waits for the next round). */
  runRound(): number {
    const round = this.pending;
    this.pending = [];
    let n = 0;
    for (const t of round) {
      const fn = t.fn;
      t.fn = undefined;
      if (fn) (fn(), n++);
    }
    return n;
  }
  /** Runs rounds until nothing is deferred (at most `maxRounds`); returns the rounds run. */
  drain(maxRounds = 10_000): number {
    let rounds = 0;
    while (this.size > 0) {
      if (++rounds > maxRounds) throw new Error('deferred work does not end');
      this.runRound();
    }
    return rounds;
  }
}

/**
 * The loop's delayed timers under a fake clock (ms): `after` timers wait until the test moves
 * the clock past them. Counts what fired, so a test can see that a throttled queue slept
 * instead of spinning.
 */
export class FakeClock {
  private t = 0;
  private timers: Array<{ at: number; seq: number; fn: (() => void) | undefined }> = [];
  private seq = 0;
  /** Timers that fired. */
  fired = 0;
  readonly now = (): number => this.t;
  after(ms: number, fn: () => void): () => void {
    const timer = { at: this.t + ms, seq: this.seq++, fn: fn as (() => void) | undefined };
    this.timers.push(timer);
    return () => {
      timer.fn = undefined;
    };
  }
  /** Timers armed and not fired or cancelled. */
  get pending(): number {
    return this.timers.filter((x) => x.fn).length;
  }
  /** When the next armed timer fires (undefined: none). */
  get next(): number | undefined {
    const live = this.timers.filter((x) => x.fn).map((x) => x.at);
    return live.length ? Math.min(...live) : undefined;
  }
  /** Moves the clock `ms` on, firing the timers that fall due on the way, in order. */
  advance(ms: number): void {
    const end = this.t + ms;
    for (;;) {
      const due = this.timers
        .filter((x) => x.fn && x.at <= end)
        .sort((a, b) => a.at - b.at || a.seq - b.seq)[0];
      if (!due) break;
      this.t = Math.max(this.t, due.at);
      const fn = due.fn!;
      due.fn = undefined;
      this.timers = this.timers.filter((x) => x.fn);
      this.fired++;
      fn();
    }
    this.t = end;
  }
}

export interface Harness {
  mem: GuestMemory;
  alloc: GuestAllocator;
  transport: MmioTransport;
  device: VirtioDevice;
  driver: MmioDriver;
  interrupts: () => number;
  logs: string[];
  /** Deferred work of the device (queue turns after a used budget). */
  deferred: DeferQueue;
  /** The loop's delayed timers (throttled queues). */
  clock: FakeClock;
  /** Negotiates `features` (default: all offered), sets up one MockQueue per queue, DRIVER_OK. */
  start(opts?: { features?: (offered: bigint) => bigint; queueSize?: number }): MockQueue[];
  /** QueueNotify through the transport (the fallback path; KVM's ioeventfd in production). */
  kick(queue?: number): void;
}

export interface HarnessOptions {
  /**
   * Guest memory (and its allocator) of another harness: a second device over the same guest,
   * as a restored VM sees it. Default: fresh anonymous memory.
   */
  mem?: GuestMemory;
  alloc?: GuestAllocator;
  /** The loop's timers (default: a queue of this harness alone). */
  deferred?: DeferQueue;
  /** Name in the deferred queue's log (default: the backend's name). */
  name?: string;
  /** The fake clock of delayed timers (default: one of this harness alone). */
  clock?: FakeClock;
  /** The loop's round (DeviceEnvironment.round; default: none, every interrupt is written). */
  round?: () => number;
  /** Called at each interrupt after it is counted (a driver that handles it at once, say). */
  onInterrupt?: () => void;
  /**
   * Give the device a register page (mmio-state.ts) and let the driver read it, as KVM's
   * read-only slot does; its writes still go to the transport. Every read the driver makes is
   * also asked of the transport and must agree (else the read throws).
   */
  registerPage?: boolean;
}

/** The register pages of harnesses, by the address their register file holds. */
const pages = new Map<bigint, ArrayBuffer>();
let nextPageAddr = 0x7000_0000_0000n;

/** Reads from the register page, writes to the transport; checks each read against both. */
export class PageReader implements BusDevice {
  readonly bytes: Uint8Array;
  constructor(
    readonly transport: MmioTransport,
    page: ArrayBuffer,
  ) {
    this.bytes = new Uint8Array(page);
  }
  read(offset: number, data: Uint8Array): void {
    data.set(this.bytes.subarray(offset, offset + data.length));
    const want = new Uint8Array(data.length);
    const bad = this.transport.state.counters().badAccesses;
    this.transport.read(offset, want);
    // Only what a driver may read must agree (the transport counts the others).
    if (this.transport.state.counters().badAccesses !== bad) return;
    if (Buffer.compare(Buffer.from(data), Buffer.from(want)) !== 0)
      throw new Error(
        `register page at 0x${offset.toString(16)}: ${Buffer.from(data).toString('hex')}, transport ${Buffer.from(want).toString('hex')}`,
      );
  }
  write(offset: number, data: Uint8Array): void {
    this.transport.write(offset, data);
  }
}

export function harness(
  id: VirtioDeviceIdentity,
  backend: VirtioBackend,
  opts: HarnessOptions = {},
): Harness {
  const mem = opts.mem ?? GuestMemory.anonymous([{ base: RAM_BASE, size: RAM_SIZE }]);
  const alloc = opts.alloc ?? new GuestAllocator(0x1000, RAM_SIZE);
  const sab = VirtioMmioState.createState(id, bit(VIRTIO_F_VERSION_1));
  let page: ArrayBuffer | undefined;
  if (opts.registerPage) {
    page = new ArrayBuffer(REGISTER_PAGE_BYTES);
    const addr = (nextPageAddr += 0x1000n);
    pages.set(addr, page);
    setRegisterPageMapper((a) => {
      const p = pages.get(a);
      if (!p) throw new Error(`no register page at 0x${a.toString(16)}`);
      return p;
    });
    new VirtioMmioState(sab).attachPage(page, addr);
  }
  let irqs = 0;
  const logs: string[] = [];
  const deferred = opts.deferred ?? new DeferQueue();
  const name = opts.name ?? backend.name;
  const clock = opts.clock ?? new FakeClock();
  const device = new VirtioDevice(sab, backend, {
    mem,
    interrupt: () => {
      irqs++;
      opts.onInterrupt?.();
    },
    log: (m) => logs.push(m),
    defer: (fn) => deferred.defer(name, fn),
    after: (ms, fn) => clock.after(ms, fn),
    ...(opts.round ? { round: opts.round } : {}),
  });
  const transport = new MmioTransport(
    sab,
    { lifecycle: () => device.onLifecycle(), notify: (q) => device.onKick(q) },
    { resetWaitMs: 0 },
  );
  const driver = new MmioDriver(page ? new PageReader(transport, page) : transport);
  return {
    mem,
    alloc,
    transport,
    device,
    driver,
    interrupts: () => irqs,
    logs,
    deferred,
    clock,
    start(opts = {}) {
      if (!driver.negotiate(opts.features ?? ((f) => f))) throw new Error('FEATURES_OK refused');
      const queues = id.queueSizes.map((max, i) => {
        const q = new MockQueue(mem, alloc, opts.queueSize ?? max);
        driver.setupQueue(i, q);
        return q;
      });
      driver.driverOk();
      return queues;
    },
    kick(queue = 0) {
      driver.write(0x50, queue);
    },
  };
}

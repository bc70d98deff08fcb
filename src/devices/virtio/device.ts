/**
 * A virtio device as the device worker runs it: the generic part (activation on DRIVER_OK,
 * reset, queue draining, interrupts, guest-error policy) around a small backend that turns one
 * descriptor chain into I/O (block/, rng/).
 *
 * State is a discriminated union: inactive (no queues; the driver is negotiating, or the device
 * was reset or broken) | active (queues built from the driver's setup, bound to one reset epoch).
 *
 * Save/restore (device-state.ts): `save()` records the transport, the device state with each
 * active queue's position, and the backend's bytes; `restore()` rebuilds all of it in a fresh
 * device. Both run on the device worker's thread while it is not processing anything else, with
 * the vCPUs paused (see `quiesce()`).
 *
 * Guest-error policy (DESIGN.md, "Guest-facing code is the attack surface"): a malformed chain is
 * returned with used.len 0 (the request failed; its buffers are not trusted enough to write a
 * status into); a broken queue or an unusable queue setup marks the device DEVICE_NEEDS_RESET and
 * raises a config-change interrupt. Each kind of error is logged once per device and counted;
 * nothing the guest does throws out of here.
 *
 * Device-failure policy: an exception out of the backend (handle, kick, activate, or one of its
 * own fds and timers, which the device worker runs through guard()) is a bug of ours or a host
 * failure the backend did not turn into a request error. The device is then broken: marked
 * DEVICE_NEEDS_RESET (config-change interrupt), its queues dropped, logged once, counted
 * (device_failures). The VM and every other device keep running; the driver's reset revives it.
 *
 * Work budget: one turn of a queue serves at most QUEUE_BUDGET_CHAINS chains and stops after
 * QUEUE_BUDGET_BYTES bytes of buffers; the rest waits for its next turn (env.defer: a timer of
 * the device worker's loop, run after the other ready events), so queues and devices take turns.
 *
 * Notifications (issue 17, queue.ts): VIRTIO_F_RING_EVENT_IDX is offered on every device (the
 * transport adds it). A turn of a queue the generic part drains suppresses the driver's kicks
 * for its duration, batches its used entries (one used.idx store) and raises at most one
 * interrupt, after the batch, if the driver wants it (used_event / NO_INTERRUPT). A turn that
 * stops on its budget or its rate limiter leaves kicks suppressed: its own timer takes the
 * queue up again, and only a turn that ran the ring dry re-enables them (queue.ts pop()), so
 * no wake-up is lost. Self-served queues (QueueIo) get the same through beginBatch() /
 * suppressKicks() / notify(); a backend that calls neither gets unbatched, correct behaviour.
 */
import type { GuestMemory } from '../../memory/guest-memory.js';
import { PersistError } from '../../util/persist.js';
import { err, ok, type Result } from '../../util/result.js';
import {
  DEVICE_ID_BLOCK,
  DEVICE_ID_MEM,
  DEVICE_ID_NET,
  DEVICE_ID_PMEM,
  DEVICE_ID_RNG,
  DEVICE_ID_VSOCK,
  INT_USED_BUFFER,
  QUEUE_BUDGET_BYTES,
  QUEUE_BUDGET_CHAINS,
  QUEUE_SIZE_MAX,
  STATUS_DRIVER_OK,
  VIRTIO_F_RING_EVENT_IDX,
  VIRTIO_F_RING_INDIRECT_DESC,
  bit,
} from './constants.js';
import type { DescriptorChain } from './chain.js';
import {
  type SavedDeviceState,
  VirtioDeviceStateV1,
  checkDeviceState,
  disagreement,
  restoreQueues,
  runnable,
} from './device-state.js';
import { VirtioMmioState } from './mmio-state.js';
import { type QueueAddresses, type QueuePosition, Virtqueue } from './queue.js';
import { checkTransportState } from './transport-state.js';
import { monoMs } from '../../util/clock.js';

/**
 * `queue N`, the name a queue's work runs under in guard(): made once per index, not per kick
 * (every kick and turn passes it; only a failure prints it).
 */
const queueLabels: string[] = [];
const QUEUE_LABELS_CACHED = 64;
function queueLabel(index: number): string {
  if (index >= QUEUE_LABELS_CACHED) return `queue ${index}`;
  return (queueLabels[index] ??= `queue ${index}`);
}

/**
 * Queue access for backends that serve some queues themselves (virtio-net RX, virtio-vsock):
 * they take buffers when host data arrives, not when the driver kicks. Bound to one activation:
 * after a reset every method is a no-op (pop returns undefined).
 */
export interface QueueIo {
  /**
   * The next well-formed chain of `queue`, or undefined (empty, inactive, broken, or a queue's
   * worth of malformed chains in a row). Malformed chains are completed with used.len 0 and
   * counted on the way. An empty ring re-enables kicks (race-free: Virtqueue.pop) unless
   * `reenableKicks` is false: then the backend must look again itself, and end its turn with
   * a pop that re-enables.
   */
  pop(queue: number, reenableKicks?: boolean): DescriptorChain | undefined;
  pushUsed(queue: number, head: number, len: number): void;
  /**
   * Gives back the chain pop(queue) returned last, unused (the next pop returns it again);
   * false when `head` is not that chain. How a backend that holds a chain saves: it lets go.
   */
  unpop(queue: number, head: number): boolean;
  /**
   * Publishes used.idx (ends a batch) and raises the used-buffer interrupt if chains were used
   * since the last call and the driver wants it (EVENT_IDX's used_event or NO_INTERRUPT).
   */
  notify(queue: number): void;
  /**
   * Optional batching: until the next notify(queue), pushUsed(queue, ..) writes used elements
   * without storing used.idx; notify() stores it once. Without it every pushUsed is published
   * at once (correct, unbatched). A backend that opens a batch must call notify() on every
   * path out of its turn.
   */
  beginBatch(queue: number): void;
  /**
   * Optional: the driver need not kick `queue` until this backend next finds it empty (pop()
   * returning undefined re-enables kicks and looks again, race-free). For a backend that keeps
   * taking buffers without kicks (it drains, or has its own wake-up, as RX from a TAP) and
   * needs a kick only once it ran out.
   */
  suppressKicks(queue: number): void;
  /** Counts a guest error and logs it once per kind. */
  guestError(kind: string, message: string): void;
  /**
   * For a queue another party serves (VirtioBackend.offloaded): the driver's ring addresses and
   * size, and where this device stands in it (the restored position, or 0/0 when fresh).
   */
  ring(queue: number): OffloadedRing | undefined;
  /**
   * The other party stopped at available entry `nextAvail` (a free-running u16): this device's
   * position in the ring becomes that, with used.idx read back from guest RAM, so that a save
   * records where the ring really stands.
   */
  adopt(queue: number, nextAvail: number): void;
  /**
   * The other party used buffers of `queue` and asks for the driver's interrupt (it already
   * applied EVENT_IDX): raise the used-buffer interrupt, as notify() does once it decided yes.
   */
  signalUsed(queue: number): void;
  /**
   * The other party found `queue` broken by the driver (vhost's error eventfd): as a broken ring
   * found by pop(), a guest error, DEVICE_NEEDS_RESET with a config-change interrupt, the
   * queues dropped (deactivate) until the driver resets the device.
   */
  broken(queue: number, message: string): void;
}

/** A queue as an offloaded backend needs it (QueueIo.ring). */
export interface OffloadedRing {
  size: number;
  addresses: QueueAddresses;
  position: QueuePosition;
}

export interface VirtioBackend {
  /** For log lines: "virtio-blk /path/disk.img". */
  readonly name: string;
  /**
   * Serves one request; returns the number of bytes written into the chain's writable buffers
   * (used.len). Must not throw for anything the guest wrote: an exception breaks the device
   * (DEVICE_NEEDS_RESET) until the driver resets it.
   */
  handle(queue: number, chain: DescriptorChain): number;
  /**
   * Rate limiting (issue 16): asked before handle() for each chain of a queue the generic part
   * drains. 0: go (the backend took its tokens; handle() follows). A number of ms > 0: the
   * chain does not fit now; it is given back to the queue (the next pop returns it again) and
   * the queue sleeps that long on a timer of the device worker's loop (kicks meanwhile wake
   * nothing), then its turn resumes with this chain.
   */
  admit?(queue: number, chain: DescriptorChain): number;
  /**
   * Optional (issue 17, virtio-net's batched TX): called at the end of every turn of a queue the
   * generic part drains, before its used entries are published (and so before the driver may
   * reuse their buffers): a backend that started I/O on the chains of the turn in handle()
   * finishes it here. An exception breaks the device, as one from handle() does.
   */
  endTurn?(queue: number): void;
  /**
   * Optional (issue 17, virtio-net's early TX completion): called after a drained turn's used
   * entries are published and its interrupt sent (so the driver may already reuse the turn's
   * buffers: a backend does here only work on copies it made in handle()). An exception breaks
   * the device.
   */
  afterTurn?(queue: number): void;
  /**
   * Optional: asked after each chain handle() served. True ends the turn there, as the chain and
   * byte budgets do (queue_budget_yields), for work those counts do not measure: virtio-blk's
   * Sync flushes (an fdatasync each, on this thread). The backend counts its own work and
   * starts counting again once it has said true.
   */
  turnSpent?(queue: number): boolean;
  /**
   * Queues the backend serves itself through QueueIo: a kick of one of them calls kick()
   * instead of draining it through handle().
   */
  readonly selfServed?: readonly number[];
  kick?(queue: number): void;
  /**
   * Queues served outside this process (the host kernel's vhost: vsock/vhost.ts): the device
   * worker does not watch their kick eventfds (the other party polls them) and the generic part
   * never drains them; the backend gets their rings through QueueIo.ring(). A kick that reaches
   * the device anyway (a QueueNotify KVM did not take, kickAll) goes to kick(), to pass on.
   */
  readonly offloaded?: readonly number[];
  /**
   * The VM pauses (snapshots, PUT /vm Paused), or resumes: for a backend whose queues are
   * served elsewhere, which must stop touching guest memory while paused. Called whether the
   * device is active or not (an activation while paused must wait for resume). An exception
   * breaks the device.
   */
  pause?(): void;
  resume?(): void;
  /**
   * Called when the driver set DRIVER_OK with these negotiated features, or (`restored` true)
   * when a restored device resumes an activation: then restore() has already run, the queues
   * stand where they were saved, and activate must keep what restore() set (no "new driver
   * instance" resets).
   */
  activate?(features: bigint, io: QueueIo, restored?: boolean): void;
  /** Called when the queues are dropped (reset or broken). */
  deactivate?(): void;
  /**
   * The backend's own state, for a snapshot (taken while the device is quiescent). Chains a
   * backend holds (taken from a queue, not yet used) are counted in the queue positions; a
   * backend that holds one records its head and re-reads it on restore.
   */
  save?(): Uint8Array;
  /**
   * Loads what save() returned, before activate(.., restored = true). The bytes are input:
   * validate everything first and throw a PersistError (changing nothing) if they are bad.
   */
  restore?(bytes: Uint8Array): void;
}

export type DeviceState =
  | { kind: 'inactive' }
  | { kind: 'active'; epoch: number; features: bigint; queues: Array<Virtqueue | undefined> };

export interface DeviceEnvironment {
  mem: GuestMemory;
  /**
   * Signals the device's interrupt after InterruptStatus bits were set (in the device worker:
   * KVM_IRQ_LINE on its GSI, or its irqfd).
   */
  interrupt(): void;
  log(message: string): void;
  /**
   * Runs `fn` on the device worker's thread once the events ready now have been handled (the
   * loop's setTimer(0)); returns a cancel function. How a queue that used its budget goes on.
   */
  defer(fn: () => void): () => void;
  /**
   * Runs `fn` on the device worker's thread after `ms` (the loop's setTimer); returns a cancel
   * function. How a throttled queue sleeps until its rate limiter has the tokens.
   */
  after(ms: number, fn: () => void): () => void;
  /**
   * The loop's round (EventLoop.rounds: one per epoll_wait): used-buffer interrupts of one
   * round share one interrupt while unacknowledged (interruptIfWanted). Absent: every
   * interrupt is written.
   */
  round?(): number;
}

/** The generic part's own counters (metrics(): Firecracker-style snake_case names). */
export interface VirtioDeviceCounters {
  /** A queue used its budget for one turn and yielded to the loop (queue_budget_yields). */
  budgetYields: number;
  /** Exceptions out of the backend: the device was broken (device_failures). */
  failures: number;
  /** A queue's turn stopped at a chain its backend's rate limiter did not admit. */
  throttled: number;
  /** A throttled queue's timer fired and its turn resumed. */
  throttleWakeups: number;
  /** Per queue: notifications (kicks) received from the driver. */
  kicks: number[];
  /** Per queue: used-buffer interrupts raised. */
  irqs: number[];
  /** Per queue: interrupt decisions the driver's suppression (used_event/NO_INTERRUPT) said no to. */
  irqsSuppressed: number[];
  /**
   * Per queue: interrupts raised without an interrupt signal of their own, because one signalled in
   * the same round of the loop was still unacknowledged (interruptIfWanted).
   */
  irqsCoalesced: number[];
  /** Per queue: chains returned to the driver (used entries). */
  used: number[];
  /** Per queue: drained turns that returned at least one chain. */
  turns: number[];
  /**
   * Per queue: the time of the timed turns among those (one turn in TURN_TIMING_EVERY: see
   * there), from the first pop to the end of afterTurn, in µs. A Float64Array: it holds
   * fractions from the first turn on, and a plain array would change its elements' kind
   * (integers to doubles) at that turn, which V8's code compiled for another device's array (the
   * virtio-net warm-up's, vmm/net-warmup.ts) does not take.
   */
  turnUs: Float64Array;
}

/**
 * One turn in this many is timed (queue<i>_turn_us is their mean times all turns). A clock read
 * is a call out of JavaScript (process.hrtime), which under the lab's emulation costs 1.6-13 µs
 * against ~0.06 µs on a host (docs/bench.md, "What a call costs in the lab"); every turn read it
 * twice, one of them between a ping's kick and its TAP write.
 */
export const TURN_TIMING_EVERY = 8;

/**
 * The turns timed among `turns`: 0, TURN_TIMING_EVERY, 2 x ... turns had been counted when each
 * began (serveQueue; a turn is counted only if it returned chains, and only those add time).
 */
export const timedTurns = (turns: number): number => Math.ceil(turns / TURN_TIMING_EVERY);

/**
 * Kicks under Firecracker's metric names, by device ID and queue (its queue_event_count
 * fields); queues without one are reported under our queue<i>_kicks only.
 */
const FC_KICK_NAMES: Readonly<Record<number, ReadonlyArray<string | undefined>>> = {
  [DEVICE_ID_BLOCK]: ['queue_event_count'],
  [DEVICE_ID_NET]: ['rx_queue_event_count', 'tx_queue_event_count'],
  [DEVICE_ID_RNG]: ['entropy_event_count'],
  [DEVICE_ID_VSOCK]: ['rx_queue_event_count', 'tx_queue_event_count'],
  [DEVICE_ID_PMEM]: ['queue_event_count'],
  [DEVICE_ID_MEM]: ['queue_event_count'],
};

export class VirtioDevice {
  readonly state: VirtioMmioState;
  private dev: DeviceState = { kind: 'inactive' };
  private readonly logged = new Set<string>();
  /** Queues whose next turn is scheduled (env.defer), with its cancel function. */
  private readonly turns = new Map<number, () => void>();
  readonly counters: VirtioDeviceCounters = {
    budgetYields: 0,
    failures: 0,
    throttled: 0,
    throttleWakeups: 0,
    kicks: [],
    irqs: [],
    irqsSuppressed: [],
    irqsCoalesced: [],
    used: [],
    turns: [],
    turnUs: new Float64Array(0),
  };
  /** Queues asleep on their rate limiter (their turn in `turns` is a timer of env.after). */
  private readonly sleeping = new Set<number>();

  constructor(
    sab: SharedArrayBuffer,
    readonly backend: VirtioBackend,
    private readonly env: DeviceEnvironment,
  ) {
    this.state = new VirtioMmioState(sab);
    const n = this.state.identity().queueNumMax.length;
    for (const k of ['kicks', 'irqs', 'irqsSuppressed', 'irqsCoalesced', 'used', 'turns'] as const)
      this.counters[k] = new Array<number>(n).fill(0);
    this.counters.turnUs = new Float64Array(n);
  }

  get deviceState(): DeviceState {
    return this.dev;
  }

  /** The control eventfd fired: catch up with DRIVER_OK and resets. */
  onLifecycle(): void {
    const snap = this.state.snapshot();
    if (
      this.dev.kind === 'active' &&
      (this.dev.epoch !== snap.epoch || !(snap.status & STATUS_DRIVER_OK))
    ) {
      this.deactivate();
    }
    // Whatever happened before this snapshot, we hold no queues of older epochs now.
    if (this.state.resetPending()) this.state.ackReset(snap.epoch);
    if (this.dev.kind === 'inactive' && runnable(snap.status)) {
      const queues: Array<Virtqueue | undefined> = [];
      const indirect = (snap.driverFeatures & bit(VIRTIO_F_RING_INDIRECT_DESC)) !== 0n;
      const eventIdx = (snap.driverFeatures & bit(VIRTIO_F_RING_EVENT_IDX)) !== 0n;
      for (const [i, q] of snap.queues.entries()) {
        if (!q.ready) {
          queues.push(undefined);
          continue;
        }
        const r = Virtqueue.create(
          this.env.mem,
          { size: q.size, desc: q.desc, driver: q.driver, device: q.device },
          { indirect, eventIdx, maxSize: QUEUE_SIZE_MAX },
        );
        if (!r.ok) {
          this.guestError('setup', `queue ${i}: ${r.error}`);
          if (this.state.markNeedsReset(snap.epoch)) this.env.interrupt();
          return;
        }
        queues.push(r.value);
      }
      const active: DeviceState = {
        kind: 'active',
        epoch: snap.epoch,
        features: snap.driverFeatures,
        queues,
      };
      this.dev = active;
      this.guard('activation', () =>
        this.backend.activate?.(snap.driverFeatures, this.queueIo(active)),
      );
      // Buffers made available before DRIVER_OK (or kicks we could not serve yet) are served now.
      this.kickAll();
    }
  }

  /**
   * Generic counters in metrics names, next to the backend's. Per queue i (ours, Firecracker
   * has no per-queue fields): queue<i>_kicks (notifications received), queue<i>_irqs (used-
   * buffer interrupts raised), queue<i>_irqs_suppressed (the driver said no), queue<i>_used
   * (chains returned), queue<i>_turns and queue<i>_turn_us (drained turns that returned a
   * chain, and their time in µs: the device's own share of a queue's round trip, estimated from
   * one turn in TURN_TIMING_EVERY). Kicks also
   * under Firecracker's names where it has them (FC_KICK_NAMES).
   */
  metrics(): Record<string, number> {
    const c = this.counters;
    const m: Record<string, number> = {
      queue_budget_yields: c.budgetYields,
      device_failures: c.failures,
    };
    c.kicks.forEach((_k, i) => {
      m[`queue${i}_kicks`] = c.kicks[i]!;
      m[`queue${i}_irqs`] = c.irqs[i]!;
      m[`queue${i}_irqs_suppressed`] = c.irqsSuppressed[i]!;
      m[`queue${i}_irqs_coalesced`] = c.irqsCoalesced[i]!;
      m[`queue${i}_used`] = c.used[i]!;
      m[`queue${i}_turns`] = c.turns[i]!;
      const timed = timedTurns(c.turns[i]!);
      m[`queue${i}_turn_us`] = timed > 0 ? Math.round((c.turnUs[i]! * c.turns[i]!) / timed) : 0;
    });
    const fc = FC_KICK_NAMES[this.state.identity().deviceId];
    fc?.forEach((name, i) => {
      if (name && i < c.kicks.length) m[name] = c.kicks[i]!;
    });
    return m;
  }

  /**
   * Runs backend work that is not a queue kick (its own fds and timers, on the device worker's
   * loop): an exception breaks the device, as one from handle() does.
   */
  guard(what: string, fn: () => void): void {
    try {
      fn();
    } catch (e) {
      this.fail(what, e);
    }
  }

  /**
   * The device is broken (an exception of the backend): DEVICE_NEEDS_RESET with a config-change
   * interrupt if it was live, its queues dropped, logged once, counted.
   */
  private fail(what: string, e: unknown): void {
    this.counters.failures++;
    this.logOnce(
      'exception',
      `${this.backend.name}: ${what} failed with an exception; the device needs a reset (logged once): ${(e as Error)?.stack ?? String(e)}`,
    );
    const d = this.dev;
    if (d.kind === 'active' && this.state.markNeedsReset(d.epoch)) this.env.interrupt();
    this.deactivate();
  }

  /**
   * True when the device worker has caught up with the transport: no reset waits for it, and
   * onLifecycle() would change nothing. save() requires it.
   */
  isQuiescent(): boolean {
    if (this.state.resetPending()) return false;
    const snap = this.state.snapshot();
    return disagreement(snap.status, snap.epoch, this.dev) === undefined;
  }

  /**
   * Catches up with lifecycle events not handled yet (a DRIVER_OK or reset whose eventfd write
   * the loop has not read), so that the device can be saved. Precondition: the vCPUs are paused
   * (no register access in flight) and this runs on the device worker's thread between events;
   * then the device stays quiescent until the vCPUs run again. Returns isQuiescent().
   */
  quiesce(): boolean {
    if (!this.isQuiescent()) this.onLifecycle();
    return this.isQuiescent();
  }

  /**
   * The device's saved state (device-state.ts). Precondition: quiescent (see quiesce()); saving
   * a device in the middle of a lifecycle change is a bug of the caller, so it throws.
   */
  save(): Uint8Array {
    if (!this.isQuiescent())
      throw new Error(`${this.backend.name}: save() before quiesce() (lifecycle work pending)`);
    // The backend first: saving may give a held chain back to its queue (QueueIo.unpop), which
    // moves the position saved below.
    const backend = this.backend.save?.();
    const d = this.dev;
    const device: SavedDeviceState =
      d.kind === 'inactive'
        ? { kind: 'inactive' }
        : {
            kind: 'active',
            epoch: d.epoch,
            features: d.features,
            queues: d.queues.map((q) => q?.position()),
          };
    return VirtioDeviceStateV1.encode({
      transport: this.state.savedState(),
      device,
      backend,
    });
  }

  /**
   * Rebuilds a saved device in this one, which must be inactive (freshly built, same kind and
   * configuration, over the same guest memory). Everything is checked before anything changes:
   * on error the device is as it was. Order: decode and check the blob; build the active queues
   * at their saved positions (their rings checked against guest RAM); backend.restore(); write
   * the transport registers; set the device active; backend.activate(.., restored = true).
   * Raises no interrupt and serves nothing: InterruptStatus is restored as it was, and buffers
   * the driver made available but nobody served are served at the next kick (the lead's resume
   * calls kickAll(), since kicks taken by the old process are lost).
   */
  restore(bytes: Uint8Array): Result<void, PersistError> {
    const fail = (m: string) => err(new PersistError(`${this.backend.name}: ${m}`));
    if (this.dev.kind !== 'inactive') return fail('restore into an active device');
    const decoded = VirtioDeviceStateV1.decode(bytes);
    if (!decoded.ok) return decoded;
    const { transport: t, device: d, backend } = decoded.value;
    const tc = checkTransportState(t, this.state.identity());
    if (!tc.ok) return tc;
    const dc = checkDeviceState(t, d);
    if (!dc.ok) return dc;
    let active: Extract<DeviceState, { kind: 'active' }> | undefined;
    if (d.kind === 'active') {
      const queues = restoreQueues(this.env.mem, t, d);
      if (!queues.ok) return fail(queues.error.message);
      active = { kind: 'active', epoch: d.epoch, features: d.features, queues: queues.value };
    }
    if (backend !== undefined) {
      if (!this.backend.restore) return fail('the saved state has backend bytes it cannot load');
      try {
        this.backend.restore(backend);
      } catch (e) {
        if (e instanceof PersistError) return fail(`backend: ${e.message}`);
        throw e;
      }
    }
    this.state.applySaved(t);
    if (active) {
      const a = active;
      this.dev = a;
      this.guard('activation', () => this.backend.activate?.(a.features, this.queueIo(a), true));
    }
    return ok(undefined);
  }

  /**
   * The VM pauses: a backend whose queues run elsewhere stops them (VirtioBackend.pause). Also
   * while inactive: an activation while paused (a save's quiesce, a restore) must not start them.
   */
  pause(): void {
    if (this.backend.pause) this.guard('pause', () => this.backend.pause!());
  }

  /** The VM resumes (after pause()). */
  resume(): void {
    if (this.backend.resume) this.guard('resume', () => this.backend.resume!());
  }

  /**
   * Drains every queue as a kick would (an interrupt only if something was used). For resuming
   * a restored device: kicks the driver made while the old process was being saved are gone.
   */
  kickAll(): void {
    const d = this.dev;
    if (d.kind === 'active') d.queues.forEach((_q, i) => this.kickQueue(i));
  }

  private queueIo(d: Extract<DeviceState, { kind: 'active' }>): QueueIo {
    const used = new Array<number>(d.queues.length).fill(0);
    const live = () => this.dev === d && this.state.epoch() === d.epoch;
    return {
      pop: (index, reenableKicks = true) => {
        const q = d.queues[index];
        // Malformed chains are completed on the way, at most a queue's worth per call (a
        // second vCPU could keep publishing them as fast as we consume them).
        for (let skipped = 0; q && live() && skipped < QUEUE_SIZE_MAX; skipped++) {
          const p = q.pop(reenableKicks);
          if (p.kind === 'empty') return undefined;
          if (p.kind === 'chain') return p.chain;
          if (p.kind === 'broken') {
            this.breakQueue(d, index, p.message);
            return undefined;
          }
          this.guestError(p.error.kind, `queue ${index}: chain ${p.head}: ${p.error.message}`);
          q.pushUsed(p.head, 0);
          this.counters.used[index]!++;
          used[index]!++;
        }
        return undefined;
      },
      unpop: (index, head) => {
        const q = d.queues[index];
        return q !== undefined && live() && q.unpop(head);
      },
      pushUsed: (index, head, len) => {
        const q = d.queues[index];
        if (!q || !live()) return;
        q.pushUsed(head, len);
        this.counters.used[index]!++;
        used[index]!++;
      },
      notify: (index) => {
        const q = d.queues[index];
        if (!q || !live()) return;
        if (used[index] === 0) {
          q.publishUsed(); // ends a batch that used nothing
          return;
        }
        used[index] = 0;
        this.interruptIfWanted(q, index);
      },
      beginBatch: (index) => {
        const q = d.queues[index];
        if (q && live()) q.beginBatch();
      },
      suppressKicks: (index) => {
        const q = d.queues[index];
        if (q && live()) q.suppressKicks();
      },
      guestError: (kind, message) => this.guestError(kind, message),
      ring: (index) => {
        const q = d.queues[index];
        if (!q || !live()) return undefined;
        return { size: q.size, addresses: q.addresses, position: q.position() };
      },
      adopt: (index, nextAvail) => {
        const q = d.queues[index];
        if (q && live()) q.adopt(nextAvail);
      },
      signalUsed: (index) => {
        if (d.queues[index] && live()) this.signal(index);
      },
      broken: (index, message) => {
        if (live()) this.breakQueue(d, index, message);
      },
    };
  }

  /** The driver broke queue `index`: a guest error, DEVICE_NEEDS_RESET, the queues dropped. */
  private breakQueue(
    d: Extract<DeviceState, { kind: 'active' }>,
    index: number,
    message: string,
  ): void {
    this.guestError('broken', `queue ${index}: ${message}`);
    if (this.state.markNeedsReset(d.epoch)) this.env.interrupt();
    this.deactivate();
  }

  /** Queue `index` was kicked (its ioeventfd fired). */
  onKick(index: number): void {
    if (index >= 0 && index < this.counters.kicks.length) this.counters.kicks[index]!++;
    this.kickQueue(index);
  }

  /** Serves queue `index` as a kick would (kickAll's own calls are not counted as kicks). */
  private kickQueue(index: number): void {
    const d = this.dev;
    if (d.kind !== 'active') return;
    // Offloaded queues too: a kick that reached us (not KVM's ioeventfd) is passed on.
    if (this.backend.selfServed?.includes(index) || this.backend.offloaded?.includes(index)) {
      this.guard(queueLabel(index), () => this.backend.kick?.(index));
      return;
    }
    // A turn already scheduled will see the buffers of this kick.
    if (this.turns.has(index)) return;
    this.serveQueue(d, index);
  }

  /** One turn of queue `index`: chains until empty or the budget is used, then yields. */
  private serveQueue(d: Extract<DeviceState, { kind: 'active' }>, index: number): void {
    const q = d.queues[index];
    if (!q) return;
    let used = 0;
    let bytes = 0;
    let spent = false; // the backend's own budget (turnSpent)
    const live = () => this.dev === d && this.state.epoch() === d.epoch;
    // Timed: the turn after every TURN_TIMING_EVERY that returned chains (the first one too).
    const start = this.counters.turns[index]! % TURN_TIMING_EVERY === 0 ? monoMs() : -1;
    // No kicks while we drain (the empty pop that ends the turn re-enables them and looks
    // again); used entries go out in one used.idx store, with at most one interrupt.
    q.suppressKicks();
    q.beginBatch();
    for (;;) {
      // A reset since activation: the rings may already belong to a new driver instance.
      if (!live()) return;
      if (spent || used >= QUEUE_BUDGET_CHAINS || bytes >= QUEUE_BUDGET_BYTES) {
        // More to do: our own next turn. Nothing more: kicks on again (the turn did not reach
        // the empty pop that does it), or a buffer added meanwhile would never be kicked.
        if (q.enableKicks()) {
          this.counters.budgetYields++;
          this.scheduleTurn(d, index);
        }
        break;
      }
      const p = q.pop();
      if (p.kind === 'empty') break;
      if (p.kind === 'broken') {
        // What was served before is the driver's (its reset will discard it anyway).
        this.endTurnQuietly(index);
        q.publishUsed();
        this.guestError('broken', `queue ${index}: ${p.message}`);
        if (this.state.markNeedsReset(d.epoch)) this.env.interrupt();
        this.deactivate();
        break;
      }
      let len = 0;
      if (p.kind === 'bad-chain') {
        this.guestError(p.error.kind, `queue ${index}: chain ${p.head}: ${p.error.message}`);
        q.pushUsed(p.head, 0);
      } else {
        let wait = 0;
        try {
          wait = this.backend.admit?.(index, p.chain) ?? 0;
        } catch (e) {
          q.pushUsed(p.chain.head, 0);
          this.counters.used[index]! += used + 1;
          this.endTurnQuietly(index);
          this.interruptIfWanted(q, index);
          this.fail(`queue ${index}`, e);
          return;
        }
        if (wait > 0 && q.unpop(p.chain.head)) {
          // Throttled: the chain waits on the queue and the queue sleeps until it fits.
          this.counters.throttled++;
          this.sleepTurn(d, index, wait);
          break;
        }
        bytes += p.chain.readableLength + p.chain.writableLength;
        try {
          len = this.backend.handle(index, p.chain);
        } catch (e) {
          // The request fails (used.len 0), and so does the device.
          q.pushUsed(p.chain.head, 0);
          this.counters.used[index]! += used + 1;
          this.endTurnQuietly(index);
          this.interruptIfWanted(q, index);
          this.fail(`queue ${index}`, e);
          return;
        }
        q.pushUsed(p.chain.head, len);
        if (this.backend.turnSpent?.(index)) spent = true;
      }
      used++;
    }
    this.counters.used[index]! += used;
    if (!live()) return;
    if (this.backend.endTurn) {
      try {
        this.backend.endTurn(index);
      } catch (e) {
        if (used > 0) this.interruptIfWanted(q, index);
        else q.publishUsed();
        this.fail(`queue ${index}`, e);
        return;
      }
    }
    if (used > 0) this.interruptIfWanted(q, index);
    else q.publishUsed(); // ends the batch
    if (this.backend.afterTurn && live()) {
      try {
        this.backend.afterTurn(index);
      } catch (e) {
        this.fail(`queue ${index}`, e);
      }
    }
    if (used > 0) {
      this.counters.turns[index]!++;
      if (start >= 0) this.counters.turnUs[index]! += (monoMs() - start) * 1000;
    }
  }

  /** endTurn() on a path that breaks the device anyway: its own exception adds nothing. */
  private endTurnQuietly(index: number): void {
    try {
      this.backend.endTurn?.(index);
    } catch {
      // The device is being broken by the caller.
    }
  }

  private scheduleTurn(d: Extract<DeviceState, { kind: 'active' }>, index: number): void {
    if (this.turns.has(index)) return;
    const cancel = this.env.defer(() => {
      this.turns.delete(index);
      if (this.dev === d) this.guard(queueLabel(index), () => this.serveQueue(d, index));
    });
    this.turns.set(index, cancel);
  }

  /** Queue `index` sleeps `ms` (its rate limiter), then takes its turn again. */
  private sleepTurn(d: Extract<DeviceState, { kind: 'active' }>, index: number, ms: number): void {
    if (this.turns.has(index)) return;
    this.sleeping.add(index);
    const cancel = this.env.after(ms, () => {
      this.turns.delete(index);
      this.sleeping.delete(index);
      this.counters.throttleWakeups++;
      if (this.dev === d) this.guard(queueLabel(index), () => this.serveQueue(d, index));
    });
    this.turns.set(index, cancel);
  }

  /**
   * The backend's rate limiter changed (PATCH): queues asleep on the old limits take their turn
   * now (a new limit may admit them at once, or set a new sleep).
   */
  wakeThrottled(): void {
    const d = this.dev;
    for (const index of [...this.sleeping]) {
      this.turns.get(index)?.();
      this.turns.delete(index);
      this.sleeping.delete(index);
      if (d.kind === 'active') this.guard(queueLabel(index), () => this.serveQueue(d, index));
    }
  }

  /**
   * Publishes queue `index`'s used entries and raises its interrupt if the driver wants it.
   *
   * Issue 17: one interrupt signal per round of the loop while the driver has not acknowledged it.
   * The driver's handler (Linux's vm_interrupt) reads InterruptStatus, acknowledges it, then
   * looks at every queue, so a used-buffer interrupt that is still pending covers what later
   * queues publish before its acknowledgement; with an edge-triggered GSI a second write would
   * only be a second interrupt that finds its work done (two exits to us for nothing). This is
   * what a level-triggered line gives QEMU. The skip holds within the round of the first write
   * only: a bit left set with no interrupt to clear it (an edge the guest lost while the line
   * was masked, say) is signalled again by the next round's interrupt, as before.
   */
  private interruptIfWanted(q: Virtqueue, index: number): void {
    if (!q.needsInterrupt()) {
      this.counters.irqsSuppressed[index]!++;
      return;
    }
    this.signal(index);
  }

  /** Raises queue `index`'s used-buffer interrupt (the decision is made), coalesced per round. */
  private signal(index: number): void {
    this.counters.irqs[index]!++;
    const was = this.state.raise(INT_USED_BUFFER);
    const round = this.env.round?.();
    if ((was & INT_USED_BUFFER) !== 0 && round !== undefined && round === this.signalledRound) {
      this.counters.irqsCoalesced[index]!++;
      return;
    }
    this.env.interrupt();
    this.signalledRound = round;
  }

  /** The loop round of this device's last interrupt signal (interruptIfWanted). */
  private signalledRound: number | undefined;

  private deactivate(): void {
    if (this.dev.kind === 'inactive') return;
    this.dev = { kind: 'inactive' };
    for (const cancel of this.turns.values()) cancel();
    this.turns.clear();
    this.sleeping.clear();
    try {
      this.backend.deactivate?.();
    } catch (e) {
      this.counters.failures++;
      this.logOnce(
        'deactivate',
        `${this.backend.name}: deactivation failed with an exception (logged once): ${(e as Error)?.stack ?? String(e)}`,
      );
    }
  }

  private guestError(kind: string, message: string): void {
    this.state.count('guestErrors');
    this.logOnce(kind, `${this.backend.name}: guest error (logged once per kind): ${message}`);
  }

  private logOnce(kind: string, message: string): void {
    if (this.logged.has(kind)) return;
    this.logged.add(kind);
    this.env.log(message);
  }
}

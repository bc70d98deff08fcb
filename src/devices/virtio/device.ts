/**
 * A virtio device as the device worker runs it: the generic part (activation on DRIVER_OK,
 * reset, queue draining, interrupts, guest-error policy) around a small backend that turns one
 * descriptor chain into I/O (block/, rng/).
 *
 * State is a discriminated union: inactive (no queues; the driver is negotiating, or the device
 * was reset or broken) | active (queues built from the driver's setup, bound to one reset epoch).
 *
 * Guest-error policy (DESIGN.md, "Guest-facing code is the attack surface"): a malformed chain is
 * returned with used.len 0 (the request failed; its buffers are not trusted enough to write a
 * status into); a broken queue or an unusable queue setup marks the device DEVICE_NEEDS_RESET and
 * raises a config-change interrupt. Each kind of error is logged once per device and counted;
 * nothing the guest does throws out of here.
 */
import type { GuestMemory } from '../../memory/guest-memory.js';
import {
  INT_USED_BUFFER,
  QUEUE_SIZE_MAX,
  STATUS_DEVICE_NEEDS_RESET,
  STATUS_DRIVER_OK,
  STATUS_FAILED,
  VIRTIO_F_RING_INDIRECT_DESC,
  bit,
} from './constants.js';
import type { DescriptorChain } from './chain.js';
import { C_GUEST_ERRORS, VirtioMmioState } from './mmio-state.js';
import { Virtqueue } from './queue.js';

/**
 * Queue access for backends that serve some queues themselves (virtio-net RX, virtio-vsock):
 * they take buffers when host data arrives, not when the driver kicks. Bound to one activation:
 * after a reset every method is a no-op (pop returns undefined).
 */
export interface QueueIo {
  /**
   * The next well-formed chain of `queue`, or undefined (empty, inactive, broken). Malformed
   * chains are completed with used.len 0 and counted on the way.
   */
  pop(queue: number): DescriptorChain | undefined;
  pushUsed(queue: number, head: number, len: number): void;
  /** Raises the used-buffer interrupt if chains were used since the last call and it is wanted. */
  notify(queue: number): void;
  /** Counts a guest error and logs it once per kind. */
  guestError(kind: string, message: string): void;
}

export interface VirtioBackend {
  /** For log lines: "virtio-blk /path/disk.img". */
  readonly name: string;
  /**
   * Serves one request; returns the number of bytes written into the chain's writable buffers
   * (used.len). Must not throw for anything the guest wrote.
   */
  handle(queue: number, chain: DescriptorChain): number;
  /**
   * Queues the backend serves itself through QueueIo: a kick of one of them calls kick()
   * instead of draining it through handle().
   */
  readonly selfServed?: readonly number[];
  kick?(queue: number): void;
  /** Called when the driver set DRIVER_OK with these negotiated features. */
  activate?(features: bigint, io: QueueIo): void;
  /** Called when the queues are dropped (reset or broken). */
  deactivate?(): void;
}

export type DeviceState =
  | { kind: 'inactive' }
  | { kind: 'active'; epoch: number; features: bigint; queues: Array<Virtqueue | undefined> };

export interface DeviceEnvironment {
  mem: GuestMemory;
  /** Signals the device's interrupt (an irqfd write) after InterruptStatus bits were set. */
  interrupt(): void;
  log(message: string): void;
}

export class VirtioDevice {
  readonly state: VirtioMmioState;
  private dev: DeviceState = { kind: 'inactive' };
  private readonly logged = new Set<string>();

  constructor(
    sab: SharedArrayBuffer,
    readonly backend: VirtioBackend,
    private readonly env: DeviceEnvironment,
  ) {
    this.state = new VirtioMmioState(sab);
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
    const runnable =
      snap.status & STATUS_DRIVER_OK &&
      !(snap.status & (STATUS_DEVICE_NEEDS_RESET | STATUS_FAILED));
    if (this.dev.kind === 'inactive' && runnable) {
      const queues: Array<Virtqueue | undefined> = [];
      const indirect = (snap.driverFeatures & bit(VIRTIO_F_RING_INDIRECT_DESC)) !== 0n;
      for (const [i, q] of snap.queues.entries()) {
        if (!q.ready) {
          queues.push(undefined);
          continue;
        }
        const r = Virtqueue.create(
          this.env.mem,
          { size: q.size, desc: q.desc, driver: q.driver, device: q.device },
          { indirect, maxSize: QUEUE_SIZE_MAX },
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
      this.backend.activate?.(snap.driverFeatures, this.queueIo(active));
      // Buffers made available before DRIVER_OK (or kicks we could not serve yet) are served now.
      queues.forEach((_q, i) => this.onKick(i));
    }
  }

  private queueIo(d: Extract<DeviceState, { kind: 'active' }>): QueueIo {
    const used = new Array<number>(d.queues.length).fill(0);
    const live = () => this.dev === d && this.state.epoch() === d.epoch;
    return {
      pop: (index) => {
        const q = d.queues[index];
        while (q && live()) {
          const p = q.pop();
          if (p.kind === 'empty') return undefined;
          if (p.kind === 'chain') return p.chain;
          if (p.kind === 'broken') {
            this.guestError('broken', `queue ${index}: ${p.message}`);
            if (this.state.markNeedsReset(d.epoch)) this.env.interrupt();
            this.deactivate();
            return undefined;
          }
          this.guestError(p.error.kind, `queue ${index}: chain ${p.head}: ${p.error.message}`);
          q.pushUsed(p.head, 0);
          used[index]!++;
        }
        return undefined;
      },
      pushUsed: (index, head, len) => {
        const q = d.queues[index];
        if (!q || !live()) return;
        q.pushUsed(head, len);
        used[index]!++;
      },
      notify: (index) => {
        const q = d.queues[index];
        if (!q || !live() || used[index] === 0) return;
        used[index] = 0;
        if (q.needsInterrupt()) {
          this.state.raise(INT_USED_BUFFER);
          this.env.interrupt();
        }
      },
      guestError: (kind, message) => this.guestError(kind, message),
    };
  }

  /** Queue `index` was kicked (its ioeventfd fired). */
  onKick(index: number): void {
    const d = this.dev;
    if (d.kind !== 'active') return;
    if (this.backend.selfServed?.includes(index)) {
      this.serveKick(index);
      return;
    }
    const q = d.queues[index];
    if (!q) return;
    let used = 0;
    for (;;) {
      // A reset since activation: the rings may already belong to a new driver instance.
      if (this.state.epoch() !== d.epoch) return;
      const p = q.pop();
      if (p.kind === 'empty') break;
      if (p.kind === 'broken') {
        this.guestError('broken', `queue ${index}: ${p.message}`);
        if (this.state.markNeedsReset(d.epoch)) this.env.interrupt();
        this.deactivate();
        break;
      }
      let len = 0;
      if (p.kind === 'bad-chain') {
        this.guestError(p.error.kind, `queue ${index}: chain ${p.head}: ${p.error.message}`);
      } else {
        len = this.serve(index, p.chain);
      }
      q.pushUsed(p.kind === 'chain' ? p.chain.head : p.head, len);
      used++;
    }
    if (used > 0 && q.needsInterrupt()) {
      this.state.raise(INT_USED_BUFFER);
      this.env.interrupt();
    }
  }

  private serveKick(index: number): void {
    try {
      this.backend.kick?.(index);
    } catch (e) {
      this.logOnce(
        'exception',
        `${this.backend.name}: queue ${index} failed with an exception: ${(e as Error).stack ?? String(e)}`,
      );
    }
  }

  private serve(index: number, chain: DescriptorChain): number {
    try {
      return this.backend.handle(index, chain);
    } catch (e) {
      // A bug of ours, not the guest's: keep the VMM alive, fail the request.
      this.logOnce(
        'exception',
        `${this.backend.name}: request failed with an exception: ${(e as Error).stack ?? String(e)}`,
      );
      return 0;
    }
  }

  private deactivate(): void {
    if (this.dev.kind === 'inactive') return;
    this.dev = { kind: 'inactive' };
    this.backend.deactivate?.();
  }

  private guestError(kind: string, message: string): void {
    this.state.count(C_GUEST_ERRORS);
    this.logOnce(kind, `${this.backend.name}: guest error (logged once per kind): ${message}`);
  }

  private logOnce(kind: string, message: string): void {
    if (this.logged.has(kind)) return;
    this.logged.add(kind);
    this.env.log(message);
  }
}

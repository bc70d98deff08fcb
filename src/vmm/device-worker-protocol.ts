/**
 * What the main thread and the device worker say to each other (docs/architecture.md).
 *
 * The worker blocks in epoll_wait, so it never runs 'message' handlers. Requests go into a
 * MessagePort that the worker drains with receiveMessageOnPort() when its control eventfd fires;
 * the main thread posts the request, then writes the eventfd. Replies come back on the same port
 * (the main thread is an ordinary event loop). Log lines and a fatal error go to parentPort.
 *
 * Shared memory beside the mailbox: each device's register file (mmio-state.ts) and the worker's
 * control block (stop flag, running flag: Int32 slots named below).
 */
import type { BalloonRequest } from '../devices/virtio/balloon/balloon.js';
import type { MessagePort } from 'node:worker_threads';
import { slots } from '../util/persist.js';
import type { VirtioCounters } from '../devices/virtio/mmio-state.js';
import type { DeviceCounters } from '../devices/virtio/descriptor.js';
import type { VirtioSlot } from './virtio-plan.js';
import type { RateLimiterConfig } from '../devices/virtio/rate-limiter.js';
import type { GuestRamLayout } from './guest-ram.js';

/** Int32 slots of the worker's control block. */
export const WORKER_CONTROL = slots(['stop', 'running', 'paused']);

export const DEVICE_WORKER_ROLE = 'virtio-device-worker';

export interface DeviceWorkerData {
  /** Marks the thread as the device worker. */
  role: typeof DEVICE_WORKER_ROLE;
  ram: GuestRamLayout;
  controlFd: number;
  control: SharedArrayBuffer;
  slots: VirtioSlot[];
  /** The worker's end of the mailbox. */
  mailbox: MessagePort;
  /** Prewarmed: the data comes later, in a DeviceWorkerStart message (vcpu-pool.ts). */
  deferred?: boolean;
}

/** What starts a prewarmed device worker (its mailbox port in the transfer list). */
export interface DeviceWorkerStart {
  type: 'start';
  data: DeviceWorkerData;
}

/** One device's counters: its transport's (guest misuse, interrupts) and its own. */
export interface DeviceReport {
  kind: VirtioSlot['kind'];
  id: string;
  name: string;
  /** Firecracker's metrics group for the kind ("block", "net", "vsock", "entropy"). */
  group: string;
  transport: VirtioCounters;
  device: DeviceCounters;
}

/** One device's saved state (VirtioDevice.save(): transport, queues, backend). */
export interface SavedDevice {
  kind: VirtioSlot['kind'];
  id: string;
  state: Uint8Array;
}

export type WorkerRequest =
  | { op: 'counters' }
  /** Stop serving every queue and host socket (kicks stay pending in their eventfds). */
  | { op: 'pause' }
  | { op: 'resume' }
  /** Every device's state; only while paused (and the vCPUs paused: the registers are still). */
  | { op: 'save' }
  /** Restores every device, matched by kind and id; only while paused. */
  | { op: 'restore'; devices: SavedDevice[] }
  /**
   * PATCH /drives (helper P): block device `id` serves the image open at `fd` (opened and
   * checked on the main thread, which keeps owning it) with `capacity` sectors from its next
   * request on; its config space says so and the driver gets a config-change interrupt.
   */
  | { op: 'update-block'; id: string; fd: number; capacity: number }
  /**
   * PATCH /drives, /network-interfaces, /pmem (issue 16): the device's rate limiters become these
   * (the whole merged configuration; a bucket left out is removed; for net, a limiter left
   * undefined is unchanged). Queues asleep on the old limits are woken to try again.
   */
  | { op: 'update-rate-limiter'; target: RateLimiterTarget }
  /**
   * The balloon API (issue 16): a request of the balloon device, answered by it; a config-space
   * change it makes (target, hinting command) raises a config-change interrupt.
   */
  | { op: 'balloon'; request: BalloonRequest }
  /** PUT/PATCH /mmds (issue 16): the data store's new content, to every MMDS responder. */
  | { op: 'mmds-data'; json: string };

/** Which device's limiters an 'update-rate-limiter' request sets. */
export type RateLimiterTarget =
  | { kind: 'block'; id: string; limiter: RateLimiterConfig }
  | { kind: 'rng'; id: string; limiter: RateLimiterConfig }
  | { kind: 'pmem'; id: string; limiter: RateLimiterConfig }
  | { kind: 'net'; id: string; rx?: RateLimiterConfig; tx?: RateLimiterConfig };

export interface WorkerReplies {
  counters: DeviceReport[];
  pause: void;
  resume: void;
  save: SavedDevice[];
  restore: void;
  'update-block': void;
  'update-rate-limiter': void;
  balloon: unknown;
  'mmds-data': void;
}

export type MailboxRequest = WorkerRequest & { seq: number };
export type MailboxReply = { seq: number } & (
  { ok: true; value: unknown } | { ok: false; error: string }
);

export type DeviceWorkerMessage =
  /**
   * A prewarmed worker has loaded its modules and waits for its DeviceWorkerStart (vcpu-pool.ts
   * ends an unused one only after this: ended while loading, it would leak module files).
   */
  | { type: 'ready' }
  /** A log line for the main thread's logger: `info` unless `level` says `warn`. */
  | { type: 'log'; message: string; level?: 'warn' }
  | { type: 'fatal'; message: string }
  /** Sent once just before the worker ends: the last counters (metrics after the VM is gone). */
  | { type: 'final-counters'; counters: DeviceReport[] };

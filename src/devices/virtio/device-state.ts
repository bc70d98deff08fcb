/**
 * The saved form of a whole virtio device (device.ts): its transport registers, whether the
 * device worker had it active and where each active queue stood, and the backend's own bytes.
 *
 * A saved device is always quiescent (VirtioDevice.quiesce): the device state agrees with the
 * transport as the device worker would leave it after handling every lifecycle event. A blob
 * that breaks that agreement is refused, because a device restored from it would act on queues
 * the driver never handed over (or ignore ones it did).
 */
import { err, ok, type Result } from '../../util/result.js';
import {
  type Infer,
  PersistError,
  array,
  bytes,
  i32,
  optional,
  struct,
  u16,
  u64n,
  union,
  versioned,
} from '../../util/persist.js';
import type { GuestMemory } from '../../memory/guest-memory.js';
import {
  MAX_QUEUES,
  QUEUE_SIZE_MAX,
  STATUS_DEVICE_NEEDS_RESET,
  STATUS_DRIVER_OK,
  STATUS_FAILED,
  VIRTIO_F_RING_EVENT_IDX,
  VIRTIO_F_RING_INDIRECT_DESC,
  bit,
} from './constants.js';
import { Virtqueue } from './queue.js';
import { type TransportState, TransportStateV1 } from './transport-state.js';

/** Bound on a backend's saved bytes (a decoding guard, not a budget). */
export const BACKEND_STATE_MAX = 16 * 1024 * 1024;

const QueuePositionV1 = struct({ nextAvail: u16, nextUsed: u16 });

export const VirtioDeviceStateV1 = versioned(
  'virtio-device',
  1,
  struct({
    /** A nested virtio-mmio-transport record (its own name and version). */
    transport: TransportStateV1.asField,
    device: union({
      inactive: {},
      active: {
        /** The reset epoch the queues belong to (equals transport.resetEpoch). */
        epoch: i32,
        /** The negotiated features (equal transport.driverFeatures). */
        features: u64n,
        /** One entry per queue: its position when the driver made it ready, else absent. */
        queues: array(optional(QueuePositionV1), MAX_QUEUES),
      },
    }),
    /** VirtioBackend.save(), when the backend has state of its own. */
    backend: optional(bytes(BACKEND_STATE_MAX)),
  }),
);
export type SavedDevice = Infer<typeof VirtioDeviceStateV1.codec>;
export type SavedDeviceState = SavedDevice['device'];

/** DRIVER_OK and nothing that stops the device: the device worker activates it. */
export function runnable(status: number): boolean {
  return (
    (status & STATUS_DRIVER_OK) !== 0 &&
    (status & (STATUS_DEVICE_NEEDS_RESET | STATUS_FAILED)) === 0
  );
}

/**
 * Would the device worker leave `device` as it is, given the transport's status and epoch?
 * (onLifecycle's rules: an active device is dropped on a reset or without DRIVER_OK; an
 * inactive one is activated when runnable.) Undefined when yes, else why not.
 */
export function disagreement(
  status: number,
  epoch: number,
  device: { kind: 'inactive' } | { kind: 'active'; epoch: number },
): string | undefined {
  if (device.kind === 'inactive')
    return runnable(status) ? 'inactive, but the driver set DRIVER_OK' : undefined;
  if (device.epoch !== epoch)
    return `active for reset epoch ${device.epoch}, transport at ${epoch}`;
  if (!(status & STATUS_DRIVER_OK)) return 'active without DRIVER_OK';
  if (status & STATUS_DEVICE_NEEDS_RESET) return 'active with DEVICE_NEEDS_RESET set';
  return undefined;
}

/** The device part of a saved device agrees with its (already checked) transport part. */
export function checkDeviceState(
  t: TransportState,
  d: SavedDeviceState,
): Result<void, PersistError> {
  const fail = (m: string) => err(new PersistError(`virtio-device: ${m}`));
  const why = disagreement(t.status, t.resetEpoch, d);
  if (why !== undefined) return fail(`device state disagrees with the transport: ${why}`);
  if (d.kind === 'inactive') return ok(undefined);
  if (d.features !== t.driverFeatures)
    return fail(
      `active with features 0x${d.features.toString(16)}, the driver negotiated 0x${t.driverFeatures.toString(16)}`,
    );
  if (d.queues.length !== t.queues.length)
    return fail(`${d.queues.length} queue positions for ${t.queues.length} queues`);
  for (const [i, p] of d.queues.entries()) {
    if ((p !== undefined) !== t.queues[i]!.ready)
      return fail(`queue ${i}: ${p ? 'a position for a queue that is not ready' : 'no position'}`);
  }
  return ok(undefined);
}

/**
 * The queues of a saved active device, at their saved positions, over `mem`: each ring checked
 * against guest RAM as at DRIVER_OK (a snapshot restored over other memory fails here).
 */
export function restoreQueues(
  mem: GuestMemory,
  t: TransportState,
  d: Extract<SavedDeviceState, { kind: 'active' }>,
): Result<Array<Virtqueue | undefined>, PersistError> {
  const indirect = (d.features & bit(VIRTIO_F_RING_INDIRECT_DESC)) !== 0n;
  const eventIdx = (d.features & bit(VIRTIO_F_RING_EVENT_IDX)) !== 0n;
  const addr = (v: bigint) => (v > BigInt(Number.MAX_SAFE_INTEGER) ? -1 : Number(v));
  const queues: Array<Virtqueue | undefined> = [];
  for (const [i, pos] of d.queues.entries()) {
    const q = t.queues[i]!;
    if (!pos) {
      queues.push(undefined);
      continue;
    }
    const r = Virtqueue.create(
      mem,
      { size: q.num, desc: addr(q.desc), driver: addr(q.driver), device: addr(q.device) },
      { indirect, eventIdx, maxSize: QUEUE_SIZE_MAX },
      pos,
    );
    if (!r.ok)
      return err(
        new PersistError(`queue ${i} cannot be restored over this guest memory: ${r.error}`),
      );
    queues.push(r.value);
  }
  return ok(queues);
}

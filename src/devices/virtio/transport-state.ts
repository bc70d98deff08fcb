/**
 * The saved form of a virtio-mmio register file (mmio-state.ts): what the driver set, plus the
 * device's identity so that a blob is only ever restored into the same kind of device.
 *
 * A blob is input (a snapshot file): `checkTransportState` refuses anything the live transport
 * could not have produced and that the rest of the device relies on (a ready queue of a bad size,
 * status bits that do not exist, features never offered after FEATURES_OK). Queue addresses are
 * not checked here: the device checks them against guest RAM when it builds its queues, as it
 * does at DRIVER_OK.
 *
 * Counters are left out on purpose: they are metrics of this process (a restored VM starts
 * counting from 0, as Firecracker's metrics do), not state the guest can observe.
 */
import { err, ok, type Result } from '../../util/result.js';
import {
  type Infer,
  PersistError,
  array,
  bool,
  bytes,
  i32,
  struct,
  u16,
  u32,
  u64n,
  u8,
  versioned,
} from '../../util/persist.js';
import {
  CONFIG_SPACE_MAX,
  DEVICE_ID_BLOCK,
  DEVICE_ID_NET,
  DEVICE_ID_RNG,
  DEVICE_ID_VSOCK,
  MAX_QUEUES,
  STATUS_ACKNOWLEDGE,
  STATUS_DEVICE_NEEDS_RESET,
  STATUS_DRIVER,
  STATUS_DRIVER_OK,
  STATUS_FAILED,
  STATUS_FEATURES_OK,
  INT_CONFIG_CHANGE,
  INT_USED_BUFFER,
  VIRTIO_F_RING_EVENT_IDX,
  VIRTIO_F_VERSION_1,
  bit,
} from './constants.js';

/** What a device is: fixed when its register file is created, checked on restore. */
const Identity = struct({
  deviceId: u32,
  deviceFeatures: u64n,
  /** QueueNumMax of each queue; its length is the queue count. */
  queueNumMax: array(u16, MAX_QUEUES),
  configLen: u16,
});
export type TransportIdentity = Infer<typeof Identity>;

const QueueRegisters = struct({
  /** QueueNum as the driver wrote it (any u32 until QueueReady; then a valid size). */
  num: u32,
  ready: bool,
  desc: u64n,
  driver: u64n,
  device: u64n,
});

export const TransportStateV1 = versioned(
  'virtio-mmio-transport',
  1,
  struct({
    identity: Identity,
    status: u8,
    interruptStatus: u32,
    deviceFeaturesSel: u32,
    driverFeaturesSel: u32,
    driverFeatures: u64n,
    queueSel: u32,
    configGeneration: u32,
    resetEpoch: i32,
    queues: array(QueueRegisters, MAX_QUEUES),
    /** The device-specific configuration space (configLen bytes). */
    config: bytes(CONFIG_SPACE_MAX),
  }),
);
export type TransportState = Infer<typeof TransportStateV1.codec>;

const KNOWN_STATUS =
  STATUS_ACKNOWLEDGE |
  STATUS_DRIVER |
  STATUS_DRIVER_OK |
  STATUS_FEATURES_OK |
  STATUS_DEVICE_NEEDS_RESET |
  STATUS_FAILED;

const KIND_NAMES: Record<number, string> = {
  [DEVICE_ID_NET]: 'net',
  [DEVICE_ID_BLOCK]: 'block',
  [DEVICE_ID_RNG]: 'rng',
  [DEVICE_ID_VSOCK]: 'vsock',
};
const kind = (id: number) => `device id ${id} (${KIND_NAMES[id] ?? 'unknown'})`;
const hex = (v: bigint) => `0x${v.toString(16)}`;

/** The saved state fits the device `current` and is one the transport could have reached. */
export function checkTransportState(
  saved: TransportState,
  current: TransportIdentity,
): Result<void, PersistError> {
  const fail = (m: string) => err(new PersistError(`virtio-mmio-transport: ${m}`));
  const id = saved.identity;
  if (id.deviceId !== current.deviceId)
    return fail(
      `saved state of ${kind(id.deviceId)} cannot be restored into ${kind(current.deviceId)}`,
    );
  // A snapshot of a build that did not offer VIRTIO_F_RING_EVENT_IDX yet (before issue 17): its
  // driver did not negotiate it, and the queues run without it until the driver's next reset.
  const older = current.deviceFeatures & ~bit(VIRTIO_F_RING_EVENT_IDX);
  if (id.deviceFeatures !== current.deviceFeatures && id.deviceFeatures !== older)
    return fail(
      `saved device features ${hex(id.deviceFeatures)} differ from this device's ${hex(current.deviceFeatures)} (different configuration)`,
    );
  if (id.queueNumMax.join() !== current.queueNumMax.join())
    return fail(
      `saved queues (QueueNumMax ${id.queueNumMax.join(', ')}) differ from this device's (${current.queueNumMax.join(', ')})`,
    );
  if (id.configLen !== current.configLen)
    return fail(
      `saved config space of ${id.configLen} bytes, this device has ${current.configLen}`,
    );
  if (saved.config.length !== id.configLen)
    return fail(`config holds ${saved.config.length} bytes, configLen says ${id.configLen}`);
  if (saved.queues.length !== id.queueNumMax.length)
    return fail(`${saved.queues.length} queues saved for a device with ${id.queueNumMax.length}`);
  if (saved.status & ~KNOWN_STATUS)
    return fail(`status 0x${saved.status.toString(16)} has bits no driver can set`);
  const st = saved.status;
  const steps: Array<[number, number]> = [
    [STATUS_DRIVER, STATUS_ACKNOWLEDGE],
    [STATUS_FEATURES_OK, STATUS_DRIVER],
    [STATUS_DRIVER_OK, STATUS_FEATURES_OK],
  ];
  for (const [later, earlier] of steps) {
    if (st & later && !(st & earlier))
      return fail(`status 0x${st.toString(16)} skips a step of the driver's initialisation`);
  }
  if (saved.interruptStatus & ~(INT_USED_BUFFER | INT_CONFIG_CHANGE))
    return fail(`InterruptStatus 0x${saved.interruptStatus.toString(16)} has unknown bits`);
  if (saved.status & STATUS_FEATURES_OK) {
    const f = saved.driverFeatures;
    if ((f & ~id.deviceFeatures) !== 0n || (f & bit(VIRTIO_F_VERSION_1)) === 0n)
      return fail(`FEATURES_OK with driver features ${hex(f)} this device would refuse`);
  }
  for (const [i, q] of saved.queues.entries()) {
    const max = id.queueNumMax[i]!;
    if (q.ready && (q.num === 0 || q.num > max || (q.num & (q.num - 1)) !== 0))
      return fail(`queue ${i} is ready with size ${q.num} (QueueNumMax ${max})`);
  }
  return ok(undefined);
}

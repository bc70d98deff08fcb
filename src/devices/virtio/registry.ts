/**
 * Every virtio device kind Typervisor has, in one table. Adding a kind = its folder (device,
 * descriptor) + one line here; the VMM plans slots, opens host sides, builds backends, reports
 * metrics and saves state through the descriptor alone.
 */
import type { DeviceType } from './descriptor.js';
import { balloonDevice } from './balloon/descriptor.js';
import { blockDevice } from './block/descriptor.js';
import { memDevice } from './mem/descriptor.js';
import { netDevice } from './net/descriptor.js';
import { pmemDevice } from './pmem/descriptor.js';
import { rngDevice } from './rng/descriptor.js';
import { vsockDevice } from './vsock/descriptor.js';

export const VIRTIO_DEVICE_TYPES = {
  block: blockDevice,
  rng: rngDevice,
  net: netDevice,
  vsock: vsockDevice,
  balloon: balloonDevice,
  pmem: pmemDevice,
  mem: memDevice,
} as const;

type Types = typeof VIRTIO_DEVICE_TYPES;
export type VirtioKind = keyof Types;
type ConfigOf<T> = T extends DeviceType<infer C, unknown> ? C : never;
type HostOf<T> = T extends DeviceType<never, infer H> ? H : never;

/** One device's configuration: a discriminated union over the registry. */
export type VirtioConfig = { [K in VirtioKind]: ConfigOf<Types[K]> }[VirtioKind];
/** What open() of kind K hands to the device worker. */
export type VirtioHost<K extends VirtioKind> = HostOf<Types[K]>;

export function deviceType<K extends VirtioKind>(
  kind: K,
): DeviceType<{ kind: K; id: string }, unknown> {
  const t = VIRTIO_DEVICE_TYPES[kind] as unknown as
    DeviceType<{ kind: K; id: string }, unknown> | undefined;
  if (!t) throw new Error(`unknown virtio device kind ${String(kind)}`);
  return t;
}

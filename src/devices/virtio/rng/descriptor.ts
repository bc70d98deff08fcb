/** virtio-rng in the device registry: no host side beyond the process's CSPRNG. */
import type { DeviceType } from '../descriptor.js';
import { RngDevice, rngIdentity } from './rng.js';

export interface RngConfig {
  kind: 'rng';
  id: string;
}

export const rngDevice: DeviceType<RngConfig, Record<string, never>> = {
  kind: 'rng',
  metricsGroup: 'entropy',
  open: (config) => ({
    name: `virtio-rng ${config.id}`,
    identity: rngIdentity(),
    host: {},
    warnings: [],
    close: () => undefined,
  }),
  create() {
    const rng = new RngDevice();
    // Firecracker's EntropyDeviceMetrics names.
    return { backend: rng, metrics: () => ({ entropy_bytes: rng.bytes }) };
  },
};

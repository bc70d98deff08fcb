/**
 * virtio-rng / entropy device (device ID 4, virtio 1.2 §5.4): one queue; every device-writable
 * buffer of a request is filled from the host CSPRNG. No device-specific features or config.
 * At most MAX_BYTES_PER_REQUEST bytes per request (the spec lets the device fill less), so a
 * guest cannot make one request take long.
 */
import { randomFillSync } from 'node:crypto';
import type { DescriptorChain } from '../chain.js';
import { DEVICE_ID_RNG, QUEUE_SIZE_MAX, VIRTIO_F_RING_INDIRECT_DESC, bit } from '../constants.js';
import type { VirtioBackend } from '../device.js';
import type { VirtioDeviceIdentity } from '../mmio-state.js';

export const MAX_BYTES_PER_REQUEST = 64 * 1024;

export function rngIdentity(): VirtioDeviceIdentity {
  return {
    deviceId: DEVICE_ID_RNG,
    features: bit(VIRTIO_F_RING_INDIRECT_DESC),
    queueSizes: [QUEUE_SIZE_MAX],
    config: new Uint8Array(0),
  };
}

export class RngDevice implements VirtioBackend {
  readonly name = 'virtio-rng';
  bytes = 0;

  handle(_queue: number, chain: DescriptorChain): number {
    let n = 0;
    for (const seg of chain.writable) {
      const take = Math.min(seg.length, MAX_BYTES_PER_REQUEST - n);
      if (take <= 0) break;
      randomFillSync(seg, 0, take);
      n += take;
    }
    this.bytes += n;
    return n;
  }
}

/**
 * virtio-balloon in the device registry. No host side to open: the device works on guest RAM,
 * which the device worker wraps (BackendEnv.ram). Pages go back to the host with MADV_DONTNEED
 * on private RAM (a booted VM's anonymous memory: the page is freed and reads zero again; a
 * restored VM's mapping of its memory file: its copy-on-write copy is dropped), or MADV_REMOVE on
 * a shared memfd mapping (a hole is punched in the memfd: every mapping of it loses the page).
 */
import type { DeviceType } from '../descriptor.js';
import { BalloonDevice, balloonIdentity, type BalloonOptions, type BalloonRam } from './balloon.js';

export const MADV_DONTNEED = 4;
export const MADV_REMOVE = 9;

export interface BalloonDeviceConfig extends BalloonOptions {
  kind: 'balloon';
  id: string;
}

export type BalloonHost = BalloonOptions;

export const balloonDevice: DeviceType<BalloonDeviceConfig, BalloonHost> = {
  kind: 'balloon',
  metricsGroup: 'balloon',
  open: (config) => {
    const { kind: _k, id: _i, ...opts } = config;
    return {
      name: `virtio-balloon (${config.amountMib} MiB target)`,
      identity: balloonIdentity(opts),
      host: opts,
      warnings: [],
      close: () => undefined,
    };
  },
  create(host, env) {
    if (!env.ram) throw new Error('virtio-balloon needs the guest RAM mapping');
    const { memory, shared } = env.ram;
    const madvise = env.sys.madvise;
    if (!madvise) throw new Error('virtio-balloon needs madvise');
    const advice = shared ? MADV_REMOVE : MADV_DONTNEED;
    const ram: BalloonRam = {
      regions: memory.regions,
      discard(index, offset, length) {
        const b = memory.regions[index]!.bytes;
        madvise(b.buffer as ArrayBuffer, b.byteOffset + offset, length, advice);
      },
    };
    const dev = new BalloonDevice(host, ram, (ms, fn) => env.loop.setTimer(ms, fn), env.log);
    return { backend: dev, metrics: () => dev.metrics() };
  },
};

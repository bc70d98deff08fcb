/**
 * Opens a virtio device kind through its registry descriptor (DeviceType.open on a fake host,
 * then DeviceType.create on the fake loop), as the VMM does: the fuzzer uses only the public
 * surface, so it follows the devices' internal changes.
 */
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { OpenContext } from '../src/devices/virtio/descriptor.js';
import type { CreatedBackend, OpenedDevice } from '../src/devices/virtio/descriptor.js';
import { deviceType, type VirtioKind } from '../src/devices/virtio/registry.js';
import type { EventLoop } from '../src/events/event-loop.js';
import { guardedLoop } from '../src/vmm/device-loop.js';
import { FakeHost } from './host.js';
import { sharedRam, VirtioRig, type SharedRam } from './rig.js';
import type { Prng } from './core.js';

let scratch: string | undefined;
/** A private temp directory (tmpfs when there is one) for images and socket paths. */
export function scratchDir(): string {
  if (!scratch) {
    const base = existsSync('/dev/shm') ? '/dev/shm' : tmpdir();
    const dir = mkdtempSync(join(base, 'typervisor-fuzz-'));
    scratch = dir;
    process.on('exit', () => rmSync(dir, { recursive: true, force: true }));
  }
  return scratch;
}

export interface OpenedVirtio {
  host: FakeHost;
  ram: SharedRam;
  rig: VirtioRig;
  opened: OpenedDevice<unknown>;
  created: CreatedBackend;
  logs: string[];
}

export function openVirtio(
  kind: VirtioKind,
  config: Record<string, unknown>,
  rng: Prng,
): OpenedVirtio {
  const host = new FakeHost();
  const claims = new Map<string, string>();
  const ctx: OpenContext = {
    sys: host.sys,
    claim: (r, owner) => {
      const prev = claims.get(r);
      if (prev === undefined) claims.set(r, owner);
      return prev;
    },
  };
  const type = deviceType(kind);
  const opened = type.open({ kind, id: `fuzz_${kind}`, ...config } as never, ctx);
  const logs: string[] = [];
  // The backend sees the loop as the device worker gives it (guardedLoop): an exception out of
  // one of its fds or timers breaks the device instead of escaping the loop.
  let rig: VirtioRig | undefined;
  const loop = guardedLoop(host.loop as unknown as EventLoop, () => rig!.h.device);
  const ram = sharedRam();
  const created = type.create(opened.host, {
    name: opened.name,
    sys: host.sys,
    loop,
    log: (m) => logs.push(m),
    // Guest RAM as a restored VM maps it (private): the balloon gives pages back with
    // MADV_DONTNEED (the fake host checks the range and counts it).
    ram: { memory: ram.mem, shared: false },
  });
  rig = new VirtioRig(ram, opened.identity, created.backend, host.loop);
  rig.start(rng);
  return { host, ram, rig, opened, created, logs };
}

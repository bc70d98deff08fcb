/**
 * Wiring of the virtio-mmio devices into a VM, in the order builder.ts needs it:
 *
 *   validateVirtioConfigs(configs)          main thread, before anything is built (ConfigError)
 *   const plan = planVirtioDevices(configs) main thread: slots (addr, GSI), shared register
 *                                           files, eventfds; structured-clone friendly
 *   acpiVirtioDevices(plan)                 -> acpiBootHook({ virtio }) (and virtioCmdline(plan))
 *   registerVirtioWithKvm(vm, plan)         main thread: irqfds and QueueNotify ioeventfds
 *   attachVirtioTransports(plan, mmio)      every vCPU worker (and the main thread if it wants
 *                                           views): one MmioTransport per slot on its MMIO bus
 *   const dw = startDeviceWorker(plan, ram) main thread: the data-plane worker
 *   await dw.stop(); closeVirtio(plan)      teardown
 */
import { openSync, closeSync } from 'node:fs';
import { Worker } from 'node:worker_threads';
import {
  VIRTIO_GSI_FIRST,
  VIRTIO_GSI_LAST,
  VIRTIO_MMIO_BASE,
  VIRTIO_MMIO_SIZE,
} from '../arch/x86_64/layout.js';
import type { Bus } from '../devices/bus.js';
import { blockIdentity } from '../devices/virtio/block/block.js';
import {
  type BlockConfig,
  validateBlockConfigs,
  type ValidatedBlock,
} from '../devices/virtio/block/config.js';
import { VIRTIO_F_VERSION_1, bit } from '../devices/virtio/constants.js';
import { VirtioMmioState, type VirtioCounters } from '../devices/virtio/mmio-state.js';
import { MmioTransport, REG } from '../devices/virtio/mmio.js';
import { rngIdentity } from '../devices/virtio/rng/rng.js';
import { netIdentity, parseMac } from '../devices/virtio/net/net.js';
import { vsockIdentity } from '../devices/virtio/vsock/vsock.js';
import { listenVsock, openTap, removeSocket } from './host-net.js';
import type { Vm } from '../kvm/kvm.js';
import { EFD_NONBLOCK, native } from '../kvm/native.js';
import { ConfigError } from '../util/errors.js';
import {
  DEVICE_WORKER_ROLE,
  W_STOP,
  WORKER_CONTROL_SLOTS,
  type DeviceWorkerData,
  type DeviceWorkerDevice,
  type DeviceWorkerMessage,
} from './device-worker.js';
import type { GuestRamLayout } from './guest-ram.js';

export type { BlockConfig } from '../devices/virtio/block/config.js';
/** virtio-net over host TAP `tap`; `mac`: the guest's MAC (else the guest picks a random one). */
export interface NetConfig {
  kind: 'net';
  tap: string;
  mac?: string;
}
/** virtio-vsock with guest CID `cid`, host side on the Unix socket `uds` (Firecracker's scheme). */
export interface VsockDeviceConfig {
  kind: 'vsock';
  cid: number;
  uds: string;
}
export type VirtioConfig = BlockConfig | { kind: 'rng' } | NetConfig | VsockDeviceConfig;

export interface VirtioSlot {
  name: string;
  kind: 'block' | 'rng' | 'net' | 'vsock';
  /** Guest-physical base of the 4 KiB register window. */
  addr: number;
  gsi: number;
  state: SharedArrayBuffer;
  irqFd: number;
  /** One eventfd per queue, signalled by KVM on QueueNotify = queue index. */
  queueFds: number[];
  block?: ValidatedBlock;
  net?: { tapFd: number; tap: string };
  vsock?: { listenFd: number; cid: number; uds: string };
}

export interface VirtioPlan {
  slots: VirtioSlot[];
  /** Wakes the device worker (lifecycle changes, stop). */
  controlFd: number;
  warnings: string[];
}

const MAX_SLOTS = VIRTIO_GSI_LAST - VIRTIO_GSI_FIRST + 1;

/** Checks the device list (drive files, duplicates, slot count). Throws ConfigError. */
export function validateVirtioConfigs(configs: readonly VirtioConfig[]): {
  blocks: ValidatedBlock[];
  warnings: string[];
} {
  if (configs.length > MAX_SLOTS) {
    throw new ConfigError(
      `at most ${MAX_SLOTS} virtio devices (one GSI each), ${configs.length} asked`,
    );
  }
  for (const c of configs) {
    if (c.kind !== 'block' && c.kind !== 'rng' && c.kind !== 'net' && c.kind !== 'vsock')
      throw new ConfigError(`unknown virtio device kind ${String((c as { kind: unknown }).kind)}`);
  }
  if (configs.filter((c) => c.kind === 'rng').length > 1)
    throw new ConfigError('at most one entropy device');
  if (configs.filter((c) => c.kind === 'vsock').length > 1)
    throw new ConfigError('at most one vsock device');
  const nets = configs.filter((c): c is NetConfig => c.kind === 'net');
  const taps = new Set(nets.map((c) => c.tap));
  if (taps.size !== nets.length) throw new ConfigError('two network interfaces on one TAP');
  const macs = nets.filter((c) => c.mac !== undefined).map((c) => c.mac!.toLowerCase());
  if (new Set(macs).size !== macs.length)
    throw new ConfigError('two network interfaces with one MAC');
  for (const c of nets) {
    if (c.mac === undefined) continue;
    let mac: Uint8Array;
    try {
      mac = parseMac(c.mac);
    } catch {
      throw new ConfigError(
        `TAP ${c.tap}: bad MAC address ${JSON.stringify(c.mac)} (like 06:00:a9:fe:00:02)`,
      );
    }
    if (mac[0]! & 1) throw new ConfigError(`TAP ${c.tap}: MAC ${c.mac} is a multicast address`);
  }
  const blocks = validateBlockConfigs(configs.filter((c): c is BlockConfig => c.kind === 'block'));
  return { blocks, warnings: blocks.flatMap((b) => b.warnings) };
}

/** Main thread: validates, lays out slots in config order, creates shared state and eventfds. */
export function planVirtioDevices(configs: readonly VirtioConfig[]): VirtioPlan {
  const { blocks, warnings } = validateVirtioConfigs(configs);
  const n = native();
  const version1 = bit(VIRTIO_F_VERSION_1);
  let b = 0;
  const opened: Array<() => void> = [];
  try {
    return planSlots();
  } catch (e) {
    opened.forEach((close) => close());
    throw e;
  }

  function planSlots(): VirtioPlan {
    const slots = configs.map((c, i): VirtioSlot => {
      const base = { addr: VIRTIO_MMIO_BASE + i * VIRTIO_MMIO_SIZE, gsi: VIRTIO_GSI_FIRST + i };
      if (c.kind === 'block') {
        const blk = blocks[b++]!;
        const id = blockIdentity(blk.capacity, blk.readOnly);
        return {
          ...base,
          name: `virtio-blk${i} (${blk.path}${blk.readOnly ? ', read-only' : ''})`,
          kind: 'block',
          state: VirtioMmioState.createState(id, version1),
          irqFd: n.eventfd(0, EFD_NONBLOCK),
          queueFds: id.queueSizes.map(() => n.eventfd(0, EFD_NONBLOCK)),
          block: blk,
        };
      }
      if (c.kind === 'net') {
        const tap = openTap(c.tap);
        opened.push(() => n.close(tap.fd));
        const id = netIdentity(c.mac === undefined ? undefined : parseMac(c.mac), tap.offloads);
        return {
          ...base,
          name: `virtio-net${i} (${c.tap})`,
          kind: 'net',
          state: VirtioMmioState.createState(id, version1),
          irqFd: n.eventfd(0, EFD_NONBLOCK),
          queueFds: id.queueSizes.map(() => n.eventfd(0, EFD_NONBLOCK)),
          net: { tapFd: tap.fd, tap: c.tap },
        };
      }
      if (c.kind === 'vsock') {
        const l = listenVsock(c.cid, c.uds);
        opened.push(() => {
          n.close(l.fd);
          removeSocket(l.path);
        });
        const id = vsockIdentity(c.cid);
        return {
          ...base,
          name: `virtio-vsock${i} (cid ${c.cid}, ${l.path})`,
          kind: 'vsock',
          state: VirtioMmioState.createState(id, version1),
          irqFd: n.eventfd(0, EFD_NONBLOCK),
          queueFds: id.queueSizes.map(() => n.eventfd(0, EFD_NONBLOCK)),
          vsock: { listenFd: l.fd, cid: c.cid, uds: l.path },
        };
      }
      const id = rngIdentity();
      return {
        ...base,
        name: `virtio-rng${i}`,
        kind: 'rng',
        state: VirtioMmioState.createState(id, version1),
        irqFd: n.eventfd(0, EFD_NONBLOCK),
        queueFds: id.queueSizes.map(() => n.eventfd(0, EFD_NONBLOCK)),
      };
    });
    return { slots, controlFd: n.eventfd(0, EFD_NONBLOCK), warnings };
  }
}

/** For acpiBootHook({ virtio }). */
export function acpiVirtioDevices(plan: VirtioPlan): Array<{ addr: number; gsi: number }> {
  return plan.slots.map((s) => ({ addr: s.addr, gsi: s.gsi }));
}

/** Kernel cmdline form, for kernels with CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES. */
export function virtioCmdline(plan: VirtioPlan): string {
  return plan.slots.map((s) => `virtio_mmio.device=4K@0x${s.addr.toString(16)}:${s.gsi}`).join(' ');
}

/** Main thread: interrupts through irqfds, queue kicks through ioeventfds (4-byte, datamatch). */
export function registerVirtioWithKvm(vm: Vm, plan: VirtioPlan): void {
  for (const s of plan.slots) {
    vm.registerIrqfd(s.irqFd, s.gsi);
    s.queueFds.forEach((fd, q) =>
      vm.registerIoeventfd(fd, s.addr + REG.QUEUE_NOTIFY, 4, { datamatch: BigInt(q) }),
    );
  }
}

/** Any thread with an MMIO bus (each vCPU worker): one transport per slot over its shared state. */
export function attachVirtioTransports(plan: VirtioPlan, mmio: Bus): MmioTransport[] {
  return plan.slots.map((s) => {
    const t = new MmioTransport(s.state, {
      lifecycle: () => native().eventfdWrite(plan.controlFd, 1),
      notify: (q) => {
        const fd = s.queueFds[q];
        if (fd !== undefined) native().eventfdWrite(fd, 1);
      },
    });
    mmio.insert(s.addr, VIRTIO_MMIO_SIZE, t);
    return t;
  });
}

export interface DeviceWorkerHandle {
  /** Asks the worker to finish and waits for it; closes the disk images. Idempotent. */
  stop(): Promise<void>;
  /** Resolves when the worker thread has exited (for any reason). */
  readonly exited: Promise<void>;
  counters(): Array<{ name: string } & VirtioCounters>;
}

export interface DeviceWorkerOptions {
  log?: (message: string) => void;
  /** The worker failed (an exception outside any request): the VM should stop. */
  onFatal?: (message: string) => void;
}

/** Main thread: opens the disk images and starts the data-plane worker. */
export function startDeviceWorker(
  plan: VirtioPlan,
  ram: GuestRamLayout,
  opts: DeviceWorkerOptions = {},
): DeviceWorkerHandle {
  const log = opts.log ?? (() => undefined);
  const fds: number[] = [];
  let devices: DeviceWorkerDevice[];
  try {
    devices = plan.slots.map((s): DeviceWorkerDevice => {
      const common = { name: s.name, state: s.state, irqFd: s.irqFd, queueFds: s.queueFds };
      if (s.kind === 'net' && s.net) return { ...common, kind: 'net', tapFd: s.net.tapFd };
      if (s.kind === 'vsock' && s.vsock)
        return {
          ...common,
          kind: 'vsock',
          listenFd: s.vsock.listenFd,
          cid: s.vsock.cid,
          uds: s.vsock.uds,
        };
      if (s.kind === 'rng' || !s.block) return { ...common, kind: 'rng' };
      const b = s.block;
      const fd = openSync(b.path, b.readOnly ? 'r' : 'r+');
      fds.push(fd);
      return {
        ...common,
        kind: 'block',
        fd,
        capacity: b.capacity,
        readOnly: b.readOnly,
        serial: b.serial,
      };
    });
  } catch (e) {
    fds.forEach((fd) => closeSync(fd));
    throw new ConfigError(`cannot open a disk image: ${(e as Error).message}`);
  }
  const control = new SharedArrayBuffer(WORKER_CONTROL_SLOTS * 4);
  const c = new Int32Array(control);
  const worker = new Worker(new URL('./device-worker.js', import.meta.url), {
    workerData: {
      role: DEVICE_WORKER_ROLE,
      ram,
      controlFd: plan.controlFd,
      control,
      devices,
    } satisfies DeviceWorkerData,
  });
  worker.on('message', (m: DeviceWorkerMessage) => {
    if (m.type === 'log') log(m.message);
    else opts.onFatal?.(`device worker: ${m.message}`);
  });
  worker.on('error', (e) => opts.onFatal?.(`device worker failed: ${e.message}`));
  const exited = new Promise<void>((resolve) => worker.once('exit', () => resolve()));
  let closed = false;
  const closeImages = () => {
    if (closed) return;
    closed = true;
    for (const fd of fds) {
      try {
        closeSync(fd);
      } catch {
        // already closed
      }
    }
  };
  void exited.then(closeImages);
  const states = plan.slots.map((s) => ({ name: s.name, state: new VirtioMmioState(s.state) }));
  return {
    exited,
    async stop() {
      Atomics.store(c, W_STOP, 1);
      native().eventfdWrite(plan.controlFd, 1);
      await exited;
      closeImages();
    },
    counters: () => states.map(({ name, state }) => ({ name, ...state.counters() })),
  };
}

/** Closes the plan's eventfds (after the VM and the device worker are gone). */
export function closeVirtio(plan: VirtioPlan): void {
  const n = native();
  for (const s of plan.slots) if (s.vsock) removeSocket(s.vsock.uds);
  const hostFds = plan.slots.flatMap((s) => [
    ...(s.net ? [s.net.tapFd] : []),
    ...(s.vsock ? [s.vsock.listenFd] : []),
  ]);
  for (const fd of [
    plan.controlFd,
    ...plan.slots.flatMap((s) => [s.irqFd, ...s.queueFds]),
    ...hostFds,
  ]) {
    try {
      n.close(fd);
    } catch {
      // already closed
    }
  }
}

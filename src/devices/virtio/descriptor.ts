/**
 * What a virtio device kind tells the VMM about itself: one descriptor per kind, exported from
 * the kind's folder (`block/descriptor.ts`, ...) and listed once in `registry.ts`. The VMM
 * drives every kind the same way:
 *
 *   main thread, before the VM is built:  open(config, ctx) -> OpenedDevice
 *     identity (device id, features, config space), the host side opened (image fd, TAP,
 *     listening socket) as structured-clone data for the device worker, and close() for teardown
 *   device worker:                         create(host, env) -> VirtioBackend
 *     the backend over that host side; it may watch its own fds on the worker's loop
 *
 * Devices never import the KVM layer: the syscalls they need come in through `HostSys`, which
 * the VMM fills with the native shim (the same functions, typed here by what devices use).
 */
import type { GuestMemory } from '../../memory/guest-memory.js';
import type { VirtioBackend } from './device.js';
import type { VirtioDeviceIdentity } from './mmio-state.js';

export type Buf = ArrayBuffer | ArrayBufferView;

/** The syscalls device host sides use (a subset of the native shim, kvm/native.ts). */
export interface HostSys {
  close(fd: number): void;
  ioctl(fd: number, request: number, arg: number | bigint | Buf): number;
  readv(fd: number, buffers: Buf[]): number;
  writev(fd: number, buffers: Buf[]): number;
  /** At a file offset (virtio-blk's Sync engine: one syscall per request, not per segment). */
  preadv?(fd: number, buffers: Buf[], offset: number): number;
  pwritev?(fd: number, buffers: Buf[], offset: number): number;
  tapOpen(name: string, flags: number): number;
  unixSocket(): number;
  bindListen(fd: number, path: string, backlog: number): void;
  accept(fd: number): number;
  connect(fd: number, path: string): number;
  sendv(fd: number, buffers: Buf[]): number;
  shutdown(fd: number, how: number): void;
  /** For device memory (virtio-mem): the region's memfd, and giving its pages back. */
  memfdCreate(name: string, flags: number): number;
  mmap(length: number, prot: number, flags: number, fd: number, offset: number): ArrayBuffer;
  munmap(buffer: ArrayBuffer): void;
  madvise(buffer: ArrayBuffer, offset: number, length: number, advice: number): void;
  /** For virtio-blk's io_uring engine (block/io-uring.ts). */
  bufferAddress(buffer: Buf): bigint;
  eventfd(initval: number, flags: number): number;
  eventfdRead(fd: number): bigint;
  /** For virtio-vsock's vhost backend (vsock/vhost.ts): its device, and its queues' kicks. */
  open?(path: string, flags: number, mode: number): number;
  eventfdWrite?(fd: number, value: number | bigint): void;
  ioUringSetup(entries: number, params: Buf): number;
  ioUringEnter(fd: number, toSubmit: number, minComplete: number, flags: number): number;
  ioUringRegister(fd: number, opcode: number, arg: Buf | null, nrArgs: number): number;
}

/** Linux epoll bits, as the worker's loop takes them. */
export const EV_IN = 0x1;
export const EV_OUT = 0x4;
export const EV_ERR = 0x8;
export const EV_HUP = 0x10;

/** The device worker's event loop, as a backend sees it (events/event-loop.ts implements it). */
export interface EventOps {
  /** Watches `fd` for `events` (default EV_IN); returns a tag for modify/remove. */
  add(fd: number, subscriber: { process(events: number): void }, events?: number): number;
  modify(tag: number, events: number): void;
  remove(tag: number): void;
  /** Runs `fn` once on the worker's thread after `ms`; returns a cancel function. */
  setTimer(ms: number, fn: () => void): () => void;
}

/** What open() may share between the devices of one VM (uniqueness of host resources). */
export interface OpenContext {
  sys: HostSys;
  /**
   * Claims a host resource (an image's dev:ino, a TAP name) for `owner`; returns the owner that
   * claimed it before, if any (the caller refuses the second claim with its own message).
   */
  claim(resource: string, owner: string): string | undefined;
  /**
   * Reserves `size` bytes of guest-physical address space above RAM, aligned to `align`, for a
   * device whose memory the guest maps (virtio-pmem, virtio-mem); returns its base. Absent when
   * the VM has no room planned for device memory (the device refuses with a ConfigError).
   */
  allocateGuestMemory?(size: number, align: number): number;
}

/**
 * Memory a device puts in the guest-physical address space: the VMM maps `size` bytes of `fd`
 * from `offset` (MAP_SHARED) and gives KVM the mapping as a memory slot at `guestAddr`
 * (KVM_MEM_READONLY when `readOnly`).
 */
export interface DeviceMemoryRegion {
  guestAddr: number;
  size: number;
  fd: number;
  offset: number;
  readOnly: boolean;
  /**
   * KVM gets no slot for it at first: the device adds it (BackendEnv.memorySlots) when it needs
   * it (virtio-mem: once a block in it is plugged).
   */
  startsOut?: boolean;
}

export interface OpenedDevice<Host> {
  /** For log lines: "virtio-blk rootfs (/path/disk.img, read-only)". */
  name: string;
  identity: VirtioDeviceIdentity;
  /** Structured-clone data for the device worker (fds are process-wide numbers). */
  host: Host;
  warnings: string[];
  /** Guest-physical memory the device's region needs mapped (see DeviceMemoryRegion). */
  memory?: DeviceMemoryRegion[];
  /** Main thread, after the device worker has ended: closes what open() opened. */
  close(): void;
}

export interface BackendEnv {
  name: string;
  sys: HostSys;
  loop: EventOps;
  /** A log line: info, or `warn` for what a user should see at the default log level. */
  log(message: string, level?: 'warn'): void;
  /**
   * Guest RAM as the device worker maps it (virtio-balloon), and whether it is the shared memfd
   * (a booted VM) rather than a private copy-on-write mapping (a restored one).
   */
  ram?: { memory: GuestMemory; shared: boolean };
  /**
   * The device's config space in the register file: read bytes of it, or change them
   * (ConfigGeneration bumped, the driver told by a config-change interrupt when live).
   */
  config?: {
    read(offset: number, length: number): Uint8Array;
    change(offset: number, bytes: Uint8Array): void;
  };
  /** The device's memory regions as KVM memory slots (when it has device memory). */
  memorySlots?: MemorySlots;
  /**
   * Each queue's kick eventfd (KVM's ioeventfd for QueueNotify): for a backend that hands
   * queues to another party (VirtioBackend.offloaded), which polls them instead of the worker.
   */
  queueFds?: readonly number[];
}

/**
 * A device's memory regions (its open()'s `memory`, in order) as KVM memory slots: a device
 * whose guest memory comes and goes (virtio-mem) puts a slot into the guest-physical map and
 * takes it out. setPresent throws on a host failure (nothing changed).
 */
export interface MemorySlots {
  readonly count: number;
  /** Whether KVM has slot `index` now (at first: not when its region `startsOut`). */
  isPresent(index: number): boolean;
  setPresent(index: number, present: boolean): void;
}

/** Counters a backend reports, in Firecracker's metric names (snake_case, monotonic). */
export type DeviceCounters = Record<string, number>;

export interface DeviceType<Config extends { kind: string; id: string }, Host> {
  readonly kind: Config['kind'];
  /** Firecracker's metrics group for this kind: "block", "net", "vsock", "entropy". */
  readonly metricsGroup: string;
  /** Main thread: validates against the host and opens the host side; throws ConfigError. */
  open(config: Config, ctx: OpenContext): OpenedDevice<Host>;
  /** Device worker: the backend, and its counters for the metrics lines. */
  create(host: Host, env: BackendEnv): CreatedBackend;
}

export interface CreatedBackend {
  backend: VirtioBackend;
  metrics?(): DeviceCounters;
  /** Device worker, when it ends: releases what create() opened (virtio-blk's io_uring). */
  close?(): void;
}

/**
 * virtio-vsock with the host kernel's vhost-vsock as its data plane (config `backend: "vhost"`,
 * opt-in): what QEMU's vhost-vsock-device does. The kernel serves the rx and tx queues itself,
 * reading and writing guest RAM through the memory table we give it; host programs reach the
 * guest over AF_VSOCK at its CID (and the guest reaches host listeners at CID 2), not through
 * Firecracker's Unix socket (device.ts, unix-host.ts).
 *
 * Who does what:
 * - main thread (`openVhostVsock`, from the registry's open()): opens /dev/vhost-vsock (or, in a
 *   jail, takes the descriptor typervisor-jailer --vhost-vsock-cid claimed), becomes its owner,
 *   reads the kernel's features and claims the guest CID (the kernel refuses a CID another VM on
 *   this host has: a clear ConfigError before boot).
 * - device worker (`VhostVsockDevice`): on DRIVER_OK it hands the kernel the features, the
 *   memory table (guest RAM only), each data queue's size, position and ring addresses, the
 *   queue's kick eventfd (KVM's ioeventfd for QueueNotify, which the device worker then does not
 *   watch: VirtioBackend.offloaded) and a call eventfd of ours, and starts it. A call is relayed
 *   as the device's used-buffer interrupt (InterruptStatus, then the GSI), as QEMU relays them
 *   for virtio-mmio; the kernel has already applied EVENT_IDX. The event queue stays ours: it
 *   carries TRANSPORT_RESET after a restore.
 *
 * The kernel touches guest memory only while the VM runs: pause() stops it (SET_RUNNING 0) and
 * resume() starts it again, so a paused VM's memory and rings do not change under a snapshot.
 * Saving reads each data queue's last available index back (GET_VRING_BASE) into the queue's
 * position, with used.idx from guest RAM; the state saved is the unix backend's (the CID and the
 * transport reset owed: connections are the kernel's and are not saved, as in Firecracker).
 *
 * Not here: dirty-page logging (the kernel's writes are not tracked: resources.ts refuses
 * track_dirty_pages with this backend). The kernel could not give it either: with
 * VHOST_F_LOG_ALL and a log base, Linux's vhost-vsock logs its used-ring writes (which a save
 * marks anyway, Queue.markForSnapshot) but not the rx buffers it fills: drivers/vhost/vsock.c
 * takes its descriptors with no log (vhost_get_vq_desc(..., NULL, NULL)), unlike vhost-net.
 * Nor memory added after boot (the memory table is guest RAM as booted: memory hotplug is
 * refused too).
 */
import { VHOST, VHOST_VSOCK_PATH, setGuestCid } from '../../../util/vhost-abi.js';
import { ConfigError } from '../../../util/errors.js';
import type { GuestMemory } from '../../../memory/guest-memory.js';
import {
  VIRTIO_F_RING_EVENT_IDX,
  VIRTIO_F_RING_INDIRECT_DESC,
  VIRTIO_F_VERSION_1,
  bit,
} from '../constants.js';
import { EV_IN, type EventOps, type HostSys } from '../descriptor.js';
import type { QueueIo, VirtioBackend } from '../device.js';
import {
  EVENT_QUEUE,
  RX_QUEUE,
  TX_QUEUE,
  VsockStateV1,
  decodeVsockState,
  sendTransportReset,
} from './device.js';

const O_RDWR = 2;
const EFD_NONBLOCK = 0o4000;
const EPOLLET = 0x8000_0000;

/** The transport offers these on every device (virtio-plan.ts, device.ts): the kernel must have them. */
const TRANSPORT_FEATURES = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_F_RING_EVENT_IDX);

export interface VhostVsockHostData {
  /** The open /dev/vhost-vsock, owned by this process, CID set. */
  fd: number;
  cid: number;
  /** What the kernel offers (VHOST_GET_FEATURES). */
  kernelFeatures: bigint;
}

function u64(v: bigint): BigUint64Array {
  return BigUint64Array.of(v);
}

/** struct vhost_vring_state { unsigned int index; unsigned int num; } */
function vringState(index: number, num: number): Uint32Array {
  return Uint32Array.of(index, num);
}

/** struct vhost_vring_file { unsigned int index; int fd; } */
function vringFile(index: number, fd: number): Int32Array {
  return Int32Array.of(index, fd);
}

/**
 * struct vhost_vring_addr { u32 index, flags; u64 desc_user_addr, used_user_addr,
 * avail_user_addr, log_guest_addr; } (40 bytes; our addresses are the process's own).
 */
function vringAddr(index: number, desc: bigint, used: bigint, avail: bigint): Uint8Array {
  const b = new Uint8Array(40);
  const v = new DataView(b.buffer);
  v.setUint32(0, index, true);
  v.setBigUint64(8, desc, true);
  v.setBigUint64(16, used, true);
  v.setBigUint64(24, avail, true);
  return b;
}

/**
 * struct vhost_memory { u32 nregions, padding; struct vhost_memory_region regions[]; } with
 * region = { u64 guest_phys_addr, memory_size, userspace_addr, flags_padding; }.
 */
export function memoryTable(
  regions: ReadonlyArray<{ base: number; size: number; host: bigint }>,
): Uint8Array {
  const b = new Uint8Array(8 + 32 * regions.length);
  const v = new DataView(b.buffer);
  v.setUint32(0, regions.length, true);
  regions.forEach((r, i) => {
    const o = 8 + 32 * i;
    v.setBigUint64(o, BigInt(r.base), true);
    v.setBigUint64(o + 8, BigInt(r.size), true);
    v.setBigUint64(o + 16, r.host, true);
  });
  return b;
}

const errCode = (e: unknown) => (e as { code?: string }).code;

/**
 * A /dev/vhost-vsock descriptor this process was started with, its guest CID already claimed:
 * the jailer's (`typervisor-jailer --vhost-vsock-cid`, which passes the VMM `--vhost-vsock-fd`
 * and `--vhost-vsock-cid`). A jail has no /dev/vhost-vsock node, so that a VMM there cannot
 * open the device again and claim more CIDs; it uses this descriptor, once, for that CID only.
 * Main thread only.
 */
interface InheritedVhostVsock {
  fd: number;
  cid: number;
  used: boolean;
}
let inherited: InheritedVhostVsock | undefined;

/** The CLI, at start: the descriptor and CID the jailer handed over (undefined: none, tests). */
export function adoptInheritedVhostVsock(fd: number | undefined, cid = 0): void {
  inherited = fd === undefined ? undefined : { fd, cid, used: false };
}

/** The jailer's descriptor for `cid`, taken for good; undefined when there is none. */
function takeInherited(cid: number, what: string): number | undefined {
  const inh = inherited;
  if (!inh) return undefined;
  if (inh.cid !== cid)
    throw new ConfigError(
      `vsock guest_cid ${cid}: this VMM was given /dev/vhost-vsock for guest CID ${inh.cid} only (typervisor-jailer --vhost-vsock-cid); use that CID`,
    );
  if (inh.used)
    throw new ConfigError(
      `${what}: the descriptor the jailer gave this VMM was used already (one vhost-vsock device per jailed VMM process)`,
    );
  inh.used = true;
  return inh.fd;
}

/**
 * Main thread: opens and claims the kernel's device for guest `cid` (or takes the jailer's
 * descriptor for it). ConfigError when the host has no vhost-vsock, refuses us, lacks a feature
 * the transport offers, or has the CID in use.
 */
export function openVhostVsock(sys: HostSys, cid: number): VhostVsockHostData {
  const what = `vsock backend "vhost" (${VHOST_VSOCK_PATH})`;
  if (!sys.open) throw new Error(`${what}: this host interface cannot open files`);
  let fd: number;
  try {
    fd = takeInherited(cid, what) ?? sys.open(VHOST_VSOCK_PATH, O_RDWR, 0);
  } catch (e) {
    if (e instanceof ConfigError) throw e;
    const code = errCode(e);
    if (code === 'ENOENT' || code === 'ENODEV' || code === 'ENXIO')
      throw new ConfigError(
        `${what}: the host has no vhost-vsock device (load it: modprobe vhost_vsock), or use the unix backend; a jailed VMM gets the device from typervisor-jailer --vhost-vsock-cid`,
      );
    if (code === 'EACCES' || code === 'EPERM')
      throw new ConfigError(`${what}: permission denied (the VMM needs read and write access)`);
    throw new ConfigError(`${what}: ${(e as Error).message}`);
  }
  try {
    sys.ioctl(fd, VHOST.SET_OWNER, 0);
    const f = u64(0n);
    sys.ioctl(fd, VHOST.GET_FEATURES, f);
    const kernelFeatures = f[0]!;
    if ((kernelFeatures & TRANSPORT_FEATURES) !== TRANSPORT_FEATURES)
      throw new ConfigError(
        `${what}: the kernel's vhost-vsock lacks VIRTIO_F_VERSION_1 or VIRTIO_F_RING_EVENT_IDX (features 0x${kernelFeatures.toString(16)})`,
      );
    const refused = setGuestCid((f, r, a) => sys.ioctl(f, r, a), fd, cid);
    if (refused !== undefined) throw new ConfigError(refused);
    return { fd, cid, kernelFeatures };
  } catch (e) {
    sys.close(fd);
    if (e instanceof ConfigError) throw e;
    throw new ConfigError(`${what}: ${(e as Error).message}`);
  }
}

/** The features the device offers: what the unix backend offers, where the kernel has them. */
export function vhostDeviceFeatures(kernelFeatures: bigint): bigint {
  return bit(VIRTIO_F_RING_INDIRECT_DESC) & kernelFeatures;
}

export interface VhostCounters {
  /** The kernel's interrupt requests relayed, per data queue (rx, tx). */
  calls: [number, number];
  /** SET_RUNNING 1 / 0 (activations, resumes; resets, pauses). */
  starts: number;
  stops: number;
  /** Rings the kernel reported broken (the error eventfd). */
  errors: number;
}

export class VhostVsockDevice implements VirtioBackend {
  readonly selfServed = [EVENT_QUEUE] as const;
  readonly offloaded = [RX_QUEUE, TX_QUEUE] as const;
  private io: QueueIo | undefined;
  /** The kernel is serving the queues (SET_RUNNING 1). */
  private running = false;
  /** The VM is paused: nothing starts until resume(). */
  private paused = false;
  private resetEventPending = false;
  private readonly callFds: number[] = [];
  private readonly errFds: number[] = [];
  private readonly tags: number[] = [];
  readonly counters: VhostCounters = { calls: [0, 0], starts: 0, stops: 0, errors: 0 };

  constructor(
    readonly name: string,
    readonly cid: number,
    private readonly fd: number,
    private readonly kernelFeatures: bigint,
    /** Kick eventfds of the rx and tx queues (KVM's ioeventfds): the kernel polls them. */
    private readonly kickFds: readonly number[],
    private readonly sys: HostSys,
    private readonly loop: EventOps,
    private readonly mem: GuestMemory,
  ) {
    if (kickFds.length < 2) throw new Error(`${name}: the rx and tx kick eventfds are missing`);
    if (!sys.eventfdWrite) throw new Error(`${name}: this host interface cannot write eventfds`);
    for (const q of [RX_QUEUE, TX_QUEUE]) {
      // The kernel's "this ring is broken" (vq_err: a bad descriptor, a ring it cannot reach):
      // read, so that one signal is one report.
      const errFd = sys.eventfd(0, EFD_NONBLOCK);
      this.errFds.push(errFd);
      this.tags.push(loop.add(errFd, { process: () => this.onError(q, errFd) }, EV_IN));
      const fd = sys.eventfd(0, EFD_NONBLOCK);
      this.callFds.push(fd);
      // Edge-triggered and never read, as the queues' kick eventfds (device-loop.ts watchQueue):
      // each of the kernel's signals reports the fd again.
      this.tags.push(loop.add(fd, { process: () => this.onCall(q) }, EV_IN | EPOLLET));
    }
  }

  handle(): number {
    // Never called: the data queues are offloaded and the event queue is self-served.
    return 0;
  }

  private onError(q: number, fd: number): void {
    this.sys.eventfdRead(fd);
    this.counters.errors++;
    // The kernel stops serving a ring it found broken; the driver must reset the device.
    this.io?.broken(
      q,
      "the host kernel's vhost-vsock refused the ring (a malformed descriptor or buffer)",
    );
  }

  private onCall(q: number): void {
    if (!this.io) return;
    this.counters.calls[q as 0 | 1]++;
    this.io.signalUsed(q);
  }

  activate(features: bigint, io: QueueIo, restored = false): void {
    this.io = io;
    const hva = (gpa: number, len: number, what: string): bigint => {
      for (const r of this.mem.regions)
        if (gpa >= r.base && gpa + len <= r.base + r.size)
          return this.sys.bufferAddress(r.bytes) + BigInt(gpa - r.base);
      throw new Error(
        `${what} at 0x${gpa.toString(16)} is not in guest RAM (the vhost backend reaches guest RAM only)`,
      );
    };
    const { sys, fd } = this;
    sys.ioctl(fd, VHOST.SET_FEATURES, u64(features & this.kernelFeatures));
    sys.ioctl(
      fd,
      VHOST.SET_MEM_TABLE,
      memoryTable(
        this.mem.regions.map((r) => ({
          base: r.base,
          size: r.size,
          host: sys.bufferAddress(r.bytes),
        })),
      ),
    );
    for (const q of [RX_QUEUE, TX_QUEUE]) {
      const ring = io.ring(q);
      if (!ring) throw new Error(`queue ${q} is not ready at DRIVER_OK`);
      const { size, addresses: a, position } = ring;
      sys.ioctl(fd, VHOST.SET_VRING_NUM, vringState(q, size));
      sys.ioctl(fd, VHOST.SET_VRING_BASE, vringState(q, position.nextAvail));
      sys.ioctl(
        fd,
        VHOST.SET_VRING_ADDR,
        vringAddr(
          q,
          hva(a.desc, 16 * size, `queue ${q}'s descriptor table`),
          hva(a.device, 6 + 8 * size, `queue ${q}'s used ring`),
          hva(a.driver, 6 + 2 * size, `queue ${q}'s available ring`),
        ),
      );
      sys.ioctl(fd, VHOST.SET_VRING_KICK, vringFile(q, this.kickFds[q]!));
      sys.ioctl(fd, VHOST.SET_VRING_CALL, vringFile(q, this.callFds[q]!));
      sys.ioctl(fd, VHOST.SET_VRING_ERR, vringFile(q, this.errFds[q]!));
    }
    if (!this.paused) this.start();
    if (restored) this.deliverEvents();
  }

  /**
   * Starts the kernel's queues. Buffers posted while it was stopped are seen at the kicks the
   * device passes on right after (VirtioDevice.kickAll, at activation and at resume).
   */
  private start(): void {
    this.sys.ioctl(this.fd, VHOST.VSOCK_SET_RUNNING, Int32Array.of(1));
    this.running = true;
    this.counters.starts++;
  }

  private stop(): void {
    if (!this.running) return;
    this.running = false;
    this.counters.stops++;
    this.sys.ioctl(this.fd, VHOST.VSOCK_SET_RUNNING, Int32Array.of(0));
  }

  deactivate(): void {
    this.io = undefined;
    this.stop();
  }

  pause(): void {
    this.paused = true;
    this.stop();
  }

  resume(): void {
    this.paused = false;
    if (this.io && !this.running) this.start();
  }

  kick(queue: number): void {
    if (queue === EVENT_QUEUE) this.deliverEvents();
    // A data queue's kick that reached us (the transport's fallback, kickAll): the kernel's.
    else if (this.running && (queue === RX_QUEUE || queue === TX_QUEUE))
      this.sys.eventfdWrite!(this.kickFds[queue]!, 1);
  }

  /**
   * Precondition (the device worker's save): the VM is paused, so the kernel is stopped. Each
   * data queue's position becomes where the kernel stands.
   */
  save(): Uint8Array {
    this.stop();
    const io = this.io;
    if (io)
      for (const q of [RX_QUEUE, TX_QUEUE]) {
        if (!io.ring(q)) continue;
        const s = vringState(q, 0);
        this.sys.ioctl(this.fd, VHOST.GET_VRING_BASE, s);
        io.adopt(q, s[1]!);
      }
    return VsockStateV1.encode({
      cid: this.cid,
      transportResetPending: this.resetEventPending || io !== undefined,
    });
  }

  restore(bytes: Uint8Array): void {
    this.resetEventPending = decodeVsockState(bytes, this.cid).transportResetPending;
  }

  /** TRANSPORT_RESET into the event queue, if owed and a buffer is there (else at its kick). */
  private deliverEvents(): void {
    const io = this.io;
    if (io && this.resetEventPending && sendTransportReset(io)) this.resetEventPending = false;
  }

  /** Device worker, at its end: stops the kernel, drops the call eventfds. */
  close(): void {
    try {
      this.stop();
    } catch {
      // the fd is closed by the main thread next
    }
    for (const t of this.tags.splice(0)) this.loop.remove(t);
    for (const fd of [...this.callFds.splice(0), ...this.errFds.splice(0)]) this.sys.close(fd);
  }
}

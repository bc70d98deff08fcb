/**
 * Warming the device worker's virtio-net path before the guest needs it (issue 17: ping RTT).
 *
 * V8 runs a function in its interpreter until it has run often enough to be compiled, and a
 * ping every 200 ms never gets the device worker's TX and RX code there: in the lab our device
 * worker spent 2-4 ms of CPU per wake-up on a ping against ~0.8 ms for QEMU's main loop, and
 * after 500 pings back to back its CPU per ping halved and the RTT fell from ~13-17 to ~8.5 ms
 * (docs/bench.md, "Ping"). So the worker plays that traffic itself first, on two scratch
 * devices: the same classes, methods and closures the guest's frames go through (EventLoop
 * dispatch, VirtioDevice's kick and drain, Virtqueue, NetDevice's TX and RX turns, interrupts),
 * over a scratch buffer in place of guest RAM and a loopback in place of the TAP (the frame
 * written is the frame read back). Nothing of it reaches the guest, the TAP or the metrics.
 * Measured in the lab: -23% device worker CPU per ping, RTT 1.5-1.75x QEMU's against 1.8-1.9x
 * (bench/results/2026-12-05-lab-ping-warmup.md).
 *
 * It runs in slices of the worker's own loop (a timer per slice), so the guest's real events
 * are served between slices, and it stops after a bounded number of round trips.
 * TYPERVISOR_NET_WARMUP=N sets that number (0: none).
 */
import { GuestMemory } from '../memory/guest-memory.js';
import { VIRTQ_DESC_F_WRITE, gather, scatter } from '../devices/virtio/chain.js';
import {
  STATUS_ACKNOWLEDGE,
  STATUS_DRIVER,
  STATUS_DRIVER_OK,
  STATUS_FEATURES_OK,
  VIRTIO_F_VERSION_1,
  bit,
} from '../devices/virtio/constants.js';
import { VirtioDevice } from '../devices/virtio/device.js';
import { VirtioMmioState } from '../devices/virtio/mmio-state.js';
import { MmioTransport, REG } from '../devices/virtio/mmio.js';
import { NET_HDR_SIZE } from '../devices/virtio/net/header.js';
import { NetDevice, RX_QUEUE, TX_QUEUE, netIdentity } from '../devices/virtio/net/net.js';
import { tapIo } from '../devices/virtio/net/tap.js';
import type { HostSys } from '../devices/virtio/descriptor.js';
import { EventLoop } from '../events/event-loop.js';
import { EFD_NONBLOCK, native } from '../kvm/native.js';
import { deviceEnvironment, guardedLoop, watchQueue } from './device-loop.js';

/** Round trips by default: enough for V8 to compile the path (bench/net-rtt.ts --warmup). */
export const NET_WARMUP_ROUNDS = 2000;
/** Round trips per slice of the worker's loop (~1 ms on our hosts once warm). */
const SLICE = 50;
const QSIZE = 64;
/** RX buffers posted per scratch device (a ping needs one at a time). */
const RX_BUFFERS = 8;
/** An echo request's size, as ping sends it (virtio-net header, Ethernet, IPv4, ICMP, 56 B). */
const FRAME = NET_HDR_SIZE + 98;
const RXBUF = NET_HDR_SIZE + 1514;

/**
 * Round trips to play: TYPERVISOR_NET_WARMUP (an integer 0-100000), else the default; a value
 * that is not one is named in `ignored` (the worker logs it) and the default is used.
 */
export function netWarmupRounds(env: NodeJS.ProcessEnv = process.env): {
  rounds: number;
  ignored?: string;
} {
  const v = env.TYPERVISOR_NET_WARMUP;
  if (v === undefined || v === '') return { rounds: NET_WARMUP_ROUNDS };
  const n = Number(v);
  if (/^[0-9]+$/.test(v) && n <= 100_000) return { rounds: n };
  return {
    rounds: NET_WARMUP_ROUNDS,
    ignored: `TYPERVISOR_NET_WARMUP=${JSON.stringify(v)} is not an integer from 0 to 100000: ${NET_WARMUP_ROUNDS} round trips`,
  };
}

/**
 * The loopback in place of a TAP: a TX frame is copied in and the next read hands it back. A
 * frame written while `hold` is set waits until release(), which makes the "TAP" fd readable,
 * so RX's two ways in both run: right after TX (rxAfterTx) and on the fd's readiness.
 */
class Loopback {
  private readonly frame = new Uint8Array(RXBUF);
  private len = 0;
  private visible = false;
  hold = false;

  constructor(private readonly fd: number) {}

  readv(buffers: Uint8Array[]): number {
    if (this.len === 0 || !this.visible) {
      native().eventfdRead(this.fd); // not readable any more (epoll is level-triggered)
      return -1;
    }
    const n = scatter(buffers, this.frame.subarray(0, this.len));
    this.len = 0;
    return n;
  }

  writev(buffers: Uint8Array[]): number {
    this.len = gather(buffers, this.frame);
    this.visible = !this.hold;
    return this.len;
  }

  /** A held frame becomes readable: the fd wakes the loop. */
  release(): void {
    this.visible = true;
    native().eventfdWrite(this.fd, 1);
  }
}

/** The driver's side of one split ring in the scratch memory (what Linux's virtio_ring does). */
class Ring {
  readonly desc: number;
  readonly avail: number;
  readonly used: number;
  private availIdx = 0;
  private lastUsed = 0;

  constructor(
    private readonly mem: GuestMemory,
    base: number,
  ) {
    this.desc = base;
    this.avail = base + 16 * QSIZE;
    this.used = (this.avail + 6 + 2 * QSIZE + 3) & ~3;
  }

  get end(): number {
    return this.used + 6 + 8 * QSIZE;
  }

  /** One buffer, as descriptor `i`, made available; the device interrupts at its use. */
  add(i: number, addr: number, len: number, write: boolean): void {
    const a = this.desc + 16 * i;
    this.mem.writeU64(a, BigInt(addr));
    this.mem.writeU32(a + 8, len);
    this.mem.writeU16(a + 12, write ? VIRTQ_DESC_F_WRITE : 0);
    this.mem.writeU16(a + 14, 0);
    this.mem.writeU16(this.avail + 4 + 2 * (this.availIdx % QSIZE), i);
    this.availIdx = (this.availIdx + 1) & 0xffff;
    this.mem.writeU16(this.avail + 2, this.availIdx);
  }

  /**
   * Used entries since the last call: their descriptor ids go to `out`. With `callbacks`, the
   * next used entry interrupts (used_event moves to it, as Linux's driver does with callbacks
   * on); without, used_event stays behind and the device suppresses that interrupt.
   */
  takeUsed(out: number[], callbacks: boolean): void {
    const idx = this.mem.readU16(this.used + 2);
    while (this.lastUsed !== idx) {
      out.push(this.mem.readU32(this.used + 4 + 8 * (this.lastUsed % QSIZE)));
      this.lastUsed = (this.lastUsed + 1) & 0xffff;
    }
    if (callbacks) this.mem.writeU16(this.avail + 4 + 2 * QSIZE, this.lastUsed);
  }
}

export interface NetWarmup {
  /** Round trips played so far. */
  readonly done: number;
  /** Plays up to `rounds` more round trips; returns whether any are left to play. */
  step(rounds: number): boolean;
  close(): void;
}

/** One scratch virtio-net device, set up as Linux's driver does, its RX ring filled. */
interface Scratch {
  net: NetDevice;
  dev: VirtioDevice;
  tap: Loopback;
  rx: Ring;
  tx: Ring;
  txBuf: number;
  rxBase: number;
  kickTx: number;
  irq: number;
  write(off: number, v: number): void;
  read(off: number): number;
}

/** A non-blocking eventfd, listed in `fds` (closed with the warm-up). */
function eventfd(fds: number[]): number {
  const fd = native().eventfd(0, EFD_NONBLOCK);
  fds.push(fd);
  return fd;
}

function scratchDevice(loop: EventLoop, fds: number[], log: (m: string) => void): Scratch {
  const size = 64 << 10;
  const mem = new GuestMemory([{ base: 0, size, bytes: new Uint8Array(size) }]);
  const rx = new Ring(mem, 0);
  const tx = new Ring(mem, (rx.end + 15) & ~15);
  const txBuf = (tx.end + 15) & ~15;
  const rxBase = txBuf + FRAME;
  const identity = netIdentity(Uint8Array.of(6, 0, 0, 0, 0, 1), true);
  const sab = VirtioMmioState.createState(identity, bit(VIRTIO_F_VERSION_1));
  const transport = new MmioTransport(sab, { lifecycle: () => {}, notify: () => {} });
  const reg = new Uint8Array(4);
  const regView = new DataView(reg.buffer);
  const write = (off: number, v: number) => {
    regView.setUint32(0, v >>> 0, true);
    transport.write(off, reg);
  };
  const read = (off: number) => {
    transport.read(off, reg);
    return regView.getUint32(0, true);
  };
  // Linux's probe: every feature the device offers (offloads, EVENT_IDX, indirect) accepted.
  write(REG.STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
  for (const sel of [0, 1]) {
    write(REG.DEVICE_FEATURES_SEL, sel);
    const f = read(REG.DEVICE_FEATURES);
    write(REG.DRIVER_FEATURES_SEL, sel);
    write(REG.DRIVER_FEATURES, f);
  }
  write(REG.STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
  for (const [q, ring] of [
    [RX_QUEUE, rx],
    [TX_QUEUE, tx],
  ] as const) {
    write(REG.QUEUE_SEL, q);
    write(REG.QUEUE_NUM, QSIZE);
    write(REG.QUEUE_DESC_LOW, ring.desc);
    write(REG.QUEUE_DRIVER_LOW, ring.avail);
    write(REG.QUEUE_DEVICE_LOW, ring.used);
    write(REG.QUEUE_READY, 1);
  }
  write(REG.STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK);

  const [kickRx, kickTx, irq, tapFd] = [eventfd(fds), eventfd(fds), eventfd(fds), eventfd(fds)];
  const tap = new Loopback(tapFd);
  // The device worker's own construction (device-loop.ts, tap.ts): only the TAP's two system
  // calls are the loopback's.
  const sys = {
    readv: (_fd: number, b: Uint8Array[]) => tap.readv(b),
    writev: (_fd: number, b: Uint8Array[]) => tap.writev(b),
    ioctl: () => 0,
  } as unknown as HostSys;
  let dev: VirtioDevice | undefined;
  const ops = guardedLoop(loop, () => dev!);
  const net: NetDevice = new NetDevice(
    'net warm-up',
    tapIo(sys, ops, tapFd, () => net.onTapReadable()),
    log,
    { setTimer: (ms, fn) => ops.setTimer(ms, fn) },
  );
  dev = new VirtioDevice(sab, net, deviceEnvironment(loop, mem, irq, log));
  watchQueue(loop, dev, RX_QUEUE, kickRx);
  watchQueue(loop, dev, TX_QUEUE, kickTx);
  for (let i = 0; i < RX_BUFFERS; i++) rx.add(i, rxBase + i * RXBUF, RXBUF, true);
  dev.onLifecycle();
  if (dev.deviceState.kind !== 'active') throw new Error('the scratch device did not start');
  const frame = mem.view(txBuf, FRAME);
  frame.fill(0);
  frame.fill(0xa5, NET_HDR_SIZE);
  return { net, dev, tap, rx, tx, txBuf, rxBase, kickTx, irq, write, read };
}

/**
 * Two scratch virtio-net devices, driven in turn as a guest pings through them (two, so that
 * what differs from device to device, such as each activation's queue closures, is seen to
 * differ before the guest's device comes: V8 then compiles for any of them). Creates eventfds
 * and an epoll set (before the worker's seccomp filter); step() only reads and writes them.
 */
export function netWarmup(rounds: number, log: (m: string) => void): NetWarmup {
  const n = native();
  const loop = new EventLoop((e) => log(`net warm-up: ${(e as Error).message}`));
  const fds: number[] = [];
  const quiet = () => {};
  try {
    const devs = [scratchDevice(loop, fds, quiet), scratchDevice(loop, fds, quiet)];
    const usedRx: number[] = [];
    const usedTx: number[] = [];
    let done = 0;
    const round = (d: Scratch, hold: boolean) => {
      d.tap.hold = hold;
      d.tx.add(0, d.txBuf, FRAME, false);
      n.eventfdWrite(d.kickTx, 1);
      loop.runOnce(0);
      if (hold) {
        d.tap.hold = false;
        d.tap.release();
        loop.runOnce(0);
      }
      // KVM takes the irqfd; the driver's handler reads InterruptStatus and acknowledges it.
      n.eventfdRead(d.irq);
      d.write(REG.INTERRUPT_ACK, d.read(REG.INTERRUPT_STATUS));
      // One round in four with interrupts off for the next one (the device's suppressed path).
      const callbacks = (done & 12) !== 12;
      d.tx.takeUsed(usedTx, callbacks);
      d.rx.takeUsed(usedRx, callbacks);
      const ok = usedTx.length === 1 && usedRx.length === 1;
      if (!ok) throw new Error(`round ${done}: ${usedTx.length} TX and ${usedRx.length} RX used`);
      d.rx.add(usedRx[0]!, d.rxBase + usedRx[0]! * RXBUF, RXBUF, true);
      usedRx.length = 0;
      usedTx.length = 0;
    };
    return {
      get done() {
        return done;
      },
      step(k) {
        for (let i = 0; i < k && done < rounds; i++, done++)
          round(devs[done & 1]!, (done & 2) !== 0);
        return done < rounds;
      },
      close() {
        for (const d of devs) d.dev.guard('close', () => d.net.deactivate());
        loop.close();
        for (const fd of fds) n.close(fd);
      },
    };
  } catch (e) {
    loop.close();
    for (const fd of fds) n.close(fd);
    throw e;
  }
}

/**
 * Plays `rounds` round trips in slices of `loop` (a timer per slice), then closes the scratch
 * device; a failure is logged, never thrown (it only costs the warm-up). Returns a cancel
 * function (the worker stopping first).
 */
export function warmNetInSlices(
  loop: EventLoop,
  rounds: number,
  log: (m: string) => void,
): () => void {
  let w: NetWarmup | undefined;
  let cancel: (() => void) | undefined;
  const end = () => {
    cancel = undefined;
    w?.close();
    w = undefined;
  };
  try {
    w = netWarmup(rounds, log);
  } catch (e) {
    log(`net warm-up: not run (${(e as Error).message})`);
    return () => {};
  }
  const slice = () => {
    try {
      if (w?.step(SLICE)) cancel = loop.setTimer(0, slice);
      else end();
    } catch (e) {
      log(`net warm-up: stopped after ${w?.done} round trips (${(e as Error).message})`);
      end();
    }
  };
  cancel = loop.setTimer(0, slice);
  return () => {
    cancel?.();
    end();
  };
}

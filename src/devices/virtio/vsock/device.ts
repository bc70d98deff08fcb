/**
 * virtio-vsock (device ID 19, virtio 1.2 §5.10) with Firecracker's host side: the guest's
 * stream connections to host port P go to the Unix socket `${uds}_${P}`; host programs dial
 * `${uds}` (we listen there), write "CONNECT <port>\n" and get "OK <hostport>\n" once the
 * guest accepted (or a closed socket if it refused).
 *
 * This file is the virtio side: queues 0 = rx (device -> guest), 1 = tx, 2 = event. RX and
 * event are self-served: packets go to the guest when host data or control packets are ready,
 * not when the guest kicks. TX packets are parsed here and handed to the muxer (muxer.ts), which
 * owns the connections (connection.ts) and the host listener (listener.ts).
 *
 * Work budget: TX is self-served too, so that one kick handles at most TX_BUDGET_PACKETS
 * packets or TX_BUDGET_BYTES bytes; the rest waits for a timer of 0 ms, which runs after the
 * current batch of events (other devices and sockets are served in between). RX fills at most
 * RX_BUDGET_PACKETS buffers or RX_BUDGET_BYTES bytes per wake-up, likewise. Each turn publishes
 * its used buffers once (one notify, one interrupt request: counted as rx_batches/tx_batches
 * beside the packets), and host data come from large socket reads staged by the muxer, many
 * packets per read (rx_reads). While a turn takes buffers the driver is told not to kick that
 * queue (notification suppression, EVENT_IDX: queue.ts); the pop that finds the ring empty
 * turns kicks back on and looks again, so no wake-up is lost (processTx, processRx).
 *
 * Errors: packets with no header or the wrong addresses are dropped; malformed ones, unknown
 * ops, non-stream types, VMADDR_PORT_ANY ports, packets for no connection and credit
 * violations are answered with RST; all are counted and logged once per kind.
 *
 * Snapshots (Firecracker's semantics): host-side connections are not saved (their peers are
 * host processes that will not be there at restore). What is saved is the guest CID and whether
 * the driver is owed VIRTIO_VSOCK_EVENT_TRANSPORT_RESET (§5.10.6.6), which makes it drop its
 * connections and re-read the CID; the restored device sends it once it is active again.
 */
import type { DescriptorChain } from '../chain.js';
import { scatter } from '../chain.js';
import { QUEUE_SIZE_MAX, bit, VIRTIO_F_RING_INDIRECT_DESC } from '../constants.js';
import type { QueueIo, VirtioBackend } from '../device.js';
import type { VirtioDeviceIdentity } from '../mmio-state.js';
import { PersistError, bool, struct, u53, versioned } from '../../../util/persist.js';
import { type CountersView, type VsockHost, countersView } from './host.js';
import { VsockMuxer } from './muxer.js';
import { EVENT_TRANSPORT_RESET, VSOCK_HDR_SIZE, parsePacket } from './packet.js';

export const DEVICE_ID_VSOCK = 19;
export const RX_QUEUE = 0;
export const TX_QUEUE = 1;
export const EVENT_QUEUE = 2;
/** TX packets, and their payload bytes, handled per kick before yielding to the loop. */
export const TX_BUDGET_PACKETS = 64;
export const TX_BUDGET_BYTES = 256 * 1024;
/** RX buffers, and payload bytes, filled per wake-up before yielding to the loop. */
export const RX_BUDGET_PACKETS = 64;
export const RX_BUDGET_BYTES = 256 * 1024;

export function vsockIdentity(cid: number): VirtioDeviceIdentity {
  const config = new Uint8Array(8);
  new DataView(config.buffer).setBigUint64(0, BigInt(cid), true);
  return {
    deviceId: DEVICE_ID_VSOCK,
    features: bit(VIRTIO_F_RING_INDIRECT_DESC),
    queueSizes: [QUEUE_SIZE_MAX, QUEUE_SIZE_MAX, QUEUE_SIZE_MAX],
    config,
  };
}

/** The saved device: its configuration (the CID) and the transport reset it owes the driver. */
export const VsockStateV1 = versioned(
  'virtio-vsock',
  1,
  struct({
    cid: u53,
    /**
     * The driver must get TRANSPORT_RESET when it is next active: a driver was active at save
     * (its connections are not saved), made connections before a reset, or a reset event was
     * still undelivered.
     */
    transportResetPending: bool,
  }),
);

/**
 * A saved virtio-vsock state (either backend's), checked: a PersistError for a blob that is not
 * one of this version, or was saved for another guest CID (the CID is in the config space the
 * guest already read).
 */
export function decodeVsockState(bytes: Uint8Array, cid: number) {
  const s = VsockStateV1.decodeOrThrow(bytes);
  if (s.cid !== cid)
    throw new PersistError(
      `virtio-vsock: saved for guest CID ${s.cid}, but this device has CID ${cid}`,
    );
  return s;
}

/**
 * Puts VIRTIO_VSOCK_EVENT_TRANSPORT_RESET into the event queue's next buffer, with its
 * interrupt. False when the driver has posted none: the caller tries again at the queue's kick.
 */
export function sendTransportReset(io: QueueIo): boolean {
  const chain = io.pop(EVENT_QUEUE);
  if (!chain) return false;
  const ev = new Uint8Array(4);
  new DataView(ev.buffer).setUint32(0, EVENT_TRANSPORT_RESET, true);
  io.pushUsed(EVENT_QUEUE, chain.head, scatter(chain.writable, ev));
  io.notify(EVENT_QUEUE);
  return true;
}

export class VsockDevice implements VirtioBackend {
  readonly selfServed = [RX_QUEUE, TX_QUEUE, EVENT_QUEUE] as const;
  private io: QueueIo | undefined;
  private readonly mux: VsockMuxer;
  /** An RX buffer popped but not filled (nothing was ready after all): used first next time. */
  private held: DescriptorChain | undefined;
  private resetEventPending = false;
  /** A timer will continue TX (RX) work that stopped at its budget. */
  private txResume: (() => void) | undefined;
  private rxResume: (() => void) | undefined;
  private readonly logged = new Set<string>();
  /** `counters()`: a copy of the device's counters; `counters.x`: one of them, live. */
  readonly counters: CountersView;

  constructor(
    readonly name: string,
    readonly cid: number,
    /** `${uds}_${port}` is dialled for guest connections to host port `port`. */
    uds: string,
    host: VsockHost,
    private readonly log: (m: string) => void,
  ) {
    const report = {
      logOnce: (kind: string, m: string) => this.logOnce(kind, m),
      guestError: (kind: string, m: string) => this.guestError(kind, m),
    };
    this.mux = new VsockMuxer(cid, uds, host, report, () => this.processRx());
    this.counters = countersView(this.mux.counters);
    this.host = host;
  }

  private readonly host: VsockHost;

  get connectionCount(): number {
    return this.mux.connectionCount;
  }

  /** What the device holds for its budgets, for tests and diagnostics. */
  get budgets(): {
    controlQueued: number;
    sockets: number;
    handshakes: number;
    bufferedBytes: number;
    bufferAllocated: number;
    /** Read from a host socket ahead of the guest's RX buffers (at most RX_READ_BYTES). */
    stagedBytes: number;
  } {
    return this.mux.budgets();
  }

  activate(_features: bigint, io: QueueIo): void {
    this.io = io;
    // Connections of an earlier driver instance were dropped at its reset; tell the new one.
    if (this.mux.start()) this.resetEventPending = true;
  }

  deactivate(): void {
    this.io = undefined;
    this.held = undefined;
    this.txResume?.();
    this.rxResume?.();
    this.txResume = this.rxResume = undefined;
    this.mux.stop();
  }

  /** The listening socket is readable: take new host connections. */
  onListen(): void {
    this.mux.onListen();
  }

  /** A connection's socket (or a handshake's) has events. */
  onSocket(fd: number, readable: boolean, writable: boolean, hangup: boolean): void {
    if (this.mux.onSocket(fd, readable, writable, hangup)) this.processRx();
  }

  kick(queue: number): void {
    if (queue === RX_QUEUE) {
      this.mux.counters.rxKicks++;
      this.mux.unblockRx();
      this.processRx();
    } else if (queue === TX_QUEUE) {
      this.mux.counters.txKicks++;
      this.processTx();
    } else if (queue === EVENT_QUEUE) this.deliverEvents();
  }

  /** TX packets from the guest (TX is self-served: VirtioDevice calls this only if it is not). */
  handle(queue: number, chain: DescriptorChain): number {
    if (queue !== TX_QUEUE) return 0;
    this.txPacket(chain);
    this.processRx();
    return 0;
  }

  /**
   * Handles TX packets up to the budget; more wait for a timer (after other events). The turn
   * publishes its used packets together (one used.idx store, at most one interrupt: the
   * notify() at the end, reached on every path) and the driver need not kick TX meanwhile: a
   * turn that drains the ring ends at the empty pop, which re-enables kicks and looks again
   * (race-free, queue.ts); a turn stopped by its budget leaves kicks off and its timer takes
   * the queue up again, until a turn ends at such a pop.
   */
  private processTx(): void {
    const io = this.io;
    if (!io || this.txResume) return; // a timer continues already
    io.beginBatch(TX_QUEUE);
    io.suppressKicks(TX_QUEUE);
    let bytes = 0;
    let n = 0;
    for (; n < TX_BUDGET_PACKETS && bytes < TX_BUDGET_BYTES; n++) {
      const chain = io.pop(TX_QUEUE);
      if (!chain) break;
      bytes += chain.readableLength;
      this.txPacket(chain);
      io.pushUsed(TX_QUEUE, chain.head, 0);
    }
    // Unconditionally: it ends the batch (and interrupts for malformed chains pop() completed).
    io.notify(TX_QUEUE);
    if (n > 0) this.mux.counters.txBatches++;
    if (n === TX_BUDGET_PACKETS || bytes >= TX_BUDGET_BYTES) {
      this.mux.counters.txBudgetYields++;
      this.txResume = this.host.after(0, () => {
        this.txResume = undefined;
        // An exception here reaches the device worker's guarded loop: a device failure.
        this.processTx();
      });
    }
    this.processRx();
  }

  private txPacket(chain: DescriptorChain): void {
    const counters = this.mux.counters;
    counters.txPackets++;
    const p = parsePacket(chain.readable, chain.readableLength, this.cid);
    if (p.ok) this.mux.fromGuest(p.value.hdr, p.value.payload);
    else {
      const e = p.error;
      if (e.action === 'drop') counters.dropped++;
      else counters.malformed++;
      this.guestError(e.kind, `bad packet (${e.kind}): ${e.message}`);
      if (e.action === 'rst' && e.hdr) this.mux.refuse(e.hdr);
    }
  }

  save(): Uint8Array {
    // An RX buffer held unfilled goes back to the queue (the queue position is saved after
    // this): the restored device takes it again.
    if (this.held && this.io?.unpop(RX_QUEUE, this.held.head)) this.held = undefined;
    if (this.held) throw new Error(`${this.name}: holds an RX buffer it cannot give back`);
    return VsockStateV1.encode({
      cid: this.cid,
      transportResetPending:
        this.resetEventPending || this.io !== undefined || this.mux.hadConnections,
    });
  }

  /**
   * Restores a saved device into this one (built for the restored VM, before its driver is
   * active). Throws PersistError for a blob that is not a virtio-vsock state of this version or
   * was saved for another guest CID (the CID is in the config space the guest already read).
   */
  restore(bytes: Uint8Array): void {
    this.resetEventPending = decodeVsockState(bytes, this.cid).transportResetPending;
    this.deliverEvents();
  }

  // ---- queues ----

  /**
   * Fills RX buffers with what the muxer has for the guest, up to the budget. One batch per
   * turn, as TX. RX kicks are suppressed only by a turn that pops (right before its pops), so
   * they can be off only while the device is not waiting for buffers: the device waits (blockRx)
   * only after a pop found the ring empty, and that pop turned kicks back on race-free. While
   * it holds buffers and has nothing to send, the guest adds more without kicking, and the
   * next host data take them without a kick. A turn with no RX work touches nothing.
   */
  private processRx(): void {
    const io = this.io;
    if (!io || this.rxResume) return; // a timer continues already
    const counters = this.mux.counters;
    let used = 0;
    let bytes = 0;
    let i = 0;
    io.beginBatch(RX_QUEUE);
    for (; i < RX_BUDGET_PACKETS && bytes < RX_BUDGET_BYTES && this.mux.hasRxWork(); i++) {
      let chain = this.held;
      this.held = undefined;
      if (!chain) {
        io.suppressKicks(RX_QUEUE); // idempotent; the empty pop below turns them back on
        chain = io.pop(RX_QUEUE);
      }
      if (!chain) {
        this.mux.blockRx();
        break;
      }
      if (chain.writableLength < VSOCK_HDR_SIZE) {
        io.guestError('rx-short', `RX buffer of ${chain.writableLength} bytes`);
        io.pushUsed(RX_QUEUE, chain.head, 0);
        continue;
      }
      const n = this.mux.fillRx(chain.writable, chain.writableLength);
      if (n < 0) {
        io.guestError('rx-short', `RX buffer of ${chain.writableLength} bytes: no room for data`);
        io.pushUsed(RX_QUEUE, chain.head, 0);
        continue;
      }
      if (n === 0) {
        this.held = chain;
        continue;
      }
      io.pushUsed(RX_QUEUE, chain.head, n);
      counters.rxPackets++;
      counters.rxBytes += n - VSOCK_HDR_SIZE;
      bytes += n - VSOCK_HDR_SIZE;
      used++;
    }
    // Unconditionally: it ends the batch, and buffers completed with used.len 0 (too short, or
    // malformed chains pop() completed) need their interrupt too.
    io.notify(RX_QUEUE);
    if (used > 0) counters.rxBatches++;
    if ((i === RX_BUDGET_PACKETS || bytes >= RX_BUDGET_BYTES) && this.mux.hasRxWork()) {
      counters.rxBudgetYields++;
      this.rxResume = this.host.after(0, () => {
        this.rxResume = undefined;
        this.processRx();
      });
    }
  }

  private deliverEvents(): void {
    const io = this.io;
    if (io && this.resetEventPending && sendTransportReset(io)) this.resetEventPending = false;
  }

  private guestError(kind: string, message: string): void {
    if (this.io) this.io.guestError(`vsock-${kind}`, `${this.name}: ${message}`);
    else this.logOnce(kind, message);
  }

  private logOnce(kind: string, m: string): void {
    if (this.logged.has(kind)) return;
    this.logged.add(kind);
    this.log(`${this.name}: ${m} (logged once)`);
  }
}

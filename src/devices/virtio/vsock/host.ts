/**
 * What virtio-vsock needs from the host: Unix sockets and a timer (the device worker's syscalls
 * and event loop; tests inject a fake), plus the device's counters and its two log channels.
 * Everything here runs on the device worker's thread.
 */

/** The host's Unix sockets (the device worker's syscalls; tests inject a fake). */
export interface VsockHost {
  /** Connects to a listening Unix socket: the fd, or throws (ENOENT, ECONNREFUSED...). */
  connect(path: string): number;
  /** Accepts on the listening socket: an fd, or -1 when none is pending. */
  accept(): number;
  /** Reads into buffers: bytes, 0 at EOF, -1 when it would block. Throws on errors. */
  read(fd: number, buffers: Uint8Array[]): number;
  /** Writes: bytes, or -1 when it would block. Throws on errors (EPIPE...). */
  write(fd: number, buffers: Uint8Array[]): number;
  shutdownWrite(fd: number): void;
  /**
   * Calls `fn` once after `ms` on the device's thread (0: after the current batch of events,
   * so other devices are served first); returns a function that cancels it.
   */
  after(ms: number, fn: () => void): () => void;
  /** Stops watching the fd and closes it. */
  close(fd: number): void;
  /** Sets what the fd is watched for; events come back through VsockDevice.onSocket. */
  watch(fd: number, read: boolean, write: boolean): void;
  unwatch(fd: number): void;
  /** Watches the listening socket (its events go to VsockDevice.onListen) or stops watching it. */
  watchListener(on: boolean): void;
}

export interface VsockCounters {
  connectionsGuest: number;
  connectionsHost: number;
  rxPackets: number;
  txPackets: number;
  rxBytes: number;
  txBytes: number;
  /** Packets dropped unanswered (no header, wrong CIDs). */
  dropped: number;
  /** Malformed packets, unknown ops, bad types or ports (answered with RST). */
  malformed: number;
  creditViolations: number;
  resetsSent: number;
  connectFailures: number;
  /** Host-initiated connections the guest did not answer within CONNECT_TIMEOUT_MS. */
  connectTimeouts: number;
  badHandshakes: number;
  /** Guest REQUESTs and host connections refused because MAX_CONNECTIONS sockets are open. */
  connsRefused: number;
  /** Closed connections whose host socket did not take the rest within CLOSE_LINGER_MS. */
  connsKilled: number;
  /** RSTs not queued: MAX_PENDING_RESETS were already waiting for RX buffers. */
  rstDropped: number;
  /** Control packets that replaced one of the same kind already waiting for the guest. */
  controlCoalesced: number;
  /**
   * Host connections closed because MAX_PENDING_HANDSHAKES were already waiting for the guest's
   * answer (the listener's back-pressure normally keeps this at 0).
   */
  handshakesRefused: number;
  /**
   * Times the listener stopped accepting because MAX_PENDING_HANDSHAKES host sockets were
   * handshaking or waiting for the guest (new ones wait in the kernel's listen backlog).
   */
  acceptsDeferred: number;
  /** Host sockets that did not send a complete CONNECT line within HANDSHAKE_TIMEOUT_MS. */
  handshakeTimeouts: number;
  /** accept() failures (EMFILE, ENFILE...): each pauses the listener (backing off). */
  acceptFails: number;
  /** TX kicks that stopped at their budget and continued after other events. */
  txBudgetYields: number;
  /** RX fills that stopped at their budget and continued after other events. */
  rxBudgetYields: number;
  /** Kicks of the RX and TX queues by the driver. */
  rxKicks: number;
  txKicks: number;
  /** Reads of host sockets for the guest (each may feed many RX packets: muxer.ts). */
  rxReads: number;
  /** RX (TX) used-ring publications with at least one packet: one interrupt request each. */
  rxBatches: number;
  txBatches: number;
  /** CREDIT_UPDATE packets given to the guest (volunteered or asked for). */
  creditUpdatesSent: number;
}

export function zeroCounters(): VsockCounters {
  return {
    connectionsGuest: 0,
    connectionsHost: 0,
    rxPackets: 0,
    txPackets: 0,
    rxBytes: 0,
    txBytes: 0,
    dropped: 0,
    malformed: 0,
    creditViolations: 0,
    resetsSent: 0,
    connectFailures: 0,
    connectTimeouts: 0,
    badHandshakes: 0,
    connsRefused: 0,
    connsKilled: 0,
    rstDropped: 0,
    controlCoalesced: 0,
    handshakesRefused: 0,
    acceptsDeferred: 0,
    handshakeTimeouts: 0,
    acceptFails: 0,
    txBudgetYields: 0,
    rxBudgetYields: 0,
    rxKicks: 0,
    txKicks: 0,
    rxReads: 0,
    rxBatches: 0,
    txBatches: 0,
    creditUpdatesSent: 0,
  };
}

/**
 * The counters as VsockDevice exposes them: `counters()` returns a copy (metrics), and
 * `counters.malformed` etc. read one live (the older form, kept for existing callers and tests).
 */
export type CountersView = (() => VsockCounters) & Readonly<VsockCounters>;

export function countersView(live: VsockCounters): CountersView {
  const view = (): VsockCounters => ({ ...live });
  for (const k of Object.keys(live) as Array<keyof VsockCounters>)
    Object.defineProperty(view, k, { get: () => live[k], enumerable: true });
  return view as CountersView;
}

/** Where problems go: host-side ones are logged once per kind, guest errors are also counted. */
export interface VsockReport {
  logOnce(kind: string, message: string): void;
  guestError(kind: string, message: string): void;
}

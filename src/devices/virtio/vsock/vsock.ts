/**
 * virtio-vsock: what the rest of Typervisor imports. The folder, in dependency order:
 *
 *   packet.ts      the wire format: headers, parsing (what the guest controls), CONNECT lines
 *   host.ts        what the device needs from the host (VsockHost), counters, log channels
 *   connection.ts  one connection: its state (a union), credit accounting, pending data
 *   listener.ts    the host listener: accept and the "CONNECT <port>\n" handshake
 *   table.ts       the connection table: lookup, queued control packets, socket writes, closing
 *   muxer.ts       what guest packets do, host connections and their ports, filling RX buffers
 *   device.ts      the VirtioBackend: queues, activation, save/restore, work budgets
 */
export { BUF_ALLOC, ByteRing, CREDIT_UPDATE_THRESHOLD } from './connection.js';
export type { CountersView, VsockCounters, VsockHost } from './host.js';
export { CONNECT_TIMEOUT_MS, RX_READ_BYTES } from './muxer.js';
export {
  CLOSE_LINGER_MS,
  MAX_CONNECTIONS,
  MAX_CONNECTIONS_PER_SIDE,
  MAX_PENDING_RESETS,
} from './table.js';
export {
  ACCEPT_BACKOFF_MAX_MS,
  ACCEPT_BACKOFF_MIN_MS,
  ACCEPT_BATCH,
  FULL_RECHECK_MS,
  HANDSHAKE_TIMEOUT_MS,
  MAX_PENDING_HANDSHAKES,
} from './listener.js';
export {
  DEVICE_ID_VSOCK,
  EVENT_QUEUE,
  RX_BUDGET_BYTES,
  RX_BUDGET_PACKETS,
  RX_QUEUE,
  TX_BUDGET_BYTES,
  TX_BUDGET_PACKETS,
  TX_QUEUE,
  VsockDevice,
  vsockIdentity,
} from './device.js';

/**
 * virtio-vsock in the device registry, with one of two backends:
 * - unix (the default, Firecracker's): a listening Unix socket, connections in the worker;
 * - vhost (opt-in): the host kernel's vhost-vsock serves the data queues (vhost.ts); host
 *   programs use AF_VSOCK.
 */
import type { DeviceType } from '../descriptor.js';
import { listenVsock, removeSocket, unixVsockHost } from './unix-host.js';
import {
  type VhostVsockHostData,
  VhostVsockDevice,
  openVhostVsock,
  vhostDeviceFeatures,
} from './vhost.js';
import { VsockDevice, vsockIdentity } from './vsock.js';

export type VsockConfig = {
  kind: 'vsock';
  id: string;
  /** The guest's context id (>= 3). */
  cid: number;
} & (
  | {
      backend?: 'unix';
      /** Host side: guest connections to port P reach `${uds}_${P}`; host programs dial `uds`. */
      uds: string;
    }
  | { backend: 'vhost' }
);

export type VsockHostData =
  | {
      backend: 'unix';
      listenFd: number;
      cid: number;
      /** Absolute path of the listening socket. */
      uds: string;
    }
  | ({ backend: 'vhost' } & VhostVsockHostData);

export const vsockDevice: DeviceType<VsockConfig, VsockHostData> = {
  kind: 'vsock',
  metricsGroup: 'vsock',
  open(config, ctx) {
    if (config.backend === 'vhost') {
      const v = openVhostVsock(ctx.sys, config.cid);
      return {
        name: `virtio-vsock (cid ${config.cid}, vhost)`,
        identity: { ...vsockIdentity(config.cid), features: vhostDeviceFeatures(v.kernelFeatures) },
        host: { backend: 'vhost', ...v },
        warnings: [],
        close() {
          ctx.sys.close(v.fd);
        },
      };
    }
    const l = listenVsock(ctx.sys, config.cid, config.uds);
    return {
      name: `virtio-vsock (cid ${config.cid}, ${l.path})`,
      identity: vsockIdentity(config.cid),
      host: { backend: 'unix', listenFd: l.fd, cid: config.cid, uds: l.path },
      warnings: [],
      close() {
        ctx.sys.close(l.fd);
        removeSocket(l.path);
      },
    };
  },
  create(host, env) {
    if (host.backend === 'vhost') {
      if (!env.ram || !env.queueFds)
        throw new Error(`${env.name}: the vhost backend needs guest RAM and the queues' eventfds`);
      const dev = new VhostVsockDevice(
        env.name,
        host.cid,
        host.fd,
        host.kernelFeatures,
        env.queueFds,
        env.sys,
        env.loop,
        env.ram.memory,
      );
      return {
        backend: dev,
        metrics: () => ({
          // Firecracker has no vhost vsock; ours: the kernel's interrupt requests relayed.
          vhost_rx_calls: dev.counters.calls[0],
          vhost_tx_calls: dev.counters.calls[1],
          vhost_starts: dev.counters.starts,
          vhost_stops: dev.counters.stops,
          vhost_ring_errors: dev.counters.errors,
        }),
        close: () => dev.close(),
      };
    }
    const vsock: VsockDevice = new VsockDevice(
      env.name,
      host.cid,
      host.uds,
      unixVsockHost(
        env.sys,
        env.loop,
        host.listenFd,
        (fd, r, w, h) => vsock.onSocket(fd, r, w, h),
        () => vsock.onListen(),
      ),
      (m) => env.log(m),
    );
    return {
      backend: vsock,
      metrics: () => {
        const c = vsock.counters();
        // Firecracker's VsockDeviceMetrics names where one exists.
        return {
          conns_added: c.connectionsGuest + c.connectionsHost,
          rx_packets_count: c.rxPackets,
          tx_packets_count: c.txPackets,
          rx_bytes_count: c.rxBytes,
          tx_bytes_count: c.txBytes,
          rx_read_fails: c.dropped,
          tx_flush_fails: c.creditViolations,
          muxer_event_fails: c.malformed,
          conn_event_fails: c.connectFailures + c.connectTimeouts + c.badHandshakes,
          rst_sent: c.resetsSent,
          // Budgets (issue 12): each counts a cap that was hit.
          conns_refused: c.connsRefused,
          conns_killed: c.connsKilled,
          credit_violations: c.creditViolations,
          rst_dropped: c.rstDropped,
          control_coalesced: c.controlCoalesced,
          handshakes_refused: c.handshakesRefused,
          accepts_deferred: c.acceptsDeferred,
          handshake_timeouts: c.handshakeTimeouts,
          connect_timeouts: c.connectTimeouts,
          accept_fails: c.acceptFails,
          tx_budget_yields: c.txBudgetYields,
          rx_budget_yields: c.rxBudgetYields,
          // Batching (issue 17): kicks, host socket reads, used-ring publications (interrupt
          // requests) per direction and credit updates; rx_packets_count / rx_batches is the
          // RX packets per interrupt.
          rx_queue_event_count: c.rxKicks,
          tx_queue_event_count: c.txKicks,
          rx_reads: c.rxReads,
          rx_batches: c.rxBatches,
          tx_batches: c.txBatches,
          credit_updates_sent: c.creditUpdatesSent,
        };
      },
    };
  },
};

/** virtio-net in the device registry: a TAP opened on the main thread, served in the worker. */
import { randomBytes } from 'node:crypto';
import { MmdsResponder, type ResponderConfig } from '../../../mmds/responder.js';
import type { MmdsVersion } from '../../../mmds/store.js';
import { ConfigError } from '../../../util/errors.js';
import type { DeviceType } from '../descriptor.js';
import type { RateLimiterConfig } from '../rate-limiter.js';
import { NetDevice, netIdentity, parseMac } from './net.js';
import { openTap, openTxBatch, tapIo } from './tap.js';

export interface NetConfig {
  kind: 'net';
  /** Firecracker's iface_id: in log lines and metrics. */
  id: string;
  /** The host TAP (created if missing, which needs CAP_NET_ADMIN). */
  tap: string;
  /** The guest's MAC (else the guest picks a random one). */
  mac?: string;
  /** Firecracker's rx_rate_limiter / tx_rate_limiter (enforced; default: none). */
  rxRateLimiter?: RateLimiterConfig;
  txRateLimiter?: RateLimiterConfig;
  /** MMDS answers on this interface (PUT /mmds/config listed it). */
  mmds?: { version: MmdsVersion; ipv4: string; imdsCompat: boolean };
}

export interface NetHost {
  tapFd: number;
  rxRateLimiter?: RateLimiterConfig;
  txRateLimiter?: RateLimiterConfig;
  /** The responder's configuration, with a V2 token key made for this VM. */
  mmds?: ResponderConfig;
}

export const netDevice: DeviceType<NetConfig, NetHost> = {
  kind: 'net',
  metricsGroup: 'net',
  open(config, ctx) {
    let mac: Uint8Array | undefined;
    if (config.mac !== undefined) {
      try {
        mac = parseMac(config.mac);
      } catch {
        throw new ConfigError(
          `network interface ${config.id}: bad MAC address ${JSON.stringify(config.mac)} (like 06:00:a9:fe:00:02)`,
        );
      }
    }
    // Two interfaces on one TAP or with one MAC are refused with the configuration
    // (vmm/resources.ts withNetworkInterface), before anything is opened.
    const tap = openTap(ctx.sys, config.tap);
    return {
      name: `virtio-net ${config.id} (${config.tap})`,
      identity: netIdentity(mac, tap.offloads),
      host: {
        tapFd: tap.fd,
        ...(config.rxRateLimiter ? { rxRateLimiter: config.rxRateLimiter } : {}),
        ...(config.txRateLimiter ? { txRateLimiter: config.txRateLimiter } : {}),
        ...(config.mmds ? { mmds: { ...config.mmds, tokenKey: randomBytes(32) } } : {}),
      },
      warnings: [],
      close: () => ctx.sys.close(tap.fd),
    };
  },
  create(host, env) {
    const mmds = host.mmds
      ? new MmdsResponder(host.mmds, {
          setTimer: (ms, fn) => env.loop.setTimer(ms, fn),
          onReply: () => net.serveReplies(),
        })
      : undefined;
    const tx = openTxBatch(env.sys, host.tapFd);
    if (!tx.batch) env.log(`${env.name}: TX writes not batched (${tx.why}); one writev per frame`);
    const net: NetDevice = new NetDevice(
      env.name,
      tapIo(env.sys, env.loop, host.tapFd, () => net.onTapReadable(), tx.batch),
      (m) => env.log(m),
      {
        ...(host.rxRateLimiter ? { rx: host.rxRateLimiter } : {}),
        ...(host.txRateLimiter ? { tx: host.txRateLimiter } : {}),
        setTimer: (ms, fn) => env.loop.setTimer(ms, fn),
      },
      mmds,
      (fn) => void env.loop.setTimer(0, fn),
    );
    const c = net.counters;
    return {
      backend: net,
      close: () => tx.batch?.close(),
      // Firecracker's NetDeviceMetrics names.
      metrics: () => ({
        rx_packets_count: c.rxFrames,
        rx_bytes_count: c.rxBytes,
        tx_packets_count: c.txFrames,
        tx_bytes_count: c.txBytes,
        rx_fails: c.rxTooLarge,
        tx_malformed_frames: c.txBad,
        tx_fails: c.txErrors,
        no_rx_avail_buffer: c.rxBackPressure,
        // Ours (issue 12): chains over the TAP's buffer limit, RX wake-ups at their budget.
        rx_chain_too_long: c.rxChainTooLong,
        tx_coalesced_frames: c.txCoalesced,
        rx_budget_yields: c.rxBudgetYields,
        // Frames the rate limiters held back, and their wake-ups (Firecracker's names).
        rx_rate_limiter_throttled: c.rxThrottled,
        tx_rate_limiter_throttled: c.txThrottled,
        rx_event_rate_limiter_count: c.rxThrottleEvents,
        tx_rate_limiter_event_count: c.txThrottleEvents,
        // Ours: RX frames held by the limiter that a snapshot dropped.
        rx_throttled_dropped: c.rxThrottledDropped,
        // Ours (issue 17): TX turns written with one io_uring_enter (frames per batch:
        // tx_packets_count / tx_batches while batching is on).
        tx_batches: tx.batch?.counters.batches ?? 0,
        // Ours (issue 17): TX turns whose end served RX too (NetDevice.rxAfterTx).
        rx_after_tx: c.rxAfterTx,
        // The mmds group (controller.ts deviceMetrics moves mmds_* there).
        ...(mmds
          ? Object.fromEntries(Object.entries(mmds.metrics()).map(([k, v]) => [`mmds_${k}`, v]))
          : {}),
      }),
    };
  },
};

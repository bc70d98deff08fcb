/**
 * The host end of virtio-net: a TAP opened on the main thread before anything is built, so every
 * problem is a ConfigError before boot (TUNSETIFF with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, vnet
 * header size 12, TUNSETOFFLOAD probed), and the TAP as the device worker drives it (TapIo).
 */
import { ConfigError } from '../../../util/errors.js';
import { EV_IN, type EventOps, type HostSys } from '../descriptor.js';
import { NET_HDR_SIZE } from './header.js';
import { IoUring } from '../block/io-uring.js';
import { TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, type TapIo } from './net.js';
import { TX_BATCH_FRAMES, TX_URING_ALLOW, UringTxBatch, type TxBatch } from './tx-batch.js';

// linux/if_tun.h
export const IFF_TAP = 0x0002;
export const IFF_NO_PI = 0x1000;
export const IFF_VNET_HDR = 0x4000;
export const TUNSETOFFLOAD = 0x4004_54d0;
export const TUNSETVNETHDRSZ = 0x4004_54d8;

/** Linux IFNAMSIZ - 1. */
export const MAX_TAP_NAME = 15;

export interface OpenedTap {
  fd: number;
  /** The TAP took TUNSETOFFLOAD with checksum and TSO: offer the offloads. */
  offloads: boolean;
}

const errno = (e: unknown): string | undefined => (e as { code?: string } | null)?.code;

export function openTap(sys: HostSys, name: string): OpenedTap {
  const what = `TAP ${JSON.stringify(name)}`;
  if (name.length === 0 || Buffer.byteLength(name) > MAX_TAP_NAME || /[/\s\0:]/.test(name))
    throw new ConfigError(
      `${what}: a TAP name is 1 to ${MAX_TAP_NAME} bytes without '/', ':' or spaces`,
    );
  let fd: number;
  try {
    fd = sys.tapOpen(name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR);
  } catch (e) {
    const code = errno(e);
    if (code === 'EBUSY') throw new ConfigError(`${what} is in use (another process has it open)`);
    if (code === 'EPERM' || code === 'EACCES')
      throw new ConfigError(
        `${what}: permission denied: opening or creating a TAP needs CAP_NET_ADMIN (or a persistent TAP owned by this user)`,
      );
    if (code === 'ENOENT' || code === 'ENODEV')
      throw new ConfigError(`${what}: /dev/net/tun is missing (load the tun module)`);
    if (code === 'EINVAL')
      throw new ConfigError(`${what}: exists but is not a TAP with a vnet header (a TUN?)`);
    throw new ConfigError(`${what}: cannot open: ${(e as Error).message}`);
  }
  try {
    sys.ioctl(fd, TUNSETVNETHDRSZ, new Int32Array([NET_HDR_SIZE]));
  } catch (e) {
    sys.close(fd);
    throw new ConfigError(
      `${what}: TUNSETVNETHDRSZ ${NET_HDR_SIZE} refused: ${(e as Error).message}`,
    );
  }
  let offloads = true;
  try {
    sys.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6);
  } catch {
    offloads = false;
  }
  // Nothing is offloaded towards the guest until its driver says what it takes.
  sys.ioctl(fd, TUNSETOFFLOAD, 0);
  return { fd, offloads };
}

/**
 * The TAP as virtio-net sees it: readv/writev on the fd, EPOLLIN interest toggled on the loop,
 * and TX writes batched through `txBatch` when given.
 */
export function tapIo(
  sys: HostSys,
  loop: EventOps,
  fd: number,
  onReadable: () => void,
  txBatch?: TxBatch,
): TapIo {
  const tag = loop.add(fd, { process: () => onReadable() }, 0);
  return {
    readv: (bufs) => sys.readv(fd, bufs),
    writev: (bufs) => sys.writev(fd, bufs),
    setOffload: (flags) => void sys.ioctl(fd, TUNSETOFFLOAD, flags),
    setReadInterest: (on) => loop.modify(tag, on ? EV_IN : 0),
    ...(txBatch ? { txBatch } : {}),
  };
}

/**
 * The TX batch of a TAP, only with TYPERVISOR_NET_TX_BATCH=1: io_uring where this kernel and the
 * seccomp filters allow it, else undefined (one writev per frame) with the reason. Off by
 * default: it pays for small frames only (host: -24% device CPU per 1514-byte frame, nothing for
 * 64 KiB TSO frames), and CI's first in-lab run with it on had the two-VM net test stall for
 * 600 s (not reproduced alone, with or without it, so not shown to be its fault).
 */
export function openTxBatch(
  sys: HostSys,
  fd: number,
  env: Readonly<Record<string, string | undefined>> = process.env,
): { batch?: UringTxBatch; why?: string } {
  if (env.TYPERVISOR_NET_TX_BATCH !== '1')
    return { why: 'TYPERVISOR_NET_TX_BATCH is not 1 (off by default)' };
  let ring: IoUring | undefined;
  try {
    ring = IoUring.open(sys, TX_BATCH_FRAMES, TX_URING_ALLOW);
    return { batch: new UringTxBatch(ring, fd, (b) => sys.bufferAddress(b)) };
  } catch (e) {
    ring?.close();
    return { why: `io_uring unavailable: ${(e as Error).message}` };
  }
}

/**
 * The host ends of virtio-net and virtio-vsock, opened on the main thread before anything is
 * built, so every problem is a ConfigError before boot: the TAP (TUNSETIFF with
 * IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, vnet header size 12, TUNSETOFFLOAD probed) and the vsock
 * Unix socket (bound and listening). The fds go to the device worker.
 */
import { accessSync, constants, existsSync, statSync, unlinkSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import {
  IFF_NO_PI,
  IFF_TAP,
  IFF_VNET_HDR,
  TUN_F_CSUM,
  TUN_F_TSO4,
  TUN_F_TSO6,
  TUNSETOFFLOAD,
  TUNSETVNETHDRSZ,
  isSyscallError,
  native,
} from '../kvm/native.js';
import { NET_HDR_SIZE } from '../devices/virtio/net/header.js';
import { ConfigError } from '../util/errors.js';

export const MAX_TAP_NAME = 15; // IFNAMSIZ - 1
export const MAX_UDS_PATH = 107; // sizeof(sun_path) - 1

export interface OpenedTap {
  fd: number;
  /** The TAP took TUNSETOFFLOAD with checksum and TSO: offer the offloads. */
  offloads: boolean;
}

export function openTap(name: string): OpenedTap {
  const what = `TAP ${JSON.stringify(name)}`;
  if (name.length === 0 || Buffer.byteLength(name) > MAX_TAP_NAME || /[/\s\0:]/.test(name))
    throw new ConfigError(
      `${what}: a TAP name is 1 to ${MAX_TAP_NAME} bytes without '/', ':' or spaces`,
    );
  const n = native();
  let fd: number;
  try {
    fd = n.tapOpen(name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR);
  } catch (e) {
    if (isSyscallError(e, 'EBUSY'))
      throw new ConfigError(`${what} is in use (another process has it open)`);
    if (isSyscallError(e, 'EPERM') || isSyscallError(e, 'EACCES'))
      throw new ConfigError(
        `${what}: permission denied: opening or creating a TAP needs CAP_NET_ADMIN (or a persistent TAP owned by this user)`,
      );
    if (isSyscallError(e, 'ENOENT') || isSyscallError(e, 'ENODEV'))
      throw new ConfigError(`${what}: /dev/net/tun is missing (load the tun module)`);
    if (isSyscallError(e, 'EINVAL'))
      throw new ConfigError(`${what}: exists but is not a TAP with a vnet header (a TUN?)`);
    throw new ConfigError(`${what}: cannot open: ${(e as Error).message}`);
  }
  try {
    n.ioctl(fd, TUNSETVNETHDRSZ, new Int32Array([NET_HDR_SIZE]));
  } catch (e) {
    n.close(fd);
    throw new ConfigError(
      `${what}: TUNSETVNETHDRSZ ${NET_HDR_SIZE} refused: ${(e as Error).message}`,
    );
  }
  let offloads = true;
  try {
    n.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6);
  } catch {
    offloads = false;
  }
  // Nothing is offloaded towards the guest until its driver says what it takes.
  n.ioctl(fd, TUNSETOFFLOAD, 0);
  return { fd, offloads };
}

/**
 * Checks the vsock config and listens on `uds` for host-initiated connections. Refused: a CID
 * below 3 (0-2 are reserved: hypervisor, local, host), a path that exists, a directory that is
 * missing or not writable.
 */
export function listenVsock(cid: number, uds: string): { fd: number; path: string } {
  if (!Number.isInteger(cid) || cid < 3 || cid > 0xffff_fffe)
    throw new ConfigError(`vsock: guest CID must be from 3 to ${0xffff_fffe} (got ${cid})`);
  const path = resolve(uds);
  if (uds.length === 0 || Buffer.byteLength(path) > MAX_UDS_PATH)
    throw new ConfigError(`vsock: the socket path must be 1 to ${MAX_UDS_PATH} bytes (${path})`);
  if (existsSync(path))
    throw new ConfigError(`vsock: ${path} already exists (remove it, or choose another path)`);
  const dir = dirname(path);
  try {
    if (!statSync(dir).isDirectory()) throw new Error('not a directory');
    accessSync(dir, constants.W_OK | constants.X_OK);
  } catch {
    throw new ConfigError(`vsock: cannot create a socket in ${dir} (missing or not writable)`);
  }
  const n = native();
  const fd = n.unixSocket();
  try {
    n.bindListen(fd, path, 128);
  } catch (e) {
    n.close(fd);
    throw new ConfigError(`vsock: cannot listen on ${path}: ${(e as Error).message}`);
  }
  return { fd, path };
}

export function removeSocket(path: string): void {
  try {
    unlinkSync(path);
  } catch {
    // already gone
  }
}

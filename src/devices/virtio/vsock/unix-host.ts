/**
 * The host end of virtio-vsock in Firecracker's scheme: a Unix socket we listen on for
 * host-initiated connections (opened on the main thread before boot, so problems are
 * ConfigErrors), and the socket operations the device worker performs for each connection.
 */
import {
  accessSync,
  chmodSync,
  closeSync,
  constants,
  existsSync,
  fstatSync,
  linkSync,
  lstatSync,
  mkdtempSync,
  openSync,
  rmdirSync,
  statSync,
  unlinkSync,
} from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { ConfigError } from '../../../util/errors.js';
import { isGuestCid, MAX_GUEST_CID, MIN_GUEST_CID } from '../../../util/vhost-abi.js';
import { EV_ERR, EV_HUP, EV_IN, EV_OUT, type EventOps, type HostSys } from '../descriptor.js';
import type { VsockHost } from './vsock.js';

/** sizeof(sockaddr_un.sun_path) - 1. */
export const MAX_UDS_PATH = 107;
const SHUT_WR = 1;

/** Linux O_PATH (not in node:fs.constants): a descriptor naming an inode, opened for nothing. */
const O_PATH = 0o10000000;

/**
 * The directory of uds_path holds `<uds>_<port>`, the sockets guest connections are sent to
 * (with the VMM's credentials): whoever can add entries there chooses where a guest connects.
 * So it must belong to root or to the VMM's user and be writable by nobody else (no group or
 * other write bit, sticky or not: /tmp is refused). Returns the reason it is refused, if it is.
 */
export function unsafeSocketDirectory(dir: string): string | undefined {
  let st;
  try {
    st = statSync(dir);
  } catch {
    return 'is missing';
  }
  if (!st.isDirectory()) return 'is not a directory';
  const euid = process.geteuid?.() ?? 0;
  if (st.uid !== 0 && st.uid !== euid)
    return `belongs to uid ${st.uid} (only root or this VMM's user, uid ${euid}, may own it)`;
  if ((st.mode & 0o022) !== 0) {
    return `is writable by ${(st.mode & 0o002) !== 0 ? 'others' : 'its group'} (mode ${(st.mode & 0o7777).toString(8)}): another user could place the <uds>_<port> sockets guests connect to`;
  }
  return undefined;
}

/**
 * Connects `fd` to the Unix socket at `path` without following a symbolic link there: the
 * socket's inode is pinned with open(O_PATH | O_NOFOLLOW) (a symlink yields the link itself,
 * refused by the type check on that descriptor), then reached through /proc/self/fd/N, so the
 * inode connected to is the inode checked, with no second look-up of `path`. Without /proc (a
 * jail that has none) the last component is checked with lstat, which the directory check above
 * keeps race-free: nobody but us can change the directory's entries.
 */
export function connectNoFollow(sys: Pick<HostSys, 'connect'>, fd: number, path: string): number {
  let pinned: number;
  try {
    pinned = openSync(path, O_PATH | constants.O_NOFOLLOW);
  } catch (e) {
    throw new Error(`connect ${path}: ${(e as NodeJS.ErrnoException).code ?? 'cannot open'}`);
  }
  try {
    if (!fstatSync(pinned).isSocket()) {
      throw new Error(
        `connect ${path}: ${lstatSync(path).isSymbolicLink() ? 'a symbolic link (not followed)' : 'not a socket'}`,
      );
    }
    const viaProc = `/proc/self/fd/${pinned}`;
    if (existsSync(viaProc)) return sys.connect(fd, viaProc);
    if (!lstatSync(path).isSocket()) throw new Error(`connect ${path}: not a socket`);
    return sys.connect(fd, path);
  } finally {
    closeSync(pinned);
  }
}

/**
 * Checks the vsock config and listens on `uds` for host-initiated connections. Refused: a CID
 * below 3 (0-2 are reserved: hypervisor, local, host), a path that exists, a directory that is
 * missing, not writable by us, or writable by anyone else (unsafeSocketDirectory).
 */
export function listenVsock(sys: HostSys, cid: number, uds: string): { fd: number; path: string } {
  if (!isGuestCid(cid))
    throw new ConfigError(
      `vsock: guest CID must be from ${MIN_GUEST_CID} to ${MAX_GUEST_CID} (got ${cid})`,
    );
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
  const unsafe = unsafeSocketDirectory(dir);
  if (unsafe !== undefined)
    throw new ConfigError(`vsock: uds_path's directory ${dir} ${unsafe}; refused`);
  const fd = sys.unixSocket();
  try {
    bindPrivate(sys, fd, path);
  } catch (e) {
    sys.close(fd);
    throw new ConfigError(`vsock: cannot listen on ${path}: ${(e as Error).message}`);
  }
  return { fd, path };
}

/** The listening socket's mode, whatever the umask: host programs of the VMM's user only. */
export const VSOCK_SOCKET_MODE = 0o600;

/**
 * Binds and listens on `path` with mode VSOCK_SOCKET_MODE and no moment where it is wider: bound
 * in a fresh 0700 directory beside it, chmod-ed, then hard-linked into place (link(2) never
 * replaces an entry) and the temporary name removed. When the temporary name would not fit in
 * sun_path, the socket is bound in place and chmod-ed at once (the directory check above means
 * only this user could reach it in between anyway).
 */
function bindPrivate(sys: HostSys, fd: number, path: string): void {
  const tmpDir = mkdtempSync(join(dirname(path), '.typervisor-'));
  const tmp = join(tmpDir, 's');
  try {
    if (Buffer.byteLength(tmp) > MAX_UDS_PATH) {
      sys.bindListen(fd, path, 128);
      chmodSync(path, VSOCK_SOCKET_MODE);
      return;
    }
    sys.bindListen(fd, tmp, 128);
    chmodSync(tmp, VSOCK_SOCKET_MODE);
    linkSync(tmp, path);
  } finally {
    try {
      unlinkSync(tmp);
    } catch {
      // not bound there
    }
    rmdirSync(tmpDir);
  }
}

export function removeSocket(path: string): void {
  try {
    unlinkSync(path);
  } catch {
    // already gone
  }
}

/** Events on a watched socket, reported to the device. */
export type SocketEvents = (
  fd: number,
  readable: boolean,
  writable: boolean,
  hangup: boolean,
) => void;

/**
 * Unix sockets for virtio-vsock, each watched on the worker's loop and reported to `onSocket`;
 * the listening socket is watched from the start and reported to `onListen`.
 */
export function unixVsockHost(
  sys: HostSys,
  loop: EventOps,
  listenFd: number,
  onSocket: SocketEvents,
  onListen: () => void,
): VsockHost {
  const tags = new Map<number, number>();
  const listener = { process: () => onListen() };
  let listenTag: number | undefined = loop.add(listenFd, listener);
  const host: VsockHost = {
    connect(path) {
      const fd = sys.unixSocket();
      try {
        if (connectNoFollow(sys, fd, path) < 0)
          throw new Error(`connect ${path}: the listener's backlog is full`);
      } catch (e) {
        sys.close(fd);
        throw e;
      }
      return fd;
    },
    accept: () => sys.accept(listenFd),
    read: (fd, bufs) => sys.readv(fd, bufs),
    write: (fd, bufs) => sys.sendv(fd, bufs),
    shutdownWrite: (fd) => sys.shutdown(fd, SHUT_WR),
    after: (ms, fn) => loop.setTimer(ms, fn),
    close(fd) {
      host.unwatch(fd);
      sys.close(fd);
    },
    watch(fd, read, write) {
      const events = (read ? EV_IN : 0) | (write ? EV_OUT : 0);
      const tag = tags.get(fd);
      if (tag !== undefined) {
        loop.modify(tag, events);
        return;
      }
      const process = (ev: number) =>
        onSocket(fd, (ev & EV_IN) !== 0, (ev & EV_OUT) !== 0, (ev & (EV_HUP | EV_ERR)) !== 0);
      tags.set(fd, loop.add(fd, { process }, events));
    },
    unwatch(fd) {
      const tag = tags.get(fd);
      if (tag === undefined) return;
      tags.delete(fd);
      loop.remove(tag);
    },
    watchListener(on) {
      if (on && listenTag === undefined) listenTag = loop.add(listenFd, listener);
      else if (!on && listenTag !== undefined) {
        loop.remove(listenTag);
        listenTag = undefined;
      }
    },
  };
  return host;
}

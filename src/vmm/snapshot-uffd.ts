/**
 * The Uffd memory backend of a snapshot load, with Firecracker's handshake (see
 * src/uffd/protocol.ts): guest RAM is anonymous memory registered with a userfaultfd, and a
 * page-fault handler process -- ours (`typervisor uffd-handler`) or one written for
 * Firecracker -- fills each page on first touch, by UFFDIO_COPY from the memory file it holds.
 *
 *   1. one anonymous MAP_PRIVATE | MAP_NORESERVE mapping per region, on the main thread (the
 *      workers wrap the same addresses: GuestRamLayout.hostAddrs, as for the File backend);
 *   2. userfaultfd (O_CLOEXEC | O_NONBLOCK, kernel faults too: KVM touches guest RAM from the
 *      kernel), UFFDIO_API with UFFD_FEATURE_EVENT_REMOVE (what Firecracker requires);
 *   3. UFFDIO_REGISTER (missing pages) on each region;
 *   4. connect to the handler's socket and send the JSON regions with the uffd attached
 *      (SCM_RIGHTS) in one sendmsg;
 *   5. wait until the handler has taken the message (the socket's send queue is empty) and is
 *      still connected, or fail: a handler that never reads would leave the guest hanging at
 *      its first page, so that is an error now rather than a hang later.
 *
 * The socket and our copy of the uffd stay open while the VM lives (as in Firecracker: if the
 * handler dies, faults wait instead of silently reading zero pages), and close with the RAM.
 * The socket is looked at every second: a handler that hangs up is reported (an error in the
 * log: the next page it has not served will stop the vCPU that touches it). Any failure
 * undoes everything made here.
 */
import {
  MAP_ANONYMOUS,
  MAP_NORESERVE,
  MAP_PRIVATE,
  native,
  PROT_READ,
  PROT_WRITE,
} from '../kvm/native.js';
import {
  encodeUffdRegions,
  UFFD_API,
  UFFD_FEATURE_EVENT_REMOVE,
  UFFDIO_API,
  UFFDIO_COPY_BIT,
  UFFDIO_REGISTER,
  UFFDIO_REGISTER_MODE_MISSING,
} from '../uffd/protocol.js';
import { log } from '../util/log.js';
import { guestRamOver, type GuestRamLayout, type MappedGuestRam } from './guest-ram.js';
import { SNAPSHOT_PAGE_SIZE, type SnapshotRegion } from './snapshot-format.js';

/** How long the handler has to take the handshake message (it is a few hundred bytes). */
export const UFFD_HANDSHAKE_TIMEOUT_MS = 5000;
/** sun_path holds 107 bytes and a NUL. */
const MAX_SOCKET_PATH = 107;
/** How often the handler's socket is looked at for a hang-up. */
export const UFFD_WATCH_MS = 1000;
/** TIOCOUTQ (SIOCOUTQ): bytes a socket has sent that its peer has not read yet. */
const SIOCOUTQ = 0x5411;

export class UffdBackendError extends Error {}

export interface UffdMemory {
  /** For the workers: memfd -1 and the main thread's host addresses (see guest-ram.ts). */
  layout: GuestRamLayout;
  /** The main thread's mapping; its unmap() also closes the uffd and the handler's socket. */
  ram: MappedGuestRam;
  /** What was sent, for logs and tests. */
  handshake: string;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function errText(e: unknown): string {
  const x = e as { code?: string; message?: string };
  return x.code ?? x.message ?? String(e);
}

/**
 * Makes guest RAM for `regions` served by the handler listening on `socketPath`. Throws
 * UffdBackendError with a message that names the failed step; then nothing is left open.
 */
export async function uffdGuestMemory(
  socketPath: string,
  regions: readonly SnapshotRegion[],
  opts: { timeoutMs?: number; watchMs?: number; onHandlerGone?: (message: string) => void } = {},
): Promise<UffdMemory> {
  if (Buffer.byteLength(socketPath) > MAX_SOCKET_PATH)
    throw new UffdBackendError(
      `the page-fault handler's socket path is over ${MAX_SOCKET_PATH} bytes`,
    );
  const n = native();
  const buffers: ArrayBuffer[] = [];
  let uffd = -1;
  let sock = -1;
  const closeAll = () => {
    for (const fd of [sock, uffd])
      if (fd >= 0)
        try {
          n.close(fd);
        } catch {
          // already closed
        }
    sock = uffd = -1;
  };
  try {
    for (const r of regions)
      buffers.push(
        n.mmap(r.size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0),
      );
    const addrs = buffers.map((b) => n.bufferAddress(b));

    try {
      uffd = n.userfaultfd(0);
    } catch (e) {
      throw new UffdBackendError(
        `cannot create a userfaultfd (${errText(e)}): the VMM needs vm.unprivileged_userfaultfd=1, CAP_SYS_PTRACE, or access to /dev/userfaultfd`,
      );
    }
    const api = new BigUint64Array([UFFD_API, UFFD_FEATURE_EVENT_REMOVE, 0n]);
    try {
      n.ioctl(uffd, UFFDIO_API, api);
    } catch (e) {
      throw new UffdBackendError(
        `UFFDIO_API with UFFD_FEATURE_EVENT_REMOVE refused (${errText(e)}): this kernel's userfaultfd is too old`,
      );
    }
    regions.forEach((r, i) => {
      const reg = new BigUint64Array([addrs[i]!, BigInt(r.size), UFFDIO_REGISTER_MODE_MISSING, 0n]);
      try {
        n.ioctl(uffd, UFFDIO_REGISTER, reg);
      } catch (e) {
        throw new UffdBackendError(
          `cannot register memory region ${i} with the userfaultfd (${errText(e)})`,
        );
      }
      if ((reg[3]! & UFFDIO_COPY_BIT) === 0n)
        throw new UffdBackendError(`memory region ${i}: this kernel offers no UFFDIO_COPY`);
    });

    const handshake = encodeUffdRegions(
      regions.map((r, i) => ({
        baseHostVirtAddr: Number(addrs[i]!),
        size: r.size,
        offset: r.fileOffset,
        pageSize: SNAPSHOT_PAGE_SIZE,
      })),
    );
    const bytes = Buffer.from(handshake);
    sock = n.unixSocket();
    let connected: number;
    try {
      connected = n.connect(sock, socketPath);
    } catch (e) {
      throw new UffdBackendError(
        `cannot connect to the page-fault handler at ${socketPath} (${errText(e)}): is the handler listening there?`,
      );
    }
    if (connected !== 0)
      throw new UffdBackendError(
        `the page-fault handler at ${socketPath} accepts no more connections (its backlog is full)`,
      );
    let sent: number;
    try {
      sent = n.sendFds(sock, bytes, [uffd]);
    } catch (e) {
      throw new UffdBackendError(
        `cannot send the memory regions to the page-fault handler (${errText(e)}): it closed the connection`,
      );
    }
    if (sent !== bytes.length)
      throw new UffdBackendError(
        `the page-fault handler's socket took ${sent < 0 ? 'none' : sent} of the ${bytes.length} bytes of the memory regions`,
      );

    // The handler took the message when nothing we sent is left unread.
    const timeoutMs = opts.timeoutMs ?? UFFD_HANDSHAKE_TIMEOUT_MS;
    const end = Date.now() + timeoutMs;
    const outq = new Int32Array(1);
    for (;;) {
      n.ioctl(sock, SIOCOUTQ, outq);
      if (outq[0] === 0) break;
      if (Date.now() > end)
        throw new UffdBackendError(
          `the page-fault handler at ${socketPath} did not take the memory regions within ${timeoutMs} ms`,
        );
      await sleep(1);
    }
    // Still connected? (A handler that closed without reading also empties the queue.)
    const one = new Uint8Array(64);
    const hungUp = () => {
      try {
        return n.read(sock, one) === 0; // data (never sent by a handler) is dropped
      } catch {
        return true; // ECONNRESET
      }
    };
    if (hungUp())
      throw new UffdBackendError(
        `the page-fault handler at ${socketPath} closed the connection (a handler keeps it open while it serves)`,
      );

    const gone = opts.onHandlerGone ?? ((m: string) => log('error', m));
    const watch = setInterval(() => {
      if (sock < 0 || !hungUp()) return;
      clearInterval(watch);
      gone(
        `the page-fault handler at ${socketPath} hung up: a vCPU that touches guest memory it has not served yet will wait forever`,
      );
    }, opts.watchMs ?? UFFD_WATCH_MS);
    watch.unref();

    const copy = regions.map((r) => ({ base: r.base, size: r.size, fileOffset: r.fileOffset }));
    const mapped = guestRamOver(copy, buffers, (b) => n.munmap(b));
    const unmapRam = mapped.unmap;
    const ram: MappedGuestRam = {
      ...mapped,
      unmap: () => {
        clearInterval(watch);
        unmapRam();
        closeAll();
      },
    };
    return { layout: { memfd: -1, regions: copy, hostAddrs: addrs }, ram, handshake };
  } catch (e) {
    closeAll();
    buffers.forEach((b) => n.munmap(b));
    throw e instanceof UffdBackendError ? e : new UffdBackendError((e as Error).message);
  }
}

/**
 * `typervisor uffd-handler --socket SOCK --mem-file MEM`: a page-fault handler for the Uffd
 * memory backend, ours and Firecracker's alike (the handshake is protocol.ts; Firecracker's
 * example is src/firecracker/examples/uffd/on_demand_handler.rs). It runs as a process of its
 * own, for one VMM:
 *
 *   1. maps MEM read-only and privately (pages come from the page cache, shared with others);
 *   2. listens on SOCK, accepts one connection, then stops listening and removes SOCK;
 *   3. takes the handshake: one message, the JSON regions with exactly one fd attached, which
 *      must be a userfaultfd; the JSON is checked against MEM (protocol.ts parseUffdRegions);
 *   4. serves faults until the VMM goes away (its end of the socket closes): each missing page
 *      is copied from MEM into the VMM (UFFDIO_COPY, one page per fault: only what the guest
 *      touches is ever read); EEXIST (another vCPU faulted on the same page first) counts as
 *      served, EAGAIN (a remove event is pending) is retried after the pending events are
 *      read. A UFFD_EVENT_REMOVE range (the VMM madvised it away, e.g. balloon) is remembered,
 *      and a later fault there gets a zero page, not the file's, as the userfaultfd
 *      documentation and Firecracker's docs ask.
 *
 * Everything the peer sends is bounded and checked; a bad handshake, a fault outside every
 * region or an event we did not ask for ends the handler with a one-line error (exit 1), never
 * a crash. The loop blocks in epoll_wait: this process does nothing else.
 */
import { closeSync, fstatSync, openSync, readlinkSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { unlinkQuietly } from '../util/fs.js';
import {
  EPOLL_CTL_ADD,
  EPOLLIN,
  EPOLLRDHUP,
  isSyscallError,
  MAP_NORESERVE,
  MAP_PRIVATE,
  native,
  PROT_READ,
} from '../kvm/native.js';
import {
  decodeUffdMsg,
  HandshakeError,
  MAX_HANDSHAKE_BYTES,
  parseUffdRegions,
  UFFD_MSG_SIZE,
  UFFDIO_COPY,
  type UffdRegion,
} from './protocol.js';

/** How long the VMM has, once connected, to send the handshake. */
export const HANDSHAKE_TIMEOUT_MS = 10_000;
/** uffd_msgs read per read(2). */
const MSGS_PER_READ = 64;
const TAG_LISTEN = 1;
const TAG_CONN = 2;
const TAG_UFFD = 3;

export class HandlerError extends Error {}

export interface HandlerStats {
  /** Page-fault events read. */
  faults: number;
  /** Pages copied from the memory file. */
  copied: number;
  /** Zero pages given (faults in removed ranges). */
  zeroed: number;
  /** Faults on pages already present (EEXIST: another thread's fault served it). */
  present: number;
  /** UFFD_EVENT_REMOVE events. */
  removes: number;
  /** UFFDIO_COPY calls retried after EAGAIN. */
  retries: number;
}

export interface HandlerOptions {
  socketPath: string;
  memFile: string;
  /** Bound on the wait for the VMM to connect (default: none). */
  acceptTimeoutMs?: number;
  /** Progress lines (listening, serving). */
  say?: (line: string) => void;
}

interface ServedRegion extends UffdRegion {
  /** One bit per page: removed (a later fault gets a zero page). */
  removed: Uint8Array;
}

function code(e: unknown): string {
  return isSyscallError(e) ? e.code : (e as Error).message;
}

/** Waits for `tag` on `epfd` for at most `ms` (undefined: forever); false on timeout. */
function waitFor(epfd: number, tag: number, ms: number | undefined): boolean {
  const n = native();
  const out = new Uint32Array(8);
  const end = ms === undefined ? Infinity : Date.now() + ms;
  for (;;) {
    const left = end === Infinity ? 1000 : Math.max(0, end - Date.now());
    const k = n.epollWait(epfd, out, Math.min(left, 1000));
    for (let i = 0; i < k; i++) if (out[2 * i + 1] === tag) return true;
    if (Date.now() >= end) return false;
  }
}

/**
 * Serves one VMM (see the file comment) and returns when it has gone away. Throws HandlerError
 * (bad arguments, a bad handshake, a fault it cannot serve); nothing it opened stays open.
 */
export function runUffdHandler(o: HandlerOptions): HandlerStats {
  const n = native();
  const say = o.say ?? (() => undefined);
  const stats: HandlerStats = {
    faults: 0,
    copied: 0,
    zeroed: 0,
    present: 0,
    removes: 0,
    retries: 0,
  };
  const fds: number[] = []; // ours to close (native fds)
  let fileFd = -1;
  let file: ArrayBuffer | undefined;
  let listening = false;
  try {
    try {
      fileFd = openSync(o.memFile, 'r');
    } catch (e) {
      throw new HandlerError(`cannot open the memory file: ${(e as Error).message}`);
    }
    const st = fstatSync(fileFd);
    if (!st.isFile()) throw new HandlerError(`${o.memFile} is not a regular file`);
    if (st.size === 0) throw new HandlerError(`${o.memFile} is empty`);
    const fileBytes = st.size;
    file = n.mmap(fileBytes, PROT_READ, MAP_PRIVATE | MAP_NORESERVE, fileFd, 0);
    closeSync(fileFd);
    fileFd = -1;
    const fileAddr = n.bufferAddress(file);

    const epfd = n.epollCreate();
    fds.push(epfd);
    const listener = n.unixSocket();
    fds.push(listener);
    try {
      n.bindListen(listener, o.socketPath, 1);
    } catch (e) {
      throw new HandlerError(
        `cannot listen on ${o.socketPath}: ${code(e)}${code(e) === 'EADDRINUSE' ? ' (something is there: remove it first)' : ''}`,
      );
    }
    listening = true;
    say(`listening on ${o.socketPath}`);
    n.epollCtl(epfd, EPOLL_CTL_ADD, listener, EPOLLIN, TAG_LISTEN);
    let conn = -1;
    while (conn < 0) {
      if (!waitFor(epfd, TAG_LISTEN, o.acceptTimeoutMs))
        throw new HandlerError(`no VMM connected within ${o.acceptTimeoutMs} ms`);
      conn = n.accept(listener);
    }
    fds.push(conn);
    // One VMM: nobody else may connect (and wait forever).
    n.close(fds.splice(fds.indexOf(listener), 1)[0]!);
    unlinkQuietly(o.socketPath);
    listening = false;

    // The handshake: one message with the uffd attached.
    n.epollCtl(epfd, EPOLL_CTL_ADD, conn, EPOLLIN | EPOLLRDHUP, TAG_CONN);
    const buf = new Uint8Array(MAX_HANDSHAKE_BYTES + 1);
    let got: { bytes: number; fds: number[] } = { bytes: -1, fds: [] };
    const end = Date.now() + HANDSHAKE_TIMEOUT_MS;
    while (got.bytes < 0) {
      if (!waitFor(epfd, TAG_CONN, Math.max(0, end - Date.now())))
        throw new HandlerError(
          `the VMM sent no memory regions within ${HANDSHAKE_TIMEOUT_MS} ms of connecting`,
        );
      try {
        got = n.recvFds(conn, buf, 1);
      } catch (e) {
        throw new HandlerError(`cannot receive the handshake: ${(e as Error).message}`);
      }
    }
    fds.push(...got.fds);
    if (got.bytes === 0)
      throw new HandlerError('the VMM closed the connection before sending the memory regions');
    if (got.bytes > MAX_HANDSHAKE_BYTES)
      throw new HandlerError(`the handshake is over ${MAX_HANDSHAKE_BYTES} bytes`);
    if (got.fds.length !== 1)
      throw new HandlerError('the handshake came without a userfaultfd attached (SCM_RIGHTS)');
    const uffd = got.fds[0]!;
    let kind = '';
    try {
      kind = readlinkSync(`/proc/self/fd/${uffd}`);
    } catch {
      // reported below
    }
    if (kind !== 'anon_inode:[userfaultfd]')
      throw new HandlerError(
        `the fd attached to the handshake is not a userfaultfd (${kind || 'unknown'})`,
      );
    let text: string;
    try {
      text = new TextDecoder('utf-8', { fatal: true }).decode(buf.subarray(0, got.bytes));
    } catch {
      throw new HandlerError('the handshake is not UTF-8');
    }
    let regions: ServedRegion[];
    try {
      regions = parseUffdRegions(text, fileBytes).map((r) => ({
        ...r,
        removed: new Uint8Array(Math.ceil(r.size / r.pageSize / 8)),
      }));
    } catch (e) {
      if (e instanceof HandshakeError) throw new HandlerError(`bad handshake: ${e.message}`);
      throw e;
    }
    const pageSize = regions[0]!.pageSize;
    const zeroPage = new Uint8Array(pageSize);
    say(
      `serving ${regions.length} region(s), ${regions.reduce((s, r) => s + r.size, 0)} bytes, from ${o.memFile}`,
    );
    n.epollCtl(epfd, EPOLL_CTL_ADD, uffd, EPOLLIN, TAG_UFFD);

    const regionOf = (addr: number) =>
      regions.find((r) => addr >= r.baseHostVirtAddr && addr < r.baseHostVirtAddr + r.size);
    const copy = new BigUint64Array(5);
    /** Copies one page in; false when it must be retried (EAGAIN); 'gone' when the VMM is. */
    const serve = (address: bigint): boolean | 'gone' => {
      const page = Number(address & ~BigInt(pageSize - 1));
      const r = regionOf(page);
      if (!r)
        throw new HandlerError(`a fault at 0x${address.toString(16)} is outside every region`);
      const idx = (page - r.baseHostVirtAddr) / pageSize;
      const removed = (r.removed[idx >> 3]! & (1 << (idx & 7))) !== 0;
      copy[0] = BigInt(page);
      copy[1] = removed
        ? n.bufferAddress(zeroPage)
        : fileAddr + BigInt(r.offset + (page - r.baseHostVirtAddr));
      copy[2] = BigInt(pageSize);
      copy[3] = 0n;
      copy[4] = 0n;
      try {
        n.ioctl(uffd, UFFDIO_COPY, copy);
      } catch (e) {
        if (isSyscallError(e, 'EEXIST')) {
          stats.present++;
          return true;
        }
        if (isSyscallError(e, 'EAGAIN')) {
          stats.retries++;
          return false;
        }
        // The VMM's memory is gone (it is exiting).
        if (isSyscallError(e, 'ESRCH') || isSyscallError(e, 'ENOENT')) return 'gone';
        throw new HandlerError(`UFFDIO_COPY at 0x${page.toString(16)}: ${code(e)}`);
      }
      if (removed) {
        r.removed[idx >> 3]! &= ~(1 << (idx & 7));
        stats.zeroed++;
      } else stats.copied++;
      return true;
    };
    const markRemoved = (start: bigint, endAddr: bigint) => {
      for (const r of regions) {
        const lo = Math.max(Number(start), r.baseHostVirtAddr);
        const hi = Math.min(Number(endAddr), r.baseHostVirtAddr + r.size);
        for (let a = lo - ((lo - r.baseHostVirtAddr) % pageSize); a < hi; a += pageSize) {
          const idx = (a - r.baseHostVirtAddr) / pageSize;
          r.removed[idx >> 3]! |= 1 << (idx & 7);
        }
      }
    };

    const msgs = new Uint8Array(UFFD_MSG_SIZE * MSGS_PER_READ);
    const one = new Uint8Array(256);
    const events = new Uint32Array(8);
    let deferred: bigint[] = [];
    for (;;) {
      const k = n.epollWait(epfd, events, deferred.length > 0 ? 1 : 1000);
      let connEvent = false;
      for (let i = 0; i < k; i++) if (events[2 * i + 1] === TAG_CONN) connEvent = true;
      if (connEvent) {
        // Nothing more is ever sent on the socket: data is read and dropped; EOF is the end.
        let r: number;
        try {
          r = n.read(conn, one);
        } catch {
          r = 0;
        }
        if (r === 0) return stats;
      }
      // Read every pending event first (a pending remove makes UFFDIO_COPY fail with EAGAIN).
      const faults: bigint[] = deferred;
      deferred = [];
      for (;;) {
        const got = n.read(uffd, msgs);
        if (got <= 0) break;
        for (let off = 0; off + UFFD_MSG_SIZE <= got; off += UFFD_MSG_SIZE) {
          const ev = decodeUffdMsg(msgs, off);
          if (ev.kind === 'pagefault') {
            stats.faults++;
            faults.push(ev.address);
          } else if (ev.kind === 'remove') {
            stats.removes++;
            markRemoved(ev.start, ev.end);
          } else
            throw new HandlerError(
              `unexpected userfaultfd event 0x${ev.event.toString(16)} (only page faults and removes were asked for)`,
            );
        }
      }
      for (const a of faults) {
        const r = serve(a);
        if (r === 'gone') return stats;
        if (!r) deferred.push(a);
      }
    }
  } finally {
    for (const fd of fds.reverse())
      try {
        n.close(fd);
      } catch {
        // already closed
      }
    if (fileFd >= 0) closeSync(fileFd);
    if (file) n.munmap(file);
    if (listening) unlinkQuietly(o.socketPath);
  }
}

export const UFFD_HANDLER_USAGE = `usage: typervisor uffd-handler --socket SOCK --mem-file MEM [--timeout-ms N]
       typervisor uffd-handler SOCK MEM   (the arguments of Firecracker's example handlers)
Serves the guest memory of ONE snapshot load with the Uffd backend (PUT /snapshot/load with
mem_backend {"backend_type": "Uffd", "backend_path": SOCK}, or run --restore STATE --mem-uffd
SOCK), Firecracker's handshake: pages are copied from MEM as the guest touches them. Exits 0
when the VMM goes away, 1 on a bad handshake or a fault it cannot serve, 2 on bad arguments.
  --socket SOCK    the Unix socket to listen on (must not exist; removed once the VMM connects)
  --mem-file MEM   the snapshot's memory file
  --timeout-ms N   give up if no VMM connects within N ms (default: wait)`;

/** The CLI entry: progress and the final counts on stdout, errors as one line on stderr. */
export function uffdHandlerCommand(argv: string[]): number {
  let v;
  let positionals: string[];
  try {
    ({ values: v, positionals } = parseArgs({
      args: argv,
      strict: true,
      allowPositionals: true,
      options: {
        socket: { type: 'string' },
        'mem-file': { type: 'string' },
        'timeout-ms': { type: 'string' },
        help: { type: 'boolean', short: 'h' },
      },
    }));
  } catch (e) {
    process.stderr.write(`typervisor uffd-handler: ${(e as Error).message.split('\n')[0]}\n`);
    return 2;
  }
  if (v.help) {
    process.stdout.write(UFFD_HANDLER_USAGE + '\n');
    return 0;
  }
  // Firecracker's example handlers take `SOCK MEM` as positional arguments: so do we.
  if (positionals.length > 0) {
    if (positionals.length !== 2 || v.socket !== undefined || v['mem-file'] !== undefined) {
      process.stderr.write(
        "typervisor uffd-handler: give --socket SOCK --mem-file MEM, or SOCK MEM (as Firecracker's example handlers take them)\n",
      );
      return 2;
    }
    v.socket = positionals[0];
    v['mem-file'] = positionals[1];
  }
  if (v.socket === undefined || v['mem-file'] === undefined) {
    process.stderr.write('typervisor uffd-handler: --socket and --mem-file are required\n');
    return 2;
  }
  let timeout: number | undefined;
  if (v['timeout-ms'] !== undefined) {
    timeout = /^\d{1,9}$/.test(v['timeout-ms']) ? Number(v['timeout-ms']) : NaN;
    if (!(timeout! >= 1)) {
      process.stderr.write('typervisor uffd-handler: --timeout-ms must be a whole number >= 1\n');
      return 2;
    }
  }
  const say = (l: string) => process.stdout.write(`typervisor uffd-handler: ${l}\n`);
  try {
    const s = runUffdHandler({
      socketPath: v.socket,
      memFile: v['mem-file'],
      ...(timeout !== undefined ? { acceptTimeoutMs: timeout } : {}),
      say,
    });
    say(
      `the VMM went away: faults=${s.faults} copied=${s.copied} zeroed=${s.zeroed} present=${s.present} removes=${s.removes} retries=${s.retries}`,
    );
    return 0;
  } catch (e) {
    if (!(e instanceof HandlerError) && !isSyscallError(e)) throw e;
    process.stderr.write(`typervisor uffd-handler: ${(e as Error).message}\n`);
    return 1;
  }
}

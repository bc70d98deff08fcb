/**
 * The HTTP/1.1 server on a Unix socket (node:http), with the wire behaviour of Firecracker's
 * micro_http where its clients can tell:
 * - a request without a `Host` header is served (raw `socat`/`nc` clients send none);
 * - pipelined requests on one connection are answered in order;
 * - `Expect: 100-continue`: `100 Continue` is sent, then the answer, once the body has arrived;
 *   other Expect values are ignored (node's default would be 417; micro_http ignores them);
 * - bodies are bounded (Firecracker's default 51200 bytes): a larger Content-Length is answered
 *   400 with Firecracker's sentence before any of the body is read, and the connection is kept
 *   (the declared body is read and dropped) as micro_http keeps it, unless the declared body is
 *   larger than OVERSIZED_DRAIN_MAX or the client waits for `100 Continue` (its body may never
 *   come), where it is closed; a chunked body is cut off as soon as it passes the limit, answered
 *   400, and the connection closed (its end cannot be found without reading it all);
 * - HTTP/1.0 and `Connection: close` requests are served; the connection is closed after the
 *   answer (micro_http keeps it open whatever the client asked, so no client waits on that);
 * - at most MAX_API_CONNECTIONS connections at once (micro_http allows 10): one more is answered
 *   503 and closed, as micro_http does, and counted;
 * - header and whole-request timeouts, so a slow or half-closed client costs a socket, never a
 *   stuck VMM; a request is queued only once its whole body has arrived;
 * - requests are handled one at a time, in the order they completed (a FIFO queue), since each
 *   may change the VM;
 * - every answer is JSON: 200 with a body, 204, or 4xx/5xx with {"fault_message": ...}.
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import { connect, type Socket } from 'node:net';
import {
  chmodSync,
  linkSync,
  lstatSync,
  mkdtempSync,
  rmdirSync,
  unlinkSync,
  type Stats,
} from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { ConfigError, HostError } from '../util/errors.js';
import { getLogLevel, log } from '../util/log.js';
import { deprecationOf, type ApiOutcome } from './controller.js';
import { outcomeLine, requestLine } from './logger.js';
import type { Counters } from './metrics.js';
import { route, type VmmAction } from './routes.js';

/** Firecracker's default --http-api-max-payload-size. */
export const DEFAULT_MAX_PAYLOAD = 51_200;
export const HEADERS_TIMEOUT_MS = 5_000;
export const REQUEST_TIMEOUT_MS = 10_000;
export const KEEP_ALIVE_TIMEOUT_MS = 30_000;
const MAX_HEADER_BYTES = 8_192;
/**
 * The largest declared body of a refused request that is still read (and dropped) to keep the
 * connection; a larger one closes it, so a refused request never costs more than this to read.
 */
export const OVERSIZED_DRAIN_MAX = 1 << 20;
/**
 * Open API connections at once; one more is answered 503 and closed. Firecracker's micro_http
 * allows 10, so a client that works with Firecracker never meets this one.
 */
export const MAX_API_CONNECTIONS = 32;
/** How long a refused connection stays (write side closed) before it is destroyed. */
const REFUSED_LINGER_MS = 1_000;
/** How often node looks for connections past HEADERS_TIMEOUT_MS or REQUEST_TIMEOUT_MS. */
const CONNECTIONS_CHECK_MS = 500;

/**
 * Node's HTTP server enforces headersTimeout and requestTimeout with one interval timer that
 * runs from listen() to close() whether a connection is open or not: an idle VMM woke twice a
 * second to find nothing. This stops that timer while no connection is open and starts it
 * again with the first one, with node's own check (so the timeouts mean what node says they
 * do). Node keeps the timer under a private symbol; where it is not found (another Node), its
 * own timer runs as before. Call after the server listens.
 */
export function checkConnectionsOnlyWhileOpen(server: Server): {
  /** A connection is open: the check runs (if it did not already). */
  opened(): void;
  /** `open` connections are left: the check stops when none is. */
  closed(open: number): void;
} {
  const key = Object.getOwnPropertySymbols(server).find(
    (k) => k.description === 'http.server.connectionsCheckingInterval',
  );
  const holder = server as unknown as Record<symbol, unknown>;
  const nodeTimer = key ? (holder[key] as { _onTimeout?: unknown } | undefined) : undefined;
  const check = nodeTimer?._onTimeout;
  if (key === undefined || typeof check !== 'function')
    return { opened: () => undefined, closed: () => undefined };
  clearInterval(nodeTimer as NodeJS.Timeout);
  holder[key] = undefined;
  return {
    opened() {
      // Kept where node's close() clears it.
      holder[key] ??= setInterval(check as () => void, CONNECTIONS_CHECK_MS).unref();
    },
    closed(open) {
      if (open > 0) return;
      clearInterval(holder[key] as NodeJS.Timeout | undefined);
      holder[key] = undefined;
    },
  };
}

export interface ApiServerOptions<A = VmmAction> {
  socketPath: string;
  maxPayload?: number;
  counters: Counters;
  handle(action: A): Promise<ApiOutcome>;
  /**
   * Method + path + body -> an action or a fault: Firecracker's routes (routes.ts) unless given
   * (the host daemon, src/daemon/, serves its own API with this server's wire behaviour).
   */
  route?: (
    method: string,
    url: string,
    body: string | undefined,
  ) => { action?: A; fault?: string; metric?: [string, string] };
  /**
   * Serve requests as they complete, without waiting for the ones before (the daemon: its
   * requests concern different VMs). Default: one at a time, in order, as Firecracker.
   */
  concurrent?: boolean;
}

export interface ApiServer {
  close(): Promise<void>;
}

/** The API socket's mode, whatever the umask: only the VMM's own user (or root) may call it. */
export const API_SOCKET_MODE = 0o600;

/** Removes a stale socket (a socket nobody listens on); refuses anything else at that path. */
export async function prepareSocketPath(path: string): Promise<void> {
  let st;
  try {
    st = lstatSync(path);
  } catch {
    return; // nothing there
  }
  if (!st.isSocket())
    throw new ConfigError(`${path} exists and is not a socket; refusing to replace it`);
  const live = await new Promise<boolean>((resolve) => {
    const s: Socket = connect(path);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
  if (live) throw new HostError(`another process is listening on ${path}`);
  // Still the stale socket looked at (not something put there since)? Then remove it.
  const now = lstatSync(path, { throwIfNoEntry: false });
  if (now === undefined) return;
  if (now.ino !== st.ino || now.dev !== st.dev || !now.isSocket())
    throw new ConfigError(`${path} was replaced while being checked; refusing to remove it`);
  unlinkSync(path);
}

/**
 * Binds `server` to `path` with mode API_SOCKET_MODE and no moment where the path is wider: the
 * socket is bound in a fresh 0700 directory beside `path` (so the umask cannot widen what anyone
 * else can reach), chmod-ed there, then hard-linked to `path` (link(2) never replaces an existing
 * entry: EEXIST if something appeared there meanwhile) and its temporary name removed. A Unix
 * socket is reached through its inode, so the linked name serves the bound socket. Returns the
 * identity of the socket, so close() removes only the entry it made.
 */
async function listenPrivate(server: Server, path: string): Promise<Stats> {
  const target = resolve(path);
  const dir = mkdtempSync(join(dirname(target), bindDirPrefix(process.pid)));
  const tmp = join(dir, 's');
  try {
    // The temporary name must fit in sun_path too (libuv may cut a long one short).
    if (Buffer.byteLength(tmp) > MAX_SOCKET_PATH) return await listenUmask(server, target);
    await listenOn(server, tmp);
    try {
      chmodSync(tmp, API_SOCKET_MODE);
      linkSync(tmp, target);
    } catch (e) {
      const code = (e as NodeJS.ErrnoException).code;
      await new Promise<void>((ok) => server.close(() => ok()));
      if (code === 'EEXIST')
        throw new HostError(
          `${path} appeared while the API socket was being created; not replacing it`,
        );
      // A file system without hard links (EPERM, ENOTSUP...): bind in place instead.
      return await listenUmask(server, target);
    }
    // The identity from the temporary name (the same inode): once linked, `target` belongs to
    // whoever reaches it, and a daemon that saw it accept may already have renamed it (the
    // lab: a pooled VMM exited with ENOENT here, its VM create failed).
    return lstatSync(tmp);
  } finally {
    try {
      unlinkSync(tmp);
    } catch {
      // never bound, or already gone
    }
    rmdirSync(dir);
  }
}

/**
 * The temporary directory listenPrivate binds in, named by the process's pid: a process killed
 * while binding leaves it, and whoever started that process can remove it (the daemon does:
 * src/daemon/state.ts removeBindDirs).
 */
export function bindDirPrefix(pid: number): string {
  return `.typervisor-${pid}-`;
}

/** The pid in the name of a directory bindDirPrefix and mkdtemp made, or undefined. */
export function bindDirPid(name: string): number | undefined {
  const m = /^\.typervisor-(\d+)-[A-Za-z0-9]{6}$/.exec(name);
  return m ? Number(m[1]) : undefined;
}

/** sizeof(sockaddr_un.sun_path) - 1. */
const MAX_SOCKET_PATH = 107;

function listenOn(server: Server, path: string): Promise<void> {
  return new Promise<void>((ok, fail) => {
    server.once('error', fail);
    server.listen(path, () => {
      server.off('error', fail);
      ok();
    });
  });
}

/**
 * The fallback: bind in place under umask 0177. node:net binds a Unix socket synchronously inside
 * listen() on the main thread, so the umask is restored before any other JavaScript runs; no
 * other thread creates files while the API server starts.
 */
async function listenUmask(server: Server, target: string): Promise<Stats> {
  const old = process.umask(0o777 & ~API_SOCKET_MODE);
  let listening: Promise<void>;
  try {
    listening = listenOn(server, target);
  } finally {
    process.umask(old);
  }
  await listening;
  return lstatSync(target);
}

function send(res: ServerResponse, out: ApiOutcome, close = false, deprecated = false): void {
  if (res.headersSent || res.destroyed) return;
  const headers: Record<string, string | number> = { Server: 'Typervisor API' };
  if (close) headers.Connection = 'close';
  if (deprecated) headers.Deprecation = 'true';
  if (out.status === 204) {
    res.writeHead(204, headers).end();
    return;
  }
  const body = JSON.stringify(out.status === 200 ? out.body : { fault_message: out.fault });
  res
    .writeHead(out.status, {
      ...headers,
      'Content-Type': 'application/json',
      'Content-Length': Buffer.byteLength(body),
    })
    .end(body);
}

export async function startApiServer<A = VmmAction>(opts: ApiServerOptions<A>): Promise<ApiServer> {
  const routeOf = opts.route ?? (route as unknown as NonNullable<ApiServerOptions<A>['route']>);
  const max = opts.maxPayload ?? DEFAULT_MAX_PAYLOAD;
  const counters = opts.counters;
  await prepareSocketPath(opts.socketPath);
  let queue: Promise<void> = Promise.resolve();

  const tooLarge = (size: number | string): ApiOutcome => ({
    status: 400,
    fault: `Request payload with size ${size} is larger than the limit of ${max} allowed by server.`,
  });

  /** A declared Content-Length, or undefined (none, or not a plain decimal: node refuses those). */
  const declaredLength = (req: IncomingMessage): number | undefined => {
    const v = req.headers['content-length'];
    return v !== undefined && /^\d{1,20}$/.test(v) ? Number(v) : undefined;
  };

  // Connections over MAX_API_CONNECTIONS: answered 503 at once; what they send is ignored.
  const refusedSockets = new WeakSet<Socket>();
  let open = 0;
  // Set once the server listens (the timer it replaces starts then).
  let checks: ReturnType<typeof checkConnectionsOnlyWhileOpen> | undefined;

  const onRequest = (req: IncomingMessage, res: ServerResponse) => {
    if (refusedSockets.has(req.socket)) {
      req.resume();
      return;
    }
    counters.inc('api_server', 'requests');
    const method = req.method ?? '';
    const url = req.url ?? '/';
    const declared = declaredLength(req);
    if (declared !== undefined && declared > max) {
      counters.inc('api_server', 'oversized_requests');
      // Keep the connection as micro_http does: node reads and drops the declared body once the
      // answer is sent, then parses the next request. Close it when that body is too large to be
      // worth reading, or the client waits for a 100 Continue that is not coming.
      const expecting = /100-continue/i.test(String(req.headers.expect ?? ''));
      const keep = declared <= OVERSIZED_DRAIN_MAX && !expecting;
      send(res, tooLarge(declared), !keep);
      if (!keep) req.socket.destroySoon();
      return;
    }
    const chunks: Buffer[] = [];
    let size = 0;
    let refused = false;
    req.on('data', (c: Buffer) => {
      if (refused) return;
      size += c.length;
      if (size > max) {
        refused = true;
        chunks.length = 0;
        counters.inc('api_server', 'oversized_requests');
        send(res, tooLarge(`>${max}`), true);
        req.socket.destroySoon();
        return;
      }
      chunks.push(c);
    });
    req.on('error', () => undefined); // aborted by the client: nothing to answer
    req.on('end', () => {
      if (refused) return;
      const body = size > 0 ? Buffer.concat(chunks).toString('utf8') : undefined;
      if (opts.concurrent) void serve(method, url, body, res);
      else queue = queue.then(() => serve(method, url, body, res));
    });
  };

  const serve = async (
    method: string,
    url: string,
    body: string | undefined,
    res: ServerResponse,
  ) => {
    if (res.destroyed) return;
    log('info', requestLine(method, url, body, getLogLevel() === 'debug'), { thread: 'fc_api' });
    const routed = routeOf(method, url, body);
    const [group, name] = routed.metric ?? [];
    if (group && name) counters.inc(group, `${name}_count`);
    let out: ApiOutcome;
    if (routed.action) {
      try {
        out = await opts.handle(routed.action);
      } catch (e) {
        out = { status: 500, fault: `Internal error: ${(e as Error).message}` };
      }
    } else out = { status: 400, fault: routed.fault ?? 'Bad request.' };
    if (out.status >= 400) {
      counters.inc('api_server', out.status >= 500 ? 'internal_errors' : 'bad_requests');
      if (group && name) counters.inc(group, `${name}_fails`);
    }
    // Firecracker's deprecation warning: logged, and a `Deprecation: true` header on the answer.
    const deprecation =
      routed.action && !opts.route
        ? deprecationOf(routed.action as unknown as VmmAction)
        : undefined;
    if (deprecation) {
      log('warn', deprecation);
      counters.inc('deprecated_api', 'deprecated_http_api_calls');
    }
    log(
      out.status >= 400 ? 'error' : 'info',
      outcomeLine(out.status, 'fault' in out ? out.fault : undefined),
      { thread: 'fc_api' },
    );
    send(res, out, false, deprecation !== undefined);
  };

  const server: Server = createServer(
    {
      maxHeaderSize: MAX_HEADER_BYTES,
      headersTimeout: HEADERS_TIMEOUT_MS,
      requestTimeout: REQUEST_TIMEOUT_MS,
      keepAliveTimeout: KEEP_ALIVE_TIMEOUT_MS,
      connectionsCheckingInterval: CONNECTIONS_CHECK_MS,
      // micro_http serves requests without a Host header (node's default answers them 400).
      requireHostHeader: false,
    },
    onRequest,
  );
  server.prependListener('connection', (socket: Socket) => {
    if (open >= MAX_API_CONNECTIONS) {
      refusedSockets.add(socket);
      counters.inc('api_server', 'connections_refused');
      const body = JSON.stringify({
        fault_message: `Too many open connections (at most ${MAX_API_CONNECTIONS}).`,
      });
      socket.on('error', () => undefined);
      socket.end(
        `HTTP/1.1 503 Service Unavailable\r\nServer: Typervisor API\r\nContent-Type: application/json\r\n` +
          `Content-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`,
      );
      // Closed a moment later rather than at once: closing with the client's request unread
      // would reset the connection, and the client could lose the 503 before reading it.
      const t = setTimeout(() => socket.destroy(), REFUSED_LINGER_MS);
      socket.once('close', () => clearTimeout(t));
      return;
    }
    open++;
    checks?.opened();
    socket.once('close', () => {
      open--;
      checks?.closed(open);
    });
  });
  // Expect: 100-continue. The 100 goes out only for a body that will be read (micro_http sends
  // it after the headers of a request with a body within the limit); an oversized request is
  // answered at once, without it.
  server.on('checkContinue', (req: IncomingMessage, res: ServerResponse) => {
    const declared = declaredLength(req);
    if (
      !refusedSockets.has(req.socket) &&
      !(declared !== undefined && declared > max) &&
      req.headers['content-length'] !== '0'
    )
      res.writeContinue();
    onRequest(req, res);
  });
  // Any other Expect value: ignored, as micro_http ignores it (node's default answers 417).
  server.on('checkExpectation', onRequest);
  // An idle socket (no request in progress) is closed after this long.
  server.setTimeout(KEEP_ALIVE_TIMEOUT_MS, (s: Socket) => s.destroy());
  server.on('clientError', (e: NodeJS.ErrnoException, socket: Socket) => {
    counters.inc('api_server', 'malformed_requests');
    if (!socket.writable || e.code === 'ECONNRESET') {
      socket.destroy();
      return;
    }
    const timeout = e.code === 'ERR_HTTP_REQUEST_TIMEOUT';
    const body = JSON.stringify({
      fault_message: timeout
        ? 'Request timed out.'
        : `Malformed HTTP request: ${e.code ?? e.message}.`,
    });
    socket.end(
      `HTTP/1.1 ${timeout ? '408 Request Timeout' : '400 Bad Request'}\r\nServer: Typervisor API\r\nContent-Type: application/json\r\n` +
        `Content-Length: ${Buffer.byteLength(body)}\r\nConnection: close\r\n\r\n${body}`,
    );
    socket.destroySoon();
  });
  const bound = await listenPrivate(server, opts.socketPath);
  checks = checkConnectionsOnlyWhileOpen(server);
  // A connection may have come in between listen and here: its checks start now.
  if (open > 0) checks.opened();
  server.on('error', (e) => log('error', `API server: ${e.message}`));
  return {
    close: () =>
      new Promise<void>((resolve) => {
        server.close(() => resolve());
        server.closeAllConnections();
        try {
          // Only the socket made here: not whatever replaced it since.
          const now = lstatSync(opts.socketPath);
          if (now.ino === bound.ino && now.dev === bound.dev) unlinkSync(opts.socketPath);
        } catch {
          // already gone
        }
      }),
  };
}

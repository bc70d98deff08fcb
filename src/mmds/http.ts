/**
 * The HTTP/1.1 side of the MMDS responder: a request parser over the bytes a TCP connection has
 * received (bounded: a head of at most MAX_HEAD bytes, a body of at most MAX_BODY) and the
 * answer to one request, as Firecracker's MMDS gives it (docs/mmds/mmds-user-guide.md):
 * GET of a JSON pointer path (JSON or IMDS format), PUT /latest/api/token for a V2 session
 * token; V2 needs a valid token on every GET, V1 answers with or without one (counting both).
 */
import { lookup, type MmdsVersion } from './store.js';
import { TOKEN_TTL_MAX, TOKEN_TTL_MIN, type TokenAuthority } from './token.js';

/** Request line and headers together, at most (a longer head is refused: 431, and closed). */
export const MAX_HEAD = 4096;
/** A request body, at most (MMDS requests have none; a PUT may carry a small one). */
export const MAX_BODY = 4096;
export const MAX_HEADERS = 64;

export interface HttpRequest {
  method: string;
  path: string;
  /** Lower-case names; a repeated header keeps its last value. */
  headers: Map<string, string>;
  /** The client asked to close after this answer (Connection: close, or HTTP/1.0). */
  close: boolean;
}

export type Parsed =
  | { kind: 'incomplete' }
  | { kind: 'request'; request: HttpRequest; consumed: number }
  | { kind: 'error'; status: number; message: string };

const CRLFCRLF = Buffer.from('\r\n\r\n');

/** The first request in `buf` (bytes received in order on one connection). */
export function parseRequest(buf: Buffer): Parsed {
  const end = buf.indexOf(CRLFCRLF);
  if (end < 0)
    return buf.length > MAX_HEAD
      ? { kind: 'error', status: 431, message: 'Request header fields too large.' }
      : { kind: 'incomplete' };
  if (end + 4 > MAX_HEAD)
    return { kind: 'error', status: 431, message: 'Request header fields too large.' };
  const lines = buf.subarray(0, end).toString('latin1').split('\r\n');
  const m = /^([A-Z]{1,16}) (\S{1,2048}) HTTP\/1\.([01])$/.exec(lines[0] ?? '');
  if (!m) return { kind: 'error', status: 400, message: 'Invalid request line.' };
  if (lines.length - 1 > MAX_HEADERS)
    return { kind: 'error', status: 431, message: 'Too many request headers.' };
  const headers = new Map<string, string>();
  for (const line of lines.slice(1)) {
    const c = line.indexOf(':');
    if (c <= 0 || !/^[!#$%&'*+.^_`|~0-9A-Za-z-]+$/.test(line.slice(0, c)))
      return { kind: 'error', status: 400, message: 'Invalid header.' };
    headers.set(line.slice(0, c).toLowerCase(), line.slice(c + 1).trim());
  }
  if (headers.has('transfer-encoding'))
    return { kind: 'error', status: 501, message: 'Transfer-Encoding is not supported.' };
  const cl = headers.get('content-length') ?? '0';
  if (!/^\d{1,9}$/.test(cl))
    return { kind: 'error', status: 400, message: 'Invalid Content-Length.' };
  const bodyLen = Number(cl);
  if (bodyLen > MAX_BODY) return { kind: 'error', status: 413, message: 'Payload too large.' };
  if (buf.length < end + 4 + bodyLen) return { kind: 'incomplete' };
  const conn = headers.get('connection')?.toLowerCase();
  return {
    kind: 'request',
    request: {
      method: m[1]!,
      path: m[2]!.split('?')[0]!,
      headers,
      close: conn === 'close' || (m[3] === '0' && conn !== 'keep-alive'),
    },
    consumed: end + 4 + bodyLen,
  };
}

export interface MmdsView {
  version: MmdsVersion;
  imdsCompat: boolean;
  /** The data store's current value. */
  data(): unknown;
  tokens: TokenAuthority;
}

/** What the responder counts per answer (Firecracker's mmds metrics). */
export interface HttpCounts {
  rxNoToken: number;
  rxInvalidToken: number;
}

const REASONS: Record<number, string> = {
  200: 'OK',
  400: 'Bad Request',
  401: 'Unauthorized',
  404: 'Not Found',
  405: 'Method Not Allowed',
  413: 'Payload Too Large',
  431: 'Request Header Fields Too Large',
  501: 'Not Implemented',
};

export function response(
  status: number,
  body: string,
  opts: { json?: boolean; close?: boolean; extra?: string } = {},
): Buffer {
  const b = Buffer.from(body);
  const head =
    `HTTP/1.1 ${status} ${REASONS[status] ?? 'Error'}\r\n` +
    `Server: Typervisor MMDS\r\n` +
    `Content-Type: ${opts.json ? 'application/json' : 'text/plain'}\r\n` +
    `Content-Length: ${b.length}\r\n` +
    (opts.close ? 'Connection: close\r\n' : '') +
    (opts.extra ?? '') +
    '\r\n';
  return Buffer.concat([Buffer.from(head, 'latin1'), b]);
}

const TOKEN_PATH = '/latest/api/token';

/** The answer to one request (status and body; the caller frames it). */
export function answer(
  r: HttpRequest,
  mmds: MmdsView,
  counts: HttpCounts,
): { status: number; body: string; json?: boolean; extra?: string } {
  const h = r.headers;
  if (r.method === 'PUT') {
    if (r.path !== TOKEN_PATH) return { status: 404, body: `Resource not found: ${r.path}.` };
    if (h.has('x-forwarded-for'))
      return {
        status: 400,
        body: 'Invalid header. Reason: Unsupported header name. Key: X-Forwarded-For',
      };
    const ttl =
      h.get('x-metadata-token-ttl-seconds') ?? h.get('x-aws-ec2-metadata-token-ttl-seconds');
    if (ttl === undefined)
      return {
        status: 400,
        body: "Token time to live value not found. Use `X-metadata-token-ttl-seconds` header to specify the token's lifetime.",
      };
    const secs = /^\d{1,6}$/.test(ttl) ? Number(ttl) : NaN;
    if (!(secs >= TOKEN_TTL_MIN && secs <= TOKEN_TTL_MAX))
      return {
        status: 400,
        body: `Invalid time to live value provided for token: ${ttl.slice(0, 32)}. Please provide a value between ${TOKEN_TTL_MIN} and ${TOKEN_TTL_MAX}.`,
      };
    return { status: 200, body: mmds.tokens.issue(secs) };
  }
  if (r.method !== 'GET')
    return { status: 405, body: 'Not allowed HTTP method.', extra: 'Allow: GET, PUT\r\n' };
  const token = h.get('x-metadata-token') ?? h.get('x-aws-ec2-metadata-token');
  if (token === undefined) {
    counts.rxNoToken++;
    if (mmds.version === 'V2')
      return {
        status: 401,
        body: 'No MMDS token provided. Use `X-metadata-token` header to specify the session token.',
      };
  } else if (!mmds.tokens.valid(token)) {
    counts.rxInvalidToken++;
    if (mmds.version === 'V2') return { status: 401, body: 'MMDS token not valid.' };
  }
  const json =
    !mmds.imdsCompat && (h.get('accept') ?? '').toLowerCase().includes('application/json');
  const found = lookup(mmds.data(), decodePath(r.path), json);
  if (!found.ok) return { status: found.status, body: found.error };
  return { status: 200, body: found.body, json: found.json };
}

function decodePath(p: string): string {
  try {
    return decodeURIComponent(p);
  } catch {
    return p;
  }
}

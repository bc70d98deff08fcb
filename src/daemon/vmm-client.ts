/**
 * A small HTTP/1.1 client for one VMM's Firecracker-compatible API socket: one request per
 * connection (no pooled sockets, so nothing stays open between calls: the daemon holds no
 * descriptor for a VM it is not talking to), a bounded answer and a deadline.
 */
import { request } from 'node:http';
import { connect } from 'node:net';

/** The largest answer read from a VMM (GET /vm/config of a big VM is a few KiB). */
export const MAX_ANSWER_BYTES = 256 * 1024;
export const CALL_TIMEOUT_MS = 10_000;

export interface VmmAnswer {
  status: number;
  body: string;
}

/** The fault_message of an error answer, or its body. */
export function faultOf(a: VmmAnswer): string {
  try {
    const j = JSON.parse(a.body) as { fault_message?: unknown };
    if (typeof j.fault_message === 'string') return j.fault_message;
  } catch {
    // not JSON
  }
  return a.body.slice(0, 500) || `HTTP ${a.status}`;
}

export function callVmm(
  socketPath: string,
  method: string,
  path: string,
  body?: unknown,
  timeoutMs = CALL_TIMEOUT_MS,
): Promise<VmmAnswer> {
  const data = body === undefined ? undefined : JSON.stringify(body);
  return new Promise((resolve, reject) => {
    const req = request(
      {
        socketPath,
        method,
        path,
        agent: false,
        headers:
          data === undefined
            ? { Connection: 'close' }
            : {
                Connection: 'close',
                'Content-Type': 'application/json',
                'Content-Length': Buffer.byteLength(data),
              },
      },
      (res) => {
        const chunks: Buffer[] = [];
        let size = 0;
        res.on('data', (c: Buffer) => {
          size += c.length;
          if (size > MAX_ANSWER_BYTES) {
            req.destroy(new Error(`answer from ${socketPath} larger than ${MAX_ANSWER_BYTES}`));
            return;
          }
          chunks.push(c);
        });
        res.on('end', () =>
          resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks).toString('utf8') }),
        );
        res.on('error', reject);
      },
    );
    req.setTimeout(timeoutMs, () =>
      req.destroy(new Error(`no answer from ${socketPath} within ${timeoutMs} ms`)),
    );
    req.on('error', reject);
    req.end(data);
  });
}

/** Whether something accepts connections on `path` now. */
export function canConnect(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect(path);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => {
      s.destroy();
      resolve(false);
    });
  });
}

/** Request targets sent as they are: printable ASCII, no space (what a request line allows). */
const SAFE_TARGET = /^\/[\x21-\x7e]*$/;

/**
 * Several requests on one connection, written at once (HTTP/1.1 pipelining), their answers read
 * in order: one round trip for all of them instead of a connection and a round trip each. The
 * VMM's server (src/api/server.ts) serves a connection's requests one after another, in order,
 * so the answers are what sequential calls would get. Use it only for requests that do not
 * depend on each other's success (a failed pre-boot PUT changes nothing; the caller checks
 * every answer before it sends InstanceStart). Answers must carry a Content-Length (the VMM's
 * always do) or be 204/304; at most MAX_ANSWER_BYTES each; all within `timeoutMs`.
 */
export function callVmmPipelined(
  socketPath: string,
  calls: ReadonlyArray<readonly [string, string, unknown]>,
  timeoutMs = CALL_TIMEOUT_MS,
): Promise<VmmAnswer[]> {
  const parts: Buffer[] = [];
  for (const [method, path, body] of calls) {
    if (!/^[A-Z]+$/.test(method) || !SAFE_TARGET.test(path))
      return Promise.reject(new Error(`not a request line: ${method} ${path.slice(0, 80)}`));
    const data = body === undefined ? '' : JSON.stringify(body);
    parts.push(
      Buffer.from(
        `${method} ${path} HTTP/1.1\r\nHost: localhost\r\n` +
          (body === undefined
            ? '\r\n'
            : `Content-Type: application/json\r\nContent-Length: ${Buffer.byteLength(data)}\r\n\r\n${data}`),
      ),
    );
  }
  return new Promise((resolve, reject) => {
    const answers: VmmAnswer[] = [];
    let buf: Buffer = Buffer.alloc(0);
    const s = connect(socketPath);
    const fail = (e: Error) => {
      s.destroy();
      reject(e);
    };
    s.setTimeout(timeoutMs, () =>
      fail(new Error(`no answer from ${socketPath} within ${timeoutMs} ms`)),
    );
    s.on('error', fail);
    s.once('connect', () => s.write(Buffer.concat(parts)));
    s.on('close', () => {
      if (answers.length < calls.length)
        reject(new Error(`${socketPath} closed the connection after ${answers.length} answers`));
    });
    s.on('data', (c: Buffer) => {
      buf = buf.length === 0 ? c : Buffer.concat([buf, c]);
      for (;;) {
        const end = buf.indexOf('\r\n\r\n');
        if (end < 0) {
          if (buf.length > MAX_ANSWER_BYTES)
            fail(new Error(`answer headers from ${socketPath} too large`));
          return;
        }
        const head = buf.subarray(0, end).toString('latin1').split('\r\n');
        const status = /^HTTP\/1\.[01] (\d{3})/.exec(head[0] ?? '');
        if (!status) return fail(new Error(`not an HTTP answer from ${socketPath}`));
        const code = Number(status[1]);
        const lengthLine = head.find((h) => /^content-length:/i.test(h));
        const length =
          code === 204 || code === 304 ? 0 : lengthLine ? Number(lengthLine.slice(15).trim()) : NaN;
        if (!Number.isSafeInteger(length) || length < 0 || length > MAX_ANSWER_BYTES)
          return fail(new Error(`an answer from ${socketPath} without a usable Content-Length`));
        if (buf.length < end + 4 + length) return;
        answers.push({
          status: code,
          body: buf.subarray(end + 4, end + 4 + length).toString('utf8'),
        });
        buf = buf.subarray(end + 4 + length);
        if (answers.length === calls.length) {
          s.destroy();
          return resolve(answers);
        }
      }
    });
  });
}

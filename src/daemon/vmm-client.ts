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

/**
 * Helpers for the API tests: run `node bin/typervisor --api-sock ...` as a child process, wait
 * for its socket, and talk HTTP/1.1 to it over the Unix socket (node:http, or raw bytes).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { request, type IncomingHttpHeaders } from 'node:http';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { CLI, TIME_SCALE } from '../host/helpers.js';

export { CLI, REPO } from '../host/helpers.js';

export interface Reply {
  status: number;
  body: string;
  json: any; // eslint-disable-line @typescript-eslint/no-explicit-any
  /** The response headers (lower-case names). */
  headers: IncomingHttpHeaders;
}

export interface ServerProcess {
  child: ChildProcess;
  sock: string;
  dir: string;
  stderr: () => string;
  stdout: () => string;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  kill(): Promise<void>;
}

export function tempDir(): string {
  const d = mkdtempSync(join(tmpdir(), 'typervisor-api-'));
  process.on('exit', () => rmSync(d, { recursive: true, force: true }));
  return d;
}

/** Starts the server; resolves once its socket exists. */
export async function startServer(extra: string[] = [], dir = tempDir()): Promise<ServerProcess> {
  const sock = join(dir, 'api.sock');
  const child = spawn(process.execPath, [CLI, '--api-sock', sock, ...extra], {
    stdio: ['ignore', 'pipe', 'pipe'],
    cwd: dir, // relative paths in requests land in the temp dir
    env: { ...process.env, TYPERVISOR_LOG: undefined },
  });
  let err = '';
  let out = '';
  child.stderr!.setEncoding('utf8').on('data', (s: string) => (err += s));
  child.stdout!.setEncoding('utf8').on('data', (s: string) => (out += s));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((r) =>
    child.on('exit', (code, signal) => r({ code, signal })),
  );
  // 30 s: a config file's restore took over 10 s in the lab's emulation (host tests run there
  // on hosts without KVM); a fast host is done in well under a second.
  const deadline = Date.now() + 30_000;
  // Wait until it accepts connections (a stale socket file may exist before it listens).
  while (!(existsSync(sock) && (await canConnect(sock)))) {
    if (child.exitCode !== null) throw new Error(`server exited early: ${err}`);
    if (Date.now() > deadline) throw new Error(`no socket after 30 s: ${err}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  return {
    child,
    sock,
    dir,
    stderr: () => err,
    stdout: () => out,
    exited,
    async kill() {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
      await exited;
    },
  };
}

function canConnect(sock: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect(sock);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

/**
 * One HTTP request over the socket (a fresh connection each time). The default wait, 5 s, is
 * multiplied by TYPERVISOR_TEST_TIME_SCALE (test/host/helpers.ts): in CI of 2026-12-07 the
 * lab's first API process after its boot had not answered its first request within 5 s.
 */
export function call(
  sock: string,
  method: string,
  path: string,
  body?: unknown,
  timeoutMs = 5000 * TIME_SCALE,
): Promise<Reply> {
  const data =
    body === undefined ? undefined : typeof body === 'string' ? body : JSON.stringify(body);
  return new Promise((resolve, reject) => {
    const req = request(
      {
        socketPath: sock,
        method,
        path,
        headers:
          data === undefined
            ? {}
            : { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(data) },
        timeout: timeoutMs,
        agent: false,
      },
      (res) => {
        let text = '';
        res.setEncoding('utf8').on('data', (c: string) => (text += c));
        res.on('end', () => {
          let json: unknown;
          try {
            json = text ? JSON.parse(text) : undefined;
          } catch {
            json = undefined;
          }
          resolve({ status: res.statusCode ?? 0, body: text, json, headers: res.headers });
        });
      },
    );
    req.on('timeout', () =>
      req.destroy(new Error(`${method} ${path}: no answer in ${timeoutMs} ms`)),
    );
    req.on('error', reject);
    if (data !== undefined) req.write(data);
    req.end();
  });
}

/** Raw bytes in, everything the server sends until it closes (or timeoutMs) out. */
export function raw(
  sock: string,
  chunks: Array<string | Buffer>,
  opts: { endAfter?: boolean; timeoutMs?: number } = {},
): Promise<{ text: string; closed: boolean }> {
  return new Promise((resolve) => {
    const s = connect(sock);
    let text = '';
    let done = false;
    const finish = (closed: boolean) => {
      if (done) return;
      done = true;
      clearTimeout(t);
      s.destroy();
      resolve({ text, closed });
    };
    const t = setTimeout(() => finish(false), opts.timeoutMs ?? 3000);
    s.on('data', (d) => (text += d.toString('utf8')));
    s.on('close', () => finish(true));
    s.on('error', () => finish(true));
    s.on('connect', () => {
      for (const c of chunks) s.write(c);
      if (opts.endAfter) s.end();
    });
  });
}

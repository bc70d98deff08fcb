/**
 * The API socket's creation: mode 0600 whatever the umask, nothing but a stale socket replaced,
 * and close() removing only the socket it made.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  existsSync,
  linkSync,
  lstatSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  symlinkSync,
  unlinkSync,
  writeFileSync,
} from 'node:fs';
import { connect, createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Counters } from './metrics.js';
import { API_SOCKET_MODE, checkConnectionsOnlyWhileOpen, startApiServer } from './server.js';
import { createServer as createHttpServer, request } from 'node:http';

const handle = async () => ({ status: 204 }) as const;

function status(socketPath: string): Promise<number> {
  return new Promise((ok, fail) => {
    const r = request({ socketPath, path: '/', method: 'GET' }, (res) => {
      res.resume();
      ok(res.statusCode ?? 0);
    });
    r.on('error', fail);
    r.end();
  });
}

function withUmask<T>(mask: number, f: () => Promise<T>): Promise<T> {
  const old = process.umask(mask);
  return f().finally(() => process.umask(old));
}

test('the API socket is 0600 even with umask 0, and it answers', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'tv-api-'));
  try {
    const sock = join(dir, 'api.sock');
    const server = await withUmask(0, () =>
      startApiServer({ socketPath: sock, counters: new Counters(), handle }),
    );
    try {
      const st = lstatSync(sock);
      assert.ok(st.isSocket());
      assert.equal(st.mode & 0o777, API_SOCKET_MODE);
      assert.equal(await status(sock), 204); // served through the linked name
      assert.deepEqual(readdirSync(dir), ['api.sock'], 'no temporary entry left behind');
    } finally {
      await server.close();
    }
    assert.equal(existsSync(sock), false);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('a file, or a symlink to a stale socket, at the socket path is refused and kept', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'tv-api-'));
  try {
    const file = join(dir, 'file');
    writeFileSync(file, 'precious');
    await assert.rejects(
      startApiServer({ socketPath: file, counters: new Counters(), handle }),
      /exists and is not a socket/,
    );
    assert.equal(readFileSync(file, 'utf8'), 'precious');

    // A stale socket elsewhere, and a symlink to it at the API path: neither is removed.
    const stale = join(dir, 'stale.sock');
    const s = createServer();
    await new Promise<void>((ok) => s.listen(stale, ok));
    // Closing would unlink it (libuv does): keep the stale inode by hard-linking it first.
    const keep = join(dir, 'stale2.sock');
    linkSync(stale, keep);
    await new Promise<void>((ok) => s.close(() => ok()));
    const link = join(dir, 'api.sock');
    symlinkSync(keep, link);
    await assert.rejects(
      startApiServer({ socketPath: link, counters: new Counters(), handle }),
      /exists and is not a socket/,
    );
    assert.ok(lstatSync(link).isSymbolicLink());
    assert.ok(lstatSync(keep).isSocket());
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('close() leaves alone whatever replaced the socket', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'tv-api-'));
  try {
    const sock = join(dir, 'api.sock');
    const server = await startApiServer({ socketPath: sock, counters: new Counters(), handle });
    unlinkSync(sock);
    writeFileSync(sock, 'someone else');
    await server.close();
    assert.equal(readFileSync(sock, 'utf8'), 'someone else');
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('a stale socket at the path is replaced by the new 0600 socket', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'tv-api-'));
  try {
    const sock = join(dir, 'api.sock');
    const s = createServer();
    await new Promise<void>((ok) => s.listen(join(dir, 'old.sock'), ok));
    linkSync(join(dir, 'old.sock'), sock); // survives the close: a socket nobody listens on
    await new Promise<void>((ok) => s.close(() => ok()));
    const server = await startApiServer({ socketPath: sock, counters: new Counters(), handle });
    try {
      assert.equal(lstatSync(sock).mode & 0o777, API_SOCKET_MODE);
      assert.equal(await status(sock), 204);
    } finally {
      await server.close();
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('a socket path too long for the private directory: bound in place, still 0600', async () => {
  const base = mkdtempSync(join(tmpdir(), 'tv-api-'));
  try {
    // The socket's path is 102 bytes; the temporary one beside it would not fit in sun_path.
    const dir = join(base, 'd'.repeat(100 - base.length - 1));
    mkdirSync(dir);
    const sock = join(dir, 'a');
    assert.equal(Buffer.byteLength(sock), 102);
    const server = await withUmask(0, async () => {
      const sv = await startApiServer({ socketPath: sock, counters: new Counters(), handle });
      assert.equal(process.umask(), 0, 'the umask is given back');
      return sv;
    });
    try {
      assert.equal(lstatSync(sock).mode & 0o777, API_SOCKET_MODE);
      assert.equal(await status(sock), 204);
      assert.deepEqual(readdirSync(dir), ['a']);
    } finally {
      await server.close();
    }
  } finally {
    rmSync(base, { recursive: true, force: true });
  }
});

test(
  'the header/request timeout check runs only while a connection is open, and still cuts a slow client',
  { timeout: 10_000 },
  async () => {
    const dir = mkdtempSync(join(tmpdir(), 'tv-check-'));
    const sock = join(dir, 's');
    const server = createHttpServer(
      { headersTimeout: 300, requestTimeout: 300, connectionsCheckingInterval: 500 },
      (_q, r) => r.end('{}'),
    );
    await new Promise<void>((r) => server.listen(sock, r));
    const key = Object.getOwnPropertySymbols(server).find(
      (k) => k.description === 'http.server.connectionsCheckingInterval',
    )!;
    const timer = () => (server as unknown as Record<symbol, unknown>)[key];
    try {
      assert.ok(key, "node 20 keeps its check's timer under this symbol");
      assert.ok(timer(), 'node started its check at listen');
      let open = 0;
      const checks = checkConnectionsOnlyWhileOpen(server);
      assert.equal(timer(), undefined, 'no check while no connection is open');
      server.on('connection', (s) => {
        open++;
        checks.opened();
        s.once('close', () => checks.closed(--open));
      });
      // A client that sends part of its headers and then nothing: node's check cuts it (408).
      const started = Date.now();
      const got = await new Promise<string>((resolve, reject) => {
        const c = connect(sock, () => c.write('GET / HTTP/1.1\r\nHost: x\r\n'));
        let out = '';
        c.on('data', (d) => (out += d.toString()));
        c.on('close', () => resolve(out));
        c.on('error', reject);
        setTimeout(() => {
          assert.ok(timer(), 'the check runs while the connection is open');
        }, 100);
      });
      assert.match(got, /^HTTP\/1\.1 408/);
      assert.ok(Date.now() - started < 3_000, `cut after ${Date.now() - started} ms`);
      await new Promise((r) => setTimeout(r, 50));
      assert.equal(open, 0);
      assert.equal(timer(), undefined, 'the check stopped with the last connection');
    } finally {
      server.close();
      rmSync(dir, { recursive: true, force: true });
    }
  },
);

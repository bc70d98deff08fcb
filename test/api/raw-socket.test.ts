/**
 * The API's wire behaviour as raw clients (socat, nc, hand-written scripts) see it, with a raw
 * `net.connect` client against the real CLI (a child process; no KVM needed): requests without
 * a Host header, pipelined requests, `Expect: 100-continue`, an oversized body followed by a
 * good request on the same connection, HTTP/1.0 and `Connection: close`. Firecracker's
 * micro_http serves all of these; node's defaults would refuse some.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { connect, type Socket } from 'node:net';
import { MAX_API_CONNECTIONS } from '../../src/api/server.js';
import { call, startServer, type ServerProcess } from './client.js';

const T = { timeout: 20_000 };

interface Response {
  status: number;
  headers: Record<string, string>;
  body: string;
}

/** Splits what the server sent into whole responses (every one has a length: 100, 204, or Content-Length). */
function parseResponses(text: string): { responses: Response[]; rest: string } {
  const responses: Response[] = [];
  let at = 0;
  for (;;) {
    const end = text.indexOf('\r\n\r\n', at);
    if (end < 0) break;
    const [statusLine, ...lines] = text.slice(at, end).split('\r\n');
    const m = /^HTTP\/1\.1 (\d{3}) /.exec(statusLine!);
    assert.ok(m, `not a status line: ${JSON.stringify(statusLine)}`);
    const headers: Record<string, string> = {};
    for (const l of lines) {
      const i = l.indexOf(':');
      headers[l.slice(0, i).trim().toLowerCase()] = l.slice(i + 1).trim();
    }
    const len = Number(headers['content-length'] ?? 0);
    if (text.length < end + 4 + len) break;
    responses.push({ status: Number(m[1]), headers, body: text.slice(end + 4, end + 4 + len) });
    at = end + 4 + len;
  }
  return { responses, rest: text.slice(at) };
}

/** One raw connection: write bytes, wait for whole responses, see whether the server closed. */
class Raw {
  private text = '';
  closed = false;
  private readonly sock: Socket;
  private wake: () => void = () => undefined;
  private constructor(sock: Socket) {
    this.sock = sock;
    sock.on('data', (d) => {
      this.text += d.toString('latin1');
      this.wake();
    });
    sock.on('close', () => {
      this.closed = true;
      this.wake();
    });
    sock.on('error', () => undefined);
  }
  static open(path: string): Promise<Raw> {
    return new Promise((resolve, reject) => {
      const s = connect(path);
      s.once('connect', () => resolve(new Raw(s)));
      s.once('error', reject);
    });
  }
  write(data: string): void {
    this.sock.write(data, 'latin1');
  }
  /** Waits until `n` whole responses have arrived (or the server closed, or timeoutMs). */
  async responses(n: number, timeoutMs = 5000): Promise<Response[]> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const { responses } = parseResponses(this.text);
      if (responses.length >= n || this.closed || Date.now() > deadline) {
        assert.equal(responses.length, n, `expected ${n} responses, got: ${this.text}`);
        return responses;
      }
      await new Promise<void>((r) => {
        const t = setTimeout(r, Math.max(1, deadline - Date.now()));
        this.wake = () => {
          clearTimeout(t);
          r();
        };
      });
    }
  }
  /** Waits for the server to close the connection (false if it is still open at timeoutMs). */
  async waitClosed(timeoutMs = 3000): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    while (!this.closed && Date.now() < deadline) await new Promise((r) => setTimeout(r, 10));
    return this.closed;
  }
  raw(): string {
    return this.text;
  }
  destroy(): void {
    this.sock.destroy();
  }
}

const put = (path: string, body: string, extra = '') =>
  `PUT ${path} HTTP/1.1\r\nContent-Type: application/json\r\n${extra}Content-Length: ${Buffer.byteLength(body)}\r\n\r\n${body}`;
const get = (path: string, extra = '') => `GET ${path} HTTP/1.1\r\n${extra}\r\n`;

describe('API wire behaviour with a raw socket client', () => {
  let srv: ServerProcess;
  before(async () => {
    srv = await startServer();
  });
  after(async () => {
    await srv.kill();
  });
  const machine = async () => (await call(srv.sock, 'GET', '/machine-config')).json;

  test('requests without a Host header are served', T, async () => {
    const c = await Raw.open(srv.sock);
    c.write('GET / HTTP/1.1\r\n\r\n');
    const [r] = await c.responses(1);
    assert.equal(r!.status, 200);
    assert.equal(JSON.parse(r!.body).state, 'Not started');
    c.write(put('/machine-config', '{"vcpu_count": 2, "mem_size_mib": 256}'));
    const [, p] = await c.responses(2);
    assert.equal(p!.status, 204);
    assert.equal(c.closed, false, 'the connection stays open');
    c.destroy();
    assert.equal((await machine()).mem_size_mib, 256);
  });

  test('two and three pipelined requests in one write are answered in order', T, async () => {
    const c = await Raw.open(srv.sock);
    c.write(get('/version') + get('/'));
    const two = await c.responses(2);
    assert.deepEqual(
      two.map((r) => r.status),
      [200, 200],
    );
    assert.ok('firecracker_version' in JSON.parse(two[0]!.body));
    assert.equal(JSON.parse(two[1]!.body).id, 'anonymous-instance');
    // Three, where the third reads what the second wrote: handled in order, not just answered.
    c.write(
      put('/machine-config', '{"vcpu_count": 3, "mem_size_mib": 192}') +
        get('/machine-config') +
        put('/machine-config', '{"vcpu_count": 0, "mem_size_mib": 64}'),
    );
    const all = await c.responses(5);
    assert.deepEqual(
      all.slice(2).map((r) => r.status),
      [204, 200, 400],
    );
    const seen = JSON.parse(all[3]!.body);
    assert.equal(seen.vcpu_count, 3);
    assert.equal(seen.mem_size_mib, 192);
    assert.match(JSON.parse(all[4]!.body).fault_message, /vcpu/i);
    assert.equal(c.closed, false);
    c.destroy();
  });

  test('Expect: 100-continue: 100 first, the body after it, then the answer', T, async () => {
    const c = await Raw.open(srv.sock);
    const body = '{"vcpu_count": 1, "mem_size_mib": 96}';
    c.write(
      `PUT /machine-config HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: ${body.length}\r\n\r\n`,
    );
    const [cont] = await c.responses(1);
    assert.equal(cont!.status, 100);
    // Nothing else until the body is sent.
    await new Promise((r) => setTimeout(r, 200));
    assert.equal(parseResponses(c.raw()).responses.length, 1, c.raw());
    c.write(body);
    const [, done] = await c.responses(2);
    assert.equal(done!.status, 204);
    c.write(get('/machine-config'));
    const [, , m] = await c.responses(3);
    assert.equal(JSON.parse(m!.body).mem_size_mib, 96);
    c.destroy();

    // Oversized with Expect: refused at once, no 100; the body may never come, so it closes.
    const o = await Raw.open(srv.sock);
    o.write(
      'PUT /machine-config HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 51201\r\n\r\n',
    );
    const [refused] = await o.responses(1);
    assert.equal(refused!.status, 400);
    assert.match(JSON.parse(refused!.body).fault_message, /size 51201 is larger than the limit/);
    assert.equal(await o.waitClosed(), true);

    // Another Expect value is ignored (as micro_http does), not answered 417.
    const x = await Raw.open(srv.sock);
    x.write(get('/version', 'Expect: 102-processing\r\n'));
    const [v] = await x.responses(1);
    assert.equal(v!.status, 200);
    x.destroy();
  });

  test(
    'an oversized body is answered 400 and the connection serves the next request',
    T,
    async () => {
      const before = await machine();
      const c = await Raw.open(srv.sock);
      // A valid machine-config padded past the limit: applied, it would change the VM.
      const big = '{"vcpu_count": 2, "mem_size_mib": 512}'.padEnd(51_201, ' ');
      c.write(put('/machine-config', big));
      const [r] = await c.responses(1);
      assert.equal(r!.status, 400);
      assert.equal(
        JSON.parse(r!.body).fault_message,
        'Request payload with size 51201 is larger than the limit of 51200 allowed by server.',
      );
      assert.notEqual(r!.headers.connection, 'close');
      c.write(get('/version'));
      const [, ok] = await c.responses(2);
      assert.equal(ok!.status, 200);
      // The refused body and a good request in one write: the body is skipped, the request served.
      c.write(put('/machine-config', big) + get('/'));
      const [, , r2, ok2] = await c.responses(4);
      assert.equal(r2!.status, 400);
      assert.equal(ok2!.status, 200);
      assert.equal(JSON.parse(ok2!.body).state, 'Not started');
      // Between two pipelined requests: the 400 (answered at once) still comes in its place.
      c.write(get('/version') + put('/machine-config', big) + get('/machine-config'));
      const seq = (await c.responses(7)).slice(4);
      assert.deepEqual(
        seq.map((r) => r.status),
        [200, 400, 200],
      );
      assert.ok('firecracker_version' in JSON.parse(seq[0]!.body));
      assert.ok('vcpu_count' in JSON.parse(seq[2]!.body));
      assert.equal(c.closed, false);
      c.destroy();
      assert.deepEqual(await machine(), before, 'a refused body changes nothing');

      // A body too large to be worth skipping: answered, then the connection is closed.
      const h = await Raw.open(srv.sock);
      h.write('PUT /machine-config HTTP/1.1\r\nContent-Length: 1073741824\r\n\r\n{"a":');
      assert.equal(await h.waitClosed(), true);
      if (h.raw()) assert.match(h.raw(), /^HTTP\/1\.1 400 /);
    },
  );

  test(
    'connections beyond the cap are answered 503 and closed; a freed slot serves again',
    T,
    async () => {
      const conns: Raw[] = [];
      for (let i = 0; i < MAX_API_CONNECTIONS; i++) conns.push(await Raw.open(srv.sock));
      // Each is served (so the server has counted them all).
      for (const c of conns) c.write(get('/version'));
      for (const c of conns) assert.equal((await c.responses(1))[0]!.status, 200);
      const extra = await Raw.open(srv.sock);
      extra.write(put('/machine-config', '{"vcpu_count": 2, "mem_size_mib": 64}'));
      const [full] = await extra.responses(1);
      assert.equal(full!.status, 503);
      assert.match(JSON.parse(full!.body).fault_message, /Too many open connections/);
      assert.equal(await extra.waitClosed(), true);
      // One closed by its client: its slot serves a new connection.
      conns.pop()!.destroy();
      await new Promise((r) => setTimeout(r, 100));
      const again = await Raw.open(srv.sock);
      again.write(get('/machine-config'));
      const [m] = await again.responses(1);
      assert.equal(m!.status, 200);
      assert.notEqual(JSON.parse(m!.body).mem_size_mib, 64, 'a refused connection changed the VM');
      again.destroy();
      for (const c of conns) c.destroy();
      // Wait until the server has seen them go (the next test needs a slot).
      for (let i = 0; i < 100; i++) {
        const r = await call(srv.sock, 'GET', '/').catch(() => ({ status: 0 }));
        if (r.status === 200) break;
        await new Promise((res) => setTimeout(res, 20));
      }
    },
  );

  test('HTTP/1.0 and Connection: close are served, then the connection closes', T, async () => {
    const a = await Raw.open(srv.sock);
    a.write('GET / HTTP/1.0\r\n\r\n');
    const [r] = await a.responses(1);
    assert.equal(r!.status, 200);
    assert.equal(JSON.parse(r!.body).app_name, 'Typervisor');
    assert.equal(await a.waitClosed(), true);

    const b = await Raw.open(srv.sock);
    const body = '{"vcpu_count": 1, "mem_size_mib": 128}';
    b.write(`PUT /machine-config HTTP/1.0\r\nContent-Length: ${body.length}\r\n\r\n${body}`);
    const [p] = await b.responses(1);
    assert.equal(p!.status, 204);
    assert.equal(await b.waitClosed(), true);

    const c = await Raw.open(srv.sock);
    c.write(get('/version', 'Connection: close\r\n'));
    const [v] = await c.responses(1);
    assert.equal(v!.status, 200);
    assert.equal(v!.headers.connection, 'close');
    assert.equal(await c.waitClosed(), true);
    assert.equal((await machine()).mem_size_mib, 128);
  });
});

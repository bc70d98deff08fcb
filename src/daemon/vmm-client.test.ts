/**
 * callVmmPipelined against the VMM's own API server (src/api/server.ts) and against peers that
 * misbehave: answers in order, the server serving one request after another; refusals.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { createServer, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { MetricsSystem } from '../api/metrics.js';
import { startApiServer } from '../api/server.js';
import type { VmmAction } from '../api/routes.js';
import { callVmmPipelined } from './vmm-client.js';

test('pipelined: every answer, in order, each request served after the one before', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'typervisor-pipe-'));
  const sock = join(dir, 's');
  const seen: string[] = [];
  let busy = false;
  const server = await startApiServer({
    socketPath: sock,
    counters: new MetricsSystem('t').counters,
    handle: async (a: VmmAction) => {
      assert.equal(busy, false, 'two requests served at once');
      busy = true;
      await new Promise((r) => setTimeout(r, 5));
      busy = false;
      seen.push(a.kind);
      if (a.kind === 'PutBootSource') return { status: 400, fault: 'no such kernel' };
      return { status: 204 };
    },
  });
  try {
    const answers = await callVmmPipelined(sock, [
      ['PUT', '/machine-config', { vcpu_count: 1, mem_size_mib: 64 }],
      ['PUT', '/boot-source', { kernel_image_path: '/nowhere' }],
      ['GET', '/', undefined],
      ['PUT', '/drives/root', { drive_id: 'root', path_on_host: '/r', is_root_device: true }],
    ]);
    assert.deepEqual(
      answers.map((a) => a.status),
      [204, 400, 204, 204],
    );
    assert.match(answers[1]!.body, /no such kernel/);
    assert.deepEqual(seen, ['PutMachineConfig', 'PutBootSource', 'GetInstanceInfo', 'PutDrive']);
    await assert.rejects(
      callVmmPipelined(sock, [['PUT', '/drives/a b', {}]]),
      /not a request line/,
    );
    await assert.rejects(
      callVmmPipelined(sock, [['PUT', '/x\r\nX-Evil: 1', {}]]),
      /not a request line/,
    );
  } finally {
    await server.close();
    rmSync(dir, { recursive: true, force: true });
  }
});

test('pipelined: a peer that does not answer, answers without a length, or hangs up', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'typervisor-pipe-'));
  let reply: (s: Socket) => void = () => undefined;
  const raw = createServer((s) => {
    s.on('error', () => undefined);
    s.once('data', () => reply(s));
  });
  const sock = join(dir, 'raw');
  await new Promise<void>((r) => raw.listen(sock, r));
  try {
    await assert.rejects(
      callVmmPipelined(sock, [['GET', '/', undefined]], 200),
      /no answer .* within 200 ms/,
    );
    reply = (s) => s.write('HTTP/1.1 200 OK\r\nConnection: keep-alive\r\n\r\n{}');
    await assert.rejects(
      callVmmPipelined(sock, [['GET', '/', undefined]], 2000),
      /without a usable Content-Length/,
    );
    reply = (s) => s.end('HTTP/1.1 204 No Content\r\n\r\n');
    await assert.rejects(
      callVmmPipelined(
        sock,
        [
          ['GET', '/', undefined],
          ['GET', '/', undefined],
        ],
        2000,
      ),
      /closed the connection after 1 answers/,
    );
    reply = (s) => s.write('nonsense\r\n\r\n');
    await assert.rejects(callVmmPipelined(sock, [['GET', '/', undefined]], 2000), /not an HTTP/);
  } finally {
    raw.close();
    rmSync(dir, { recursive: true, force: true });
  }
});

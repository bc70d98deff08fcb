/**
 * Property test: random JSON (seeded PRNG, reproducible) at every endpoint of a live server.
 * Every request must be answered with 2xx or 4xx, never 5xx, and the server must stay up.
 * Set TYPERVISOR_FUZZ_SEED to replay a run.
 */
import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { call, startServer, type ServerProcess } from './client.js';

const SEED = Number(process.env.TYPERVISOR_FUZZ_SEED ?? Date.now() % 1_000_000);
const REQUESTS = 3000;

/** mulberry32: small, fast, good enough to drive a fuzzer. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const FIELDS = [
  'vcpu_count',
  'mem_size_mib',
  'smt',
  'kernel_image_path',
  'boot_args',
  'initrd_path',
  'drive_id',
  'is_root_device',
  'path_on_host',
  'is_read_only',
  'iface_id',
  'host_dev_name',
  'guest_mac',
  'mtu',
  'guest_cid',
  'uds_path',
  'backend',
  'rate_limiter',
  'bandwidth',
  'size',
  'refill_time',
  'level',
  'log_path',
  'metrics_path',
  'action_type',
  'state',
  'huge_pages',
  'properties',
  '__proto__',
  'constructor',
];
const STRINGS = [
  '',
  'a',
  'Paused',
  'Resumed',
  'FlushMetrics',
  'SendCtrlAltDel',
  'InstanceStart',
  'None',
  '2M',
  '/dev/null',
  '/tmp',
  // A missing directory: as root, a bare '/nonexistent' would be created by PUT /logger.
  '/nonexistent-typervisor-fuzz/file',
  'tap0',
  '06:00:AC:10:00:02',
  'Info',
  'off',
  'vhost',
  'unix',
  'x'.repeat(300),
  '\u0000',
  '💥',
  '../../etc/passwd',
];

function value(r: () => number, depth: number): unknown {
  const k = Math.floor(r() * (depth > 2 ? 6 : 8));
  switch (k) {
    case 0:
      return null;
    case 1:
      return r() < 0.5;
    case 2:
      return [0, 1, -1, 3, 64, 65, 2 ** 31, 2 ** 53, -(2 ** 63), 1.5, 1e308, 128, 16][
        Math.floor(r() * 13)
      ];
    case 3:
      return STRINGS[Math.floor(r() * STRINGS.length)];
    case 4:
      return Math.floor(r() * 1e6);
    case 5:
      return STRINGS[Math.floor(r() * STRINGS.length)] + String(Math.floor(r() * 10));
    case 6:
      return Array.from({ length: Math.floor(r() * 4) }, () => value(r, depth + 1));
    default: {
      const o: Record<string, unknown> = {};
      const n = Math.floor(r() * 5);
      for (let i = 0; i < n; i++) o[FIELDS[Math.floor(r() * FIELDS.length)]!] = value(r, depth + 1);
      return o;
    }
  }
}

const ENDPOINTS: Array<[string, string]> = [
  ['GET', '/'],
  ['GET', '/version'],
  ['GET', '/vm/config'],
  ['GET', '/machine-config'],
  ['PUT', '/machine-config'],
  ['PATCH', '/machine-config'],
  ['PUT', '/boot-source'],
  ['PUT', '/drives/d0'],
  ['PATCH', '/drives/d0'],
  ['PUT', '/network-interfaces/eth0'],
  ['PATCH', '/network-interfaces/eth0'],
  ['PUT', '/vsock'],
  ['PUT', '/entropy'],
  ['PUT', '/logger'],
  ['PUT', '/metrics'],
  ['PUT', '/actions'],
  ['PATCH', '/vm'],
  ['PUT', '/balloon'],
  ['PUT', '/mmds'],
  ['PUT', '/snapshot/create'],
  ['PUT', '/snapshot/load'],
  ['DELETE', '/drives/d0'],
  ['POST', '/'],
  ['GET', '/x/y/z'],
  ['PUT', '/drives/'],
];

let srv: ServerProcess;
before(async () => {
  srv = await startServer();
});
after(async () => {
  await srv.kill();
});

test(
  `random JSON at every endpoint: only 2xx/4xx, the server survives (seed ${SEED})`,
  { timeout: 60_000 },
  async (t) => {
    const r = prng(SEED);
    const counts: Record<number, number> = {};
    for (let i = 0; i < REQUESTS; i++) {
      const [method, path] = ENDPOINTS[Math.floor(r() * ENDPOINTS.length)]!;
      let body: string | undefined;
      const shape = r();
      if (shape < 0.1) body = undefined;
      else if (shape < 0.2)
        body = JSON.stringify(value(r, 0)).slice(0, Math.floor(r() * 40)); // truncated JSON
      else body = JSON.stringify(value(r, 0));
      if (method === 'PUT' && path === '/actions' && body?.includes('InstanceStart'))
        body = '{"action_type":"FlushMetrics"}';
      const reply = await call(srv.sock, method, path, body);
      counts[reply.status] = (counts[reply.status] ?? 0) + 1;
      assert.ok(
        reply.status >= 200 && reply.status < 500,
        `seed ${SEED} request ${i}: ${method} ${path} ${body} -> ${reply.status} ${reply.body}`,
      );
      if (reply.status >= 400)
        assert.equal(typeof reply.json?.fault_message, 'string', `no fault_message: ${reply.body}`);
    }
    t.diagnostic(`statuses: ${JSON.stringify(counts)}`);
    assert.equal(srv.child.exitCode, null, 'the server exited');
    assert.equal((await call(srv.sock, 'GET', '/')).status, 200);
  },
);

/**
 * API bodies (src/api/): requests built from Firecracker's request shapes, valid and mutated
 * (fields removed, added, renamed, of the wrong type, edge numbers, long and odd strings,
 * nulls, prototype keys, deep nesting, broken JSON), routed (routes.ts: schema check) and
 * handled by a VmmController whose VM build is refused, plus --config-file bodies
 * (parseVmConfig). Checks: nothing throws; no request is answered 5xx; every answer is
 * JSON-serialisable; the configuration GET /vm/config reports always parses back as a
 * configuration file.
 *
 * `api-http` sends such requests, and malformed HTTP, through the real server (server.ts) on a
 * Unix socket: every response is 2xx/4xx (never 5xx), and the server answers GET / after each
 * session. PutLogger/PutMetrics are routed but not applied (they open host files).
 */
import { connect } from 'node:net';
import { join } from 'node:path';
import { parseVmConfig } from '../../src/api/config-file.js';
import { type ApiOutcome, VmmController } from '../../src/api/controller.js';
import { LoggerControl } from '../../src/api/logger.js';
import { MetricsSystem } from '../../src/api/metrics.js';
import { route, type VmmAction } from '../../src/api/routes.js';
import { startApiServer } from '../../src/api/server.js';
import { ConfigError } from '../../src/util/errors.js';
import { fail, type Prng, type Session, type Target } from '../core.js';
import { scratchDir } from '../virtio-kinds.js';

type Json = null | boolean | number | string | Json[] | { [k: string]: Json };

const EXAMPLES: Array<[string, string, Json]> = [
  [
    'PUT',
    '/machine-config',
    { vcpu_count: 2, mem_size_mib: 256, smt: false, track_dirty_pages: false },
  ],
  ['PATCH', '/machine-config', { vcpu_count: 1 }],
  [
    'PUT',
    '/boot-source',
    { kernel_image_path: '/nonexistent/vmlinux', boot_args: 'console=ttyS0', initrd_path: null },
  ],
  [
    'PUT',
    '/drives/rootfs',
    {
      drive_id: 'rootfs',
      path_on_host: '/nonexistent/disk.img',
      is_root_device: true,
      is_read_only: false,
    },
  ],
  ['PATCH', '/drives/rootfs', { drive_id: 'rootfs', path_on_host: '/dev/null' }],
  [
    'PUT',
    '/network-interfaces/eth0',
    { iface_id: 'eth0', host_dev_name: 'tap0', guest_mac: '06:00:ac:10:00:02' },
  ],
  ['PATCH', '/network-interfaces/eth0', { iface_id: 'eth0' }],
  ['PUT', '/vsock', { guest_cid: 3, uds_path: '/nonexistent/v.sock' }],
  ['PUT', '/entropy', {}],
  ['PUT', '/logger', { log_path: '/nonexistent/log', level: 'Info' }],
  ['PUT', '/metrics', { metrics_path: '/nonexistent/metrics' }],
  ['PUT', '/actions', { action_type: 'InstanceStart' }],
  ['PUT', '/actions', { action_type: 'SendCtrlAltDel' }],
  ['PUT', '/actions', { action_type: 'FlushMetrics' }],
  ['PATCH', '/vm', { state: 'Paused' }],
  ['GET', '/', null],
  ['GET', '/machine-config', null],
  ['GET', '/vm/config', null],
  ['GET', '/version', null],
  ['PUT', '/snapshot/create', { snapshot_path: 'a', mem_file_path: 'b' }],
  ['PUT', '/balloon', { amount_mib: 1, deflate_on_oom: false }],
];

const ODD_STRINGS = [
  '',
  ' ',
  'a'.repeat(5000),
  '\u0000',
  '💥',
  '../../etc/passwd',
  '\n',
  'tap0 ',
  '0',
  '-1',
  '1e309',
  'Paused',
  'null',
];
const ODD_NUMBERS = [0, -1, 1, 0.5, 2 ** 31, 2 ** 32, 2 ** 53, -(2 ** 53), 1e308, 32, 33, 255, 256];
const ODD_KEYS = [
  '__proto__',
  'constructor',
  'prototype',
  '',
  'vcpu_count',
  'toString',
  'a'.repeat(300),
];

function randomJson(rng: Prng, depth: number): Json {
  switch (rng.below(depth > 3 ? 5 : 7)) {
    case 0:
      return null;
    case 1:
      return rng.chance(0.5);
    case 2:
      return rng.pick(ODD_NUMBERS);
    case 3:
    case 4:
      return rng.pick(ODD_STRINGS);
    case 5:
      return Array.from({ length: rng.below(4) }, () => randomJson(rng, depth + 1));
    default: {
      const o: { [k: string]: Json } = {};
      for (let i = rng.below(4); i > 0; i--) o[rng.pick(ODD_KEYS)] = randomJson(rng, depth + 1);
      return o;
    }
  }
}

function mutate(rng: Prng, v: Json, depth = 0): Json {
  if (v === null || typeof v !== 'object' || Array.isArray(v) || rng.chance(0.1))
    return randomJson(rng, depth);
  const o = { ...v };
  const keys = Object.keys(o);
  switch (rng.below(6)) {
    case 0:
      if (keys.length) delete o[rng.pick(keys)];
      break;
    case 1:
      o[rng.pick(ODD_KEYS)] = randomJson(rng, depth + 1);
      break;
    case 2:
      if (keys.length) o[rng.pick(keys)] = randomJson(rng, depth + 1);
      break;
    case 3:
      if (keys.length) o[rng.pick(keys)] = rng.pick(ODD_NUMBERS);
      break;
    case 4:
      if (keys.length) o[rng.pick(keys)] = rng.pick(ODD_STRINGS);
      break;
    default:
      if (keys.length) o[rng.pick(keys)] = mutate(rng, o[rng.pick(keys)]!, depth + 1);
  }
  return o;
}

/** One request: method, path, body (undefined: none). */
export function request(rng: Prng): [string, string, string | undefined] {
  const [method, path, example] = rng.pick(EXAMPLES);
  let m = method;
  let p = path;
  if (rng.chance(0.05)) m = rng.pick(['GET', 'PUT', 'PATCH', 'DELETE', 'POST', 'HEAD', 'OPTIONS']);
  if (rng.chance(0.05))
    p = rng.pick([
      '/drives/',
      '/drives/a/b',
      '/drives/a-b',
      '/drives/💥',
      '//',
      '/machine-config/',
      '/vm/config/x',
      '/?x=1',
      `/${'a'.repeat(3000)}`,
    ]);
  let body: string | undefined;
  if (example !== null || m === 'PUT' || m === 'PATCH') {
    const k = rng.below(10);
    if (k < 5) body = JSON.stringify(rng.chance(0.2) ? example : mutate(rng, example));
    else if (k < 7) body = JSON.stringify(randomJson(rng, 0));
    else if (k < 8) {
      const s = JSON.stringify(example);
      body = s.slice(0, rng.below(s.length + 1));
    } else if (k < 9) body = '['.repeat(rng.below(20_000)) + ']'.repeat(rng.below(3));
    else body = rng.pick(['', ' ', 'null', '1', '"x"', '{}', '{"a":1,"a":2}', '\u0000']);
  }
  if (m === 'GET' && rng.chance(0.8)) body = undefined;
  return [m, p, body];
}

function controller(): VmmController {
  const metrics = new MetricsSystem('fuzz');
  return new VmmController({
    instanceId: 'fuzz',
    version: '0.0.0-fuzz',
    metrics,
    logger: new LoggerControl(metrics.counters),
    build: () => {
      throw new ConfigError('fuzz: no VM is built');
    },
  });
}

/** The controller, minus the actions that open host files. */
async function handle(c: VmmController, a: VmmAction): Promise<ApiOutcome> {
  if (a.kind === 'PutLogger' || a.kind === 'PutMetrics') return { status: 204 };
  return c.handle(a);
}

export const apiTarget: Target = {
  name: 'api',
  what: 'api/ routes + schemas + controller (pre-boot) + config-file parsing',
  cases: 100_000,
  session: 500,
  open(): Session {
    const c = controller();
    let answered = 0;
    let refused = 0;
    return {
      stats: () => ({ answered, refused }),
      async run(rng: Prng) {
        const [m, p, body] = request(rng);
        const r = route(m, p, body);
        if (r.action) {
          const out = await handle(c, r.action);
          if (out.status >= 500)
            fail(
              `api: ${m} ${p} ${body?.slice(0, 200)}: ${out.status} ${'fault' in out ? out.fault : ''}`,
            );
          JSON.stringify(out);
          if (out.status < 300) answered++;
          else refused++;
        } else {
          if (typeof r.fault !== 'string') fail('api: neither an action nor a fault');
          refused++;
        }
        // A configuration file: random, or the one the controller reports.
        const text = rng.chance(0.5) ? JSON.stringify(c.fullConfig()) : (body ?? '{}');
        const parsed = parseVmConfig(text);
        if (text === JSON.stringify(c.fullConfig()) && 'fault' in parsed)
          fail(`api: GET /vm/config does not parse back: ${parsed.fault} (${text.slice(0, 300)})`);
      },
    };
  },
};

let sockNo = 0;

/** Raw bytes of one HTTP request, well-formed or not. */
function rawRequest(rng: Prng): string {
  const [m, p, body] = request(rng);
  const b = body ?? '';
  switch (rng.below(12)) {
    case 0:
      return `${m} ${p} HTTP/1.1\r\nHost: x\r\nContent-Length: ${b.length + rng.below(10)}\r\n\r\n${b}`;
    case 1:
      return `${m} ${p} HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n${b.length.toString(16)}\r\n${b}\r\n0\r\n\r\n`;
    case 2:
      return `${m} ${p} HTTP/1.1\r\nContent-Length: 99999999\r\n\r\n${b}`;
    case 3:
      return `${m} ${p} HTTP/1.1\r\n${'X-A: b\r\n'.repeat(rng.below(2000))}\r\n`;
    case 4:
      return `${m} ${p}\r\n\r\n`;
    case 5:
      return String.fromCharCode(...Array.from({ length: rng.below(200) }, () => rng.below(256)));
    case 6:
      return `${m} ${p} HTTP/1.1\r\nContent-Length: -1\r\n\r\n`;
    case 7: // two requests pipelined
      return `GET / HTTP/1.1\r\n\r\n${m} ${p} HTTP/1.1\r\nContent-Length: ${Buffer.byteLength(b)}\r\n\r\n${b}`;
    default:
      return body === undefined
        ? `${m} ${p} HTTP/1.1\r\nHost: localhost\r\n\r\n`
        : `${m} ${p} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(b)}\r\n\r\n${b}`;
  }
}

/** Sends `data`, half-closes, and collects everything until the server closes (or `ms`). */
function exchange(sock: string, data: string, ms: number): Promise<string> {
  return new Promise((resolve) => {
    const s = connect(sock);
    let got = '';
    const done = () => {
      clearTimeout(timer);
      s.destroy();
      resolve(got);
    };
    const timer = setTimeout(done, ms);
    s.on('data', (d) => (got += d.toString('latin1')));
    s.on('error', done);
    s.on('close', done);
    s.on('connect', () => {
      s.write(data, 'latin1');
      s.end();
    });
  });
}

export const apiHttpTarget: Target = {
  name: 'api-http',
  what: 'api/server.ts over a Unix socket: raw requests, bad framing, big bodies, pipelining',
  cases: 20_000,
  session: 500,
  async open(): Promise<Session> {
    const c = controller();
    const sock = join(scratchDir(), `api-${process.pid}-${sockNo++}.sock`);
    const metrics = new MetricsSystem('fuzz');
    const server = await startApiServer({
      socketPath: sock,
      counters: metrics.counters,
      handle: (a) => handle(c, a),
    });
    let responses = 0;
    return {
      stats: () => ({ responses }),
      async run(rng: Prng) {
        const reply = await exchange(sock, rawRequest(rng), 2000);
        for (const m of reply.matchAll(/HTTP\/1\.[01] (\d{3})/g)) {
          responses++;
          if (Number(m[1]) >= 500) fail(`api-http: answered ${m[1]}: ${reply.slice(0, 300)}`);
        }
      },
      async close() {
        const r = await exchange(sock, 'GET / HTTP/1.1\r\nHost: localhost\r\n\r\n', 5000);
        await server.close();
        if (!/HTTP\/1\.1 200/.test(r))
          fail(`api-http: the server no longer answers GET / (${r.slice(0, 100)})`);
      },
    };
  },
};

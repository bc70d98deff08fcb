/**
 * API conformance against Firecracker's published API description (issue 15): every operation of
 * test/api/firecracker-api.json (each path x method), in each VM state it applies to: fresh,
 * configured, running and paused. One server walks through the states in order (its configuring
 * PUTs in the fresh state are what make it configured; InstanceStart with the tiny spin guest on
 * the host KVM makes it running; PATCH /vm makes it paused). Each answer's status must be one the
 * operation documents, a 2xx body must validate against its schema and an error body against the
 * Error schema (ajv); each request body we send must validate against the operation's body
 * schema; and the outcome (2xx or 4xx) must be the one Firecracker gives in that state. Features
 * we do not have (MMDS, serial) may answer
 * either way, but an error must be documented and valid. Known mismatches are `todo` cases (see
 * KNOWN), visible in the report without failing CI. Running/paused need KVM, gcc and ld.
 * Then: a fresh VM loads the snapshot the paused state made; every operation with a body refuses
 * wrong-typed bodies with a documented 4xx and an Error body and changes nothing; paths and
 * methods outside the description answer 400 with an Error body; and each configuration request
 * with every documented field (and the deprecated ones, with `Deprecation: true`) is accepted.
 * The answers are printed as test diagnostics. Regenerate the description with
 * scripts/firecracker-api-to-json.py.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { call, startServer, type ServerProcess } from './client.js';
import { loadDescription, type Operation } from './fc-description.js';
import { guestPath, tinyGuests } from '../host/helpers.js';

const fc = loadDescription();
/** The same description with no undocumented fields allowed in answers. */
const fcClosed = loadDescription(undefined, true);
type State = 'fresh' | 'configured' | 'running' | 'paused';
type Want = 'ok' | 'err' | 'either';
interface Req {
  path: string;
  body?: unknown;
  want: Want;
}
interface Ctx {
  dir: string;
  kernel: string;
  disk: string;
  /** Whether PUT /network-interfaces/eth0 was accepted (it needs to create or open a tap). */
  iface?: boolean;
}
const pre = (s: State) => s === 'fresh' || s === 'configured';
/** The 2xx-before-boot, 4xx-after rule most configuration PUTs follow. */
const preOnly = (s: State): Want => (pre(s) ? 'ok' : 'err');

/**
 * One request per operation and state, with a body valid for the description, and the outcome
 * Firecracker gives. Keyed by "METHOD path" as in the description: an operation without an
 * entry here fails the coverage test.
 */
const REQUESTS: Record<string, (s: State, c: Ctx) => Req> = {
  'GET /': () => ({ path: '/', want: 'ok' }),
  'GET /version': () => ({ path: '/version', want: 'ok' }),
  'GET /machine-config': () => ({ path: '/machine-config', want: 'ok' }),
  'GET /vm/config': () => ({ path: '/vm/config', want: 'ok' }),
  'PUT /actions': (s) =>
    s === 'fresh'
      ? // Nothing to boot: Firecracker refuses (no boot source).
        { path: '/actions', body: { action_type: 'InstanceStart' }, want: 'err' }
      : // Firecracker flushes metrics only after boot (before: "not supported before starting").
        { path: '/actions', body: { action_type: 'FlushMetrics' }, want: pre(s) ? 'err' : 'ok' },
  'PUT /boot-source': (s, c) => ({
    path: '/boot-source',
    body: { kernel_image_path: c.kernel, boot_args: 'console=ttyS0' },
    want: preOnly(s),
  }),
  'PUT /machine-config': (s) => ({
    path: '/machine-config',
    body: { vcpu_count: 1, mem_size_mib: 32 },
    want: preOnly(s),
  }),
  // The description's PATCH body is a whole MachineConfiguration (both required fields).
  'PATCH /machine-config': (s) => ({
    path: '/machine-config',
    body: { vcpu_count: 1, mem_size_mib: 32 },
    want: preOnly(s),
  }),
  'PUT /drives/{drive_id}': (s, c) => ({
    path: '/drives/data',
    body: { drive_id: 'data', path_on_host: c.disk, is_root_device: false, is_read_only: true },
    want: preOnly(s),
  }),
  // Firecracker: a drive update before boot is refused; after boot it swaps the backing file.
  'PATCH /drives/{drive_id}': (s, c) => ({
    path: '/drives/data',
    body: { drive_id: 'data', path_on_host: c.disk },
    want: pre(s) ? 'err' : 'ok',
  }),
  // The tap may not exist on this host: Firecracker opens it at PUT time (400 if missing).
  'PUT /network-interfaces/{iface_id}': (s) => ({
    path: '/network-interfaces/eth0',
    body: { iface_id: 'eth0', host_dev_name: 'tvconf0', guest_mac: '06:00:00:00:00:01' },
    want: pre(s) ? 'either' : 'err',
  }),
  'PATCH /network-interfaces/{iface_id}': (s, c) => ({
    path: '/network-interfaces/eth0',
    body: {
      iface_id: 'eth0',
      rx_rate_limiter: { bandwidth: { size: 1 << 20, refill_time: 100 } },
    },
    // Before boot Firecracker refuses; after, it updates eth0 if it exists (it needs a tap).
    want: pre(s) ? 'err' : c.iface ? 'ok' : 'err',
  }),
  'PUT /vsock': (s, c) => ({
    path: '/vsock',
    body: { guest_cid: 3, uds_path: join(c.dir, 'v.sock') },
    want: preOnly(s),
  }),
  'PUT /entropy': (s) => ({ path: '/entropy', body: {}, want: preOnly(s) }),
  // Firecracker: the logger and metrics can be set once (a second PUT is refused).
  'PUT /logger': (s, c) => ({
    path: '/logger',
    body: { log_path: join(c.dir, 'log.txt'), level: 'Info' },
    want: s === 'fresh' ? 'ok' : s === 'configured' ? 'either' : 'err',
  }),
  'PUT /metrics': (s, c) => ({
    path: '/metrics',
    body: { metrics_path: join(c.dir, 'metrics.json') },
    want: s === 'fresh' ? 'ok' : s === 'configured' ? 'either' : 'err',
  }),
  'PATCH /vm': (s) => ({
    path: '/vm',
    body: { state: s === 'paused' ? 'Paused' : 'Resumed' }, // the state it is in: stays there
    want: pre(s) ? 'err' : 'ok',
  }),
  'PUT /snapshot/create': (s, c) => ({
    path: '/snapshot/create',
    body: { snapshot_path: join(c.dir, 'snap'), mem_file_path: join(c.dir, 'mem') },
    want: s === 'paused' ? 'ok' : 'err',
  }),
  // Only a fresh VM may load, and there is no snapshot at this path.
  'PUT /snapshot/load': (s, c) => ({
    path: '/snapshot/load',
    body: {
      snapshot_path: join(c.dir, 'no-such-snap'),
      mem_backend: { backend_type: 'File', backend_path: join(c.dir, 'no-such-mem') },
    },
    want: 'err',
  }),
  // Features we do not have: an answer either way, an error documented and valid.
  'PUT /cpu-config': () => ({ path: '/cpu-config', body: {}, want: 'either' }),
  // The balloon (issue 16): PUT in the fresh state gives the VM one, without statistics or
  // hinting, so those answer 400 in every state (as Firecracker's do).
  'GET /balloon': (s) => ({ path: '/balloon', want: s === 'fresh' ? 'err' : 'ok' }),
  'PUT /balloon': (s) => ({
    path: '/balloon',
    body: { amount_mib: 0, deflate_on_oom: false },
    want: preOnly(s),
  }),
  'PATCH /balloon': (s) => ({
    path: '/balloon',
    body: { amount_mib: 0 },
    want: pre(s) ? 'err' : 'ok',
  }),
  'GET /balloon/statistics': () => ({ path: '/balloon/statistics', want: 'err' }),
  'PATCH /balloon/statistics': () => ({
    path: '/balloon/statistics',
    body: { stats_polling_interval_s: 1 },
    want: 'err',
  }),
  'PATCH /balloon/hinting/start': () => ({
    path: '/balloon/hinting/start',
    body: {},
    want: 'err',
  }),
  'GET /balloon/hinting/status': () => ({ path: '/balloon/hinting/status', want: 'err' }),
  // The description gives this one no body parameter; Firecracker's parser still wants a body
  // on every PATCH, so we send {} (checked as "no schema" below).
  'PATCH /balloon/hinting/stop': () => ({
    path: '/balloon/hinting/stop',
    body: {},
    want: 'err',
  }),
  'PUT /pmem/{id}': (s, c) => ({
    path: '/pmem/pm0',
    // Its own file: pmem files are whole 2 MiB units, and one file backs one device.
    body: { id: 'pm0', path_on_host: join(c.dir, 'pmem.img'), read_only: true },
    want: preOnly(s),
  }),
  // pm0 exists from the fresh state on: after boot its rate limiter (on flushes) is updated.
  'PATCH /pmem/{id}': (s) => ({
    path: '/pmem/pm0',
    body: { id: 'pm0', rate_limiter: { ops: { size: 100, refill_time: 1000 } } },
    want: pre(s) ? 'err' : 'ok',
  }),
  'PUT /mmds': () => ({ path: '/mmds', body: { latest: { 'meta-data': {} } }, want: 'either' }),
  'PATCH /mmds': () => ({ path: '/mmds', body: { latest: {} }, want: 'either' }),
  'GET /mmds': () => ({ path: '/mmds', want: 'either' }),
  'PUT /mmds/config': () => ({
    path: '/mmds/config',
    body: { network_interfaces: ['eth0'] },
    want: 'either',
  }),
  'PUT /serial': (_s, c) => ({
    path: '/serial',
    body: { serial_out_path: join(c.dir, 'serial.out') },
    want: 'either',
  }),
  'PUT /hotplug/memory': () => ({
    path: '/hotplug/memory',
    body: { total_size_mib: 1024 },
    want: 'either',
  }),
  'PATCH /hotplug/memory': () => ({
    path: '/hotplug/memory',
    body: { requested_size_mib: 0 },
    want: 'either',
  }),
  'GET /hotplug/memory': () => ({ path: '/hotplug/memory', want: 'either' }),
};

/**
 * Mismatches found and not fixed here ("state METHOD path" -> what differs): reported as todo.
 * Remove an entry once fixed (a todo that passes is reported as such by node:test).
 */
const KNOWN: Record<string, string> = {};

const key = (op: Operation) => `${op.method} ${op.path}`;

/** Runs one operation in one state and returns every problem found ([] = conforms). */
async function exercise(
  sock: string,
  op: Operation,
  s: State,
  c: Ctx,
): Promise<{ problems: string[]; answer: string }> {
  const make = REQUESTS[key(op)];
  if (!make) return { problems: [`no request defined for ${key(op)}`], answer: '' };
  const req = make(s, c);
  const problems: string[] = [];
  if (op.bodySchema || req.body === undefined) problems.push(...fc.checkRequest(op, req.body));
  const r = await call(sock, op.method, req.path, req.body);
  problems.push(...fc.checkResponse(op, r.status, r.body, r.headers['content-type'] ?? ''));
  const ok = r.status >= 200 && r.status < 300;
  if (key(op) === 'PUT /network-interfaces/{iface_id}' && pre(s) && ok) c.iface = true;
  if (req.want === 'ok' && !ok) problems.push(`want 2xx, got ${r.status} ${r.body}`);
  if (req.want === 'err' && ok) problems.push(`want 4xx, got ${r.status} ${r.body}`);
  return { problems, answer: `${op.method} ${req.path} -> ${r.status} ${r.body.slice(0, 160)}` };
}

/** GETs first (they see the state as it was entered), then the rest in description order. */
function ordered(s: State): Operation[] {
  const rank = (op: Operation) => {
    if (op.method === 'GET') return 0;
    if (s !== 'fresh') return 1;
    // In the fresh state, the requests expected to fail go before the configuring ones.
    const want = REQUESTS[key(op)]?.('fresh', { dir: '', kernel: '', disk: '' }).want;
    return want === 'ok' ? 2 : 1;
  };
  return [...fc.operations].sort((a, b) => rank(a) - rank(b));
}

function caseOptions(s: State, op: Operation) {
  const todo = KNOWN[`${s} ${key(op)}`];
  return todo ? { todo } : {};
}

test('the vendored description is the one this test knows: every operation has a request', () => {
  assert.match(fc.version, /^1\.\d+/);
  assert.ok(fc.operations.length >= 38, `${fc.operations.length} operations`);
  const missing = fc.operations.map(key).filter((k) => !REQUESTS[k]);
  assert.deepEqual(missing, []);
  const extra = Object.keys(REQUESTS).filter((k) => !fc.operations.some((op) => key(op) === k));
  assert.deepEqual(extra, []);
  // Every known mismatch names a case that exists (a typo would hide nothing, but mislead).
  const cases = new Set(fc.operations.map(key));
  const stale = Object.keys(KNOWN).filter((k) => {
    const [where, ...rest] = k.split(' ');
    const what = rest.join(' ');
    if (where === 'closed') return !['fresh', 'configured', 'running', 'paused'].includes(what);
    return (
      !['fresh', 'configured', 'running', 'paused', 'loaded', 'full', 'deprecated'].includes(
        where!,
      ) || !cases.has(what)
    );
  });
  assert.deepEqual(stale, []);
});

test('the validator refuses what does not conform (so a pass means something)', () => {
  const get = fc.operations.find((o) => key(o) === 'GET /')!;
  const info = JSON.stringify({ app_name: 'x', id: 'i', state: 'Running', vmm_version: '1' });
  assert.deepEqual(fc.checkResponse(get, 200, info), []);
  assert.match(fc.checkResponse(get, 200, '{"id":"i"}').join(), /required property 'app_name'/);
  assert.match(
    fc.checkResponse(get, 200, info.replace('Running', 'Booting')).join(),
    /allowed values/,
  );
  assert.match(fc.checkResponse(get, 201, '{}').join(), /status 201 is not documented/);
  const put = fc.operations.find((o) => key(o) === 'PUT /boot-source')!;
  assert.match(
    fc.checkResponse(put, 404, '{"fault_message":"no"}').join(),
    /404 is not documented/,
  );
  assert.deepEqual(fc.checkResponse(put, 400, '{"fault_message":"no"}'), []);
  assert.match(fc.checkResponse(put, 400, '{"fault_message":3}').join(), /must be string/);
  assert.match(fc.checkResponse(put, 400, '').join(), /not JSON/);
  assert.match(fc.checkResponse(put, 204, 'x').join(), /204 with a body/);
  assert.match(
    fc.checkResponse(put, 400, '{"fault_message":"no"}', 'text/plain').join(),
    /Content-Type text\/plain/,
  );
  assert.deepEqual(
    fc.checkResponse(put, 400, '{"fault_message":"no"}', 'application/json; charset=utf-8'),
    [],
  );
  assert.match(fc.checkRequest(put, { boot_args: 'x' }).join(), /kernel_image_path/);
  // The closed variant refuses undocumented fields the open one lets through.
  const extra = info.replace('{', '{"extra":1,');
  assert.deepEqual(fc.checkResponse(get, 200, extra), []);
  const getClosed = fcClosed.operations.find((o) => key(o) === 'GET /')!;
  assert.match(fcClosed.checkResponse(getClosed, 200, extra).join(), /additional properties/);
  assert.deepEqual(fcClosed.checkResponse(getClosed, 200, info), []);
  // YAML 1.1 would read the level "Off" as false (the converter reads YAML 1.2 booleans only).
  const logger = fc.operations.find((o) => key(o) === 'PUT /logger')!;
  assert.deepEqual(fc.checkRequest(logger, { level: 'Off' }), []);
  // An operation that lists only "default" for errors: any 4xx is documented.
  const entropy = fc.operations.find((o) => key(o) === 'PUT /entropy')!;
  assert.deepEqual(fc.checkResponse(entropy, 400, '{"fault_message":"no"}'), []);
  // GET /mmds lists 404: a 400 is not one of its documented statuses.
  const mmds = fc.operations.find((o) => key(o) === 'GET /mmds')!;
  assert.match(fc.checkResponse(mmds, 400, '{"fault_message":"no"}').join(), /not documented/);
});

const guests = tinyGuests();
/** Where the paused state made its snapshot (for the load test). */
let snapshotDir: string | undefined;
const T = { timeout: 30_000 };

describe('conformance to the API description, state by state', () => {
  let srv: ServerProcess;
  let ctx: Ctx;
  before(async () => {
    srv = await startServer(['--id', 'conformance']);
    const disk = join(srv.dir, 'disk.img');
    writeFileSync(disk, Buffer.alloc(1 << 20));
    writeFileSync(join(srv.dir, 'pmem.img'), Buffer.alloc(2 << 20));
    let kernel = join(srv.dir, 'not-a-kernel'); // never booted when there is no KVM
    if (guests.dir) kernel = guestPath('spin');
    else writeFileSync(kernel, 'no KVM here: this VM is configured but never started');
    ctx = { dir: srv.dir, kernel, disk };
    snapshotDir = srv.dir;
  });
  after(async () => {
    await srv?.kill();
  });

  const states: Array<{ s: State; enter?: () => Promise<void>; skip?: string }> = [
    { s: 'fresh' },
    {
      s: 'configured',
      enter: async () => {
        // The fresh state's configuring PUTs already ran; make sure the essentials are set.
        const cfg = (await call(srv.sock, 'GET', '/vm/config')).json;
        assert.equal(cfg?.['machine-config']?.mem_size_mib, 32, JSON.stringify(cfg));
        assert.equal(cfg?.['boot-source']?.kernel_image_path, ctx.kernel, JSON.stringify(cfg));
        assert.equal(cfg?.drives?.length, 1, JSON.stringify(cfg));
      },
    },
    {
      s: 'running',
      skip: guests.skip,
      enter: async () => {
        const op = fc.operations.find((o) => key(o) === 'PUT /actions')!;
        const r = await call(srv.sock, 'PUT', '/actions', { action_type: 'InstanceStart' });
        assert.deepEqual(
          fc.checkResponse(op, r.status, r.body, r.headers['content-type'] ?? ''),
          [],
        );
        assert.equal(r.status, 204, r.body);
        assert.equal((await call(srv.sock, 'GET', '/')).json.state, 'Running');
      },
    },
    {
      s: 'paused',
      skip: guests.skip,
      enter: async () => {
        const op = fc.operations.find((o) => key(o) === 'PATCH /vm')!;
        const r = await call(srv.sock, 'PATCH', '/vm', { state: 'Paused' });
        assert.deepEqual(
          fc.checkResponse(op, r.status, r.body, r.headers['content-type'] ?? ''),
          [],
        );
        assert.equal(r.status, 204, r.body);
        assert.equal((await call(srv.sock, 'GET', '/')).json.state, 'Paused');
      },
    },
  ];

  for (const { s, enter, skip } of states) {
    describe(s, { skip: skip ?? false }, () => {
      if (enter) test(`enter the ${s} state`, T, enter);
      for (const op of ordered(s)) {
        test(`${s}: ${key(op)}`, { ...T, ...caseOptions(s, op) }, async (t) => {
          const { problems, answer } = await exercise(srv.sock, op, s, ctx);
          t.diagnostic(answer); // what we answered, in the report (the 'either' cases too)
          assert.deepEqual(problems, []);
        });
      }
      const strictTodo = KNOWN[`closed ${s}`];
      test(
        `${s}: GET answers carry only documented fields`,
        { ...T, ...(strictTodo ? { todo: strictTodo } : {}) },
        async (t) => {
          const problems: string[] = [];
          for (const op of fcClosed.operations.filter((o) => o.method === 'GET')) {
            const r = await call(srv.sock, 'GET', REQUESTS[key(op)]!(s, ctx).path);
            if (r.status !== 200) continue; // errors are checked above
            for (const p of fcClosed.checkResponse(op, r.status, r.body))
              problems.push(`${key(op)}: ${p}`);
          }
          for (const p of problems) t.diagnostic(p);
          assert.deepEqual(problems, []);
        },
      );
      test(`${s}: GET / reports the state`, T, async () => {
        const r = await call(srv.sock, 'GET', '/');
        const want = { fresh: 'Not started', configured: 'Not started' }[s as string] ?? s;
        assert.equal(r.json.state.toLowerCase(), want.toLowerCase());
      });
    });
  }
});

describe(
  'a fresh VM loads the snapshot made in the paused state',
  { skip: guests.skip ?? false },
  () => {
    let srv: ServerProcess | undefined;
    after(async () => {
      await srv?.kill();
    });
    const find = (k: string) => fc.operations.find((o) => key(o) === k)!;
    const check = async (
      t: { diagnostic(s: string): void },
      k: string,
      path: string,
      body?: unknown,
    ) => {
      const op = find(k);
      assert.deepEqual(fc.checkRequest(op, body), []);
      const r = await call(srv!.sock, op.method, path, body);
      t.diagnostic(`${k} -> ${r.status} ${r.body.slice(0, 160)}`);
      assert.deepEqual(fc.checkResponse(op, r.status, r.body, r.headers['content-type'] ?? ''), []);
      return r;
    };

    test('loaded: PUT /snapshot/load', T, async (t) => {
      // The walk above ran first (node:test runs top-level suites in order) and made it.
      const walked = snapshotDir;
      assert.ok(walked && existsSync(join(walked, 'snap')), 'the paused state made a snapshot');
      srv = await startServer(['--id', 'conformance-load']);
      const load = await check(t, 'PUT /snapshot/load', '/snapshot/load', {
        snapshot_path: join(walked, 'snap'),
        mem_backend: { backend_type: 'File', backend_path: join(walked, 'mem') },
        resume_vm: false,
        // The walk's server still holds its vsock socket: the load binds another.
        vsock_override: { uds_path: join(srv.dir, 'v2.sock') },
      });
      assert.equal(load.status, 204, load.body);
      assert.equal((await check(t, 'GET /', '/')).json.state, 'Paused');
      assert.equal(
        (await check(t, 'GET /machine-config', '/machine-config')).json.mem_size_mib,
        32,
      );
    });
    test(
      'loaded: GET /vm/config',
      { ...T, ...(KNOWN['loaded GET /vm/config'] ? { todo: KNOWN['loaded GET /vm/config'] } : {}) },
      async (t) => {
        assert.ok(srv, 'loaded');
        await check(t, 'GET /vm/config', '/vm/config');
      },
    );
    test('loaded: PATCH /vm resumes it', T, async (t) => {
      assert.ok(srv, 'loaded');
      assert.equal((await check(t, 'PATCH /vm', '/vm', { state: 'Resumed' })).status, 204);
      assert.equal((await check(t, 'GET /', '/')).json.state, 'Running');
    });
  },
);

describe('bad requests answer a documented 4xx with an Error body and change nothing', () => {
  let srv: ServerProcess;
  before(async () => {
    srv = await startServer();
  });
  after(async () => {
    await srv?.kill();
  });
  const validError = fc.definition('Error');

  test('every operation with a body, given a body of the wrong type', T, async () => {
    const before = (await call(srv.sock, 'GET', '/vm/config')).body;
    const problems: string[] = [];
    for (const op of fc.operations.filter((o) => o.bodySchema)) {
      const path = REQUESTS[key(op)]!('fresh', { dir: srv.dir, kernel: 'k', disk: 'd' }).path;
      for (const body of ['[1]', '"text"', '{"no_such_field_anywhere": 1}', '{']) {
        // PUT /mmds takes any object: an unknown field is its data, not an error.
        if (key(op) === 'PUT /mmds' || key(op) === 'PATCH /mmds')
          if (body.startsWith('{"')) continue;
        const r = await call(srv.sock, op.method, path, body);
        const p = fc.checkResponse(op, r.status, r.body, r.headers['content-type'] ?? '');
        if (r.status < 400) p.push(`answered ${r.status}`);
        for (const x of p) problems.push(`${key(op)} ${body}: ${x}`);
      }
    }
    assert.deepEqual(problems, []);
    assert.equal((await call(srv.sock, 'GET', '/vm/config')).body, before, 'nothing changed');
    assert.equal((await call(srv.sock, 'GET', '/')).json.state, 'Not started');
  });

  test('paths and methods the description does not have: 400 with an Error body', T, async () => {
    for (const [m, p, b] of [
      ['GET', '/no-such-resource', undefined],
      ['POST', '/actions', { action_type: 'InstanceStart' }],
      ['DELETE', '/boot-source', undefined],
      ['GET', '/version/extra', undefined],
      ['PUT', '/drives', { drive_id: 'x', is_root_device: false }],
    ] as Array<[string, string, unknown]>) {
      const r = await call(srv.sock, m, p, b);
      assert.equal(r.status, 400, `${m} ${p}: ${r.status} ${r.body}`);
      const fault: unknown = r.json?.fault_message;
      assert.ok(validError(r.json), `${m} ${p}: ${r.body}`);
      assert.equal(typeof fault, 'string', `${m} ${p}: ${r.body}`);
    }
    assert.equal((await call(srv.sock, 'GET', '/')).json.state, 'Not started');
  });
});

/**
 * Every field the description documents for a configuration request, in one body each, on a
 * fresh VM: Firecracker accepts all of these, so must we (the forms its clients send: firectl
 * sends smt, older clients cpu_template and vsock_id, which Firecracker marks with a
 * `Deprecation: true` header).
 */
describe('configuration bodies with every documented field (fresh VM)', () => {
  let srv: ServerProcess;
  let dir: string;
  before(async () => {
    srv = await startServer();
    dir = srv.dir;
    writeFileSync(join(dir, 'disk.img'), Buffer.alloc(1 << 20));
    writeFileSync(join(dir, 'kernel'), 'a kernel file, never booted');
    writeFileSync(join(dir, 'initrd'), 'an initrd file, never loaded');
  });
  after(async () => {
    await srv?.kill();
  });
  const bucket = { size: 1 << 20, one_time_burst: 1 << 20, refill_time: 100 };
  const limiter = { bandwidth: bucket, ops: { size: 1000, refill_time: 1000 } };
  /** [operation, path, a body with every field, [deprecated field, a body with it]?] */
  const bodies: Array<[string, string, () => unknown, [string, () => unknown]?]> = [
    [
      'PUT /machine-config',
      '/machine-config',
      () => ({
        vcpu_count: 2,
        mem_size_mib: 64,
        smt: true,
        cpu_template: 'None',
        track_dirty_pages: true,
        huge_pages: 'None',
      }),
      ['cpu_template', () => ({ vcpu_count: 1, mem_size_mib: 32, cpu_template: 'None' })],
    ],
    [
      'PATCH /machine-config',
      '/machine-config',
      () => ({ vcpu_count: 2, mem_size_mib: 32, smt: false, track_dirty_pages: false }),
    ],
    [
      'PUT /boot-source',
      '/boot-source',
      () => ({
        kernel_image_path: join(dir, 'kernel'),
        initrd_path: join(dir, 'initrd'),
        boot_args: 'console=ttyS0 reboot=k panic=1',
      }),
    ],
    [
      'PUT /drives/{drive_id}',
      '/drives/rootfs',
      () => ({
        drive_id: 'rootfs',
        path_on_host: join(dir, 'disk.img'),
        is_root_device: true,
        partuuid: '0eaa91a0-01',
        is_read_only: false,
        cache_type: 'Writeback',
        io_engine: 'Sync',
        rate_limiter: limiter,
      }),
    ],
    [
      'PUT /network-interfaces/{iface_id}',
      '/network-interfaces/eth1',
      () => ({
        iface_id: 'eth1',
        host_dev_name: 'tvconf1',
        guest_mac: '07:00:00:00:00:01', // the first octet's low bit set: Firecracker takes it
        mtu: 1500,
        rx_rate_limiter: limiter,
        tx_rate_limiter: { bandwidth: bucket },
      }),
    ],
    [
      'PUT /vsock',
      '/vsock',
      () => ({ guest_cid: 3, uds_path: join(dir, 'v.sock'), vsock_id: 'vsock0' }),
      ['vsock_id', () => ({ guest_cid: 4, uds_path: join(dir, 'v.sock'), vsock_id: 'vsock0' })],
    ],
    ['PUT /entropy', '/entropy', () => ({ rate_limiter: limiter })],
    [
      'PUT /logger',
      '/logger',
      () => ({
        log_path: join(dir, 'log.txt'),
        level: 'Debug',
        show_level: true,
        show_log_origin: true,
        module: 'api_server::request',
      }),
    ],
    [
      'PUT /metrics',
      '/metrics',
      () => ({ metrics_path: join(dir, 'metrics.json'), emit_id: true, properties: { a: 'b' } }),
    ],
  ];
  for (const [k, path, body, deprecated] of bodies) {
    const todo = KNOWN[`full ${k}`];
    test(`full ${k}`, { ...T, ...(todo ? { todo } : {}) }, async (t) => {
      const op = fc.operations.find((o) => key(o) === k)!;
      assert.deepEqual(fc.checkRequest(op, body()), []);
      const r = await call(srv.sock, op.method, path, body());
      t.diagnostic(`${k} -> ${r.status} ${r.body}`);
      assert.deepEqual(fc.checkResponse(op, r.status, r.body, r.headers['content-type'] ?? ''), []);
      assert.equal(r.status, 204, r.body);
    });
    if (deprecated) {
      const [field, withField] = deprecated;
      const todo = KNOWN[`deprecated ${k}`];
      test(
        `${k} with ${field}: Deprecation: true`,
        { ...T, ...(todo ? { todo } : {}) },
        async () => {
          const op = fc.operations.find((o) => key(o) === k)!;
          assert.deepEqual(fc.checkRequest(op, withField()), []);
          const r = await call(srv.sock, op.method, path, withField());
          assert.equal(r.status, 204, r.body);
          assert.equal(r.headers['deprecation'], 'true');
        },
      );
    }
  }
});

/**
 * /mmds and /mmds/config in the routes and the controller (issue 16): Firecracker's answers
 * before boot, the data store's limit, the config's checks, GET /vm/config, the config file,
 * and after a (fake) snapshot load: the data store goes to the device worker on each change.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { BuiltVm, VmConfig } from '../vmm/index.js';
import { emptyVmConfig } from '../vmm/index.js';
import { LoggerControl } from './logger.js';
import { MetricsSystem } from './metrics.js';
import { deprecationOf, PRE_BOOT_ONLY, VmmController, type ApiOutcome } from './controller.js';
import { parseVmConfig } from './config-file.js';
import { route } from './routes.js';

function controller(opts: { limit?: number; loaded?: VmConfig } = {}) {
  const metrics = new MetricsSystem('test');
  const sent: unknown[] = [];
  const vm = {
    vmm: { state: 'running', exited: new Promise(() => undefined), vcpuCount: 0 },
    devices: {},
    parts: { config: opts.loaded },
    deviceWorker: {
      request: (r: unknown) => {
        sent.push(r);
        return Promise.resolve();
      },
      counters: () => Promise.resolve([]),
    },
  } as unknown as BuiltVm;
  const c = new VmmController({
    instanceId: 'test',
    version: '0',
    metrics,
    logger: new LoggerControl(metrics.counters),
    loadSnapshot: async () => Promise.resolve(vm),
    ...(opts.limit !== undefined ? { mmdsSizeLimit: opts.limit } : {}),
  });
  const run = (m: string, p: string, body?: unknown): Promise<ApiOutcome> => {
    const r = route(m, p, body === undefined ? undefined : JSON.stringify(body));
    assert.ok(r.action, r.fault);
    return c.handle(r.action);
  };
  return { c, run, sent };
}

const fault = (o: ApiOutcome) => ('fault' in o ? o.fault : '');

test('GET /mmds before any PUT answers {} (Firecracker); PATCH before PUT is refused', async () => {
  const { run } = controller();
  assert.deepEqual(await run('GET', '/mmds'), { status: 200, body: {} });
  const p = await run('PATCH', '/mmds', { a: 1 });
  assert.equal(p.status, 400);
  assert.match(fault(p), /not initialized/);
});

test('PUT, PATCH (merge patch), GET; over the size limit nothing changes', async () => {
  const { run } = controller({ limit: 64 });
  assert.equal((await run('PUT', '/mmds', { latest: { a: 'b', c: 'd' } })).status, 204);
  assert.equal((await run('PATCH', '/mmds', { latest: { c: null, e: 'f' } })).status, 204);
  assert.deepEqual(await run('GET', '/mmds'), {
    status: 200,
    body: { latest: { a: 'b', e: 'f' } },
  });
  const big = await run('PATCH', '/mmds', { latest: { x: 'y'.repeat(64) } });
  assert.equal(big.status, 400);
  assert.match(fault(big), /doesn't fit/);
  assert.equal((await run('PUT', '/mmds', { x: 'y'.repeat(64) })).status, 400);
  assert.deepEqual(await run('GET', '/mmds'), {
    status: 200,
    body: { latest: { a: 'b', e: 'f' } },
  });
});

test('/mmds bodies: malformed JSON and nesting past the limit are refused at routing', () => {
  assert.match(route('PUT', '/mmds', '{').fault!, /deserializing/);
  for (const b of ['[1]', '"text"', '3', 'null'])
    assert.match(route('PATCH', '/mmds', b).fault!, /must be a JSON object/, b);
  assert.match(
    route('PUT', '/mmds', '{"a":' + '['.repeat(200) + ']'.repeat(200) + '}').fault!,
    /recursion limit/,
  );
  assert.equal(route('PUT', '/mmds/x', '{}').fault?.startsWith('Invalid request'), true);
  assert.equal(route('GET', '/mmds/config', undefined).fault?.startsWith('Invalid request'), true);
  assert.deepEqual(route('GET', '/mmds', undefined).metric, ['get_api_requests', 'mmds']);
  // V1 (the default) is deprecated, as in Firecracker.
  const v1 = route('PUT', '/mmds/config', '{"network_interfaces":["eth0"]}').action!;
  assert.match(deprecationOf(v1)!, /V1 is deprecated/);
  const v2 = route('PUT', '/mmds/config', '{"network_interfaces":["eth0"],"version":"V2"}');
  assert.equal(deprecationOf(v2.action!), undefined);
});

test('PUT /mmds/config: interfaces must exist, the list not be empty, the address link-local', async () => {
  const { run } = controller();
  let r = await run('PUT', '/mmds/config', { network_interfaces: ['eth0'] });
  assert.match(fault(r), /does not correspond to any existing network interface/);
  assert.equal(
    (await run('PUT', '/network-interfaces/eth0', { iface_id: 'eth0', host_dev_name: 'tap0' }))
      .status,
    204,
  );
  r = await run('PUT', '/mmds/config', { network_interfaces: [] });
  assert.match(fault(r), /empty/);
  for (const ip of ['169.254.0.9', '169.254.255.1', '10.0.0.1', 'x'])
    assert.match(
      fault(await run('PUT', '/mmds/config', { network_interfaces: ['eth0'], ipv4_address: ip })),
      /link local/,
      ip,
    );
  assert.match(
    route('PUT', '/mmds/config', '{"network_interfaces":["eth0"],"version":"V3"}').fault!,
    /version/,
  );
  let cfg = (await run('GET', '/vm/config')) as { body: Record<string, unknown> };
  assert.equal(cfg.body['mmds-config'], null, 'refusals changed nothing');
  assert.equal((await run('PUT', '/mmds/config', { network_interfaces: ['eth0'] })).status, 204);
  cfg = (await run('GET', '/vm/config')) as { body: Record<string, unknown> };
  assert.deepEqual(cfg.body['mmds-config'], {
    version: 'V1',
    network_interfaces: ['eth0'],
    ipv4_address: '169.254.169.254',
    imds_compat: false,
  });
  assert.equal(
    (
      await run('PUT', '/mmds/config', {
        version: 'V2',
        network_interfaces: ['eth0'],
        ipv4_address: '169.254.170.2',
        imds_compat: true,
      })
    ).status,
    204,
  );
  cfg = (await run('GET', '/vm/config')) as { body: Record<string, unknown> };
  assert.deepEqual(cfg.body['mmds-config'], {
    version: 'V2',
    network_interfaces: ['eth0'],
    ipv4_address: '169.254.170.2',
    imds_compat: true,
  });
});

test('the config file takes mmds-config (after the interfaces it names)', () => {
  const r = parseVmConfig(
    JSON.stringify({
      'boot-source': { kernel_image_path: '/k' },
      'network-interfaces': [{ iface_id: 'eth0', host_dev_name: 'tap0' }],
      'mmds-config': { version: 'V2', network_interfaces: ['eth0'] },
    }),
  );
  assert.ok('actions' in r, 'fault' in r ? r.fault : '');
  assert.deepEqual(
    r.actions.map((a) => a.kind),
    ['PutBootSource', 'PutNetworkInterface', 'PutMmdsConfig', 'InstanceStart'],
  );
});

test('after a load: the config came with the snapshot, the data store did not; each change reaches the worker', async () => {
  const loaded: VmConfig = {
    ...emptyVmConfig(),
    'network-interfaces': [{ iface_id: 'eth0', host_dev_name: 'tap0' }],
    'mmds-config': { version: 'V2', network_interfaces: ['eth0'] },
  };
  const { run, sent } = controller({ loaded });
  const load = await run('PUT', '/snapshot/load', { snapshot_path: 's', mem_file_path: 'm' });
  assert.equal(load.status, 204, fault(load));
  assert.deepEqual(await run('GET', '/mmds'), { status: 200, body: {} });
  assert.equal((await run('PUT', '/mmds', { a: 'b' })).status, 204);
  assert.equal((await run('PATCH', '/mmds', { c: 'd' })).status, 204);
  assert.deepEqual(sent, [
    { op: 'mmds-data', json: '{"a":"b"}' },
    { op: 'mmds-data', json: '{"a":"b","c":"d"}' },
  ]);
  assert.equal(
    fault(await run('PUT', '/mmds/config', { network_interfaces: ['eth0'] })),
    PRE_BOOT_ONLY,
  );
});

test('after a load without MMDS: /mmds is not initialized (Firecracker)', async () => {
  const { run, sent } = controller({ loaded: emptyVmConfig() });
  assert.equal(
    (await run('PUT', '/snapshot/load', { snapshot_path: 's', mem_file_path: 'm' })).status,
    204,
  );
  assert.match(fault(await run('GET', '/mmds')), /not initialized/);
  assert.match(fault(await run('PUT', '/mmds', {})), /not initialized/);
  assert.equal(sent.length, 0);
});

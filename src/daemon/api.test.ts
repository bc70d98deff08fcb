import { test } from 'node:test';
import assert from 'node:assert/strict';
import { configRequests, parseCreate, routeDaemon } from './api.js';

const cfg = {
  'boot-source': { kernel_image_path: '/k', boot_args: 'console=ttyS0' },
  'machine-config': { vcpu_count: 1, mem_size_mib: 64 },
  drives: [{ drive_id: 'root', path_on_host: '/r', is_root_device: true, is_read_only: false }],
};

test('routes: each endpoint, and 400s naming the problem', () => {
  assert.deepEqual(routeDaemon('GET', '/', undefined).action, { kind: 'GetDaemon' });
  assert.deepEqual(routeDaemon('GET', '/pool', undefined).action, { kind: 'GetPool' });
  assert.deepEqual(routeDaemon('GET', '/vms', undefined).action, { kind: 'ListVms' });
  assert.deepEqual(routeDaemon('GET', '/vms/a_1', undefined).action, { kind: 'GetVm', id: 'a_1' });
  assert.deepEqual(routeDaemon('PUT', '/vms/a/stop', undefined).action, {
    kind: 'StopVm',
    id: 'a',
  });
  assert.deepEqual(routeDaemon('DELETE', '/vms/a', undefined).action, {
    kind: 'DeleteVm',
    id: 'a',
  });
  assert.deepEqual(routeDaemon('GET', '/vms/a/console', '').action, {
    kind: 'GetConsole',
    id: 'a',
  });
  assert.deepEqual(routeDaemon('GET', '/vms/a/wait', undefined).action, {
    kind: 'WaitVm',
    id: 'a',
  });
  assert.match(routeDaemon('PUT', '/vms/a/wait', undefined).fault!, /Invalid request/);
  assert.match(routeDaemon('GET', '/vms/a/wait', '{}').fault!, /takes no body/);
  assert.match(routeDaemon('GET', '/vms/a.b', undefined).fault!, /Invalid VM id/);
  assert.match(routeDaemon('PUT', '/vms', undefined).fault!, /Invalid request/);
  assert.match(routeDaemon('GET', '/vms/a/stop/x', undefined).fault!, /Invalid request/);
  assert.match(routeDaemon('GET', '/vms', '{}').fault!, /takes no body/);
  assert.match(routeDaemon('POST', '/vms', ' ').fault!, /needs a body/);
  const c = routeDaemon('POST', '/vms', JSON.stringify({ vm_id: 'x', ...cfg }));
  assert.equal(c.action?.kind, 'CreateVm');
});

test('create bodies: a configuration, a snapshot, and what is refused', () => {
  const r = parseCreate(JSON.stringify({ vm_id: 'web-1', ...cfg }));
  assert.ok('request' in r);
  assert.equal(r.request.id, 'web-1');
  assert.equal(r.request.kind, 'config');
  assert.equal(r.request.actions.at(-1)?.kind, 'InstanceStart');
  assert.ok(!('vm_id' in r.request.config));
  const s = parseCreate(
    JSON.stringify({
      snapshot: { snapshot_path: '/s', mem_backend: { backend_type: 'File', backend_path: '/m' } },
    }),
  );
  assert.ok('request' in s && s.request.kind === 'snapshot');
  const bad: Array<[unknown, RegExp]> = [
    [{ ...cfg, vm_id: 'a/b' }, /vm_id/],
    [{ ...cfg, vm_id: 'x'.repeat(65) }, /vm_id/],
    [{ 'machine-config': cfg['machine-config'] }, /boot-source/],
    [{ ...cfg, extra: true }, /extra/],
    [{ ...cfg, 'machine-config': { vcpu_count: 0, mem_size_mib: 64 } }, /vcpu_count/],
    [{ snapshot: { snapshot_path: '/s' } }, /mem_backend/],
    [{ snapshot: 'x' }, /must be an object/],
    [
      { snapshot: { snapshot_path: '/s', mem_file_path: '/m' }, drives: [] },
      /"drives" cannot be used with "snapshot"/,
    ],
    [[], /JSON object/],
  ];
  for (const [body, re] of bad) {
    const b = parseCreate(JSON.stringify(body));
    assert.ok('fault' in b, JSON.stringify(body));
    assert.match(b.fault, re);
  }
  assert.match((parseCreate('{') as { fault: string }).fault, /not JSON/);
});

test('configRequests: the API calls a config file makes, ending with InstanceStart', () => {
  assert.deepEqual(
    configRequests(cfg).map(([m, p]) => `${m} ${p}`),
    ['PUT /machine-config', 'PUT /boot-source', 'PUT /drives/root', 'PUT /actions'],
  );
});

/**
 * --config-file's "snapshot-load" section: the body of PUT /snapshot/load, refused with the same
 * messages, only beside "logger" and "metrics"; a boot configuration is unchanged.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { parseVmConfig } from './config-file.js';
import { DESERIALIZE_PREFIX, LOAD_MISSING_MEM, LOAD_TOO_MANY_MEM } from './routes.js';

const load = {
  snapshot_path: '/s/state',
  mem_backend: { backend_type: 'Uffd', backend_path: '/s/uffd.sock' },
  resume_vm: true,
  network_overrides: [{ iface_id: 'eth0', host_dev_name: 'tap7' }],
};
const parse = (c: object, opts = {}) => parseVmConfig(JSON.stringify(c), opts);
const fault = (c: object, opts = {}) => {
  const r = parse(c, opts);
  assert.ok('fault' in r, `accepted: ${JSON.stringify(c)}`);
  return r.fault;
};

test('snapshot-load: logger, metrics, then the load; no InstanceStart', () => {
  const r = parse({
    logger: { log_path: '/tmp/l', level: 'Info' },
    metrics: { metrics_path: '/tmp/m' },
    'snapshot-load': load,
  });
  assert.ok('actions' in r, JSON.stringify(r));
  assert.deepEqual(
    r.actions.map((a) => a.kind),
    ['PutLogger', 'PutMetrics', 'LoadSnapshot'],
  );
  assert.deepEqual(r.actions[2], { kind: 'LoadSnapshot', params: load });
  const file = parse({ 'snapshot-load': { snapshot_path: 's', mem_file_path: 'm' } });
  assert.ok('actions' in file);
  assert.deepEqual(file.actions, [
    { kind: 'LoadSnapshot', params: { snapshot_path: 's', mem_file_path: 'm' } },
  ]);
});

test('snapshot-load: the API rules and messages', () => {
  const sections: Record<string, unknown> = {
    'boot-source': { kernel_image_path: '/k' },
    'machine-config': { vcpu_count: 1, mem_size_mib: 64 },
    drives: [],
    vsock: { guest_cid: 3, uds_path: '/tmp/v.sock' },
    entropy: {},
    balloon: {},
  };
  for (const [section, value] of Object.entries(sections))
    assert.match(
      fault({ [section]: value, 'snapshot-load': load }),
      new RegExp(`^configuration section "${section}" cannot be used with "snapshot-load"`),
      section,
    );
  assert.equal(
    fault({ 'snapshot-load': { snapshot_path: 's' } }),
    `${DESERIALIZE_PREFIX}snapshot-load: ${LOAD_MISSING_MEM}`,
  );
  assert.equal(
    fault({ 'snapshot-load': { ...load, mem_file_path: 'm' } }),
    `${DESERIALIZE_PREFIX}snapshot-load: ${LOAD_TOO_MANY_MEM}`,
  );
  assert.match(
    fault({ 'snapshot-load': { ...load, extra: 1 } }),
    /unknown field `snapshot-load.extra`|extra/,
  );
  assert.match(
    fault({
      'snapshot-load': { ...load, mem_backend: { backend_type: 'Tape', backend_path: 'x' } },
    }),
    /backend_type/,
  );
  assert.match(fault({ 'snapshot-load': { mem_file_path: 'm' } }), /snapshot_path/);
  // With --no-api a paused VM could never be resumed.
  assert.match(
    fault({ 'snapshot-load': { ...load, resume_vm: false } }, { noApi: true }),
    /without "resume_vm": true .* --no-api/,
  );
  assert.ok('actions' in parse({ 'snapshot-load': { ...load, resume_vm: false } }));
});

test('a boot configuration is unchanged: sections, then InstanceStart', () => {
  const r = parse({
    'machine-config': { vcpu_count: 1, mem_size_mib: 64 },
    'boot-source': { kernel_image_path: '/k' },
  });
  assert.ok('actions' in r);
  assert.deepEqual(
    r.actions.map((a) => a.kind),
    ['PutMachineConfig', 'PutBootSource', 'InstanceStart'],
  );
});

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

/** Firecracker's example configuration (its tests/framework/vm_config.json), in our words. */
const firecrackerExample = {
  'boot-source': {
    kernel_image_path: '/k/vmlinux.bin',
    boot_args: 'console=ttyS0 reboot=k panic=1',
    initrd_path: null,
  },
  drives: [
    {
      drive_id: 'rootfs',
      partuuid: null,
      is_root_device: true,
      cache_type: 'Unsafe',
      is_read_only: false,
      path_on_host: '/k/rootfs.ext4',
      io_engine: 'Sync',
      rate_limiter: null,
      socket: null,
    },
  ],
  'machine-config': {
    vcpu_count: 2,
    mem_size_mib: 1024,
    smt: false,
    track_dirty_pages: false,
    huge_pages: 'None',
  },
  'cpu-config': null,
  balloon: null,
  'network-interfaces': [],
  vsock: null,
  logger: null,
  metrics: null,
  'mmds-config': null,
  entropy: null,
  pmem: [],
  'memory-hotplug': null,
};

test("Firecracker's example shape: empty sections of features we lack are accepted", () => {
  const r = parse(firecrackerExample);
  assert.ok('actions' in r, 'fault' in r ? r.fault : '');
  assert.deepEqual(
    r.actions.map((a) => a.kind),
    ['PutMachineConfig', 'PutBootSource', 'PutDrive', 'InstanceStart'],
  );
  // Nulls are absent fields, as serde's Option reads them.
  assert.deepEqual(r.actions[2], {
    kind: 'PutDrive',
    config: {
      drive_id: 'rootfs',
      is_root_device: true,
      cache_type: 'Unsafe',
      is_read_only: false,
      path_on_host: '/k/rootfs.ext4',
      io_engine: 'Sync',
    },
  });
  // "serial" (not in Firecracker's file format) as null, and pmem as null, are accepted too.
  assert.ok('actions' in parse({ ...firecrackerExample, serial: null, pmem: null }));
});

test('a non-empty section of a feature we lack is refused, naming it', () => {
  for (const [k, v] of [
    ['balloon', { amount_mib: 0, deflate_on_oom: false }],
    ['cpu-config', { cpuid_modifiers: [] }],
    ['memory-hotplug', { total_size_mib: 1024 }],
    ['pmem', [{ id: 'p', path_on_host: '/p', root_device: false }]],
    ['pmem', {}],
    ['balloon', []],
    ['serial', { serial_out_path: '/tmp/s' }],
  ] as Array<[string, unknown]>) {
    assert.match(
      fault({ ...firecrackerExample, [k]: v }),
      new RegExp(`^configuration section "${k}" is not supported by Typervisor: only`),
      k,
    );
  }
  // Not JSON, or not an object: the parser's own message.
  const bad = parseVmConfig('{"pmem": [}');
  assert.ok('fault' in bad);
  assert.match(bad.fault, /^An error occurred when deserializing/);
  assert.match(fault([] as unknown as object), /expected an object, got an array/);
});

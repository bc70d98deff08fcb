/**
 * --config-file's "snapshot-load" section: the body of PUT /snapshot/load, refused with the same
 * messages, only beside "logger" and "metrics"; a boot configuration is unchanged.
 */
import { test } from 'node:test';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import assert from 'node:assert/strict';
import { parseVmConfig } from './config-file.js';
import { DESERIALIZE_PREFIX, LOAD_MISSING_MEM, LOAD_TOO_MANY_MEM } from './routes.js';
import { firecrackerExampleConfig } from './testing/firecracker-example.js';

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

const firecrackerExample = firecrackerExampleConfig('/k/vmlinux.bin', '/k/rootfs.ext4');

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
  // "serial" (not in Firecracker's file format) as null, and pmem as null, are accepted too
  // (pmem is supported: its entries become PutPmem actions, tested below).
  assert.ok('actions' in parse({ ...firecrackerExample, serial: null, pmem: null }));
});

test('a balloon section becomes PUT /balloon (before InstanceStart); a bad one is refused', () => {
  const r = parse({
    ...firecrackerExample,
    balloon: { amount_mib: 4, deflate_on_oom: true, stats_polling_interval_s: 1 },
  });
  assert.ok('actions' in r);
  const kinds = r.actions.map((a) => a.kind);
  assert.ok(
    kinds.indexOf('PutBalloon') >= 0 &&
      kinds.indexOf('PutBalloon') < kinds.indexOf('InstanceStart'),
  );
  assert.deepEqual(
    r.actions.find((a) => a.kind === 'PutBalloon'),
    {
      kind: 'PutBalloon',
      config: { amount_mib: 4, deflate_on_oom: true, stats_polling_interval_s: 1 },
    },
  );
  assert.match(fault({ ...firecrackerExample, balloon: { amount_mib: 4 } }), /deflate_on_oom/);
  assert.match(fault({ ...firecrackerExample, balloon: [] }), /balloon/);
});

test("a serial section (not in Firecracker's file format) is refused unless empty, naming it", () => {
  for (const [k, v] of [['serial', { serial_out_path: '/tmp/s' }]] as Array<[string, unknown]>) {
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

test('cpu-config: an object or the path of a JSON file, applied after machine-config', () => {
  const template = {
    cpuid_modifiers: [
      { leaf: '0x1', subleaf: '0x0', flags: 0, modifiers: [{ register: 'eax', bitmap: '0b1' }] },
    ],
  };
  const wire = {
    kvm_capabilities: [],
    cpuid_modifiers: [
      {
        leaf: '0x1',
        subleaf: '0x0',
        flags: 0,
        modifiers: [{ register: 'eax', bitmap: '0b' + 'x'.repeat(31) + '1' }],
      },
    ],
    msr_modifiers: [],
  };
  const r = parse({ ...firecrackerExample, 'cpu-config': template });
  assert.ok('actions' in r, JSON.stringify(r));
  assert.deepEqual(
    r.actions.map((a) => a.kind),
    ['PutMachineConfig', 'PutCpuConfig', 'PutBootSource', 'PutDrive', 'InstanceStart'],
  );
  assert.deepEqual(r.actions[1], { kind: 'PutCpuConfig', config: wire });

  const dir = mkdtempSync(join(tmpdir(), 'cpu-config-'));
  try {
    const file = join(dir, 't.json');
    writeFileSync(file, JSON.stringify(template));
    const p = parse({ ...firecrackerExample, 'cpu-config': file });
    assert.ok('actions' in p, JSON.stringify(p));
    assert.deepEqual(p.actions[1], { kind: 'PutCpuConfig', config: wire });
    assert.match(
      fault({ ...firecrackerExample, 'cpu-config': join(dir, 'nope.json') }),
      /^cpu-config: cannot read the CPU template .*nope\.json: ENOENT/,
    );
    writeFileSync(file, '{"cpuid_modifiers": 3}');
    assert.match(
      fault({ ...firecrackerExample, 'cpu-config': file }),
      /cpu-config: cpuid_modifiers: expected an array, got 3/,
    );
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  assert.match(
    fault({ ...firecrackerExample, 'cpu-config': { msr_modifiers: [{ addr: 'x' }] } }),
    /^An error occurred when deserializing the json body of a request: cpu-config: msr_modifiers\[0\]\.addr: "x" is not a number/,
  );
  assert.match(
    fault({ 'cpu-config': template, 'snapshot-load': load }),
    /"cpu-config" cannot be used with "snapshot-load"/,
  );
});

test('pmem entries of a config file become PutPmem actions, in order, before InstanceStart', () => {
  const r = parse({
    ...firecrackerExample,
    pmem: [
      { id: 'p0', path_on_host: '/a', root_device: true },
      { id: 'p1', path_on_host: '/b', read_only: true },
    ],
  });
  assert.ok('actions' in r);
  const kinds = r.actions.map((a) => a.kind);
  const pmem = r.actions.filter((a) => a.kind === 'PutPmem');
  assert.deepEqual(
    pmem.map((a) => (a.kind === 'PutPmem' ? a.config.id : '')),
    ['p0', 'p1'],
  );
  assert.ok(kinds.indexOf('PutPmem') < kinds.indexOf('InstanceStart'));
  // A pmem entry without path_on_host is refused by the schema, naming the field.
  assert.match(fault({ ...firecrackerExample, pmem: [{ id: 'p' }] }), /path_on_host/);
  assert.match(fault({ ...firecrackerExample, pmem: {} }), /pmem/);
});

test('a memory-hotplug section becomes a PutMemoryHotplug action', () => {
  const r = parse({ ...firecrackerExample, 'memory-hotplug': { total_size_mib: 1024 } });
  assert.ok('actions' in r);
  const a = r.actions.find((x) => x.kind === 'PutMemoryHotplug');
  assert.deepEqual(a, { kind: 'PutMemoryHotplug', config: { total_size_mib: 1024 } });
  assert.match(
    fault({ ...firecrackerExample, 'memory-hotplug': { total_size_mib: 'x' } }),
    /total_size_mib/,
  );
});

/**
 * PUT /snapshot/create and /snapshot/load at the API level, without KVM: routing and schemas
 * (Firecracker's messages), and the controller's rules (create only after boot and while paused;
 * load only in a fresh process, retryable after a failure), with the snapshot functions faked.
 */
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { test } from 'node:test';
import { fileURLToPath } from 'node:url';
import { ConfigError } from '../util/errors.js';
import type { BuiltVm, CreateParams, LoadParams, VmConfig } from '../vmm/index.js';
import { emptyVmConfig } from '../vmm/index.js';
import {
  LOAD_AFTER_BOOT_RESOURCES,
  POST_BOOT_ONLY,
  PRE_BOOT_ONLY,
  VmmController,
  type ApiOutcome,
} from './controller.js';
import { LoggerControl } from './logger.js';
import { MetricsSystem } from './metrics.js';
import { DESERIALIZE_PREFIX, route, type VmmAction } from './routes.js';

const put = (path: string, body: unknown) =>
  route('PUT', path, typeof body === 'string' ? body : JSON.stringify(body));
const LOAD = { snapshot_path: 's', mem_backend: { backend_type: 'File', backend_path: 'm' } };

test('routing: /snapshot needs an operation, and only create and load exist', () => {
  assert.equal(put('/snapshot', {}).fault, 'Missing snapshot operation type.');
  assert.equal(put('/snapshot/', {}).fault, 'Missing snapshot operation type.');
  assert.equal(
    put('/snapshot/x', {}).fault,
    'Invalid request method and/or path: PUT /snapshot/x.',
  );
  assert.match(put('/snapshot/load/x', LOAD).fault!, /^Invalid request method and\/or path/);
  assert.match(route('GET', '/snapshot/create', undefined).fault!, /^Invalid request method/);
  assert.match(route('PATCH', '/snapshot/load', '{}').fault!, /^Invalid request method/);
  const c = put('/snapshot/create', { snapshot_path: 'a', mem_file_path: 'b' });
  assert.deepEqual(c.action, {
    kind: 'CreateSnapshot',
    params: { snapshot_path: 'a', mem_file_path: 'b' },
  });
  assert.equal(put('/snapshot/load', LOAD).action?.kind, 'LoadSnapshot');
});

test('create body: required fields, the type enum, unknown fields refused', () => {
  const f = (b: unknown) => put('/snapshot/create', b).fault;
  assert.equal(f({ snapshot_path: 'a' }), `${DESERIALIZE_PREFIX}missing field \`mem_file_path\`.`);
  assert.match(
    f({ snapshot_path: 'a', mem_file_path: 'b', snapshot_type: 'Half' })!,
    /snapshot_type/,
  );
  assert.match(
    f({ snapshot_path: 'a', mem_file_path: 'b', version: '1.0' })!,
    /unknown field `version`/,
  );
  assert.match(f({ snapshot_path: 'a'.repeat(5000), mem_file_path: 'b' })!, /longer than 4096/);
  assert.match(f('{"snapshot_path":')!, new RegExp(`^${DESERIALIZE_PREFIX}`));
  assert.equal(f({ snapshot_path: 'a', mem_file_path: 'b', snapshot_type: 'Diff' }), undefined);
});

test('load body: exactly one of mem_backend and mem_file_path, bounded overrides', () => {
  const f = (b: unknown) => put('/snapshot/load', b).fault;
  assert.equal(
    f({ snapshot_path: 's' }),
    `${DESERIALIZE_PREFIX}missing field: either \`mem_backend\` or \`mem_file_path\` is required`,
  );
  assert.equal(
    f({ ...LOAD, mem_file_path: 'm' }),
    `${DESERIALIZE_PREFIX}too many fields: either \`mem_backend\` or \`mem_file_path\` exclusively is required`,
  );
  assert.equal(f({ snapshot_path: 's', mem_file_path: 'm', mem_backend: null }), undefined);
  assert.match(f({ ...LOAD, resume: true })!, /unknown field `resume`/);
  assert.match(
    f({ snapshot_path: 's', mem_backend: { backend_type: 'File' } })!,
    /missing field `mem_backend.backend_path`/,
  );
  assert.match(
    f({ snapshot_path: 's', mem_backend: { backend_type: 'Disk', backend_path: 'm' } })!,
    /backend_type/,
  );
  assert.match(f({ ...LOAD, network_overrides: [{ iface_id: 'n' }] })!, /host_dev_name/);
  assert.match(
    f({ ...LOAD, network_overrides: [{ iface_id: 'n', host_dev_name: 'x'.repeat(16) }] })!,
    /longer than 15/,
  );
  const many = Array.from({ length: 100 }, (_, i) => ({ iface_id: `n${i}`, host_dev_name: 't' }));
  assert.match(f({ ...LOAD, network_overrides: many })!, /more than \d+ items/);
  assert.match(f({ ...LOAD, vsock_override: {} })!, /uds_path/);
  assert.match(f({ ...LOAD, vsock_override: { uds_path: 'u'.repeat(108) } })!, /longer than 107/);
  assert.match(f({ ...LOAD, huge_pages: '1G' })!, /huge_pages/);
  assert.match(f({ ...LOAD, resume_vm: 'yes' })!, /`resume_vm`: expected a boolean/);
});

/** A VM that pauses and resumes, enough for the controller. */
function fakeVm(config?: VmConfig): BuiltVm {
  const vmm = {
    state: 'running' as string,
    async pauseAll() {
      await Promise.resolve();
      vmm.state = 'paused';
    },
    async resumeAll() {
      await Promise.resolve();
      vmm.state = 'running';
    },
    exited: new Promise(() => undefined),
    vcpuCount: 0,
    control: { exits: () => 0 },
  };
  return { vmm, devices: {}, ...(config ? { parts: { config } } : {}) } as unknown as BuiltVm;
}

function harness() {
  const metrics = new MetricsSystem('test');
  const calls = { create: [] as CreateParams[], load: [] as LoadParams[] };
  let loadFails: string | undefined;
  let createFails: string | undefined;
  const saved: VmConfig = {
    ...emptyVmConfig(),
    'machine-config': { vcpu_count: 1, mem_size_mib: 32 },
  };
  const c = new VmmController({
    instanceId: 'test',
    version: '0',
    metrics,
    logger: new LoggerControl(metrics.counters),
    build: () => fakeVm(),
    createSnapshot: async (_b, p) => {
      await Promise.resolve();
      calls.create.push(p);
      if (createFails) throw new ConfigError(createFails);
    },
    loadSnapshot: async (p) => {
      await Promise.resolve();
      calls.load.push(p);
      if (loadFails) throw new ConfigError(loadFails);
      const vm = fakeVm(saved);
      if (!p.resumeVm) (vm.vmm as { state: string }).state = 'paused';
      return vm;
    },
  });
  const run = async (a: VmmAction): Promise<ApiOutcome> => c.handle(a);
  const state = async () =>
    ((await run({ kind: 'GetInstanceInfo' })) as { body: { state: string } }).body.state;
  return {
    c,
    run,
    state,
    calls,
    metrics,
    failLoad: (m?: string) => (loadFails = m),
    failCreate: (m?: string) => (createFails = m),
  };
}
const fault = (o: ApiOutcome) => ('fault' in o ? o.fault : undefined);
const loadAction = (extra: object = {}): VmmAction =>
  route('PUT', '/snapshot/load', JSON.stringify({ ...LOAD, ...extra })).action!;
const createAction: VmmAction = {
  kind: 'CreateSnapshot',
  params: { snapshot_path: 's', mem_file_path: 'm' },
};

test('create: refused before boot and while running; paused, it calls createSnapshot', async () => {
  const h = harness();
  assert.equal(fault(await h.run(createAction)), POST_BOOT_ONLY);
  await h.run({ kind: 'PutBootSource', config: { kernel_image_path: '/dev/null' } });
  await h.run({ kind: 'PutMachineConfig', config: { vcpu_count: 1, mem_size_mib: 32 } });
  // InstanceStart goes through checkHostCanRun; bypass it by building directly.
  (h.c as unknown as { built: BuiltVm }).built = fakeVm();
  assert.equal(
    fault(await h.run(createAction)),
    'Create snapshot error: the microVM must be paused (it is Running)',
  );
  assert.equal(h.calls.create.length, 0);
  assert.equal((await h.run({ kind: 'Pause' })).status, 204);
  assert.equal(await h.state(), 'Paused');
  assert.equal((await h.run(createAction)).status, 204);
  assert.deepEqual(h.calls.create, [{ snapshotPath: 's', memFilePath: 'm', type: 'Full' }]);
  assert.equal(await h.state(), 'Paused');
  h.failCreate('Diff snapshots are not implemented yet');
  assert.equal(
    fault(await h.run(createAction)),
    'Create snapshot error: Diff snapshots are not implemented yet',
  );
  assert.equal(fault(await h.run(loadAction())), PRE_BOOT_ONLY);
});

test('load: only in a fresh process; logger and metrics do not count', async () => {
  for (const a of [
    { kind: 'PutMachineConfig', config: { vcpu_count: 1, mem_size_mib: 32 } },
    { kind: 'PatchMachineConfig', update: { vcpu_count: 2 } },
    { kind: 'PutBootSource', config: { kernel_image_path: fileURLToPath(import.meta.url) } },
    { kind: 'PutVsock', config: { guest_cid: 3, uds_path: 'v.sock' } },
    { kind: 'PutEntropy', config: {} },
    {
      kind: 'PutDrive',
      config: {
        drive_id: 'd',
        is_root_device: false,
        path_on_host: fileURLToPath(import.meta.url),
        is_read_only: true,
      },
    },
    { kind: 'PutNetworkInterface', config: { iface_id: 'n', host_dev_name: 'tap0' } },
  ] as VmmAction[]) {
    const h = harness();
    if (a.kind === 'PatchMachineConfig')
      await h.run({ kind: 'PutMachineConfig', config: { vcpu_count: 1, mem_size_mib: 32 } });
    const r = await h.run(a);
    assert.equal(r.status, 204, `${a.kind}: ${fault(r)}`);
    assert.equal(fault(await h.run(loadAction())), LOAD_AFTER_BOOT_RESOURCES, a.kind);
    assert.equal(h.calls.load.length, 0);
  }
  const dir = mkdtempSync(join(tmpdir(), 'typervisor-snapapi-'));
  try {
    const h = harness();
    assert.equal((await h.run({ kind: 'PutLogger', config: { level: 'Info' } })).status, 204);
    const metricsPath = join(dir, 'metrics');
    assert.equal(
      (await h.run({ kind: 'PutMetrics', config: { metrics_path: metricsPath } })).status,
      204,
    );
    assert.equal((await h.run(loadAction({ resume_vm: true }))).status, 204);
    assert.equal(await h.state(), 'Running');
    // The saved configuration, with this process's metrics kept (GET /vm/config reports metrics
    // as null, as Firecracker does).
    const cfg = (await h.run({ kind: 'GetFullVmConfig' })) as { body: VmConfig };
    assert.equal(cfg.body['machine-config'].mem_size_mib, 32);
    assert.equal(cfg.body.metrics, null);
    assert.equal(h.c.fullConfig().metrics?.metrics_path, metricsPath);
    assert.equal(fault(await h.run(loadAction())), PRE_BOOT_ONLY);
    assert.equal(
      fault(await h.run({ kind: 'PutMachineConfig', config: { vcpu_count: 1, mem_size_mib: 32 } })),
      PRE_BOOT_ONLY,
    );
    await h.metrics.flush();
    const line = JSON.parse(readFileSync(metricsPath, 'utf8').trim().split('\n')[0]!) as {
      latencies_us: Record<string, number>;
    };
    assert.ok(line.latencies_us.load_snapshot! >= line.latencies_us.vmm_load_snapshot!);
    await h.metrics.close();
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('load: a failure leaves the process fresh, and a corrected load succeeds', async () => {
  const h = harness();
  h.failLoad('checksum mismatch (file corrupted or truncated)');
  assert.equal(
    fault(await h.run(loadAction())),
    'Load snapshot error: checksum mismatch (file corrupted or truncated)',
  );
  assert.equal(await h.state(), 'Not started');
  h.failLoad('Load snapshot error: Unknown Network Device: eth9');
  assert.equal(
    fault(await h.run(loadAction())),
    'Load snapshot error: Unknown Network Device: eth9',
  );
  h.failLoad(undefined);
  assert.equal((await h.run(loadAction())).status, 204);
  assert.equal(await h.state(), 'Paused'); // resume_vm defaults to false
  assert.equal((await h.run({ kind: 'Resume' })).status, 204);
  assert.equal(await h.state(), 'Running');
  assert.equal(h.calls.load.length, 3);
});

test('load: parameters as loadSnapshot takes them (deprecated fields, overrides, huge pages)', async () => {
  let h = harness();
  const r = await h.run(
    route(
      'PUT',
      '/snapshot/load',
      JSON.stringify({
        snapshot_path: 's',
        mem_file_path: 'm',
        enable_diff_snapshots: true,
        resume_vm: true,
        clock_realtime: true,
        network_overrides: [{ iface_id: 'eth0', host_dev_name: 'tap9' }],
        vsock_override: { uds_path: '/tmp/v.sock' },
        huge_pages: 'None',
      }),
    ).action!,
  );
  assert.equal(r.status, 204);
  assert.deepEqual(h.calls.load[0], {
    snapshotPath: 's',
    memBackend: { type: 'File', path: 'm' },
    trackDirtyPages: true,
    resumeVm: true,
    clockRealtime: true,
    networkOverrides: [{ ifaceId: 'eth0', hostDevName: 'tap9' }],
    vsockOverride: { udsPath: '/tmp/v.sock' },
  });
  for (const hp of ['Transparent', '2M']) {
    h = harness();
    assert.match(
      fault(await h.run(loadAction({ huge_pages: hp })))!,
      /^Load snapshot error: huge_pages/,
    );
    assert.equal(h.calls.load.length, 0);
    assert.equal(await h.state(), 'Not started');
  }
  h = harness();
  assert.equal((await h.run(loadAction({ huge_pages: 'Snapshot' }))).status, 204);
  assert.deepEqual(h.calls.load[0]!.memBackend, { type: 'File', path: 'm' });
  assert.equal(h.calls.load[0]!.trackDirtyPages, false);
});

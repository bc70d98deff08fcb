/**
 * PUT /vsock and the config file's "vsock" with Typervisor's `backend` field: Firecracker's body
 * is unchanged (uds_path required without "vhost"), "vhost" refuses uds_path, an unknown backend
 * is refused naming both, InstanceStart refuses vhost with track_dirty_pages or memory hotplug,
 * and GET /vm/config shows `backend` only when it is "vhost". No KVM (buildless controller).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { VmSpec } from '../vmm/index.js';
import { parseVmConfig } from './config-file.js';
import type { ApiOutcome } from './controller.js';
import { route } from './routes.js';
import { buildlessController } from './testing/controller.js';

const fault = (o: ApiOutcome) => ('fault' in o ? o.fault : '');

const dir = mkdtempSync(join(tmpdir(), 'typervisor-vsock-api-'));
process.on('exit', () => rmSync(dir, { recursive: true, force: true }));
const kernel = join(dir, 'k');
writeFileSync(kernel, new Uint8Array(4096));

function api() {
  const built: VmSpec[] = [];
  const c = buildlessController((spec) => built.push(spec));
  const call = async (method: string, path: string, body?: unknown) => {
    const r = route(method, path, body === undefined ? undefined : JSON.stringify(body));
    if (!r.action) return { status: 400, fault: r.fault ?? '' } as ApiOutcome;
    return c.handle(r.action);
  };
  const vsock = async () => {
    const r = await call('GET', '/vm/config');
    return 'body' in r ? (r.body as { vsock: unknown }).vsock : r;
  };
  return { call, vsock, built };
}

test('PUT /vsock: Firecracker bodies as before; backend "unix" is the same; "vhost" without uds_path', async () => {
  const a = api();
  let r = await a.call('PUT', '/vsock', { guest_cid: 3, uds_path: join(dir, 'v.sock') });
  assert.equal(r.status, 204, fault(r));
  assert.deepEqual(await a.vsock(), { guest_cid: 3, uds_path: join(dir, 'v.sock') });
  r = await a.call('PUT', '/vsock', {
    guest_cid: 4,
    uds_path: join(dir, 'v.sock'),
    backend: 'unix',
  });
  assert.equal(r.status, 204, fault(r));
  assert.deepEqual(await a.vsock(), { guest_cid: 4, uds_path: join(dir, 'v.sock') });
  r = await a.call('PUT', '/vsock', { guest_cid: 5, backend: 'vhost' });
  assert.equal(r.status, 204, fault(r));
  assert.deepEqual(await a.vsock(), { guest_cid: 5, backend: 'vhost' });
  // null is absent, as for every optional field.
  r = await a.call('PUT', '/vsock', { guest_cid: 6, backend: 'vhost', uds_path: null });
  assert.equal(r.status, 204, fault(r));
  assert.deepEqual(await a.vsock(), { guest_cid: 6, backend: 'vhost' });
});

test('PUT /vsock: what is refused, and the message; a refused PUT keeps the old section', async () => {
  const a = api();
  assert.equal((await a.call('PUT', '/vsock', { guest_cid: 5, backend: 'vhost' })).status, 204);
  const refused: Array<[unknown, RegExp]> = [
    [
      { guest_cid: 3, backend: 'vhost', uds_path: join(dir, 'v.sock') },
      /vsock: uds_path is for the unix backend; the vhost backend's host side is AF_VSOCK at guest_cid/,
    ],
    [{ guest_cid: 3 }, /vsock uds_path is required \(unless backend is "vhost"\)/],
    [{ guest_cid: 3, backend: 'unix' }, /vsock uds_path is required \(unless backend is "vhost"\)/],
    [{ guest_cid: 3, backend: 'kernel' }, /backend.*"unix", "vhost"/],
    [{ guest_cid: 3, backend: true }, /backend/],
  ];
  for (const [body, re] of refused) {
    const r = await a.call('PUT', '/vsock', body);
    assert.equal(r.status, 400, JSON.stringify(body));
    assert.match(fault(r), re, JSON.stringify(body));
  }
  assert.deepEqual(await a.vsock(), { guest_cid: 5, backend: 'vhost' });
});

test('InstanceStart: vhost with track_dirty_pages or memory hotplug is refused; unix is not', async () => {
  const boot = { kernel_image_path: kernel, boot_args: 'console=ttyS0' };
  const start = async (vsock: object, machine: object, hotplug?: object) => {
    const a = api();
    assert.equal((await a.call('PUT', '/boot-source', boot)).status, 204);
    let r = await a.call('PUT', '/machine-config', { vcpu_count: 1, mem_size_mib: 64, ...machine });
    assert.equal(r.status, 204, fault(r));
    if (hotplug) {
      r = await a.call('PUT', '/hotplug/memory', hotplug);
      assert.equal(r.status, 204, fault(r));
    }
    r = await a.call('PUT', '/vsock', vsock);
    assert.equal(r.status, 204, fault(r));
    const s = await a.call('PUT', '/actions', { action_type: 'InstanceStart' });
    return { s, built: a.built };
  };
  const vhost = { guest_cid: 3, backend: 'vhost' };
  const unix = { guest_cid: 3, uds_path: join(dir, 'v.sock') };
  let { s, built } = await start(vhost, { track_dirty_pages: true });
  assert.equal(s.status, 400);
  assert.match(
    fault(s),
    /vhost backend cannot be used with track_dirty_pages.*use the unix backend/,
  );
  assert.equal(built.length, 0);
  ({ s, built } = await start(vhost, {}, { total_size_mib: 1024 }));
  assert.equal(s.status, 400);
  assert.match(fault(s), /vhost backend cannot be used with memory hotplug.*boot RAM only/);
  assert.equal(built.length, 0);
  ({ s, built } = await start(vhost, {}));
  assert.equal(s.status, 204, fault(s));
  assert.deepEqual(
    built[0]!.devices.find((d) => d.kind === 'vsock'),
    { kind: 'vsock', id: 'vsock', cid: 3, backend: 'vhost' },
  );
  ({ s, built } = await start(unix, { track_dirty_pages: true }, { total_size_mib: 1024 }));
  assert.equal(s.status, 204, fault(s));
});

test('config file: "vsock" takes backend with the same rules', () => {
  const base = {
    'boot-source': { kernel_image_path: kernel },
    'machine-config': { vcpu_count: 1, mem_size_mib: 64 },
  };
  const r = parseVmConfig(JSON.stringify({ ...base, vsock: { guest_cid: 3, backend: 'vhost' } }));
  assert.ok('actions' in r, JSON.stringify(r));
  assert.deepEqual(
    r.actions.find((x) => x.kind === 'PutVsock'),
    { kind: 'PutVsock', config: { guest_cid: 3, backend: 'vhost' } },
  );
  const bad = parseVmConfig(JSON.stringify({ ...base, vsock: { guest_cid: 3, backend: 'x' } }));
  assert.ok('fault' in bad);
  assert.match(bad.fault, /backend.*"unix", "vhost"/);
});

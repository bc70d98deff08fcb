/**
 * vsock's `backend` (Typervisor's own field): "unix" (default, Firecracker's Unix sockets, and
 * uds_path required) or "vhost" (the host kernel's vhost-vsock; no uds_path). Checked at PUT, at
 * boot (not with track_dirty_pages or memory hotplug) and at a snapshot load (no vsock_override,
 * no track_dirty_pages); echoed by GET /vm/config only when "vhost".
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ConfigError } from '../util/errors.js';
import {
  checkVsockBackend,
  configFromResources,
  configFromSpec,
  validateResources,
  validateRestoreConfig,
  validateVsock,
  wireVmConfig,
  type VmConfig,
  type VmResources,
  type VsockConfig,
} from './resources.js';

const dir = mkdtempSync(join(tmpdir(), 'typervisor-vsock-config-'));
process.on('exit', () => rmSync(dir, { recursive: true, force: true }));
const kernel = join(dir, 'vmlinux');
writeFileSync(kernel, 'k');

const VHOST_UDS =
  /^vsock: uds_path is for the unix backend; the vhost backend's host side is AF_VSOCK at guest_cid$/;
const UDS_REQUIRED = /^vsock uds_path is required \(unless backend is "vhost"\)$/;

function resources(vsock: VsockConfig, more: Partial<VmResources> = {}): VmResources {
  return {
    machine: { vcpu_count: 1, mem_size_mib: 64 },
    boot: { kernel_image_path: kernel },
    vsock,
    ...more,
  };
}

function refused(f: () => unknown, re: RegExp): void {
  assert.throws(f, (e: unknown) => {
    assert.ok(e instanceof ConfigError, String(e));
    assert.match(e.message, re);
    return true;
  });
}

test('validateVsock: the unix backend needs uds_path, vhost refuses it; other backends are refused', () => {
  // Firecracker's body is unchanged, and "unix" said out loud is the same configuration.
  const fc = { guest_cid: 3, uds_path: '/run/v.sock' };
  assert.deepEqual(validateVsock(fc), fc);
  assert.deepEqual(validateVsock({ ...fc, backend: 'unix', vsock_id: 'v' }), {
    ...fc,
    vsock_id: 'v',
  });
  assert.deepEqual(validateVsock({ guest_cid: 7, backend: 'vhost' }), {
    guest_cid: 7,
    backend: 'vhost',
  });
  assert.deepEqual(validateVsock({ guest_cid: 7, backend: 'vhost', vsock_id: 'v' }), {
    guest_cid: 7,
    backend: 'vhost',
    vsock_id: 'v',
  });
  refused(
    () => validateVsock({ guest_cid: 3, backend: 'vhost', uds_path: '/run/v.sock' }),
    VHOST_UDS,
  );
  refused(() => validateVsock({ guest_cid: 3 }), UDS_REQUIRED);
  refused(() => validateVsock({ guest_cid: 3, backend: 'unix' }), UDS_REQUIRED);
  refused(
    () => validateVsock({ guest_cid: 3, backend: 'kernel' as 'vhost' }),
    /^vsock backend must be "unix" or "vhost" \(got "kernel"\)$/,
  );
  // The other checks still apply to vhost.
  refused(() => validateVsock({ guest_cid: 2, backend: 'vhost' }), /guest_cid must be from 3/);
  refused(() => validateVsock({ guest_cid: 3, uds_path: '' }), /uds_path must be 1 to 107 bytes/);
});

test('the device config: vhost has no socket; unix keeps uds (and no backend field)', () => {
  const vhost = validateResources(resources({ guest_cid: 9, backend: 'vhost' }));
  assert.deepEqual(vhost.devices, [{ kind: 'vsock', id: 'vsock', cid: 9, backend: 'vhost' }]);
  const unix = validateResources(
    resources({ guest_cid: 9, uds_path: '/run/v.sock', backend: 'unix', vsock_id: 'v0' }),
  );
  assert.deepEqual(unix.devices, [{ kind: 'vsock', id: 'v0', cid: 9, uds: '/run/v.sock' }]);
  // At boot too: a bad section is refused by validateResources, not only at PUT.
  refused(
    () => validateResources(resources({ guest_cid: 9, backend: 'vhost', uds_path: '/x' })),
    VHOST_UDS,
  );
  refused(() => validateResources(resources({ guest_cid: 9 })), UDS_REQUIRED);
});

test('vhost is refused with track_dirty_pages and with memory hotplug; unix is not', () => {
  const vhost: VsockConfig = { guest_cid: 3, backend: 'vhost' };
  const unix: VsockConfig = { guest_cid: 3, uds_path: '/run/v.sock' };
  const dirty = { machine: { vcpu_count: 1, mem_size_mib: 64, track_dirty_pages: true } };
  const hotplug = { memory_hotplug: { total_size_mib: 1024 } };
  refused(
    () => validateResources(resources(vhost, dirty)),
    /^vsock: the vhost backend cannot be used with track_dirty_pages: .*Diff snapshot would miss .*; use the unix backend$/,
  );
  refused(
    () => validateResources(resources(vhost, hotplug)),
    /^vsock: the vhost backend cannot be used with memory hotplug .*memory table covers boot RAM only/,
  );
  assert.equal(validateResources(resources(unix, dirty)).trackDirtyPages, true);
  assert.equal(validateResources(resources(unix, hotplug)).devices.length, 2);
  assert.equal(validateResources(resources(vhost)).devices.length, 1);
  // The same rule as a function, for a load (no vsock or unix: nothing to refuse).
  checkVsockBackend(undefined, { trackDirtyPages: true, memoryHotplug: true });
  checkVsockBackend(unix, { trackDirtyPages: true, memoryHotplug: true });
  refused(
    () => checkVsockBackend(vhost, { trackDirtyPages: true, memoryHotplug: false }),
    /track_dirty_pages/,
  );
});

test('GET /vm/config: backend only when "vhost" (no uds_path then); unix reads back as Firecracker', () => {
  const config = (v: VsockConfig): VmConfig =>
    configFromResources({ ...resources(validateVsock(v)) });
  assert.deepEqual(
    wireVmConfig(config({ guest_cid: 3, uds_path: '/v.sock', backend: 'unix' })).vsock,
    {
      guest_cid: 3,
      uds_path: '/v.sock',
    },
  );
  assert.deepEqual(wireVmConfig(config({ guest_cid: 3, backend: 'vhost' })).vsock, {
    guest_cid: 3,
    backend: 'vhost',
  });
});

test('a spec -> configuration -> restore keeps the vhost backend', () => {
  const spec = validateResources(resources({ guest_cid: 5, backend: 'vhost' }));
  const c = configFromSpec(spec);
  assert.deepEqual(c.vsock, { guest_cid: 5, backend: 'vhost', vsock_id: 'vsock' });
  const back = validateRestoreConfig(JSON.parse(JSON.stringify(c)));
  assert.deepEqual(back.devices, spec.devices);
  assert.deepEqual(back.config.vsock, { guest_cid: 5, backend: 'vhost', vsock_id: 'vsock' });
  // A unix one still round-trips without a backend field.
  const unix = configFromSpec(validateResources(resources({ guest_cid: 5, uds_path: '/v' })));
  assert.deepEqual(unix.vsock, { guest_cid: 5, uds_path: '/v', vsock_id: 'vsock' });
});

test('a snapshot load: a vhost vsock refuses vsock_override and track_dirty_pages', () => {
  const saved = (v: VsockConfig, more: Partial<VmResources> = {}) =>
    JSON.parse(JSON.stringify(configFromResources(resources(v, more)))) as unknown;
  const vhost = saved({ guest_cid: 3, backend: 'vhost' });
  refused(
    () => validateRestoreConfig(vhost, { vsockUdsPath: '/run/other.sock' }),
    /^vsock_override: the snapshot's vsock device uses the vhost backend, which has no Unix socket to re-point \(its host side is AF_VSOCK at guest_cid 3\)$/,
  );
  refused(() => validateRestoreConfig(vhost, { trackDirtyPages: true }), /track_dirty_pages/);
  assert.equal(validateRestoreConfig(vhost, { trackDirtyPages: false }).devices.length, 1);
  // The unix backend: both are fine, as before.
  const unix = saved({ guest_cid: 3, uds_path: '/run/v.sock' });
  const r = validateRestoreConfig(unix, { vsockUdsPath: '/run/other.sock', trackDirtyPages: true });
  assert.equal(r.config.vsock?.uds_path, '/run/other.sock');
  // A saved configuration is hostile: its vsock section gets the same checks as at boot.
  const c = JSON.parse(
    JSON.stringify(configFromResources(resources({ guest_cid: 3, backend: 'vhost' }))),
  );
  refused(
    () =>
      validateRestoreConfig({ ...c, vsock: { guest_cid: 3, backend: 'vhost', uds_path: '/x' } }),
    VHOST_UDS,
  );
  refused(() => validateRestoreConfig({ ...c, vsock: { guest_cid: 3 } }), UDS_REQUIRED);
  refused(
    () => validateRestoreConfig({ ...c, vsock: { guest_cid: 3, backend: 'tcp' } }),
    /backend must be "unix" or "vhost"/,
  );
  refused(
    () => validateRestoreConfig({ ...c, vsock: { guest_cid: 3, backend: 1 } }),
    /expected a string/,
  );
  // Saved with memory hotplug (a crafted file: boot refuses it) is refused at load too.
  refused(
    () => validateRestoreConfig({ ...c, 'memory-hotplug': { total_size_mib: 1024 } }),
    /memory hotplug/,
  );
});

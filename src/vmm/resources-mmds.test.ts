/**
 * mmds-config in the VM description (issue 16): the listed interfaces' net devices carry the
 * responder's configuration (defaults filled in), the others none; a snapshot's saved
 * configuration brings it back (Firecracker saves the MMDS config, not its data store), checked
 * as strictly as at boot.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ConfigError } from '../util/errors.js';
import {
  emptyVmConfig,
  validateResources,
  validateRestoreConfig,
  wireVmConfig,
  type VmConfig,
} from './resources.js';

function config(mmds: VmConfig['mmds-config']): VmConfig {
  return {
    ...emptyVmConfig(),
    'boot-source': { kernel_image_path: process.execPath },
    'network-interfaces': [
      { iface_id: 'eth0', host_dev_name: 'tap0' },
      { iface_id: 'eth1', host_dev_name: 'tap1' },
    ],
    'mmds-config': mmds,
  };
}

const nets = (devices: readonly unknown[]) =>
  devices.filter((d) => (d as { kind: string }).kind === 'net') as Array<{
    id: string;
    mmds?: unknown;
  }>;

test('the listed interface gets the responder, with defaults; the others do not', () => {
  const c = config({ network_interfaces: ['eth1'] });
  const spec = validateResources({
    machine: c['machine-config'],
    boot: c['boot-source']!,
    network_interfaces: c['network-interfaces'],
    mmds_config: c['mmds-config']!,
  });
  const [eth0, eth1] = nets(spec.devices);
  assert.equal(eth0!.mmds, undefined);
  assert.deepEqual(eth1!.mmds, { version: 'V1', ipv4: '169.254.169.254', imdsCompat: false });
  assert.throws(
    () =>
      validateResources({
        machine: c['machine-config'],
        boot: c['boot-source']!,
        network_interfaces: c['network-interfaces'],
        mmds_config: { network_interfaces: ['eth9'] },
      }),
    (e) => e instanceof ConfigError && /eth9/.test(e.message),
  );
});

test('a snapshot brings mmds-config back, checked; its wire form has the defaults', () => {
  const saved = config({
    version: 'V2',
    network_interfaces: ['eth0'],
    ipv4_address: '169.254.170.2',
  });
  const r = validateRestoreConfig(JSON.parse(JSON.stringify(saved)));
  assert.deepEqual(nets(r.devices)[0]!.mmds, {
    version: 'V2',
    ipv4: '169.254.170.2',
    imdsCompat: false,
  });
  assert.deepEqual(wireVmConfig(r.config)['mmds-config'], {
    version: 'V2',
    network_interfaces: ['eth0'],
    ipv4_address: '169.254.170.2',
    imds_compat: false,
  });
  // Without the section (snapshots from before MMDS): none.
  const plain = validateRestoreConfig(JSON.parse(JSON.stringify(config(null))));
  assert.ok(nets(plain.devices).every((n) => n.mmds === undefined));
  assert.equal(wireVmConfig(plain.config)['mmds-config'], null);
  for (const bad of [
    { network_interfaces: ['eth7'] },
    { network_interfaces: [] },
    { network_interfaces: [1] },
    { network_interfaces: ['eth0'], version: 'V9' },
    { network_interfaces: ['eth0'], ipv4_address: '10.0.0.1' },
    { network_interfaces: ['eth0'], extra: 1 },
    'text',
  ])
    assert.throws(
      () => validateRestoreConfig({ ...JSON.parse(JSON.stringify(saved)), 'mmds-config': bad }),
      ConfigError,
      JSON.stringify(bad),
    );
});

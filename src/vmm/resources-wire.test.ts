/**
 * The configuration as Firecracker's clients read it (GET /vm/config, GET /machine-config), and
 * the list rules of PUT /drives and PUT /network-interfaces as Firecracker's builders apply them:
 * MACs, replacement order, and what a failed replacement leaves.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ConfigError } from '../util/errors.js';
import {
  afterFailedInterfacePut,
  emptyVmConfig,
  validateNetworkInterface,
  withDrive,
  withNetworkInterface,
  wireMachineConfig,
  wireVmConfig,
  type DriveConfig,
  type NetworkInterfaceConfig,
} from './resources.js';

test("a fresh VM's configuration is Firecracker's, key for key", () => {
  assert.deepEqual(wireVmConfig(emptyVmConfig()), {
    balloon: null,
    drives: [],
    'boot-source': { kernel_image_path: '', initrd_path: null, boot_args: null },
    'cpu-config': null,
    logger: null,
    'machine-config': {
      vcpu_count: 1,
      mem_size_mib: 128,
      smt: false,
      track_dirty_pages: false,
      huge_pages: 'None',
    },
    metrics: null,
    'mmds-config': null,
    'network-interfaces': [],
    vsock: null,
    entropy: null,
    pmem: [],
    'memory-hotplug': null,
  });
});

test('every device echoes its defaults and nulls; logger, metrics and vsock_id are dropped', () => {
  const c = emptyVmConfig();
  c['boot-source'] = { kernel_image_path: '/k', initrd_path: '/i' };
  c['machine-config'] = { vcpu_count: 2, mem_size_mib: 64, cpu_template: 'None' };
  c.drives = [
    { drive_id: 'root', is_root_device: true, is_read_only: true, path_on_host: '/r' },
    {
      drive_id: 'data',
      is_root_device: false,
      is_read_only: false,
      path_on_host: '/dev/sdz',
      partuuid: 'abc',
      cache_type: 'Writeback',
      io_engine: 'Async',
      allow_block_device: true,
      rate_limiter: { bandwidth: { size: 100, refill_time: 10, one_time_burst: 5 } },
    },
  ];
  c['network-interfaces'] = [
    {
      iface_id: 'eth0',
      host_dev_name: 'tap0',
      guest_mac: '06:00:AC:10:00:02',
      mtu: 1400,
      // A bucket of size 0 limits nothing: Firecracker has no bucket then, so null.
      rx_rate_limiter: { bandwidth: { size: 0, refill_time: 100 } },
      tx_rate_limiter: { ops: { size: 10, refill_time: 100, one_time_burst: 0 } },
    },
    { iface_id: 'eth1', host_dev_name: 'tap1' },
  ];
  c.vsock = { guest_cid: 3, uds_path: '/v.sock', vsock_id: 'old' };
  c.entropy = {};
  c.logger = { level: 'Info', log_path: '/l' };
  c.metrics = { metrics_path: '/m' };
  const w = wireVmConfig(c);
  assert.deepEqual(w['boot-source'], {
    kernel_image_path: '/k',
    initrd_path: '/i',
    boot_args: null,
  });
  assert.deepEqual(w['machine-config'], {
    vcpu_count: 2,
    mem_size_mib: 64,
    smt: false,
    track_dirty_pages: false,
    huge_pages: 'None',
  });
  assert.deepEqual(w.drives, [
    {
      drive_id: 'root',
      partuuid: null,
      is_root_device: true,
      cache_type: 'Unsafe',
      is_read_only: true,
      path_on_host: '/r',
      rate_limiter: null,
      // Unset: our default, "Async" (Firecracker's is "Sync").
      io_engine: 'Async',
      socket: null,
    },
    {
      drive_id: 'data',
      partuuid: 'abc',
      is_root_device: false,
      cache_type: 'Writeback',
      is_read_only: false,
      path_on_host: '/dev/sdz',
      rate_limiter: { bandwidth: { size: 100, one_time_burst: 5, refill_time: 10 }, ops: null },
      io_engine: 'Async',
      socket: null,
      allow_block_device: true,
    },
  ]);
  assert.deepEqual(w['network-interfaces'], [
    {
      iface_id: 'eth0',
      host_dev_name: 'tap0',
      guest_mac: '06:00:ac:10:00:02',
      mtu: 1400,
      rx_rate_limiter: null,
      tx_rate_limiter: {
        bandwidth: null,
        ops: { size: 10, one_time_burst: null, refill_time: 100 },
      },
    },
    {
      iface_id: 'eth1',
      host_dev_name: 'tap1',
      guest_mac: null,
      mtu: null,
      rx_rate_limiter: null,
      tx_rate_limiter: null,
    },
  ]);
  assert.deepEqual(w.vsock, { guest_cid: 3, uds_path: '/v.sock' });
  assert.deepEqual(w.entropy, { rate_limiter: null });
  assert.equal(w.logger, null);
  assert.equal(w.metrics, null);
  // The configuration itself is untouched (a snapshot records it as given).
  assert.equal(c.vsock.vsock_id, 'old');
  assert.equal(c.logger.level, 'Info');
});

test('GET /machine-config shows a static cpu_template other than "None"', () => {
  assert.equal(
    wireMachineConfig({ vcpu_count: 1, mem_size_mib: 32, cpu_template: 'T2' }).cpu_template,
    'T2',
  );
  assert.ok(!('cpu_template' in wireMachineConfig({ vcpu_count: 1, mem_size_mib: 32 })));
});

test('a MAC is any six hex bytes (the multicast bit too), stored in lower case', () => {
  for (const mac of ['07:00:00:00:00:01', 'FF:FF:FF:FF:FF:FF', '00:00:00:00:00:00'])
    assert.equal(
      validateNetworkInterface({ iface_id: 'e', host_dev_name: 't', guest_mac: mac }).guest_mac,
      mac.toLowerCase(),
    );
  for (const mac of [
    '07:00:00:00:00',
    '07:00:00:00:00:0g',
    '7:00:00:00:00:01',
    '07-00-00-00-00-01',
  ])
    assert.throws(
      () => validateNetworkInterface({ iface_id: 'e', host_dev_name: 't', guest_mac: mac }),
      /guest_mac must look like/,
    );
});

const iface = (id: string, tap: string, mac?: string): NetworkInterfaceConfig => ({
  iface_id: id,
  host_dev_name: tap,
  ...(mac ? { guest_mac: mac } : {}),
});
const ids = (l: ReadonlyArray<{ iface_id?: string; drive_id?: string }>) =>
  l.map((x) => x.iface_id ?? x.drive_id);

test("interfaces: a replacement goes last, the last one taking its slot (Firecracker's order)", () => {
  let nets: NetworkInterfaceConfig[] = [];
  for (const [id, tap] of [
    ['a', 'ta'],
    ['b', 'tb'],
    ['c', 'tc'],
  ])
    nets = withNetworkInterface(nets, iface(id!, tap!));
  nets = withNetworkInterface(nets, iface('a', 'tz'));
  assert.deepEqual(ids(nets), ['c', 'b', 'a']);
  assert.equal(nets[2]!.host_dev_name, 'tz');
  // Replacing with the TAP it already had is no conflict.
  assert.deepEqual(ids(withNetworkInterface(nets, iface('b', 'tb'))), ['c', 'a', 'b']);
});

test('a failed interface replacement removes the old one, unless the MAC was the problem', () => {
  let nets = withNetworkInterface([], iface('a', 'ta', '06:00:00:00:00:01'));
  nets = withNetworkInterface(nets, iface('b', 'tb', '06:00:00:00:00:02'));
  const badTap = iface('a', 'bad/name');
  assert.throws(() => withNetworkInterface(nets, badTap), ConfigError);
  assert.deepEqual(ids(afterFailedInterfacePut(nets, badTap)), ['b']);
  const takenTap = iface('a', 'tb');
  assert.throws(() => withNetworkInterface(nets, takenTap), /already used/);
  assert.deepEqual(ids(afterFailedInterfacePut(nets, takenTap)), ['b']);
  const takenMac = iface('a', 'ta', '06:00:00:00:00:02');
  assert.throws(() => withNetworkInterface(nets, takenMac), /MAC address is already in use/);
  assert.deepEqual(afterFailedInterfacePut(nets, takenMac), nets);
});

const drive = (id: string, root = false): DriveConfig => ({
  drive_id: id,
  is_root_device: root,
  is_read_only: true,
  path_on_host: `/${id}`,
});

test('drives: a new root goes first, an update keeps its slot, a root update swaps with slot 0', () => {
  let d: DriveConfig[] = [];
  for (const x of [drive('a'), drive('b'), drive('c')]) d = withDrive(d, x);
  assert.deepEqual(ids(withDrive(d, drive('r', true))), ['r', 'a', 'b', 'c']);
  assert.deepEqual(ids(withDrive(d, { ...drive('b'), path_on_host: '/new' })), ['a', 'b', 'c']);
  assert.deepEqual(ids(withDrive(d, drive('c', true))), ['c', 'b', 'a']);
  d = withDrive(d, drive('r', true));
  assert.throws(() => withDrive(d, drive('b', true)), /root block device already exists/);
  assert.deepEqual(ids(withDrive(d, drive('r', true))), ['r', 'a', 'b', 'c']);
});

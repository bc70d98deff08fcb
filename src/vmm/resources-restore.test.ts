import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ConfigError } from '../util/errors.js';
import {
  configFromSpec,
  validateResources,
  validateRestoreConfig,
  type VmConfig,
  type VmResources,
} from './resources.js';

const dir = mkdtempSync(join(tmpdir(), 'typervisor-restore-config-'));
process.on('exit', () => rmSync(dir, { recursive: true, force: true }));
const kernel = join(dir, 'vmlinux');
const disk = join(dir, 'root.img');
const data = join(dir, 'data.img');
writeFileSync(kernel, 'k');
writeFileSync(disk, Buffer.alloc(4096));
writeFileSync(data, Buffer.alloc(4096));

function resources(): VmResources {
  return {
    machine: { vcpu_count: 2, mem_size_mib: 64 },
    boot: { kernel_image_path: kernel, boot_args: 'console=ttyS0' },
    drives: [
      { drive_id: 'data', is_root_device: false, is_read_only: true, path_on_host: data },
      {
        drive_id: 'root',
        is_root_device: true,
        is_read_only: false,
        path_on_host: disk,
        partuuid: 'abcd-01',
      },
    ],
    network_interfaces: [
      { iface_id: 'eth0', host_dev_name: 'tap0', guest_mac: '06:00:ac:10:00:02' },
      { iface_id: 'eth1', host_dev_name: 'tap1' },
    ],
    vsock: { guest_cid: 3, uds_path: '/tmp/v.sock' },
    entropy: {},
  };
}

/** What a snapshot stores: the configuration as JSON, parsed back. */
function saved(c: VmConfig): unknown {
  return JSON.parse(JSON.stringify(c));
}

test('a configuration from a spec restores to the same machine and devices, in slot order', () => {
  const spec = validateResources(resources());
  const r = validateRestoreConfig(saved(configFromSpec(spec)));
  assert.equal(r.vcpus, 2);
  assert.equal(r.memMib, 64);
  assert.deepEqual(r.devices, spec.devices);
  assert.deepEqual(
    r.devices.map((d) => `${d.kind}/${d.id}`),
    ['block/root', 'block/data', 'rng/entropy', 'net/eth0', 'net/eth1', 'vsock/vsock'],
  );
  assert.equal(r.config.drives[0]!.partuuid, 'abcd-01');
  assert.equal(r.config['boot-source']?.boot_args, 'console=ttyS0');
});

test('a configuration in Firecracker shape (nulls, logger, metrics) is accepted; logger and metrics are dropped', () => {
  const c = {
    ...configFromSpec(validateResources(resources())),
    logger: { level: 'Info', log_path: '/tmp/log' },
    metrics: { metrics_path: '/tmp/m' },
  };
  const r = validateRestoreConfig(saved(c));
  assert.equal(r.config.logger, null);
  assert.equal(r.config.metrics, null);
  const bare = validateRestoreConfig({
    'boot-source': null,
    'machine-config': { vcpu_count: 1, mem_size_mib: 32, smt: false, huge_pages: 'None' },
    drives: [],
    'network-interfaces': [],
    vsock: null,
    entropy: null,
    logger: null,
    metrics: null,
  });
  assert.deepEqual(bare.devices, []);
  assert.equal(bare.config['boot-source'], null);
});

test('network and vsock overrides replace the host names; unknown devices are refused', () => {
  const c = saved(configFromSpec(validateResources(resources())));
  const r = validateRestoreConfig(c, {
    network: [{ ifaceId: 'eth1', hostDevName: 'tapclone7' }],
    vsockUdsPath: '/tmp/clone7.sock',
  });
  const eth1 = r.devices.find((d) => d.id === 'eth1');
  assert.equal(eth1?.kind === 'net' && eth1.tap, 'tapclone7');
  const vsock = r.devices.find((d) => d.kind === 'vsock');
  assert.equal(vsock?.kind === 'vsock' && 'uds' in vsock && vsock.uds, '/tmp/clone7.sock');
  assert.equal(r.config['network-interfaces'][1]!.host_dev_name, 'tapclone7');
  assert.equal(r.config.vsock?.uds_path, '/tmp/clone7.sock');

  assert.throws(
    () => validateRestoreConfig(c, { network: [{ ifaceId: 'eth9', hostDevName: 'tap9' }] }),
    { message: 'Unknown Network Device: eth9' },
  );
  assert.throws(
    () => validateRestoreConfig(c, { network: [{ ifaceId: 'eth0', hostDevName: 'tap1' }] }),
    /already used by another interface/,
  );
  assert.throws(
    () => validateRestoreConfig(c, { network: [{ ifaceId: 'eth0', hostDevName: 'a/b' }] }),
    /TAP name/,
  );
  const noVsock = { ...(c as VmConfig), vsock: null };
  assert.throws(() => validateRestoreConfig(noVsock, { vsockUdsPath: '/tmp/x' }), {
    message: 'Unknown Vsock Device',
  });
});

test('the saved machine is checked with the boot rules; the kernel is not needed', () => {
  const c = saved(configFromSpec(validateResources(resources()))) as VmConfig;
  rmSync(kernel);
  try {
    assert.equal(validateRestoreConfig(c).vcpus, 2); // boot-source is kept, not checked
  } finally {
    writeFileSync(kernel, 'k');
  }
  const machine = (m: object) => ({ ...c, 'machine-config': { ...c['machine-config'], ...m } });
  assert.throws(() => validateRestoreConfig(machine({ vcpu_count: 0 })), /vcpu_count/);
  assert.throws(() => validateRestoreConfig(machine({ mem_size_mib: 1.5 })), /mem_size_mib/);
  assert.throws(
    () => validateRestoreConfig(machine({ smt: true, vcpu_count: 3 })),
    /1 or an even number when smt/,
  );
  assert.equal(validateRestoreConfig(machine({ smt: true })).vcpus, 2);
  // Dirty page tracking is the load's choice, not the saved VM's.
  assert.equal(validateRestoreConfig(machine({ track_dirty_pages: true })).vcpus, 2);
  // A drive whose image is gone is refused by name.
  const gone = { ...c, drives: [{ ...c.drives[0]!, path_on_host: join(dir, 'nope') }] };
  assert.throws(
    () => validateRestoreConfig(gone),
    /drive root: path_on_host .*nope does not exist/,
  );
});

test('hostile configurations are refused with a ConfigError naming the field, never a TypeError', () => {
  const good = saved(configFromSpec(validateResources(resources()))) as Record<string, unknown>;
  const cases: Array<[unknown, RegExp]> = [
    [null, /config: expected an object/],
    [[], /config: expected an object/],
    ['{}', /config: expected an object/],
    [{ ...good, extra: 1 }, /config: unknown field `extra`/],
    [{ ...good, 'machine-config': undefined }, /missing field `machine-config`/],
    [
      { ...good, 'machine-config': { vcpu_count: '1', mem_size_mib: 64 } },
      /vcpu_count: expected a number/,
    ],
    [{ ...good, 'machine-config': { vcpu_count: 1 } }, /missing field `mem_size_mib`/],
    [{ ...good, drives: {} }, /drives: expected an array/],
    [{ ...good, drives: [7] }, /drives\[0\]: expected an object/],
    [{ ...good, drives: [{ drive_id: 'x' }] }, /missing field `is_root_device`/],
    [{ ...good, drives: Array(40).fill({}) }, /drives: 40 entries/],
    [
      { ...good, 'network-interfaces': [{ iface_id: 'e', host_dev_name: 5 }] },
      /host_dev_name: expected a string/,
    ],
    [
      { ...good, vsock: { guest_cid: 3 } },
      /vsock uds_path is required \(unless backend is "vhost"\)/,
    ],
    [{ ...good, vsock: { uds_path: '/x' } }, /vsock: missing field `guest_cid`/],
    [{ ...good, vsock: { guest_cid: 2, uds_path: '/x' } }, /guest_cid/],
    [{ ...good, entropy: { rate_limiter: { ops: { size: 1 } } } }, /refill_time/],
    [{ ...good, 'boot-source': { boot_args: 'x' } }, /kernel_image_path/],
  ];
  for (const [c, re] of cases) {
    assert.throws(
      () => validateRestoreConfig(c),
      (e: unknown) => e instanceof ConfigError && re.test(e.message),
      `case ${JSON.stringify(c)?.slice(0, 80)}`,
    );
  }
  // Every field of every section replaced by values of the wrong type: only ConfigErrors.
  const junk: unknown[] = [null, 0, -1, 1e300, 'x', '', true, [], {}, [1], { a: 1 }];
  const sections = Object.keys(good);
  for (const s of sections) {
    for (const j of junk) {
      try {
        validateRestoreConfig({ ...good, [s]: j });
      } catch (e) {
        assert.ok(e instanceof ConfigError, `${s} = ${JSON.stringify(j)}: ${String(e)}`);
      }
      const sec = good[s];
      const items = Array.isArray(sec) ? sec : sec && typeof sec === 'object' ? [sec] : [];
      for (const item of items as Array<Record<string, unknown>>) {
        for (const f of Object.keys(item)) {
          const mutated = { ...item, [f]: j };
          const value = Array.isArray(sec) ? [mutated] : mutated;
          try {
            validateRestoreConfig({ ...good, [s]: value });
          } catch (e) {
            assert.ok(e instanceof ConfigError, `${s}.${f} = ${JSON.stringify(j)}: ${String(e)}`);
          }
        }
      }
    }
  }
});

test('rate limiters reach the devices, survive a snapshot configuration, and bad ones are refused', () => {
  const r = resources();
  r.drives![0]!.rate_limiter = {
    bandwidth: { size: 1 << 20, refill_time: 100, one_time_burst: 4096 },
    // size 0: no bucket (Firecracker's "disabled").
    ops: { size: 0, refill_time: 100 },
  };
  r.network_interfaces![0]!.tx_rate_limiter = { ops: { size: 100, refill_time: 1000 } };
  r.entropy = { rate_limiter: { bandwidth: { size: 64, refill_time: 10 } } };
  const spec = validateResources(r);
  const byId = (k: string, id: string) => spec.devices.find((d) => d.kind === k && d.id === id)!;
  assert.deepEqual((byId('block', 'data') as { rateLimiter?: unknown }).rateLimiter, {
    bandwidth: { size: 1 << 20, refill_time: 100, one_time_burst: 4096 },
  });
  assert.equal((byId('block', 'root') as { rateLimiter?: unknown }).rateLimiter, undefined);
  assert.deepEqual((byId('net', 'eth0') as { txRateLimiter?: unknown }).txRateLimiter, {
    ops: { size: 100, refill_time: 1000 },
  });
  assert.deepEqual((byId('rng', 'entropy') as { rateLimiter?: unknown }).rateLimiter, {
    bandwidth: { size: 64, refill_time: 10 },
  });
  // Through a snapshot's configuration and back: the same devices.
  const back = validateRestoreConfig(saved(configFromSpec(spec)));
  assert.deepEqual(back.devices, spec.devices);

  for (const bad of [-1, 1.5, 2 ** 64]) {
    const b = resources();
    b.drives![0]!.rate_limiter = { bandwidth: { size: bad, refill_time: 100 } };
    assert.throws(
      () => validateResources(b),
      (e) =>
        e instanceof ConfigError && /drive data: rate_limiter\.bandwidth\.size/.test(e.message),
    );
  }
});

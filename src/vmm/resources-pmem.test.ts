import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { deviceMemoryBase, MMIO_HOLE_END } from '../arch/x86_64/layout.js';
import { ConfigError } from '../util/errors.js';
import { composeCmdline } from './builder.js';
import { deviceMemorySpace } from './device-memory.js';
import {
  configFromSpec,
  validatePmem,
  validateResources,
  validateRestoreConfig,
  wireVmConfig,
  withPmem,
  type VmResources,
} from './resources.js';
import { closeVirtio, planVirtioDevices } from './virtio-plan.js';

const dir = mkdtempSync(join(tmpdir(), 'typervisor-pmem-config-'));
process.on('exit', () => rmSync(dir, { recursive: true, force: true }));
const kernel = join(dir, 'vmlinux');
const a = join(dir, 'a.img');
const b = join(dir, 'b.img');
writeFileSync(kernel, 'k');
writeFileSync(a, '');
truncateSync(a, 4 << 20);
writeFileSync(b, '');
truncateSync(b, 2 << 20);

function resources(): VmResources {
  return {
    machine: { vcpu_count: 1, mem_size_mib: 128 },
    boot: { kernel_image_path: kernel },
    pmem: [
      { id: 'data', path_on_host: b, read_only: true },
      { id: 'root', path_on_host: a, root_device: true },
    ],
  };
}

test('pmem: the root device goes first and becomes root=/dev/pmem0; the rest in order', () => {
  const spec = validateResources(resources());
  assert.deepEqual(spec.root, { readOnly: false, device: '/dev/pmem0' });
  assert.deepEqual(
    spec.devices.map((d) => [d.kind, d.id]),
    [
      ['pmem', 'root'],
      ['pmem', 'data'],
    ],
  );
  const config = configFromSpec(spec);
  assert.deepEqual(config.pmem, [
    { id: 'root', path_on_host: a, root_device: true, read_only: false },
    { id: 'data', path_on_host: b, root_device: false, read_only: true },
  ]);
  // GET /vm/config shape: Firecracker's Pmem fields, rate_limiter null.
  assert.deepEqual((wireVmConfig(config).pmem as unknown[])[1], {
    id: 'data',
    path_on_host: b,
    root_device: false,
    read_only: true,
    rate_limiter: null,
  });
  // What a snapshot records comes back through the restore check unchanged.
  const back = validateRestoreConfig(JSON.parse(JSON.stringify(config)));
  assert.deepEqual(back.config.pmem, config.pmem);
  assert.deepEqual(back.devices, spec.devices);
});

test('pmem: one root device at most, drive or pmem; bad fields are refused', () => {
  assert.throws(
    () =>
      withPmem(withPmem([], { id: 'x', path_on_host: a, root_device: true }), {
        id: 'y',
        path_on_host: b,
        root_device: true,
      }),
    /A root pmem device already exists/,
  );
  const both = resources();
  both.drives = [{ drive_id: 'r', is_root_device: true, is_read_only: true, path_on_host: b }];
  assert.throws(() => validateResources(both), /at most one root device/);
  assert.throws(() => validatePmem({ id: 'p', path_on_host: '' }), ConfigError);
  assert.throws(() => validatePmem({ id: 'p', path_on_host: join(dir, 'nope') }), ConfigError);
  assert.throws(
    () =>
      validatePmem({
        id: 'p',
        path_on_host: a,
        rate_limiter: { ops: { size: 10.5, refill_time: 100 } },
      }),
    /pmem p: rate_limiter\.ops\.size: 10\.5 is not an integer/,
  );
  assert.throws(
    () =>
      validateRestoreConfig({ 'machine-config': { vcpu_count: 1, mem_size_mib: 64 }, pmem: [{}] }),
    /pmem\[0\]: missing field `id`/,
  );
});

test('device memory lies above RAM and the MMIO hole, 1 GiB aligned', () => {
  assert.equal(deviceMemoryBase(128 << 20), MMIO_HOLE_END);
  assert.equal(deviceMemoryBase(3 * 2 ** 30), MMIO_HOLE_END);
  // 4.5 GiB of RAM ends at 5.5 GiB: device memory from 6 GiB.
  assert.equal(deviceMemoryBase(4.5 * 2 ** 30), 6 * 2 ** 30);
});

test('planVirtioDevices: pmem files get 128 MiB aligned guest ranges in order; no room, no plan', () => {
  const spec = validateResources(resources());
  const space = deviceMemorySpace(128 << 20);
  const plan = planVirtioDevices(spec.devices, space);
  try {
    assert.deepEqual(
      plan.memory.map((m) => [m.guestAddr, m.size, m.readOnly]),
      [
        [space.base, 4 << 20, false],
        [space.base + (128 << 20), 2 << 20, true],
      ],
    );
  } finally {
    closeVirtio(plan);
  }
  assert.throws(
    () => planVirtioDevices(spec.devices, { base: space.base, size: 128 << 20 }),
    /do not fit/,
  );
});

test('a root pmem device boots with root=/dev/pmem0 and rw (ro when read-only)', () => {
  assert.match(composeCmdline(validateResources(resources())).toString(), /root=\/dev\/pmem0 rw/);
  const ro = resources();
  ro.pmem = [{ id: 'root', path_on_host: a, root_device: true, read_only: true }];
  assert.match(composeCmdline(validateResources(ro)).toString(), /root=\/dev\/pmem0 ro/);
});

test('pmem: a rate limiter reaches the device and comes back in the configuration', () => {
  const r = resources();
  const limit = { ops: { size: 10, refill_time: 100 }, bandwidth: { size: 0, refill_time: 5 } };
  r.pmem![0] = { ...r.pmem![0]!, rate_limiter: limit };
  assert.equal(validatePmem(r.pmem![0]!), r.pmem![0]);
  const spec = validateResources(r);
  const data = spec.devices.find((d) => d.id === 'data');
  // A bucket of size 0 is no bucket.
  assert.deepEqual(data, {
    kind: 'pmem',
    id: 'data',
    path: b,
    readOnly: true,
    rateLimiter: { ops: { size: 10, refill_time: 100 } },
  });
  const config = configFromSpec(spec);
  assert.deepEqual(config.pmem[1]!.rate_limiter, { ops: { size: 10, refill_time: 100 } });
  assert.deepEqual(
    (wireVmConfig(config).pmem as Array<{ rate_limiter: unknown }>)[1]!.rate_limiter,
    {
      bandwidth: null,
      ops: { size: 10, refill_time: 100, one_time_burst: null },
    },
  );
  const back = validateRestoreConfig(JSON.parse(JSON.stringify(config)));
  assert.deepEqual(back.devices, spec.devices);
});

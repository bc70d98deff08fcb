/**
 * PATCH /drives and PATCH /network-interfaces in the controller (helper P): before boot, the
 * unknown id, an empty update, rate limiters merged as Firecracker merges them; every refusal
 * leaves GET /vm/config as it was. The image swap itself is in test/host/drive-patch.test.ts.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  existsSync,
  fstatSync,
  mkdtempSync,
  rmSync,
  statSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { BuiltVm, VmConfig } from '../vmm/index.js';
import { LoggerControl } from './logger.js';
import { MetricsSystem } from './metrics.js';
import { mergeRateLimiter, POST_BOOT_ONLY, VmmController, type ApiOutcome } from './controller.js';
import { route, type VmmAction } from './routes.js';
import { buildlessController } from './testing/controller.js';

test('mergeRateLimiter: a bucket left out stays, one given replaces, size or refill 0 disables', () => {
  const bw = { size: 1000, refill_time: 100 };
  const ops = { size: 10, one_time_burst: 5, refill_time: 1000 };
  assert.deepEqual(mergeRateLimiter(undefined, { bandwidth: bw }), { bandwidth: bw });
  assert.deepEqual(mergeRateLimiter({ bandwidth: bw }, { ops }), { bandwidth: bw, ops });
  assert.deepEqual(mergeRateLimiter({ bandwidth: bw, ops }, { ops: { size: 0, refill_time: 9 } }), {
    bandwidth: bw,
  });
  assert.equal(
    mergeRateLimiter({ bandwidth: bw }, { bandwidth: { size: 5, refill_time: 0 } }),
    undefined,
  );
  assert.deepEqual(mergeRateLimiter({ bandwidth: bw }, {}), { bandwidth: bw });
});

function controller(saved: VmConfig) {
  const metrics = new MetricsSystem('test');
  const vm = {
    vmm: { state: 'running', exited: new Promise(() => undefined), vcpuCount: 0 },
    devices: {},
    parts: { config: saved },
  } as unknown as BuiltVm;
  const c = new VmmController({
    instanceId: 'test',
    version: '0',
    metrics,
    logger: new LoggerControl(metrics.counters),
    loadSnapshot: async () => Promise.resolve(vm),
  });
  const run = (m: string, p: string, body: unknown): Promise<ApiOutcome> => {
    const r = route(m, p, JSON.stringify(body));
    assert.ok(r.action, r.fault);
    return c.handle(r.action);
  };
  return { c, run, vm };
}

const fault = (o: ApiOutcome) => ('fault' in o ? o.fault : '');

/**
 * Gives a VM its devices' plan slots and a recording stand-in for the device worker's handle
 * (device-worker.test.ts runs the real one); returns the requests the worker was sent.
 */
function withDevices(vm: object, slots: Array<{ kind: string; id: string }>): unknown[] {
  const requests: unknown[] = [];
  Object.assign(vm, {
    deviceWorker: {
      request: (q: unknown) => {
        requests.push(q);
        return Promise.resolve(undefined);
      },
    },
  });
  Object.assign((vm as { parts: object }).parts, { plan: { slots } });
  return requests;
}

test("PATCH before boot: Firecracker's answer, nothing stored", async () => {
  const { c, run } = controller({} as VmConfig);
  const dir = mkdtempSync(join(tmpdir(), 'typervisor-patch-'));
  try {
    const img = join(dir, 'd.img');
    writeFileSync(img, new Uint8Array(4096));
    const put = route(
      'PUT',
      '/drives/d',
      JSON.stringify({
        drive_id: 'd',
        path_on_host: img,
        is_root_device: false,
        is_read_only: true,
      }),
    );
    const p = await c.handle(put.action!);
    assert.equal(p.status, 204, fault(p));
    const before = c.fullConfig();
    let r = await run('PATCH', '/drives/d', {
      drive_id: 'd',
      rate_limiter: { ops: { size: 1, refill_time: 1 } },
    });
    assert.equal(fault(r), POST_BOOT_ONLY);
    r = await run('PATCH', '/network-interfaces/e', { iface_id: 'e', rx_rate_limiter: {} });
    assert.equal(fault(r), POST_BOOT_ONLY);
    r = await run('PATCH', '/pmem/p', {
      id: 'p',
      rate_limiter: { ops: { size: 1, refill_time: 1 } },
    });
    assert.equal(fault(r), POST_BOOT_ONLY);
    assert.deepEqual(c.fullConfig(), before);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('PATCH after boot: rate limiters stored and merged; unknown ids and empty updates refused', async () => {
  const saved = {
    'machine-config': { vcpu_count: 1, mem_size_mib: 32 },
    drives: [{ drive_id: 'root', is_root_device: true, path_on_host: '/x.img' }],
    'network-interfaces': [
      {
        iface_id: 'eth0',
        host_dev_name: 'tap0',
        rx_rate_limiter: { ops: { size: 9, refill_time: 9 } },
      },
    ],
  } as unknown as VmConfig;
  const { c, run, vm } = controller(saved);
  const load: VmmAction = route(
    'PUT',
    '/snapshot/load',
    JSON.stringify({ snapshot_path: 's', mem_file_path: 'm' }),
  ).action!;
  assert.equal((await c.handle(load)).status, 204);
  const before = c.fullConfig();

  let r = await run('PATCH', '/network-interfaces/eth1', { iface_id: 'eth1', rx_rate_limiter: {} });
  assert.match(fault(r), /no network interface with id eth1/);
  r = await run('PATCH', '/drives/other', { drive_id: 'other', rate_limiter: {} });
  assert.match(fault(r), /no drive with id other/);
  r = await run('PATCH', '/drives/root', { drive_id: 'root' });
  assert.match(fault(r), /changes nothing/);
  // A VM whose drive has no device (here: a stand-in without virtio slots): refused, unchanged.
  r = await run('PATCH', '/drives/root', {
    drive_id: 'root',
    path_on_host: '/y.img',
    rate_limiter: { bandwidth: { size: 1, refill_time: 1 } },
  });
  assert.match(fault(r), /^Unable to patch the block device: drive root is not attached/);
  r = await run('PATCH', '/drives/root', {
    drive_id: 'root',
    rate_limiter: { bandwidth: { size: 1, refill_time: 1 } },
  });
  assert.match(fault(r), /^Unable to patch the block device: drive root is not attached/);
  assert.deepEqual(c.fullConfig(), before);

  // From here the VM has its devices: the device worker's mailbox gets the merged limiters
  // (a recording stand-in for the worker's handle; device-worker.test.ts runs the real one).
  const requests = withDevices(vm, [
    { kind: 'block', id: 'root' },
    { kind: 'net', id: 'eth0' },
  ]);
  // Bad values never reach the controller (the route's schema refuses them).
  assert.match(
    route(
      'PATCH',
      '/drives/root',
      JSON.stringify({
        drive_id: 'root',
        rate_limiter: { bandwidth: { size: 1.5, refill_time: 1 } },
      }),
    ).fault!,
    /rate_limiter\.bandwidth\.size/,
  );

  const bw = { size: 1000, refill_time: 100 };
  r = await run('PATCH', '/network-interfaces/eth0', {
    iface_id: 'eth0',
    rx_rate_limiter: { bandwidth: bw },
    tx_rate_limiter: { bandwidth: bw },
  });
  assert.equal(r.status, 204);
  r = await run('PATCH', '/drives/root', {
    drive_id: 'root',
    rate_limiter: { ops: { size: 5, refill_time: 50 } },
  });
  assert.equal(r.status, 204);
  assert.deepEqual(requests, [
    {
      op: 'update-rate-limiter',
      target: {
        kind: 'net',
        id: 'eth0',
        rx: { ops: { size: 9, refill_time: 9 }, bandwidth: bw },
        tx: { bandwidth: bw },
      },
    },
    {
      op: 'update-rate-limiter',
      target: { kind: 'block', id: 'root', limiter: { ops: { size: 5, refill_time: 50 } } },
    },
  ]);
  const after = c.fullConfig();
  assert.deepEqual(after['network-interfaces'][0], {
    iface_id: 'eth0',
    host_dev_name: 'tap0',
    rx_rate_limiter: { ops: { size: 9, refill_time: 9 }, bandwidth: bw },
    tx_rate_limiter: { bandwidth: bw },
  });
  assert.deepEqual(after.drives[0], {
    ...saved.drives[0],
    rate_limiter: { ops: { size: 5, refill_time: 50 } },
  });
  // The VM's own configuration (what a snapshot saves) follows: it is not the controller's.
  assert.notEqual(vm.parts.config, undefined);
  assert.deepEqual(vm.parts.config.drives, after.drives);
  assert.deepEqual(vm.parts.config['network-interfaces'], after['network-interfaces']);

  // A bucket of size 0 removes it (Firecracker's "disabled"): the device gets no ops bucket,
  // and the drive's stored limiter is gone.
  requests.length = 0;
  r = await run('PATCH', '/drives/root', {
    drive_id: 'root',
    rate_limiter: { ops: { size: 0, refill_time: 0 } },
  });
  assert.equal(r.status, 204, fault(r));
  assert.deepEqual(requests, [
    { op: 'update-rate-limiter', target: { kind: 'block', id: 'root', limiter: {} } },
  ]);
  assert.equal(c.fullConfig().drives[0]!.rate_limiter, undefined);
});

test('PUT /serial: checked like log_path, handed to the build, pre-boot only', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'typervisor-serial-'));
  try {
    let consoleFd: number | undefined;
    let serialRateLimiter: unknown;
    const c = buildlessController((_spec, opts) => {
      consoleFd = opts.consoleFd;
      serialRateLimiter = opts.serialRateLimiter;
    });
    const run = (m: string, p: string, body: unknown) => {
      const r = route(m, p, JSON.stringify(body));
      assert.ok(r.action, r.fault);
      if (p === '/serial') assert.deepEqual(r.metric, ['put_api_requests', 'serial']);
      return c.handle(r.action);
    };
    assert.match(route('PUT', '/serial', '{"serial_out_path": 3}').fault!, /serial_out_path/);
    assert.match(route('PUT', '/serial', '{"path": "x"}').fault!, /path/);
    const out = join(dir, 'serial.out');
    symlinkSync(join(dir, 'elsewhere'), join(dir, 'link'));
    let r = await run('PUT', '/serial', { serial_out_path: join(dir, 'link') });
    assert.match(fault(r), /serial_out_path .*symbolic link/);
    assert.equal(existsSync(join(dir, 'elsewhere')), false, 'nothing created through the link');
    r = await run('PUT', '/serial', { serial_out_path: join(dir, 'no', 'such', 'dir', 'f') });
    assert.match(fault(r), /directory does not exist/);
    assert.match(
      route('PUT', '/serial', '{"rate_limiter": {"size": -1, "refill_time": 10}}').fault!,
      /rate_limiter\.size/,
    );
    const limit = { size: 100, refill_time: 10, one_time_burst: 5 };
    r = await run('PUT', '/serial', { serial_out_path: out, rate_limiter: limit });
    assert.equal(r.status, 204, fault(r));
    assert.equal(statSync(out).mode & 0o777, 0o600);

    const kernel = join(dir, 'k');
    writeFileSync(kernel, new Uint8Array(4096));
    assert.equal((await run('PUT', '/boot-source', { kernel_image_path: kernel })).status, 204);
    r = await c.handle({ kind: 'InstanceStart' });
    assert.equal(r.status, 204, fault(r));
    {
      assert.ok(consoleFd !== undefined);
      const a = fstatSync(consoleFd);
      const b = statSync(out);
      assert.deepEqual([a.dev, a.ino], [b.dev, b.ino]);
      assert.deepEqual(serialRateLimiter, limit, 'the rate limiter reaches the build');
      r = await run('PUT', '/serial', { serial_out_path: out });
      assert.equal(
        fault(r),
        'The requested operation is not supported after starting the microVM.',
      );
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('PATCH /pmem after boot: merged per bucket, sent to the device, stored; bad requests refused', async () => {
  const ops = { size: 9, refill_time: 9 };
  const saved = {
    'machine-config': { vcpu_count: 1, mem_size_mib: 32 },
    drives: [],
    pmem: [
      { id: 'pm0', path_on_host: '/p.img', root_device: false, read_only: false },
      { id: 'pm1', path_on_host: '/q.img', rate_limiter: { ops } },
    ],
  } as unknown as VmConfig;
  const { c, run, vm } = controller(saved);
  const load = route(
    'PUT',
    '/snapshot/load',
    JSON.stringify({ snapshot_path: 's', mem_file_path: 'm' }),
  );
  assert.equal((await c.handle(load.action!)).status, 204);
  const before = c.fullConfig();
  const bw = { size: 4 << 20, refill_time: 100 };

  let r = await run('PATCH', '/pmem/pm9', { id: 'pm9', rate_limiter: { bandwidth: bw } });
  assert.equal(
    fault(r),
    'Unable to patch the pmem device: no pmem device with id pm9. Please verify the request arguments.',
  );
  // No device in the VM (a stand-in without virtio slots): refused, nothing stored.
  r = await run('PATCH', '/pmem/pm0', { id: 'pm0', rate_limiter: { bandwidth: bw } });
  assert.match(fault(r), /^Unable to patch the pmem device: pmem device pm0 is not attached/);
  assert.deepEqual(c.fullConfig(), before);
  // Bad bodies never reach the controller.
  for (const [body, why] of [
    [{ id: 'pm0', rate_limiter: { ops: { size: -1, refill_time: 1 } } }, /rate_limiter\.ops\.size/],
    [{ id: 'pm0', rate_limiter: { ops: { size: 1 } } }, /refill_time/],
    [{ id: 'pm0', path_on_host: '/x' }, /path_on_host/],
    [{ rate_limiter: {} }, /id/],
    [{ id: 'pm1', rate_limiter: {} }, /does not match the id from the body/],
  ] as Array<[unknown, RegExp]>) {
    const routed = route('PATCH', '/pmem/pm0', JSON.stringify(body));
    assert.equal(routed.action, undefined, JSON.stringify(body));
    assert.match(routed.fault!, why);
    assert.deepEqual(routed.metric, ['patch_api_requests', 'pmem']);
  }

  const requests = withDevices(vm, [
    { kind: 'pmem', id: 'pm0' },
    { kind: 'pmem', id: 'pm1' },
  ]);
  r = await run('PATCH', '/pmem/pm1', { id: 'pm1', rate_limiter: { bandwidth: bw } });
  assert.equal(r.status, 204, fault(r));
  r = await run('PATCH', '/pmem/pm0', { id: 'pm0' });
  assert.equal(r.status, 204, 'no rate_limiter: nothing to change (as Firecracker)');
  r = await run('PATCH', '/pmem/pm1', {
    id: 'pm1',
    rate_limiter: { ops: { size: 0, refill_time: 0 } },
  });
  assert.equal(r.status, 204, fault(r));
  assert.deepEqual(requests, [
    {
      op: 'update-rate-limiter',
      target: { kind: 'pmem', id: 'pm1', limiter: { ops, bandwidth: bw } },
    },
    { op: 'update-rate-limiter', target: { kind: 'pmem', id: 'pm1', limiter: { bandwidth: bw } } },
  ]);
  const after = c.fullConfig();
  assert.deepEqual(after.pmem[1], {
    id: 'pm1',
    path_on_host: '/q.img',
    rate_limiter: { bandwidth: bw },
  });
  assert.deepEqual(after.pmem[0], saved.pmem[0]);
  // The VM's own configuration (what a snapshot saves) follows.
  assert.deepEqual(vm.parts.config.pmem, after.pmem);
});

/**
 * The configuration as Firecracker's clients see it, over a real socket with the real CLI (no
 * KVM: nothing is booted): GET /vm/config key for key on a fresh and a configured VM, the
 * `Deprecation: true` header on deprecated fields, MACs Firecracker accepts, and what a failed
 * PUT on an existing interface or drive leaves.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { call, raw, startServer, type ServerProcess } from './client.js';

const T = { timeout: 20_000 };

/** One request on a raw connection: the status and the header lines, lower-cased. */
async function headersOf(
  sock: string,
  method: string,
  path: string,
  body: unknown,
): Promise<{ status: number; headers: string[] }> {
  const data = JSON.stringify(body);
  const r = await raw(sock, [
    `${method} ${path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n` +
      `Content-Length: ${Buffer.byteLength(data)}\r\nConnection: close\r\n\r\n${data}`,
  ]);
  const head = r.text.split('\r\n\r\n')[0] ?? '';
  const [statusLine, ...lines] = head.split('\r\n');
  return {
    status: Number(statusLine?.split(' ')[1]),
    headers: lines.map((l) => l.toLowerCase()),
  };
}

describe("configuration in Firecracker's shape (real socket, child process)", () => {
  let srv: ServerProcess;
  let files: string;
  before(async () => {
    srv = await startServer();
    files = join(srv.dir, 'files');
    mkdirSync(files);
    writeFileSync(join(files, 'kernel'), 'not really a kernel');
    writeFileSync(join(files, 'disk.img'), Buffer.alloc(4096));
  });
  after(async () => {
    await srv.kill();
  });
  const sock = () => srv.sock;

  test('GET /vm/config and GET /machine-config on a fresh VM', T, async () => {
    const c = await call(sock(), 'GET', '/vm/config');
    assert.equal(c.status, 200);
    assert.deepEqual(c.json, {
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
    const m = await call(sock(), 'GET', '/machine-config');
    assert.deepEqual(m.json, c.json['machine-config']);
  });

  test(
    'Deprecation: true on cpu_template, vsock_id and mem_file_path, whatever the outcome',
    T,
    async () => {
      const dep = (h: string[]) => h.includes('deprecation: true');
      let r = await headersOf(sock(), 'PUT', '/machine-config', {
        vcpu_count: 1,
        mem_size_mib: 64,
      });
      assert.equal(r.status, 204);
      assert.ok(!dep(r.headers), r.headers.join('|'));
      r = await headersOf(sock(), 'PUT', '/machine-config', {
        vcpu_count: 1,
        mem_size_mib: 64,
        cpu_template: 'None',
      });
      assert.equal(r.status, 204);
      assert.ok(dep(r.headers), r.headers.join('|'));
      r = await headersOf(sock(), 'PATCH', '/machine-config', { cpu_template: 'None' });
      assert.equal(r.status, 204);
      assert.ok(dep(r.headers));
      r = await headersOf(sock(), 'PUT', '/vsock', {
        vsock_id: 'vsock0',
        guest_cid: 3,
        uds_path: join(srv.dir, 'v.sock'),
      });
      assert.equal(r.status, 204);
      assert.ok(dep(r.headers));
      r = await headersOf(sock(), 'PUT', '/vsock', {
        guest_cid: 3,
        uds_path: join(srv.dir, 'v.sock'),
      });
      assert.ok(!dep(r.headers));
      // A refused load still carries the header (Firecracker sets it from the parsed request);
      // it is refused here because the process has configured boot resources.
      r = await headersOf(sock(), 'PUT', '/snapshot/load', {
        snapshot_path: join(files, 'state'),
        mem_file_path: join(files, 'mem'),
      });
      assert.equal(r.status, 400);
      assert.ok(dep(r.headers));
    },
  );

  test('a configured VM reads back in full; vsock_id is not echoed', T, async () => {
    const kernel = join(files, 'kernel');
    const disk = join(files, 'disk.img');
    assert.equal(
      (await call(sock(), 'PUT', '/boot-source', { kernel_image_path: kernel })).status,
      204,
    );
    assert.equal(
      (
        await call(sock(), 'PUT', '/drives/rootfs', {
          drive_id: 'rootfs',
          path_on_host: disk,
          is_root_device: true,
          is_read_only: false,
        })
      ).status,
      204,
    );
    assert.equal(
      (
        await call(sock(), 'PUT', '/network-interfaces/eth0', {
          iface_id: 'eth0',
          host_dev_name: 'tap0',
          guest_mac: '07:00:00:00:00:01', // multicast bit: Firecracker takes it
          rx_rate_limiter: { bandwidth: { size: 1000, refill_time: 100, one_time_burst: 50 } },
        })
      ).status,
      204,
    );
    const c = await call(sock(), 'GET', '/vm/config');
    assert.deepEqual(c.json['boot-source'], {
      kernel_image_path: kernel,
      initrd_path: null,
      boot_args: null,
    });
    assert.deepEqual(c.json.drives, [
      {
        drive_id: 'rootfs',
        partuuid: null,
        is_root_device: true,
        cache_type: 'Unsafe',
        is_read_only: false,
        path_on_host: disk,
        rate_limiter: null,
        // Left unset: our default, "Async" (Firecracker's is "Sync").
        io_engine: 'Async',
        socket: null,
      },
    ]);
    assert.deepEqual(c.json['network-interfaces'], [
      {
        iface_id: 'eth0',
        host_dev_name: 'tap0',
        guest_mac: '07:00:00:00:00:01',
        mtu: null,
        rx_rate_limiter: {
          bandwidth: { size: 1000, one_time_burst: 50, refill_time: 100 },
          ops: null,
        },
        tx_rate_limiter: null,
      },
    ]);
    assert.deepEqual(c.json.vsock, { guest_cid: 3, uds_path: join(srv.dir, 'v.sock') });
    assert.equal(c.json.logger, null);
  });

  test('a failed PUT on an existing interface removes it; one on a drive keeps it', T, async () => {
    const put = (id: string, body: object) =>
      call(sock(), 'PUT', `/network-interfaces/${id}`, { iface_id: id, ...body });
    const ifaces = async () =>
      (await call(sock(), 'GET', '/vm/config')).json['network-interfaces'].map(
        (n: { iface_id: string }) => n.iface_id,
      );
    assert.equal(
      (await put('eth1', { host_dev_name: 'tap1', guest_mac: '06:00:00:00:00:02' })).status,
      204,
    );
    assert.deepEqual(await ifaces(), ['eth0', 'eth1']);
    // The MAC of another interface: checked before the old one goes, so eth0 stays.
    let r = await put('eth0', { host_dev_name: 'tap0', guest_mac: '06:00:00:00:00:02' });
    assert.equal(r.status, 400);
    assert.match(r.json.fault_message, /MAC address is already in use/);
    assert.deepEqual(await ifaces(), ['eth0', 'eth1']);
    // Another interface's TAP: the old eth0 is gone, as in Firecracker.
    r = await put('eth0', { host_dev_name: 'tap1' });
    assert.equal(r.status, 400);
    assert.deepEqual(await ifaces(), ['eth1']);

    const disk = join(files, 'disk.img');
    // is_read_only may be left out: false, as in Firecracker.
    r = await call(sock(), 'PUT', '/drives/data', {
      drive_id: 'data',
      path_on_host: disk,
      is_root_device: false,
    });
    assert.equal(r.status, 204, r.body);
    r = await call(sock(), 'PUT', '/drives/rootfs', {
      drive_id: 'rootfs',
      path_on_host: join(files, 'missing.img'),
      is_root_device: true,
      is_read_only: false,
    });
    assert.equal(r.status, 400);
    const d = (await call(sock(), 'GET', '/vm/config')).json.drives;
    assert.deepEqual(
      d.map((x: { drive_id: string; path_on_host: string; is_read_only: boolean }) => [
        x.drive_id,
        x.path_on_host,
        x.is_read_only,
      ]),
      [
        ['rootfs', disk, false],
        ['data', disk, false],
      ],
    );
  });
});

/**
 * vsock's `backend` (Typervisor's own field) over the real socket: a Firecracker body reads back
 * with Firecracker's two fields, "vhost" reads back with `backend` and no uds_path, and the
 * refusals name the problem.
 */
describe('vsock backend: our extension, echoed only when "vhost"', () => {
  let srv: ServerProcess;
  before(async () => {
    srv = await startServer();
  });
  after(async () => {
    await srv.kill();
  });

  test('PUT /vsock with and without backend; GET /vm/config', T, async () => {
    const vsock = async () => (await call(srv.sock, 'GET', '/vm/config')).json.vsock;
    const uds = join(srv.dir, 'v.sock');
    let r = await call(srv.sock, 'PUT', '/vsock', { guest_cid: 3, uds_path: uds, backend: 'unix' });
    assert.equal(r.status, 204, r.body);
    assert.deepEqual(await vsock(), { guest_cid: 3, uds_path: uds });
    r = await call(srv.sock, 'PUT', '/vsock', { guest_cid: 4, backend: 'vhost' });
    assert.equal(r.status, 204, r.body);
    assert.deepEqual(await vsock(), { guest_cid: 4, backend: 'vhost' });
    for (const [body, re] of [
      [{ guest_cid: 5, backend: 'vhost', uds_path: uds }, /uds_path is for the unix backend/],
      [{ guest_cid: 5 }, /uds_path is required \(unless backend is \\"vhost\\"\)/],
      [{ guest_cid: 5, backend: 'tcp' }, /backend.*one of \\"unix\\", \\"vhost\\"/],
    ] as Array<[object, RegExp]>) {
      r = await call(srv.sock, 'PUT', '/vsock', body);
      assert.equal(r.status, 400, JSON.stringify(body));
      assert.match(r.body, re);
    }
    assert.deepEqual(await vsock(), { guest_cid: 4, backend: 'vhost' });
  });
});

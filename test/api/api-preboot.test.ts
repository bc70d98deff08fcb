/**
 * The Firecracker-compatible API before InstanceStart, over a real Unix socket, with the real
 * CLI as a child process (no KVM needed: nothing is booted). Every endpoint's success case,
 * strict validation (unknown fields, wrong types, ranges), failed requests changing nothing,
 * unsupported features, unknown paths and verbs, oversized bodies, slow and half-closed clients.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { writeFileSync, mkdirSync, statSync } from 'node:fs';
import { connect } from 'node:net';
import { join } from 'node:path';
import { call, raw, startServer, tempDir, type ServerProcess } from './client.js';

const T = { timeout: 20_000 };

describe('API pre-boot (real socket, child process)', () => {
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
  const fault = (r: { json: { fault_message?: string } }) => r.json?.fault_message ?? '';

  test('GET / and /version', T, async () => {
    const r = await call(sock(), 'GET', '/');
    assert.equal(r.status, 200);
    assert.deepEqual(Object.keys(r.json).sort(), ['app_name', 'id', 'state', 'vmm_version']);
    assert.equal(r.json.state, 'Not started');
    assert.equal(r.json.id, 'anonymous-instance');
    const v = await call(sock(), 'GET', '/version');
    assert.equal(v.status, 200);
    assert.match(v.json.firecracker_version, /^\d+\.\d+\.\d+/);
  });

  test(
    'machine-config: defaults, PUT, PATCH, validation, failed request changes nothing',
    T,
    async () => {
      const g = await call(sock(), 'GET', '/machine-config');
      assert.equal(g.status, 200);
      assert.equal(g.json.vcpu_count, 1);
      assert.equal(g.json.mem_size_mib, 128);
      assert.equal(
        (await call(sock(), 'PUT', '/machine-config', { vcpu_count: 2, mem_size_mib: 256 })).status,
        204,
      );
      assert.equal(
        (await call(sock(), 'PATCH', '/machine-config', { mem_size_mib: 64 })).status,
        204,
      );
      let r = await call(sock(), 'PUT', '/machine-config', { vcpu_count: 0, mem_size_mib: 64 });
      assert.equal(r.status, 400);
      assert.match(fault(r), /vcpu_count/);
      r = await call(sock(), 'PUT', '/machine-config', {
        vcpu_count: 1,
        mem_size_mib: 64,
        bogus: true,
      });
      assert.equal(r.status, 400);
      assert.match(fault(r), /unknown field `bogus`/);
      r = await call(sock(), 'PUT', '/machine-config', { vcpu_count: '1', mem_size_mib: 64 });
      assert.equal(r.status, 400);
      assert.match(fault(r), /vcpu_count.*got a string/);
      r = await call(sock(), 'PUT', '/machine-config', { vcpu_count: 1 });
      assert.match(fault(r), /missing field `mem_size_mib`/);
      r = await call(sock(), 'PATCH', '/machine-config', { mem_size_mib: 8 });
      assert.equal(r.status, 400);
      assert.match(fault(r), /mem_size_mib/);
      r = await call(sock(), 'PATCH', '/machine-config', {});
      assert.equal(fault(r), 'Empty PATCH request.');
      r = await call(sock(), 'PUT', '/machine-config', {
        vcpu_count: 3,
        mem_size_mib: 64,
        smt: true,
      });
      assert.equal(r.status, 400);
      assert.match(fault(r), /vcpu_count must be 1 or an even number when smt is enabled/);
      const after_ = await call(sock(), 'GET', '/machine-config');
      assert.equal(after_.json.vcpu_count, 2);
      assert.equal(after_.json.mem_size_mib, 64);
    },
  );

  test('boot-source: PUT, missing file, unknown field', T, async () => {
    let r = await call(sock(), 'PUT', '/boot-source', { kernel_image_path: join(files, 'nope') });
    assert.equal(r.status, 400);
    assert.match(fault(r), /does not exist/);
    r = await call(sock(), 'PUT', '/boot-source', {
      kernel_image_path: join(files, 'kernel'),
      boot_args: 'console=ttyS0',
      x: 1,
    });
    assert.match(fault(r), /unknown field `x`/);
    r = await call(sock(), 'PUT', '/boot-source', {
      kernel_image_path: join(files, 'kernel'),
      boot_args: 'console=ttyS0',
    });
    assert.equal(r.status, 204);
    const c = await call(sock(), 'GET', '/vm/config');
    assert.equal(c.json['boot-source'].boot_args, 'console=ttyS0');
  });

  test(
    'drives: PUT, id checks, root device rule, missing file, PATCH is post-boot only',
    T,
    async () => {
      const disk = join(files, 'disk.img');
      const ok = {
        drive_id: 'root',
        path_on_host: disk,
        is_root_device: true,
        is_read_only: false,
      };
      assert.equal((await call(sock(), 'PUT', '/drives/root', ok)).status, 204);
      let r = await call(sock(), 'PUT', '/drives/other', ok);
      assert.match(fault(r), /does not match the id from the body/);
      r = await call(sock(), 'PUT', '/drives/bad-id', { ...ok, drive_id: 'bad-id' });
      assert.match(fault(r), /alphanumeric/);
      r = await call(sock(), 'PUT', '/drives/second', { ...ok, drive_id: 'second' });
      assert.match(fault(r), /root block device already exists/);
      r = await call(sock(), 'PUT', '/drives/second', {
        ...ok,
        drive_id: 'second',
        is_root_device: false,
        path_on_host: join(files, 'missing'),
      });
      assert.equal(r.status, 400);
      r = await call(sock(), 'PUT', '/drives/second', {
        ...ok,
        drive_id: 'second',
        is_root_device: false,
        is_read_only: true,
      });
      assert.equal(r.status, 204);
      r = await call(sock(), 'PUT', '/drives/', ok);
      assert.equal(r.status, 400);
      r = await call(sock(), 'PATCH', '/drives/root', { drive_id: 'root', path_on_host: disk });
      assert.equal(
        fault(r),
        'The requested operation is not supported before starting the microVM.',
      );
      const c = await call(sock(), 'GET', '/vm/config');
      assert.deepEqual(
        c.json.drives.map((d: { drive_id: string }) => d.drive_id),
        ['root', 'second'],
      );
    },
  );

  test('network-interfaces, vsock, entropy: stored and validated', T, async () => {
    assert.equal(
      (
        await call(sock(), 'PUT', '/network-interfaces/eth0', {
          iface_id: 'eth0',
          host_dev_name: 'tap0',
          guest_mac: '06:00:AC:10:00:02',
        })
      ).status,
      204,
    );
    let r = await call(sock(), 'PUT', '/network-interfaces/eth1', {
      iface_id: 'eth1',
      host_dev_name: 'tap1',
      guest_mac: '06:00:ac:10:00:02',
    });
    assert.match(fault(r), /MAC address is already in use/);
    r = await call(sock(), 'PUT', '/network-interfaces/eth1', {
      iface_id: 'eth1',
      host_dev_name: 'tap1',
      mtu: 10,
    });
    assert.match(fault(r), /mtu/);
    r = await call(sock(), 'PATCH', '/network-interfaces/eth0', { iface_id: 'eth0' });
    assert.equal(r.status, 400);
    r = await call(sock(), 'PUT', '/vsock', { guest_cid: 2, uds_path: '/tmp/v.sock' });
    assert.match(fault(r), /guest_cid/);
    assert.equal(
      (await call(sock(), 'PUT', '/vsock', { guest_cid: 3, uds_path: '/tmp/v.sock' })).status,
      204,
    );
    r = await call(sock(), 'PUT', '/entropy', {
      rate_limiter: { bandwidth: { size: -1, refill_time: 100 } },
    });
    assert.match(fault(r), /rate_limiter\.bandwidth\.size/);
    assert.equal(
      (
        await call(sock(), 'PUT', '/entropy', {
          rate_limiter: { ops: { size: 10, refill_time: 100 } },
        })
      ).status,
      204,
    );
    const c = await call(sock(), 'GET', '/vm/config');
    assert.equal(c.json['network-interfaces'].length, 1);
    assert.equal(c.json.vsock.guest_cid, 3);
    assert.deepEqual(c.json.entropy, {
      rate_limiter: { bandwidth: null, ops: { size: 10, one_time_burst: null, refill_time: 100 } },
    });
  });

  test(
    'balloon: PUT checked against the memory, GET echoes it, the rest need a VM',
    T,
    async () => {
      let r = await call(sock(), 'GET', '/balloon');
      assert.equal(fault(r), 'No balloon device found.');
      const mem = (await call(sock(), 'GET', '/machine-config')).json.mem_size_mib as number;
      r = await call(sock(), 'PUT', '/balloon', { amount_mib: mem + 1, deflate_on_oom: true });
      assert.equal(fault(r), 'Amount of pages requested is too large.');
      r = await call(sock(), 'PUT', '/balloon', { amount_mib: 1 });
      assert.match(fault(r), /deflate_on_oom/);
      r = await call(sock(), 'PUT', '/balloon', {
        amount_mib: 1,
        deflate_on_oom: true,
        stats_polling_interval_s: 70000,
      });
      assert.match(fault(r), /stats_polling_interval_s/);
      assert.equal(
        (await call(sock(), 'GET', '/balloon')).status,
        400,
        'a failed PUT sets nothing',
      );
      r = await call(sock(), 'PUT', '/balloon', {
        amount_mib: 1,
        deflate_on_oom: true,
        stats_polling_interval_s: 2,
      });
      assert.equal(r.status, 204, r.body);
      const want = {
        amount_mib: 1,
        deflate_on_oom: true,
        stats_polling_interval_s: 2,
        free_page_hinting: false,
        free_page_reporting: false,
      };
      assert.deepEqual((await call(sock(), 'GET', '/balloon')).json, want);
      assert.deepEqual((await call(sock(), 'GET', '/vm/config')).json.balloon, want);
      const post = 'The requested operation is not supported before starting the microVM.';
      for (const [m, p, b] of [
        ['PATCH', '/balloon', { amount_mib: 2 }],
        ['GET', '/balloon/statistics', undefined],
        ['PATCH', '/balloon/statistics', { stats_polling_interval_s: 1 }],
        ['PATCH', '/balloon/hinting/start', undefined],
        ['GET', '/balloon/hinting/status', undefined],
        ['PATCH', '/balloon/hinting/stop', undefined],
      ] as Array<[string, string, unknown]>)
        assert.equal(fault(await call(sock(), m, p, b)), post, `${m} ${p}`);
    },
  );

  test('logger and metrics: PUT once, metrics re-init refused, bad level refused', T, async () => {
    let r = await call(sock(), 'PUT', '/logger', { level: 'Loud' });
    assert.equal(r.status, 400);
    assert.equal(
      (await call(sock(), 'PUT', '/logger', { level: 'warning', show_level: true })).status,
      204,
    );
    const m = join(srv.dir, 'metrics.json');
    assert.equal((await call(sock(), 'PUT', '/metrics', { metrics_path: m })).status, 204);
    assert.ok(statSync(m).isFile());
    r = await call(sock(), 'PUT', '/metrics', { metrics_path: m });
    assert.match(fault(r), /Reinitialization of metrics not allowed/);
  });

  test(
    'post-boot-only actions are refused before boot; InstanceStart with a bad configuration fails with 400',
    T,
    async () => {
      for (const a of ['SendCtrlAltDel', 'FlushMetrics']) {
        const r = await call(sock(), 'PUT', '/actions', { action_type: a });
        assert.equal(
          fault(r),
          'The requested operation is not supported before starting the microVM.',
        );
      }
      let r = await call(sock(), 'PATCH', '/vm', { state: 'Paused' });
      assert.equal(
        fault(r),
        'The requested operation is not supported before starting the microVM.',
      );
      r = await call(sock(), 'PATCH', '/vm', { state: 'Sleeping' });
      assert.match(fault(r), /state/);
      r = await call(sock(), 'PUT', '/actions', { action_type: 'Reboot' });
      assert.match(fault(r), /action_type/);
      r = await call(sock(), 'PUT', '/actions', { action_type: 'InstanceStart' });
      assert.equal(r.status, 400);
      assert.match(fault(r), /^Start microvm error: /); // net/vsock are attached now (issue 5)
      assert.equal((await call(sock(), 'GET', '/')).json.state, 'Not started');
    },
  );

  test('unsupported features answer 400 saying so', T, async () => {
    const cases: Array<[string, string, unknown?]> = [
      ['DELETE', '/drives/root'],
      ['DELETE', '/pmem/p0'],
    ];
    for (const [m, p, b] of cases) {
      const r = await call(sock(), m, p, b);
      assert.equal(r.status, 400, `${m} ${p}`);
      assert.match(fault(r), /not supported: .* not implemented in Typervisor yet/, `${m} ${p}`);
    }
  });

  test('pmem: PUT stores, GET /vm/config echoes; bad requests change nothing', T, async () => {
    const img = join(files, 'pmem.img');
    writeFileSync(img, Buffer.alloc(2 * 1024 * 1024));
    let r = await call(sock(), 'PUT', '/pmem/pm0', {
      id: 'pm0',
      path_on_host: img,
      read_only: true,
    });
    assert.equal(r.status, 204, fault(r));
    r = await call(sock(), 'PUT', '/pmem/pm1', { id: 'pm0', path_on_host: img });
    assert.match(fault(r), /does not match the id from the body/);
    r = await call(sock(), 'PUT', '/pmem/pm1', { id: 'pm1', path_on_host: join(files, 'nope') });
    assert.equal(r.status, 400);
    assert.match(fault(r), /pmem pm1: path_on_host/);
    r = await call(sock(), 'PUT', '/pmem/pm1', { id: 'pm1' });
    assert.match(fault(r), /path_on_host/);
    let c = await call(sock(), 'GET', '/vm/config');
    assert.deepEqual(c.json.pmem, [
      { id: 'pm0', path_on_host: img, root_device: false, read_only: true, rate_limiter: null },
    ]);
    // A rate limiter (on flushes) is taken at PUT; PATCH is post-boot only.
    const ops = { size: 10, refill_time: 100 };
    r = await call(sock(), 'PUT', '/pmem/pm0', {
      id: 'pm0',
      path_on_host: img,
      read_only: true,
      rate_limiter: { ops },
    });
    assert.equal(r.status, 204, fault(r));
    r = await call(sock(), 'PATCH', '/pmem/pm0', {
      id: 'pm0',
      rate_limiter: { ops: { size: 1, refill_time: 1 } },
    });
    assert.equal(fault(r), 'The requested operation is not supported before starting the microVM.');
    r = await call(sock(), 'PATCH', '/pmem/pm0', {
      id: 'pm0',
      rate_limiter: { ops: { size: 'x', refill_time: 1 } },
    });
    assert.match(fault(r), /rate_limiter\.ops\.size/);
    r = await call(sock(), 'PUT', '/pmem/pm0', {
      id: 'pm0',
      path_on_host: img,
      rate_limiter: { bandwidth: { size: 2 ** 64, refill_time: 1 } },
    });
    assert.match(fault(r), /rate_limiter\.bandwidth\.size/);
    c = await call(sock(), 'GET', '/vm/config');
    assert.deepEqual(c.json.pmem, [
      {
        id: 'pm0',
        path_on_host: img,
        root_device: false,
        read_only: true,
        rate_limiter: { bandwidth: null, ops: { ...ops, one_time_burst: null } },
      },
    ]);
  });

  test(
    'memory hotplug: GET needs a PUT first; PUT checks sizes; PATCH is post-boot',
    T,
    async () => {
      let r = await call(sock(), 'GET', '/hotplug/memory');
      assert.equal(r.status, 400);
      assert.match(fault(r), /memory hotplug is not configured/);
      r = await call(sock(), 'PUT', '/hotplug/memory', { total_size_mib: 200 });
      assert.match(fault(r), /total_size_mib must be a positive multiple of slot_size_mib/);
      r = await call(sock(), 'PUT', '/hotplug/memory', { total_size_mib: 256, block_size_mib: 3 });
      assert.match(fault(r), /block_size_mib must be a power of 2/);
      r = await call(sock(), 'PUT', '/hotplug/memory', { total_size_mib: 256, slot_size_mib: 64 });
      assert.equal(r.status, 400); // the schema's minimum (128)
      r = await call(sock(), 'PUT', '/hotplug/memory', { total_size_mib: 256 });
      assert.equal(r.status, 204, fault(r));
      r = await call(sock(), 'GET', '/hotplug/memory');
      assert.deepEqual(r.json, {
        total_size_mib: 256,
        slot_size_mib: 128,
        block_size_mib: 2,
        plugged_size_mib: 0,
        requested_size_mib: 0,
      });
      r = await call(sock(), 'PATCH', '/hotplug/memory', { requested_size_mib: 128 });
      assert.equal(r.status, 400);
      const c = await call(sock(), 'GET', '/vm/config');
      assert.deepEqual(c.json['memory-hotplug'], {
        total_size_mib: 256,
        block_size_mib: 2,
        slot_size_mib: 128,
      });
    },
  );

  test('snapshots before boot: create needs a VM, load a fresh process', T, async () => {
    let r = await call(sock(), 'PUT', '/snapshot', {});
    assert.equal(fault(r), 'Missing snapshot operation type.');
    r = await call(sock(), 'PUT', '/snapshot/create', { snapshot_path: 's', mem_file_path: 'm' });
    assert.equal(fault(r), 'The requested operation is not supported before starting the microVM.');
    r = await call(sock(), 'PUT', '/snapshot/load', { snapshot_path: 's' });
    assert.match(fault(r), /either `mem_backend` or `mem_file_path` is required/);
    assert.equal((await call(sock(), 'GET', '/')).json.state, 'Not started');
  });

  test('unknown paths, wrong verbs, bodies where none belong, malformed JSON', T, async () => {
    let r = await call(sock(), 'GET', '/nope');
    assert.equal(r.status, 400);
    assert.equal(fault(r), 'Invalid request method and/or path: GET /nope.');
    r = await call(sock(), 'POST', '/actions', { action_type: 'InstanceStart' });
    assert.match(fault(r), /Invalid request method and\/or path: POST/);
    r = await call(sock(), 'DELETE', '/machine-config');
    assert.equal(r.status, 400);
    r = await call(sock(), 'GET', '/version/extra');
    assert.equal(r.status, 400);
    r = await call(sock(), 'PUT', '/machine-config');
    assert.equal(fault(r), 'Empty PUT request.');
    r = await call(sock(), 'GET', '/', '{}');
    assert.equal(fault(r), 'GET request cannot have a body.');
    for (const body of [
      '{',
      '[]',
      'null',
      '"x"',
      '{"vcpu_count":1,"mem_size_mib":64,}',
      '\u0000',
    ]) {
      r = await call(sock(), 'PUT', '/machine-config', body);
      assert.equal(r.status, 400, body);
      assert.match(fault(r), /deserializing the json body/);
    }
  });

  test('oversized bodies are refused without being read; the server stays small', T, async () => {
    const big = JSON.stringify({ kernel_image_path: 'x'.repeat(60_000) });
    const r = await call(sock(), 'PUT', '/boot-source', big);
    assert.equal(r.status, 400);
    assert.match(fault(r), /larger than the limit of 51200/);
    // A declared 1 GiB body: refused at once, the connection closed, nothing buffered.
    const huge = await raw(
      sock(),
      ['PUT /boot-source HTTP/1.1\r\nHost: x\r\nContent-Length: 1073741824\r\n\r\n{"a":'],
      { timeoutMs: 3000 },
    );
    // The answer is a 400, unless the close overtook it (the client was still writing).
    assert.equal(huge.closed, true);
    if (huge.text) assert.match(huge.text, /^HTTP\/1.1 400/);
    // Chunked: cut off once it passes the limit.
    const chunk = 'x'.repeat(16_384);
    const parts = ['PUT /boot-source HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n'];
    for (let i = 0; i < 8; i++) parts.push(`${chunk.length.toString(16)}\r\n${chunk}\r\n`);
    const ch = await raw(sock(), parts, { timeoutMs: 3000 });
    assert.equal(ch.closed, true);
    if (ch.text) assert.match(ch.text, /^HTTP\/1.1 400/);
    assert.equal((await call(sock(), 'GET', '/')).status, 200);
  });

  test('slow, silent and half-closed clients do not block others', T, async () => {
    // Half a request line, then nothing: others are served meanwhile.
    const silent = connect(srv.sock);
    silent.on('error', () => undefined);
    silent.write('PUT /machine-config HTTP/1.1\r\nContent-Length: 100\r\n\r\n{"vcpu');
    const partial = connect(srv.sock);
    partial.on('error', () => undefined);
    const partialClosed = new Promise<number>((resolve) =>
      partial.on('close', () => resolve(Date.now())),
    );
    const opened = Date.now();
    partial.resume(); // read (and drop) what the server sends, so its close is seen
    partial.write('GET / HT');
    const t0 = Date.now();
    for (let i = 0; i < 5; i++) assert.equal((await call(sock(), 'GET', '/')).status, 200);
    assert.ok(Date.now() - t0 < 2000, 'requests were delayed by the silent clients');
    // Half-closed after a partial body: the server answers or closes, never hangs.
    const half = await raw(
      sock(),
      ['PUT /machine-config HTTP/1.1\r\nContent-Length: 50\r\n\r\n{"vcpu_count"'],
      { endAfter: true, timeoutMs: 12_000 },
    );
    assert.equal(half.closed, true);
    // The stalled request is dropped by the header timeout (5 s).
    const closedAt = await Promise.race([
      partialClosed,
      new Promise<number>((r) => setTimeout(() => r(0), 12_000)),
    ]);
    assert.ok(closedAt > 0, 'a client that never finished its headers was not disconnected');
    assert.ok(closedAt - opened < 11_000);
    silent.destroy();
    // A complete request after all that.
    assert.equal((await call(sock(), 'GET', '/machine-config')).status, 200);
  });

  test('requests on one connection are answered in order', T, async () => {
    const reqs = [
      'GET /version HTTP/1.1\r\nHost: x\r\n\r\n',
      'PUT /machine-config HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\n{}}',
      'GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n',
    ];
    const r = await raw(sock(), [reqs.join('')], { timeoutMs: 3000 });
    const statuses = [...r.text.matchAll(/HTTP\/1\.1 (\d{3}) /g)].map((m) => m[1]);
    assert.deepEqual(statuses, ['200', '400', '200']);
  });
});

describe('API socket path handling', () => {
  test(
    'a stale socket is replaced; a regular file is refused; a live socket is refused',
    { timeout: 20_000 },
    async () => {
      const dir = tempDir();
      const first = await startServer([], dir);
      await first.kill(); // SIGKILL: the socket file stays behind, nobody listens
      const second = await startServer([], dir);
      assert.equal((await call(second.sock, 'GET', '/')).status, 200);
      const { spawnSync } = await import('node:child_process');
      const { CLI } = await import('./client.js');
      const live = spawnSync(process.execPath, [CLI, '--api-sock', second.sock], {
        encoding: 'utf8',
        timeout: 10_000,
      });
      assert.notEqual(live.status, 0);
      assert.match(live.stderr, /another process is listening/);
      await second.kill();
      const file = join(dir, 'plain');
      writeFileSync(file, 'keep me');
      const r = spawnSync(process.execPath, [CLI, '--api-sock', file], {
        encoding: 'utf8',
        timeout: 10_000,
      });
      assert.notEqual(r.status, 0);
      assert.match(r.stderr, /not a socket/);
    },
  );

  test(
    'bad flags exit 153; --no-api without --config-file is refused',
    { timeout: 20_000 },
    async () => {
      const { spawnSync } = await import('node:child_process');
      const { CLI } = await import('./client.js');
      let r = spawnSync(process.execPath, [CLI, '--api-sock', '/tmp/x.sock', '--bogus'], {
        encoding: 'utf8',
        timeout: 10_000,
      });
      assert.equal(r.status, 153);
      r = spawnSync(process.execPath, [CLI, '--no-api'], { encoding: 'utf8', timeout: 10_000 });
      assert.equal(r.status, 153);
      assert.match(r.stderr, /--no-api requires --config-file/);
      r = spawnSync(process.execPath, [CLI, '--id', 'bad id!', '--api-sock', '/tmp/x.sock'], {
        encoding: 'utf8',
        timeout: 10_000,
      });
      assert.equal(r.status, 153);
    },
  );
});

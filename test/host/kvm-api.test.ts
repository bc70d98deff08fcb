/**
 * Needs /dev/kvm, gcc and ld. The Firecracker-compatible API after InstanceStart, with the tiny
 * guests (test/guests): spin.elf keeps running while we pause, resume, send Ctrl-Alt-Del, flush
 * metrics and try pre-boot-only requests; poweroff.elf with --config-file (and --no-api) starts
 * at once and exits 0; GET /vm/config fed back as --config-file is accepted.
 */
import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { call, CLI, startServer, tempDir, type ServerProcess } from '../api/client.js';
import { guestPath, tinyGuests } from './helpers.js';
import { kvmVmFds } from './daemon-helpers.js';
import { makeBzImage } from '../fixtures/kernel-images.js';
import { detectKvm } from '../../src/kvm/detect.js';
import { validateFcMetrics } from '../../src/api/fc-metrics-validator.js';

const guests = tinyGuests();
const T = { timeout: 30_000, skip: guests.skip ?? false };
const fault = (r: { json: { fault_message?: string } }) => r.json?.fault_message ?? '';

/** The spin guest (1 vCPU, 32 MiB) configured and started over `sock`: Running. */
async function startSpin(sock: string): Promise<void> {
  assert.equal(
    (await call(sock, 'PUT', '/machine-config', { vcpu_count: 1, mem_size_mib: 32 })).status,
    204,
  );
  assert.equal(
    (await call(sock, 'PUT', '/boot-source', { kernel_image_path: guestPath('spin') })).status,
    204,
  );
  const start = await call(sock, 'PUT', '/actions', { action_type: 'InstanceStart' });
  assert.equal(start.status, 204, start.body);
  assert.equal((await call(sock, 'GET', '/')).json.state, 'Running');
}

describe('API post-boot with tiny guests (KVM)', () => {
  const servers: ServerProcess[] = [];
  after(async () => {
    for (const s of servers) await s.kill();
  });

  test('InstanceStart, pause/resume, Ctrl-Alt-Del, metrics, post-boot misuse', T, async () => {
    const srv = await startServer(['--id', 'spin-1']);
    servers.push(srv);
    const sock = srv.sock;
    const metrics = join(srv.dir, 'metrics.json');
    assert.equal(
      (await call(sock, 'PUT', '/metrics', { metrics_path: metrics, emit_id: true })).status,
      204,
    );
    await startSpin(sock);

    assert.equal((await call(sock, 'PATCH', '/vm', { state: 'Paused' })).status, 204);
    assert.equal((await call(sock, 'GET', '/')).json.state, 'Paused');
    assert.equal((await call(sock, 'PATCH', '/vm', { state: 'Paused' })).status, 204); // idempotent
    assert.equal((await call(sock, 'PATCH', '/vm', { state: 'Resumed' })).status, 204);
    assert.equal((await call(sock, 'GET', '/')).json.state, 'Running');
    // Firecracker's lines for the timed actions (the log goes to stderr without a log path).
    assert.match(srv.stderr(), /\[spin-1:fc_api\] 'pause vm' API request took \d+ us\.\n/);
    assert.match(srv.stderr(), /\[spin-1:fc_api\] 'resume vm' API request took \d+ us\.\n/);
    assert.equal(
      (await call(sock, 'PUT', '/actions', { action_type: 'SendCtrlAltDel' })).status,
      204,
    );
    assert.equal(
      (await call(sock, 'PUT', '/actions', { action_type: 'FlushMetrics' })).status,
      204,
    );

    for (const [m, p, b] of [
      ['PUT', '/boot-source', { kernel_image_path: guestPath('spin') }],
      ['PUT', '/machine-config', { vcpu_count: 1, mem_size_mib: 64 }],
      ['PATCH', '/machine-config', { mem_size_mib: 64 }],
      ['PUT', '/actions', { action_type: 'InstanceStart' }],
      ['PUT', '/metrics', { metrics_path: metrics }],
      ['PUT', '/logger', { level: 'Info' }],
      ['PUT', '/vsock', { guest_cid: 3, uds_path: '/tmp/v.sock' }],
      ['PUT', '/entropy', {}],
    ] as Array<[string, string, unknown]>) {
      const r = await call(sock, m, p, b);
      assert.equal(r.status, 400, `${m} ${p}`);
      assert.equal(
        fault(r),
        'The requested operation is not supported after starting the microVM.',
        `${m} ${p}`,
      );
    }
    let r = await call(sock, 'PUT', '/drives/d0', {
      drive_id: 'd0',
      path_on_host: guestPath('spin'),
      is_root_device: false,
      is_read_only: true,
    });
    assert.match(fault(r), /hot-plugging/);
    r = await call(sock, 'PATCH', '/drives/d0', { drive_id: 'd0' });
    assert.match(fault(r), /no drive with id d0/);

    const cfg = await call(sock, 'GET', '/vm/config');
    assert.equal(cfg.status, 200);
    assert.equal(cfg.json['machine-config'].mem_size_mib, 32);
    assert.equal(cfg.json['boot-source'].kernel_image_path, guestPath('spin'));

    const lines = readFileSync(metrics, 'utf8')
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l));
    const last = lines[lines.length - 1];
    assert.equal(last.id, 'spin-1');
    assert.equal(typeof last.utc_timestamp_ms, 'number');
    // Firecracker's schema: every group on every line, its names only (fc-metrics-validator.ts).
    for (const l of lines) assert.deepEqual(validateFcMetrics(l, l.utc_timestamp_ms), []);
    assert.ok(last.put_api_requests.actions_count >= 1);
    assert.equal(typeof last.uart.write_count, 'number');
    assert.equal(typeof last.i8042.reset_count, 'number');

    await srv.kill();
    assert.equal(srv.child.signalCode, 'SIGKILL');
  });

  test(
    'InstanceStart failures answer 400 with the reason; the VM can still be started after',
    T,
    async () => {
      const srv = await startServer();
      servers.push(srv);
      const bogus = join(srv.dir, 'bogus');
      writeFileSync(bogus, 'not an ELF or bzImage at all');
      assert.equal(
        (await call(srv.sock, 'PUT', '/boot-source', { kernel_image_path: bogus })).status,
        204,
      );
      const r = await call(srv.sock, 'PUT', '/actions', { action_type: 'InstanceStart' });
      assert.equal(r.status, 400);
      assert.match(fault(r), /^Start microvm error: /);
      assert.equal((await call(srv.sock, 'GET', '/')).json.state, 'Not started');
      assert.equal(
        (await call(srv.sock, 'PUT', '/boot-source', { kernel_image_path: guestPath('poweroff') }))
          .status,
        204,
      );
      assert.equal(
        (await call(srv.sock, 'PUT', '/machine-config', { vcpu_count: 1, mem_size_mib: 32 }))
          .status,
        204,
      );
      assert.equal(
        (await call(srv.sock, 'PUT', '/actions', { action_type: 'InstanceStart' })).status,
        204,
      );
      const ex = await srv.exited; // the guest powers off: the process exits 0, as Firecracker's does
      assert.equal(ex.code, 0, srv.stderr());
      assert.equal(srv.stdout(), 'tiny guest up\n');
    },
  );

  test(
    "on a PVM-only host, InstanceStart of a bzImage answers 400 with the CLI's explanation",
    {
      ...T,
      skip: T.skip || (detectKvm().canRunStockGuests ? 'this host runs stock kernels' : false),
    },
    async () => {
      const srv = await startServer();
      servers.push(srv);
      const bz = join(srv.dir, 'bzImage');
      writeFileSync(bz, makeBzImage());
      assert.equal(
        (await call(srv.sock, 'PUT', '/boot-source', { kernel_image_path: bz })).status,
        204,
      );
      const r = await call(srv.sock, 'PUT', '/actions', { action_type: 'InstanceStart' });
      assert.equal(r.status, 400);
      assert.match(
        fault(r),
        /^Start microvm error: this host's KVM cannot run stock Linux kernels \(.*\); run it in the lab/,
      );
      assert.equal((await call(srv.sock, 'GET', '/')).json.state, 'Not started');
    },
  );

  test(
    '--config-file boots at once and exits 0 when the guest powers off; metrics flushed on exit',
    T,
    async () => {
      const dir = tempDir();
      const metrics = join(dir, 'm.json');
      const cfg = join(dir, 'vm.json');
      writeFileSync(
        cfg,
        JSON.stringify({
          'boot-source': { kernel_image_path: guestPath('poweroff') },
          'machine-config': { vcpu_count: 1, mem_size_mib: 32 },
          metrics: { metrics_path: metrics },
        }),
      );
      const log = join(dir, 'fc.log');
      const r = spawnSync(
        process.execPath,
        [CLI, '--no-api', '--config-file', cfg, '--boot-timer', '--log-path', log],
        { encoding: 'utf8', timeout: 20_000 },
      );
      assert.equal(r.status, 0, r.stderr);
      assert.equal(r.stdout, 'tiny guest up\n');
      const last = JSON.parse(readFileSync(metrics, 'utf8').trim().split('\n').pop()!);
      assert.deepEqual(validateFcMetrics(last, last.utc_timestamp_ms), []);
      assert.equal(last.uart.write_count, 'tiny guest up\n'.length, JSON.stringify(last.uart));
      // The exits by kind: each byte to the UART and the boot marker are port writes; the
      // poweroff is an MMIO write (the ACPI sleep control register).
      assert.ok(last.vcpu.exit_io_out >= 'tiny guest up\n'.length + 1, JSON.stringify(last.vcpu));
      assert.ok(last.vcpu.exit_mmio_write >= 1, JSON.stringify(last.vcpu));
      // The guest powers off right after its boot marker: the boot timer's line is still there,
      // before the exit line.
      const logLines = readFileSync(log, 'utf8').trimEnd().split('\n');
      const boot = logLines.findIndex((l) =>
        /\[anonymous-instance:fc_vcpu 0\] Guest-boot-time = +\d+ us \d+ ms, +\d+ CPU us \d+ CPU ms$/.test(
          l,
        ),
      );
      assert.ok(boot >= 0, logLines.join('\n'));
      assert.match(
        logLines[logLines.length - 1]!,
        /\[anonymous-instance:main\] Firecracker exiting successfully\. exit_code=0$/,
      );
      assert.ok(boot < logLines.length - 1);
      // A bad config file: exit 152 with the field named.
      writeFileSync(
        cfg,
        JSON.stringify({ 'machine-config': { vcpu_count: 1, mem_size_mib: 32, bogus: 1 } }),
      );
      const bad = spawnSync(process.execPath, [CLI, '--no-api', '--config-file', cfg], {
        encoding: 'utf8',
        timeout: 20_000,
      });
      assert.equal(bad.status, 152);
      assert.match(bad.stderr, /bogus/);
    },
  );

  test(
    '--rehearse: a VM ran before the socket listened, unseen; the real VM runs on its vCPU thread',
    T,
    async () => {
      const srv = await startServer(['--id', 'reh-1', '--rehearse']);
      servers.push(srv);
      const sock = srv.sock;
      // The rehearsal's socket and guest file are gone; none of its lines reached the log.
      assert.deepEqual(readdirSync(srv.dir), ['api.sock']);
      assert.doesNotMatch(srv.stderr(), /rehearsal|Put request|InstanceStart/);
      const threadNames = () =>
        readdirSync(`/proc/${srv.child.pid}/task`).map((t) =>
          readFileSync(`/proc/${srv.child.pid}/task/${t}/comm`, 'utf8').trim(),
        );
      // Its vCPU worker stays, idle, for the real VM (a reusable one names itself tv-vcpu).
      assert.ok(threadNames().includes('tv-vcpu'), threadNames().join(','));
      const metrics = join(srv.dir, 'metrics.json');
      assert.equal((await call(sock, 'PUT', '/metrics', { metrics_path: metrics })).status, 204);
      await startSpin(sock);
      const names = threadNames();
      assert.equal(names.filter((t) => t.startsWith('tv-vcpu')).length, 1, names.join(','));
      assert.equal(
        (await call(sock, 'PUT', '/actions', { action_type: 'FlushMetrics' })).status,
        204,
      );
      // The process's metrics count this client's requests only.
      const line = JSON.parse(readFileSync(metrics, 'utf8').trim().split('\n')[0]!) as {
        put_api_requests: { machine_cfg_count: number; actions_count: number };
      };
      assert.equal(line.put_api_requests.machine_cfg_count, 1);
      assert.equal(line.put_api_requests.actions_count, 2); // InstanceStart, FlushMetrics
      assert.deepEqual(readdirSync(srv.dir).sort(), ['api.sock', 'metrics.json']);
    },
  );

  test('--rehearse is refused with --config-file', T, () => {
    const r = spawnSync(process.execPath, [CLI, '--config-file', 'x.json', '--rehearse'], {
      encoding: 'utf8',
    });
    assert.equal(r.status, 153);
    assert.match(r.stderr, /--rehearse .*not with --config-file/);
  });

  test(
    '--prepare-mem: the VM made ahead is the one PUT /vm/config starts at that size; another size builds its own',
    T,
    async () => {
      const config = (mem: number) => ({
        'machine-config': { vcpu_count: 1, mem_size_mib: mem },
        'boot-source': { kernel_image_path: guestPath('spin') },
      });
      for (const [mem, expected] of [
        [32, 1],
        [48, 2],
      ] as const) {
        const srv = await startServer(['--id', `prep-${mem}`, '--rehearse', '--prepare-mem', '32']);
        servers.push(srv);
        const pid = srv.child.pid!;
        assert.equal(kvmVmFds(pid), 1, 'the prepared VM (the rehearsal VM is closed)');
        const r = await call(srv.sock, 'PUT', '/vm/config', config(mem));
        assert.equal(r.status, 204, r.body);
        assert.equal((await call(srv.sock, 'GET', '/')).json.state, 'Running');
        assert.equal(
          (await call(srv.sock, 'GET', '/machine-config')).json.mem_size_mib,
          mem,
          'the configured size',
        );
        assert.equal(kvmVmFds(pid), expected, `${mem} MiB: VMs held`);
        // Still running a moment later (a VM on a half-made prepared VM would have failed).
        await new Promise((res) => setTimeout(res, 200));
        assert.equal((await call(srv.sock, 'GET', '/')).json.state, 'Running');
      }
    },
  );

  test('--prepare-mem: a bad size and --config-file are refused', T, () => {
    for (const [args, re] of [
      [['--prepare-mem', '0'], /--prepare-mem must be a whole number of MiB from 1 to/],
      [['--prepare-mem', 'lots'], /--prepare-mem must be a whole number of MiB/],
      [
        ['--prepare-mem', '64', '--config-file', 'x.json'],
        /--prepare-mem .*not with --config-file/,
      ],
    ] as const) {
      const r = spawnSync(process.execPath, [CLI, ...args], { encoding: 'utf8' });
      assert.equal(r.status, 153, r.stderr);
      assert.match(r.stderr, re);
    }
  });

  test('GET /vm/config round-trips through --config-file', T, async () => {
    const srv = await startServer();
    servers.push(srv);
    const disk = join(srv.dir, 'disk.img');
    writeFileSync(disk, Buffer.alloc(64 * 1024));
    assert.equal(
      (await call(srv.sock, 'PUT', '/machine-config', { vcpu_count: 1, mem_size_mib: 32 })).status,
      204,
    );
    assert.equal(
      (
        await call(srv.sock, 'PUT', '/boot-source', {
          kernel_image_path: guestPath('poweroff'),
          boot_args: 'console=ttyS0 reboot=k',
        })
      ).status,
      204,
    );
    assert.equal(
      (
        await call(srv.sock, 'PUT', '/drives/rootfs', {
          drive_id: 'rootfs',
          path_on_host: disk,
          is_root_device: true,
          is_read_only: true,
        })
      ).status,
      204,
    );
    assert.equal((await call(srv.sock, 'PUT', '/entropy', {})).status, 204);
    const got = await call(srv.sock, 'GET', '/vm/config');
    await srv.kill();
    const cfg = join(srv.dir, 'roundtrip.json');
    writeFileSync(cfg, got.body);
    const r = spawnSync(process.execPath, [CLI, '--no-api', '--config-file', cfg], {
      encoding: 'utf8',
      timeout: 20_000,
    });
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stdout, 'tiny guest up\n');
    // And with the API on: the VM is already running when the socket answers.
    const dir = tempDir();
    const withApi = await startServer(['--config-file', cfg], dir).catch(() => undefined);
    if (withApi) {
      servers.push(withApi);
      const ex = await withApi.exited;
      assert.equal(ex.code, 0);
    }
  });

  test(
    'PATCH /pmem/{id} on a running VM: merged, applied, echoed; bad requests refused',
    T,
    async () => {
      const srv = await startServer();
      servers.push(srv);
      const sock = srv.sock;
      const img = join(srv.dir, 'pmem.img');
      writeFileSync(img, Buffer.alloc(2 << 20));
      const metrics = join(srv.dir, 'metrics.json');
      const ops = { size: 10, refill_time: 100 };
      for (const [p, b] of [
        ['/metrics', { metrics_path: metrics }],
        ['/machine-config', { vcpu_count: 1, mem_size_mib: 32 }],
        ['/boot-source', { kernel_image_path: guestPath('spin') }],
        ['/pmem/pm0', { id: 'pm0', path_on_host: img, rate_limiter: { ops } }],
        ['/actions', { action_type: 'InstanceStart' }],
      ] as Array<[string, unknown]>) {
        const r = await call(sock, 'PUT', p, b);
        assert.equal(r.status, 204, `${p}: ${r.body}`);
      }
      const bw = { size: 4 << 20, refill_time: 1000, one_time_burst: 1 << 20 };
      let r = await call(sock, 'PATCH', '/pmem/pm0', {
        id: 'pm0',
        rate_limiter: { bandwidth: bw },
      });
      assert.equal(r.status, 204, r.body);
      let cfg = (await call(sock, 'GET', '/vm/config')).json;
      assert.deepEqual(cfg.pmem[0].rate_limiter, {
        bandwidth: bw,
        ops: { ...ops, one_time_burst: null },
      });
      // A bucket of size 0 disables it; the other stays.
      r = await call(sock, 'PATCH', '/pmem/pm0', {
        id: 'pm0',
        rate_limiter: { ops: { size: 0, refill_time: 0 } },
      });
      assert.equal(r.status, 204, r.body);
      cfg = (await call(sock, 'GET', '/vm/config')).json;
      assert.deepEqual(cfg.pmem[0].rate_limiter, { bandwidth: bw, ops: null });
      // An unknown id names it; a bad body names the field; an id mismatch is refused.
      r = await call(sock, 'PATCH', '/pmem/pm7', { id: 'pm7', rate_limiter: {} });
      assert.equal(r.status, 400);
      assert.match(fault(r), /^Unable to patch the pmem device: no pmem device with id pm7\./);
      r = await call(sock, 'PATCH', '/pmem/pm0', {
        id: 'pm0',
        rate_limiter: { bandwidth: { size: -5, refill_time: 1 } },
      });
      assert.equal(r.status, 400);
      assert.match(fault(r), /rate_limiter\.bandwidth\.size/);
      r = await call(sock, 'PATCH', '/pmem/pm0', { id: 'pm0', read_only: true });
      assert.match(fault(r), /read_only/);
      r = await call(sock, 'PATCH', '/pmem/pm0', { id: 'pm1' });
      assert.match(fault(r), /does not match the id from the body/);
      cfg = (await call(sock, 'GET', '/vm/config')).json;
      assert.deepEqual(cfg.pmem[0].rate_limiter, { bandwidth: bw, ops: null }, 'unchanged');
      // The metrics keep Firecracker's schema with the pmem limiter's counters.
      assert.equal(
        (await call(sock, 'PUT', '/actions', { action_type: 'FlushMetrics' })).status,
        204,
      );
      const lines = readFileSync(metrics, 'utf8')
        .trim()
        .split('\n')
        .map((l) => JSON.parse(l));
      for (const l of lines) assert.deepEqual(validateFcMetrics(l, l.utc_timestamp_ms), []);
      const sum = (k: string) => lines.reduce((a, l) => a + (l.patch_api_requests?.[k] ?? 0), 0);
      assert.equal(sum('pmem_count'), 6);
      assert.equal(srv.stderr().match(/pmem device pm0: rate limiter updated/g)?.length, 2);
    },
  );
});

/**
 * Least privilege through the real API (issue 14), the CLI as a child process, no KVM: the socket
 * is 0600 under umask 0; log_path/metrics_path symlinks are refused with a 400 naming the field
 * and nothing is created or written behind them; host paths given to boot-source and drives are
 * refused with the field and the reason; a block device only with allow_block_device.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import {
  existsSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  statSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { join } from 'node:path';
import { CLI, call, startServer, tempDir, type ServerProcess } from './client.js';
import { spawnSync } from 'node:child_process';

const T = { timeout: 20_000 };
const fault = (r: { json: { fault_message?: string } }) => r.json?.fault_message ?? '';

describe('API least privilege (real socket, child process)', () => {
  let srv: ServerProcess;
  let files: string;
  before(async () => {
    const old = process.umask(0); // the child inherits it
    try {
      srv = await startServer();
    } finally {
      process.umask(old);
    }
    files = join(srv.dir, 'files');
    mkdirSync(files);
    writeFileSync(join(files, 'victim'), 'do not touch\n');
  });
  after(async () => {
    await srv.kill();
  });

  test('the API socket is 0600 under umask 0', T, () => {
    assert.equal(statSync(srv.sock).mode & 0o777, 0o600);
  });

  test('log_path and metrics_path: a symlink is a 400 naming the field', T, async () => {
    symlinkSync(join(files, 'victim'), join(files, 'log-link'));
    symlinkSync(join(files, 'not-yet'), join(files, 'metrics-link'));
    let r = await call(srv.sock, 'PUT', '/logger', { log_path: join(files, 'log-link') });
    assert.equal(r.status, 400);
    assert.match(fault(r), /^log_path .*log-link: cannot open: it is a symbolic link/);
    r = await call(srv.sock, 'PUT', '/metrics', { metrics_path: join(files, 'metrics-link') });
    assert.equal(r.status, 400);
    assert.match(fault(r), /^metrics_path .*metrics-link: cannot open: it is a symbolic link/);
    assert.equal(existsSync(join(files, 'not-yet')), false, 'nothing created behind the link');
    r = await call(srv.sock, 'PUT', '/logger', { log_path: '/dev/null' });
    assert.match(fault(r), /log_path \/dev\/null: not a regular file or FIFO/);
    // A real path works, is created 0600, and the failures above changed nothing.
    r = await call(srv.sock, 'PUT', '/logger', { log_path: join(files, 'log'), level: 'Info' });
    assert.equal(r.status, 204, fault(r));
    assert.equal(statSync(join(files, 'log')).mode & 0o777, 0o600);
    assert.equal(readFileSync(join(files, 'victim'), 'utf8'), 'do not touch\n');
  });

  test('PUT /logger many times: the VMM keeps one log descriptor', T, async () => {
    const pid = srv.child.pid!;
    const logFds = () =>
      readdirSync(`/proc/${pid}/fd`).filter((f) => {
        try {
          return readlinkSync(`/proc/${pid}/fd/${f}`).startsWith(join(files, 'rot'));
        } catch {
          return false;
        }
      }).length;
    for (let i = 0; i < 10; i++) {
      const r = await call(srv.sock, 'PUT', '/logger', { log_path: join(files, `rot${i}`) });
      assert.equal(r.status, 204, fault(r));
    }
    assert.equal(logFds(), 1);
  });

  test(
    'boot-source and drives: the field and the reason; block devices on request',
    T,
    async () => {
      let r = await call(srv.sock, 'PUT', '/boot-source', { kernel_image_path: '/dev/zero' });
      assert.equal(r.status, 400);
      assert.match(
        fault(r),
        /^kernel_image_path \/dev\/zero is a character device, not a regular file/,
      );
      r = await call(srv.sock, 'PUT', '/boot-source', {
        kernel_image_path: join(files, 'victim'),
        initrd_path: files,
      });
      assert.match(fault(r), /^initrd_path .* is a directory/);
      const drive = (path: string, extra: object = {}) =>
        call(srv.sock, 'PUT', '/drives/d', {
          drive_id: 'd',
          path_on_host: path,
          is_root_device: false,
          is_read_only: true,
          ...extra,
        });
      r = await drive(join(files, 'nope'));
      assert.match(fault(r), /^drive d: path_on_host .*nope does not exist/);
      const blk = ['/dev/loop7', '/dev/loop0'].find(
        (p) => existsSync(p) && statSync(p).isBlockDevice(),
      );
      if (blk && process.getuid?.() === 0) {
        r = await drive(blk);
        assert.equal(r.status, 400);
        assert.match(fault(r), /path_on_host .* is a block device; .*allow_block_device/);
        r = await drive(blk, { allow_block_device: true });
        assert.equal(r.status, 204, fault(r));
        const cfg = await call(srv.sock, 'GET', '/vm/config');
        assert.equal(cfg.json.drives[0].allow_block_device, true);
      }
    },
  );
});

test(
  '--log-path and --metrics-path on the command line: a symlink is refused by name',
  T,
  async () => {
    const dir = tempDir();
    symlinkSync('/etc/hostname', join(dir, 'link'));
    for (const flag of ['--log-path', '--metrics-path']) {
      const r = spawnSync(
        process.execPath,
        [CLI, '--api-sock', join(dir, 'api.sock'), flag, join(dir, 'link')],
        { encoding: 'utf8', timeout: 15_000 },
      );
      assert.notEqual(r.status, 0);
      assert.match(
        r.stderr,
        new RegExp(
          `${flag === '--log-path' ? 'log_path' : 'metrics_path'} .*link: cannot open: it is a symbolic link`,
        ),
      );
    }
  },
);

/**
 * The host daemon with a stock Linux guest (run inside the lab): `typervisor serve` in process
 * mode creates the Debian guest from a Firecracker-shaped configuration, its boot marker shows
 * in the daemon's console endpoint and record, its own API socket answers, DELETE ends it, and
 * SIGTERM leaves no VMM process behind; the guest boots on the VM its pool process prepared
 * (--prepare-mem). About 20-40 s in the lab (one guest boot).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { repoRoot } from '../../src/lab/guest.js';
import { call as apiCall } from '../api/client.js';
import { kvmVmFds, pidsWith } from '../host/daemon-helpers.js';
import { defaultGuest, skipReason } from './helpers.js';

const opts = { skip: skipReason, timeout: 120_000 };
const MARKER = /TYPERVISOR-BOOT-OK/;
/** The lab is slow: a create takes ~10 s there (the shared client's default is 5 s). */
const call = (sock: string, method: string, path: string, body?: unknown) =>
  apiCall(sock, method, path, body, 30_000);

test('the Debian guest created through typervisor serve (process mode)', opts, async () => {
  const g = defaultGuest();
  // Not under /tmp: in the lab that is the host's /tmp over 9p, where Unix sockets cannot live.
  const dir = mkdtempSync(join(existsSync('/run') ? '/run' : tmpdir(), 'tv-daemon-'));
  const sock = join(dir, 'd.sock');
  const state = join(dir, 'state');
  const child = spawn(
    process.execPath,
    [
      join(repoRoot(), 'bin', 'typervisor'),
      'serve',
      '--socket',
      sock,
      '--state-dir',
      state,
      '--pool',
      '1',
    ],
    { stdio: ['ignore', 'ignore', 'pipe'] },
  );
  let err = '';
  child.stderr.on('data', (d: Buffer) => (err += d.toString()));
  const exited = new Promise<number | null>((r) => child.on('close', (code) => r(code)));
  try {
    const deadline = Date.now() + 30_000;
    while (!existsSync(sock) || !(await call(sock, 'GET', '/').catch(() => undefined))) {
      assert.ok(Date.now() < deadline, `no daemon socket after 30 s: ${err}`);
      await sleep(100);
    }
    const t0 = Date.now();
    const r = await call(sock, 'POST', '/vms', {
      vm_id: 'deb',
      'boot-source': {
        kernel_image_path: g.kernel,
        initrd_path: g.initrd,
        boot_args: 'console=ttyS0 reboot=k panic=1 pci=off quiet',
      },
      // 128 MiB: what a fresh daemon's pool processes prepare (--prepare-mem), so the stock
      // kernel boots on a VM made ahead of the create.
      'machine-config': { vcpu_count: 1, mem_size_mib: 128 },
    });
    assert.equal(r.status, 200, JSON.stringify(r.json));
    assert.equal(r.json.state, 'running');
    assert.ok(r.json.pid > 0);
    // One KVM VM in that process: the prepared one, taken (a build of its own would be a second).
    assert.equal(kvmVmFds(r.json.pid), 1, 'the prepared VM runs the guest');
    let output = '';
    while (!MARKER.test(output)) {
      assert.ok(Date.now() - t0 < 60_000, `no boot marker after 60 s: ${output}\n${err}`);
      await sleep(200);
      const c = await call(sock, 'GET', '/vms/deb/console');
      assert.equal(c.status, 200);
      output = c.json.output;
    }
    // The guest's init prints the marker, then writes the boot timer's byte (busybox devmem,
    // a program of its own to start): the daemon's boot_marker_ms follows the console line.
    let vm = (await call(sock, 'GET', '/vms/deb')).json;
    while (!(vm.boot_marker_ms > 0) && Date.now() - t0 < 90_000) {
      await sleep(200);
      vm = (await call(sock, 'GET', '/vms/deb')).json;
    }
    assert.equal(vm.state, 'running');
    assert.ok(vm.boot_marker_ms > 0, JSON.stringify(vm));
    process.stderr.write(
      `in-lab daemon: create ${vm.create_ms} ms, boot marker ${vm.boot_marker_ms} ms\n`,
    );
    // The VM's own Firecracker API socket answers.
    const own = await call(vm.api_socket, 'GET', '/');
    assert.equal(own.json.state, 'Running');
    assert.equal((await call(sock, 'DELETE', '/vms/deb')).status, 204);
    assert.equal(existsSync(vm.api_socket), false);
    assert.ok(!pidsWith(state).includes(vm.pid), "the VM's VMM process has ended");
    child.kill('SIGTERM');
    assert.equal(await exited, 0, err);
    assert.deepEqual(pidsWith(state), [], 'no VMM process left');
  } finally {
    child.kill('SIGKILL');
    rmSync(dir, { recursive: true, force: true });
  }
});

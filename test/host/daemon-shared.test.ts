/**
 * Needs /dev/kvm, gcc and ld. `typervisor serve --mode shared`: VMs in the daemon's process,
 * each with its own Firecracker-compatible API socket; a triple-faulting guest is reported and
 * its socket and console file removed while the others keep running and the daemon serves on;
 * the process's own sections (logger, metrics) are refused; SIGTERM stops every VM.
 */
import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readdirSync, statSync } from 'node:fs';
import { call } from '../api/client.js';
import { guestPath, tinyGuests } from './helpers.js';
import { startDaemon, vmConfig, waitVm, type DaemonProcess } from './daemon-helpers.js';

const guests = tinyGuests();
const T = { timeout: 120_000, skip: guests.skip ?? false };

describe('typervisor serve, shared mode (KVM)', () => {
  const daemons: DaemonProcess[] = [];
  after(async () => {
    for (const d of daemons) {
      d.child.kill('SIGKILL');
      await d.exited;
    }
  });

  test('create, list, crash, stop in one process', T, async () => {
    const d = await startDaemon(['--mode', 'shared', '--pool', '1']);
    daemons.push(d);
    assert.equal(statSync(d.sock).mode & 0o777, 0o600);
    const a = await call(d.sock, 'POST', '/vms', { vm_id: 'a', ...vmConfig(guestPath('spin')) });
    assert.equal(a.status, 200, a.body);
    assert.equal(a.json.pid, null);
    assert.equal(statSync(a.json.api_socket).mode & 0o777, 0o600);
    assert.equal((await call(a.json.api_socket, 'GET', '/')).json.state, 'Running');
    await waitVm(d.sock, 'a', (v) => v.boot_marker_ms !== null);
    assert.match((await call(d.sock, 'GET', '/vms/a/console')).json.output, /tiny guest up/);

    const t = await call(d.sock, 'POST', '/vms', { vm_id: 't', ...vmConfig(guestPath('triple')) });
    assert.equal(t.status, 200, t.body);
    const crashed = await waitVm(d.sock, 't', (v) => v.state !== 'running');
    assert.equal(crashed.state, 'crashed');
    assert.match(crashed.exit.reason, /triple.fault/i);
    assert.equal(existsSync(t.json.api_socket), false);
    assert.equal(existsSync(`${d.stateDir}/t.console`), false);
    // The other VM runs on, and the daemon serves.
    assert.equal((await call(d.sock, 'GET', '/vms/a')).json.state, 'running');
    assert.equal((await call(a.json.api_socket, 'GET', '/')).json.state, 'Running');
    const p = await call(d.sock, 'POST', '/vms', vmConfig(guestPath('poweroff')));
    assert.equal(p.status, 200, p.body);
    assert.equal((await waitVm(d.sock, p.json.id, (v) => v.state !== 'running')).state, 'exited');

    const refused = await call(d.sock, 'POST', '/vms', {
      ...vmConfig(guestPath('spin')),
      logger: { level: 'Info' },
    });
    assert.equal(refused.status, 400, refused.body);
    assert.match(refused.json.fault_message, /"logger".*shared mode/);

    const list = await call(d.sock, 'GET', '/vms');
    assert.deepEqual(
      list.json.vms.map((v: { id: string; state: string }) => `${v.id}:${v.state}`),
      ['a:running', 't:crashed', `${p.json.id}:exited`],
    );
    assert.equal((await call(d.sock, 'PUT', '/vms/a/stop', undefined, 20_000)).status, 204);
    assert.equal((await call(d.sock, 'GET', '/vms/a')).json.state, 'stopped');
    assert.equal(existsSync(a.json.api_socket), false);

    const b = await call(d.sock, 'POST', '/vms', { vm_id: 'b', ...vmConfig(guestPath('spin')) });
    assert.equal(b.status, 200, b.body);
    const st = await d.stop();
    assert.equal(st.code, 0, d.stderr());
    assert.deepEqual(readdirSync(d.stateDir), [], 'no socket or console file left');
  });
});

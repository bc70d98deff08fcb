/**
 * Needs /dev/kvm, gcc and ld. `typervisor serve` in process mode with the tiny guests: VMs
 * created, listed, stopped and deleted over the daemon's socket, each with its own
 * Firecracker-compatible API socket; a triple-faulting guest and a SIGKILLed VMM process
 * reported and cleaned up while the daemon keeps serving; bad requests answered 400 (and a VMM's
 * own refusal passed on); the VM cap; SIGTERM ends every VMM process; a daemon restarted after a
 * SIGKILL ends the VMM processes the last one left; a VM snapshotted through its own socket and
 * restored as a new VM, after which the pool refills without a boot marker to wait for.
 */
import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { call } from '../api/client.js';
import { guestPath, tempDir, tinyGuests } from './helpers.js';
import {
  DAEMON_HEAP_FLAGS,
  DAEMON_MALLOC_TUNABLE,
  HEAP_REEXEC_ENV,
} from '../../src/daemon/heap.js';
import { PREPARE_MAX_MIB } from '../../src/daemon/process-backend.js';
import {
  environOf,
  nodeOptionsOf,
  pidsWith,
  sleep,
  snapshotAndRestore,
  startDaemon,
  vmConfig,
  waitPool,
  waitVm,
  type DaemonProcess,
} from './daemon-helpers.js';

const guests = tinyGuests();
const T = { timeout: 120_000, skip: guests.skip ?? false };
const fault = (r: { json: { fault_message?: string } }) => r.json?.fault_message ?? '';

describe('typervisor serve, process mode (KVM)', () => {
  const daemons: DaemonProcess[] = [];
  after(async () => {
    for (const d of daemons) {
      d.child.kill('SIGKILL');
      await d.exited;
    }
    // Whatever a failed test left: no VMM process of these daemons' state dirs survives.
    for (const d of daemons) for (const pid of pidsWith(d.stateDir)) process.kill(pid, 'SIGKILL');
  });

  test('create, list, get, console, stop, delete; the sockets are 0600', T, async () => {
    const d = await startDaemon(['--pool', '1']);
    daemons.push(d);
    assert.equal(statSync(d.sock).mode & 0o777, 0o600);
    await waitPool(d.sock, 1);
    // GET / reports the daemon's own memory: its RSS and its main thread's V8 heap spaces.
    const self = (await call(d.sock, 'GET', '/')).json;
    assert.equal(self.mode, 'process');
    assert.ok(self.memory.rss_bytes > 10 * 1024 * 1024, JSON.stringify(self.memory));
    for (const space of ['new_space', 'old_space', 'code_space']) {
      const sp = self.memory.heap[space];
      assert.ok(
        sp && sp.size > 0 && sp.used > 0 && sp.used <= sp.size,
        `${space}: ${JSON.stringify(sp)}`,
      );
    }
    const r = await call(d.sock, 'POST', '/vms', {
      vm_id: 'spin1',
      ...vmConfig(guestPath('spin')),
    });
    assert.equal(r.status, 200, r.body);
    assert.equal(r.json.id, 'spin1');
    assert.equal(r.json.state, 'running');
    assert.equal(r.json.api_socket, `${d.stateDir}/spin1.sock`);
    assert.equal(statSync(r.json.api_socket).mode & 0o777, 0o600);
    const pid = r.json.pid as number;
    assert.ok(pidsWith(d.stateDir).includes(pid));
    // The daemon runs with its heap flags (it re-executed itself); a VMM process does not,
    // nor does it get the re-exec marker.
    assert.deepEqual(nodeOptionsOf(d.child.pid!), DAEMON_HEAP_FLAGS);
    assert.ok(
      environOf(d.child.pid!).includes(`GLIBC_TUNABLES=${DAEMON_MALLOC_TUNABLE}`),
      "malloc's fixed mmap threshold",
    );
    assert.deepEqual(nodeOptionsOf(pid), []);
    assert.ok(!environOf(pid).some((e) => e.startsWith(`${HEAP_REEXEC_ENV}=`)), 'no marker');
    // A pool process makes its VM ahead with the RAM of the last VM created (--prepare-mem;
    // Firecracker's default 128 MiB before any): this VM's process before it, the next after.
    const preparedMib = (p: number) => {
      const argv = readFileSync(`/proc/${p}/cmdline`, 'utf8').split('\0');
      return argv[argv.indexOf('--prepare-mem') + 1];
    };
    assert.equal(preparedMib(pid), '128');
    await waitPool(d.sock, 1);
    const next = pidsWith(d.stateDir).filter(
      (x) => x !== pid && readFileSync(`/proc/${x}/cmdline`, 'utf8').includes('--api-sock'),
    );
    assert.equal(next.length, 1, `${next}`);
    assert.equal(preparedMib(next[0]!), '32');
    // Not past PREPARE_MAX_MIB: the pool process after a larger VM prepares none.
    const big = await call(d.sock, 'POST', '/vms', {
      vm_id: 'big',
      ...vmConfig(guestPath('spin')),
      'machine-config': { vcpu_count: 1, mem_size_mib: PREPARE_MAX_MIB + 1 },
    });
    assert.equal(big.status, 200, big.body);
    assert.equal(big.json.pid, next[0], 'the warm process took it (and built its own VM)');
    await waitPool(d.sock, 1);
    const third = pidsWith(d.stateDir).filter(
      (x) =>
        x !== pid &&
        x !== big.json.pid &&
        readFileSync(`/proc/${x}/cmdline`, 'utf8').includes('--api-sock'),
    );
    assert.equal(third.length, 1, `${third}`);
    assert.ok(!readFileSync(`/proc/${third[0]}/cmdline`, 'utf8').includes('--prepare-mem'));
    assert.equal((await call(d.sock, 'PUT', '/vms/big/stop', undefined, 20_000)).status, 204);
    assert.equal((await call(d.sock, 'DELETE', '/vms/big')).status, 204);
    // The VM's own socket is Firecracker's API.
    const info = await call(r.json.api_socket, 'GET', '/');
    assert.equal(info.json.state, 'Running');
    const cfg = await call(r.json.api_socket, 'GET', '/vm/config');
    assert.equal(cfg.json['machine-config'].mem_size_mib, 32);
    const vm = await waitVm(d.sock, 'spin1', (v) => v.boot_marker_ms !== null);
    assert.ok(vm.boot_marker_ms > 0);
    const cons = await call(d.sock, 'GET', '/vms/spin1/console');
    assert.match(cons.json.output, /tiny guest up/);

    const list = await call(d.sock, 'GET', '/vms');
    assert.deepEqual(
      list.json.vms.map((v: { id: string }) => v.id),
      ['spin1'],
    );
    const stop = await call(d.sock, 'PUT', '/vms/spin1/stop', undefined, 20_000);
    assert.equal(stop.status, 204, stop.body);
    const stopped = await call(d.sock, 'GET', '/vms/spin1');
    assert.equal(stopped.json.state, 'stopped');
    assert.equal(existsSync(`${d.stateDir}/spin1.sock`), false);
    assert.ok(!pidsWith(d.stateDir).includes(pid), 'the VMM process is gone');
    assert.equal((await call(d.sock, 'DELETE', '/vms/spin1')).status, 204);
    assert.equal((await call(d.sock, 'GET', '/vms/spin1')).status, 404);

    // A guest that powers off: reported exited, and its process and socket are gone.
    const p = await call(d.sock, 'POST', '/vms', vmConfig(guestPath('poweroff')));
    assert.equal(p.status, 200, p.body);
    const off = await waitVm(d.sock, p.json.id, (v) => v.state !== 'running');
    assert.equal(off.state, 'exited');
    assert.equal(off.exit.code, 0);
    assert.equal(existsSync(p.json.api_socket), false);

    const st = await d.stop();
    assert.equal(st.code, 0, d.stderr());
    assert.deepEqual(pidsWith(d.stateDir), [], 'SIGTERM ended every VMM process');
    assert.deepEqual(readdirSync(d.stateDir), [], 'nothing left in the state dir');
    assert.equal(existsSync(d.sock), false);
  });

  test(
    'a VM restored from a snapshot (its guest writes no boot marker): running, and the pool refilled',
    T,
    async () => {
      const d = await startDaemon(['--pool', '1']);
      daemons.push(d);
      await waitPool(d.sock, 1);
      const a = await call(d.sock, 'POST', '/vms', { vm_id: 'a', ...vmConfig(guestPath('spin')) });
      assert.equal(a.status, 200, a.body);
      await waitVm(d.sock, 'a', (v) => v.boot_marker_ms !== null);
      const dir = tempDir('typervisor-daemon-snap-');
      await waitPool(d.sock, 1);
      const b = await snapshotAndRestore(d.sock, a.json.api_socket, dir, 'b');
      assert.equal(b.status, 200, b.body);
      assert.notEqual(b.json.pid, a.json.pid);
      assert.equal((await call(b.json.api_socket, 'GET', '/')).json.state, 'Running');
      // The restored guest is past its marker: the refill cannot wait for one, and does not.
      await waitPool(d.sock, 1, 20_000);
      const vm = (await call(d.sock, 'GET', '/vms/b')).json;
      assert.equal(vm.state, 'running');
      assert.equal(vm.boot_marker_ms, null);
      for (const id of ['a', 'b'])
        assert.equal((await call(d.sock, 'DELETE', `/vms/${id}`, undefined, 20_000)).status, 204);
    },
  );

  test('a triple fault and a SIGKILLed VMM: reported, cleaned up, daemon serving', T, async () => {
    const d = await startDaemon(['--pool', '2']);
    daemons.push(d);
    await waitPool(d.sock, 2);
    const tri = await call(d.sock, 'POST', '/vms', vmConfig(guestPath('triple')));
    assert.equal(tri.status, 200, tri.body);
    const crashed = await waitVm(d.sock, tri.json.id, (v) => v.state !== 'running');
    assert.equal(crashed.state, 'crashed');
    assert.equal(crashed.exit.code, 1);
    assert.match(crashed.exit.reason, /triple.fault/i);
    assert.equal(existsSync(tri.json.api_socket), false);
    assert.ok(!pidsWith(d.stateDir).includes(tri.json.pid));
    assert.equal(existsSync(`${d.stateDir}/vmm-${tri.json.pid}.json`), false);

    const spin = await call(d.sock, 'POST', '/vms', vmConfig(guestPath('spin')));
    assert.equal(spin.status, 200, spin.body);
    process.kill(spin.json.pid, 'SIGKILL');
    const killed = await waitVm(d.sock, spin.json.id, (v) => v.state !== 'running');
    assert.equal(killed.state, 'crashed');
    assert.equal(killed.exit.signal, 'SIGKILL');
    assert.match(killed.exit.reason, /killed by SIGKILL/);
    assert.equal(existsSync(spin.json.api_socket), false);

    // Still serving: the next VM boots.
    const next = await call(d.sock, 'POST', '/vms', vmConfig(guestPath('poweroff')));
    assert.equal(next.status, 200, next.body);
    assert.equal(
      (await waitVm(d.sock, next.json.id, (v) => v.state !== 'running')).state,
      'exited',
    );
    assert.equal((await d.stop()).code, 0);
    assert.deepEqual(pidsWith(d.stateDir), []);
  });

  test('bad requests: 400 naming the problem, 404 for an unknown VM, the cap', T, async () => {
    const d = await startDaemon(['--pool', '1', '--max-vms', '1']);
    daemons.push(d);
    const cases: Array<[string, string, unknown, RegExp]> = [
      ['POST', '/vms', '{"boot-source":', /not JSON/],
      ['POST', '/vms', '[1]', /JSON object/],
      ['POST', '/vms', undefined, /needs a body/],
      ['POST', '/vms', { 'machine-config': { vcpu_count: 1, mem_size_mib: 32 } }, /boot-source/],
      ['POST', '/vms', { ...vmConfig('/k'), bogus: 1 }, /bogus/],
      ['POST', '/vms', { ...vmConfig('/k'), vm_id: '../x' }, /vm_id/],
      ['POST', '/vms', { 'boot-source': { kernel_image_path: 7 } }, /kernel_image_path/],
      ['POST', '/vms', { snapshot: { snapshot_path: '/s' } }, /mem_backend|mem_file_path/],
      ['POST', '/vms', { snapshot: {}, drives: [] }, /drives/],
      ['GET', '/vms/a.b', undefined, /Invalid VM id/],
      ['GET', '/nope', undefined, /Invalid request/],
      ['PUT', '/vms/x/stop', { a: 1 }, /takes no body/],
      ['POST', '/vms', 'x'.repeat(60_000), /larger than the limit/],
    ];
    for (const [m, p, b, re] of cases) {
      const r = await call(d.sock, m, p, b);
      assert.equal(r.status, 400, `${m} ${p} ${String(b).slice(0, 40)}: ${r.body}`);
      assert.match(fault(r), re, `${m} ${p}`);
    }
    assert.equal((await call(d.sock, 'GET', '/vms/nosuch')).status, 404);
    assert.equal((await call(d.sock, 'DELETE', '/vms/nosuch')).status, 404);
    // The VMM's own refusal is passed on, and the VMM process is not reused.
    const bad = await call(d.sock, 'POST', '/vms', vmConfig('/nonexistent/kernel'));
    assert.equal(bad.status, 400, bad.body);
    assert.match(fault(bad), /\/nonexistent\/kernel/);
    assert.equal((await call(d.sock, 'GET', '/vms')).json.vms.length, 0);
    // The cap: one VM at a time here.
    const one = await call(d.sock, 'POST', '/vms', vmConfig(guestPath('spin')));
    assert.equal(one.status, 200, one.body);
    const two = await call(d.sock, 'POST', '/vms', vmConfig(guestPath('spin')));
    assert.equal(two.status, 503, two.body);
    assert.match(fault(two), /At most 1 VMs/);
    assert.equal((await d.stop()).code, 0);
    assert.deepEqual(pidsWith(d.stateDir), []);
  });

  test('a daemon stopped while its pool process rehearses leaves nothing behind', T, async () => {
    // CI of 39b6a76: a pool process ended by the daemon's SIGTERM during its rehearsal left the
    // rehearsal's socket and guest image in the state dir. Stop the daemon while they exist.
    const d = await startDaemon(['--pool', '1']);
    daemons.push(d);
    const rehearsing = () => readdirSync(d.stateDir).some((f) => f.includes('.rehearsal-'));
    const deadline = Date.now() + 20_000;
    while (!rehearsing() && Date.now() < deadline) await sleep(1);
    assert.ok(rehearsing(), `a rehearsal's files seen: ${readdirSync(d.stateDir)}`);
    const st = await d.stop();
    assert.equal(st.code, 0, d.stderr());
    assert.deepEqual(pidsWith(d.stateDir), [], 'SIGTERM ended the pool process');
    assert.deepEqual(readdirSync(d.stateDir), [], 'nothing left in the state dir');
  });

  test('a daemon restarted after SIGKILL ends the VMM processes the last one left', T, async () => {
    const first = await startDaemon(['--pool', '1']);
    daemons.push(first);
    await waitPool(first.sock, 1);
    const r = await call(first.sock, 'POST', '/vms', vmConfig(guestPath('spin')));
    assert.equal(r.status, 200, r.body);
    await waitPool(first.sock, 1);
    first.child.kill('SIGKILL');
    await first.exited;
    const left = pidsWith(first.stateDir);
    assert.ok(left.includes(r.json.pid), 'the VMM outlives a SIGKILLed daemon');
    assert.ok(left.length >= 2, `the VM and a warm process: ${left}`);

    const second = await startDaemon(['--pool', '0'], first.stateDir);
    daemons.push(second);
    // The second daemon's own command line names the state dir too.
    const strays = () => pidsWith(first.stateDir).filter((p) => p !== second.child.pid);
    for (let i = 0; i < 100 && strays().length > 0; i++) await sleep(50);
    assert.deepEqual(strays(), [], 'the strays were ended');
    const files = readdirSync(first.stateDir);
    assert.deepEqual(
      files.filter((f) => f !== 'daemon.json'),
      [],
      `stale sockets and records removed: ${files}`,
    );
    // A second daemon on the same state dir is refused while this one runs.
    await assert.rejects(startDaemon([], first.stateDir), /another daemon/);
    assert.equal((await second.stop()).code, 0);
  });
});

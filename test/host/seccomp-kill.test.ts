/**
 * Needs Linux seccomp (and /dev/kvm for the vCPU role). Each role's filter, installed on the
 * thread that role runs on (test/host/seccomp-child.ts), kills the whole process with SIGSYS
 * when that thread makes a call outside its list, and lets the calls on its list through.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { kvmSkipReason } from './helpers.js';

const CHILD = fileURLToPath(new URL('./seccomp-child.js', import.meta.url));
const skip = kvmSkipReason() ?? false;

function run(c: string) {
  const r = spawnSync(process.execPath, [CHILD, c], { encoding: 'utf8', timeout: 20_000 });
  return {
    pid: r.pid,
    signal: r.signal,
    status: r.status,
    out: r.stdout.trim().split('\n'),
    err: r.stderr,
  };
}

/**
 * The system call the kernel logged for a seccomp kill of `pid` (audit type=1326, which the
 * kernel writes when kernel.seccomp.actions_logged has kill_process), or undefined when this
 * host's kernel log cannot be read or has no such record.
 */
function killedSyscall(pid: number): number | undefined {
  const logged = spawnSync('dmesg', [], { encoding: 'utf8' });
  if (logged.status !== 0) return undefined;
  const line = logged.stdout
    .split('\n')
    .filter((l) => l.includes('type=1326') && l.includes(` pid=${pid} `))
    .at(-1);
  const m = line && /\bsyscall=(\d+)/.exec(line);
  return m ? Number(m[1]) : undefined;
}

/** Whether this host's kernel logs seccomp kills (then the test checks which call it was). */
const killsLogged = (() => {
  try {
    return (
      readFileSync('/proc/sys/kernel/seccomp/actions_logged', 'utf8').includes('kill_process') &&
      spawnSync('dmesg', [], { encoding: 'utf8' }).status === 0
    );
  } catch {
    return false;
  }
})();

// x86-64 numbers: socket 41, clone 56, memfd_create 319, clone3 435.
for (const [c, calls] of [
  ['main-clone-process', [56, 435]],
  ['main-inet-socket', [41]],
  ['vcpu-socket', [41]],
  ['device-memfd', [319]],
  ['device-inet-socket', [41]],
] as Array<[string, number[]]>) {
  test(`${c}: the process dies of SIGSYS after the filter is in place`, { skip }, async (t) => {
    const r = run(c);
    assert.equal(r.signal, 'SIGSYS', `status ${r.status}, stderr: ${r.err}`);
    assert.deepEqual(r.out, ['before'], 'killed at the forbidden call, not before or after it');
    if (!killsLogged) return t.diagnostic('the kernel log shows no seccomp kills here');
    // The record can trail the exit by a moment.
    let sys: number | undefined;
    for (let i = 0; i < 20 && sys === undefined; i++) {
      sys = killedSyscall(r.pid);
      if (sys === undefined) await new Promise((res) => setTimeout(res, 50));
    }
    assert.ok(sys !== undefined, `no seccomp record for pid ${r.pid} in the kernel log`);
    assert.ok(calls.includes(sys), `killed by system call ${sys}, not the case's (${calls})`);
  });
}

test(
  'vcpu-open: an open a worker may not make fails with EACCES; the process lives',
  { skip },
  () => {
    const r = run('vcpu-open');
    assert.equal(r.signal, null, r.err);
    assert.equal(r.status, 0, r.err);
    assert.deepEqual(r.out, ['before', 'refused EACCES', 'after']);
  },
);

for (const c of ['main-allowed', 'vcpu-allowed', 'device-allowed']) {
  test(`${c}: calls on the role's list go through`, { skip }, () => {
    const r = run(c);
    assert.equal(r.signal, null, r.err);
    assert.equal(r.status, 0, r.err);
    assert.deepEqual(r.out, ['before', 'after']);
  });
}

test(
  'TSYNC: a thread started before the main thread installs its filter is filtered too',
  { skip },
  () => {
    const r = run('main-tsync');
    assert.equal(r.status, 0, r.err);
    assert.deepEqual(JSON.parse(r.out[0]!), { mainBefore: 0, main: 2, worker: 2 });
  },
);

/**
 * Needs Linux seccomp (and /dev/kvm for the vCPU role). Each role's filter, installed on the
 * thread that role runs on (test/host/seccomp-child.ts), kills the whole process with SIGSYS
 * when that thread makes a call outside its list, and lets the calls on its list through.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { kvmSkipReason } from './helpers.js';

const CHILD = fileURLToPath(new URL('./seccomp-child.js', import.meta.url));
const skip = kvmSkipReason() ?? false;

function run(c: string) {
  const r = spawnSync(process.execPath, [CHILD, c], { encoding: 'utf8', timeout: 20_000 });
  return { signal: r.signal, status: r.status, out: r.stdout.trim().split('\n'), err: r.stderr };
}

for (const c of [
  'main-clone-process',
  'main-inet-socket',
  'vcpu-socket',
  'device-memfd',
  'device-inet-socket',
]) {
  test(`${c}: the process dies of SIGSYS after the filter is in place`, { skip }, () => {
    const r = run(c);
    assert.equal(r.signal, 'SIGSYS', `status ${r.status}, stderr: ${r.err}`);
    assert.deepEqual(r.out, ['before'], 'killed at the forbidden call, not before or after it');
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

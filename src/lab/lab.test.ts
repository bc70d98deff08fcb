import { test } from 'node:test';
import assert from 'node:assert/strict';
import { labFaultsIn } from './lab.js';

// Lines as the lab's kernel (Debian 6.1) prints them on its console (src/lab/lab.ts LAB_FAULT).
test('labFaultsIn: the lab kernel saying that it broke', () => {
  const log = [
    'lab init: up, running /tmp/typervisor-lab-hXTEbN/run.sh',
    '[   20.609742] kvm [146]: vcpu0, guest rIP: 0xffffffff88a73744 Unhandled WRMSR(0xc0010007) = 0xffff',
    '[  360.735711] watchdog: BUG: soft lockup - CPU#0 stuck for 26s! [node:285]',
    '[  360.736000] Modules linked in: kvm_amd kvm',
    '[  361.000000] rcu: INFO: rcu_sched self-detected stall on CPU',
    '[  362.000000] INFO: task node:301 blocked for more than 120 seconds.',
    '[  363.000000] general protection fault, probably for non-canonical address 0xdead: 0000 [#1] SMP',
    '[  364.000000] Kernel panic - not syncing: stack-protector: Kernel stack is corrupted in: x',
  ].join('\n');
  assert.deepEqual(labFaultsIn(log), [
    '[  360.735711] watchdog: BUG: soft lockup - CPU#0 stuck for 26s! [node:285]',
    '[  361.000000] rcu: INFO: rcu_sched self-detected stall on CPU',
    '[  362.000000] INFO: task node:301 blocked for more than 120 seconds.',
    '[  363.000000] general protection fault, probably for non-canonical address 0xdead: 0000 [#1] SMP',
    '[  364.000000] Kernel panic - not syncing: stack-protector: Kernel stack is corrupted in: x',
  ]);
});

test('labFaultsIn: a healthy lab, and at most 20 lines of a broken one', () => {
  assert.deepEqual(
    labFaultsIn('lab init: up\n[ 1.0] kvm [146]: vcpu0, Unhandled WRMSR(0xc0010007) = 0xffff\n'),
    [],
  );
  const many = Array.from({ length: 50 }, (_, i) => `[ ${i}] watchdog: BUG: soft lockup - CPU#0`);
  assert.equal(labFaultsIn(many.join('\n')).length, 20);
});

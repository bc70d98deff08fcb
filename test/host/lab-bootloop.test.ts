// The in-lab boot loop's bookkeeping (bench/lab-bootloop.ts), without a lab: how a finished boot
// is classified for each VMM, and the summary of a triple fault's KVM trace.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { classify, shutdownSummary } from '../../bench/lab-bootloop.js';

const base = { stderr: '', code: 0, markerSeen: true, timedOut: false };

test('Typervisor boots: ok, triple fault, other', () => {
  assert.equal(classify(false, { ...base, stdout: 'TYPERVISOR-BOOT-OK' }).outcome, 'ok');
  const tf = 'typervisor: the guest triple-faulted (KVM_EXIT_SHUTDOWN) on vCPU 0';
  assert.equal(
    classify(false, { ...base, stdout: '', stderr: tf, code: 1, markerSeen: false }).outcome,
    'triple',
  );
  assert.equal(classify(false, { ...base, stdout: '', code: 1 }).outcome, 'other');
  assert.equal(classify(false, { ...base, stdout: '', timedOut: true }).outcome, 'other');
});

test('QEMU boots: a reset with no kernel message is a triple fault (-no-reboot)', () => {
  const off = 'TYPERVISOR-BOOT-OK\n[ 9.1] reboot: Power down\n';
  assert.equal(classify(true, { ...base, stdout: off }).outcome, 'ok');
  assert.equal(
    classify(true, { ...base, stdout: 'PCI: Fatal', markerSeen: false }).outcome,
    'triple',
  );
  // The kernel's own reboot or a panic is not a triple fault.
  const panic = 'Kernel panic - not syncing\nreboot: Restarting system\n';
  assert.equal(classify(true, { ...base, stdout: panic, markerSeen: false }).outcome, 'other');
  assert.equal(classify(true, { ...base, stdout: off, code: 1 }).outcome, 'other');
});

test('shutdownSummary: the faulting thread exits, runs counted, and the shutdown exit', () => {
  const line = (who: string, reason: string, rip: string, tail = 'info1 0x0') =>
    ` ${who}     [000] .....   931.28: kvm_exit: vcpu 0 reason ${reason} rip ${rip} ${tail}`;
  const trace = [
    line('qemu-system-x86-504', 'npf', '0xffffffff81000000'),
    line('node-77', 'io', '0xffffffff81234567'),
    line('qemu-system-x86-504', 'vintr', '0xffffffffc042913c'),
    line('qemu-system-x86-504', 'vintr', '0xffffffffc042913c'),
    line('qemu-system-x86-504', 'interrupt', '0xffffffffc042913c'),
    line('qemu-system-x86-504', 'shutdown', '0xffffffffc042913c', 'intr_info 0x80000b0e'),
    ' node-77     [001] .....   931.29: kvm_exit: vcpu 0 reason io rip 0x1',
  ].join('\n');
  const s = shutdownSummary(trace);
  assert.match(s, /^qemu-system-x86-504: 1x npf 0xffffffff81000000, 2x vintr 0xffffffffc042913c, /);
  assert.match(s, /1x interrupt 0xffffffffc042913c, 1x shutdown 0xffffffffc042913c\n/);
  assert.match(s, /shutdown exit: .*intr_info 0x80000b0e/);
  assert.doesNotMatch(s, /node-77|io 0x/);
  assert.equal(shutdownSummary(line('a', 'io', '0x1')), '(no shutdown exit in the trace)');
});

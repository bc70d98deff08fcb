import { test } from 'node:test';
import assert from 'node:assert/strict';
import { fixZeroTscDeadline, MSR_IA32_TSC, MSR_IA32_TSC_DEADLINE } from './vcpu-state.js';

test('a zero TSC_DEADLINE is saved as the TSC (the timer fires after a restore)', () => {
  const tsc = { index: MSR_IA32_TSC, data: 123_456_789n };
  const other = { index: 0x174, data: 0x23n };
  assert.deepEqual(fixZeroTscDeadline([tsc, other, { index: MSR_IA32_TSC_DEADLINE, data: 0n }]), [
    tsc,
    other,
    { index: MSR_IA32_TSC_DEADLINE, data: 123_456_789n },
  ]);
  // An armed deadline is kept as it is.
  const armed = [tsc, { index: MSR_IA32_TSC_DEADLINE, data: 999n }];
  assert.deepEqual(fixZeroTscDeadline(armed), armed);
  // Without a saved TSC there is nothing to put in its place.
  const noTsc = [other, { index: MSR_IA32_TSC_DEADLINE, data: 0n }];
  assert.deepEqual(fixZeroTscDeadline(noTsc), noTsc);
  // Without a deadline MSR nothing changes.
  assert.deepEqual(fixZeroTscDeadline([tsc, other]), [tsc, other]);
});

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { MSR, bootMsrs } from './msrs.js';

test('boot MSRs: syscall MSRs required, others optional, no ARCH_CAPABILITIES', () => {
  const m = bootMsrs();
  const by = new Map(m.map((e) => [e.index, e]));
  assert.equal(by.size, m.length);
  assert.equal(by.get(MSR.LSTAR)?.required, true);
  assert.equal(by.get(MSR.KERNEL_GS_BASE)?.data, 0n);
  assert.equal(by.get(MSR.MTRR_DEF_TYPE)?.data, 0x806n);
  assert.equal(by.get(MSR.MTRR_DEF_TYPE)?.required, false);
  assert.equal(by.get(MSR.IA32_MISC_ENABLE)?.data, 1n);
  assert.equal(by.has(0x10a), false);
});

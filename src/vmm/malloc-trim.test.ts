import { test } from 'node:test';
import assert from 'node:assert/strict';
import { native } from '../kvm/native.js';
import { mallocTrim } from './malloc-trim.js';

test('the shim has mallocTrim: malloc_trim(0), 0 or 1', () => {
  const r = native().mallocTrim();
  assert.equal(typeof r, 'number');
  assert.ok(r === 0 || r === 1, `malloc_trim(0) gave ${r}`);
  assert.equal(typeof mallocTrim(), 'boolean');
});

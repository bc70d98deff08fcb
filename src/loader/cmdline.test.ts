import { test } from 'node:test';
import assert from 'node:assert/strict';
import { Cmdline } from './cmdline.js';

test('builds key=value and flags, quoting values with spaces', () => {
  const c = new Cmdline();
  assert.ok(c.insertStr('console=ttyS0 reboot=k').ok);
  assert.ok(c.insert('panic', '1').ok);
  assert.ok(c.insert('foo', 'a b').ok);
  assert.ok(c.insertStr('  quiet ').ok);
  assert.equal(c.toString(), 'console=ttyS0 reboot=k panic=1 foo="a b" quiet');
  assert.ok(c.has('panic') && c.has('quiet') && !c.has('pan'));
  const b = c.toBytes();
  assert.equal(b.length, c.length + 1);
  assert.equal(b[b.length - 1], 0);
});

test('rejects NUL, control and non-ASCII characters, bad keys, quotes in values', () => {
  const c = new Cmdline();
  assert.equal(c.insertStr('a\0b').ok, false);
  assert.equal(c.insertStr('a\nb').ok, false);
  assert.equal(c.insert('k', 'é').ok, false);
  assert.equal(c.insert('', 'v').ok, false);
  assert.equal(c.insert('a b', 'v').ok, false);
  assert.equal(c.insert('a=b', 'v').ok, false);
  assert.equal(c.insert('k', 'say "hi"').ok, false);
  assert.equal(c.toString(), '');
});

test('length limit counts the NUL', () => {
  const c = new Cmdline(11);
  assert.ok(c.insertStr('0123456789').ok); // 10 chars + NUL = 11
  const r = c.insertStr('x');
  assert.equal(r.ok, false);
  if (!r.ok) assert.match(r.error.message, /too long \(12 bytes, at most 10\)/);
  assert.equal(c.toString(), '0123456789');
  assert.equal(Cmdline.from('x'.repeat(2048)).ok, false);
  assert.ok(Cmdline.from('x'.repeat(2047)).ok);
});

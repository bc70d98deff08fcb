import { test } from 'node:test';
import assert from 'node:assert/strict';
import { statSync } from 'node:fs';
import { deviceNumber, isCharDevice } from './fs.js';

test('deviceNumber decodes glibc makedev, high bits of both numbers included', () => {
  assert.deepEqual(deviceNumber((1 << 8) | 3), { major: 1, minor: 3 });
  assert.deepEqual(deviceNumber((10 << 8) | 232), { major: 10, minor: 232 }); // /dev/kvm
  // makedev(0x1234, 0x56789): major's high bits above 32, minor's above bit 20
  const rdev = 0x1000 * 2 ** 32 + ((0x234 << 8) | 0x89 | (0x56700 << 12));
  assert.deepEqual(deviceNumber(rdev), { major: 0x1234, minor: 0x56789 });
});

test('isCharDevice: /dev/null is 1:3, not 1:9; a file is no device', () => {
  assert.equal(isCharDevice(statSync('/dev/null'), 1, 3), true);
  assert.equal(isCharDevice(statSync('/dev/null'), 1, 9), false);
  assert.equal(isCharDevice(statSync('/dev/urandom'), 1, 9), true);
  assert.equal(isCharDevice(statSync('/etc/hostname'), 0, 0), false);
});

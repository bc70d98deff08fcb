import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ConfigError } from '../util/errors.js';
import { parseNet, parseVsock } from './net.js';

test('--net tap=NAME[,mac=MAC] and --vsock cid=N,uds=PATH', () => {
  assert.deepEqual(parseNet('tap=tap0'), { kind: 'net', tap: 'tap0' });
  assert.deepEqual(parseNet('tap=tap0,mac=06:00:00:00:00:01'), {
    kind: 'net',
    tap: 'tap0',
    mac: '06:00:00:00:00:01',
  });
  for (const bad of ['', 'mac=06:00:00:00:00:01', 'tap=a,tap=b', 'tap=a,mtu=9000', 'tap'])
    assert.throws(() => parseNet(bad), ConfigError, bad);
  assert.deepEqual(parseVsock('cid=3,uds=/tmp/v.sock'), {
    kind: 'vsock',
    cid: 3,
    uds: '/tmp/v.sock',
  });
  for (const bad of [
    'cid=2,uds=/x',
    'cid=-1,uds=/x',
    'cid=4294967295,uds=/x',
    'cid=3',
    'uds=/x',
    'cid=3,uds=/x,port=1',
  ])
    assert.throws(() => parseVsock(bad), ConfigError, bad);
});

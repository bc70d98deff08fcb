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

test('--vsock backend=vhost: cid only, no uds; backend=unix is the default', () => {
  assert.deepEqual(parseVsock('cid=3,backend=vhost'), { kind: 'vsock', cid: 3, backend: 'vhost' });
  assert.deepEqual(parseVsock('backend=vhost,cid=4294967294'), {
    kind: 'vsock',
    cid: 0xffff_fffe,
    backend: 'vhost',
  });
  // "unix" said out loud is the flag without it.
  assert.deepEqual(parseVsock('cid=3,uds=/run/v.sock,backend=unix'), {
    kind: 'vsock',
    cid: 3,
    uds: '/run/v.sock',
  });
  const refused = (spec: string, re: RegExp) =>
    assert.throws(
      () => parseVsock(spec),
      (e: unknown) => e instanceof ConfigError && re.test(e.message),
      spec,
    );
  refused(
    'cid=3,uds=/run/v.sock,backend=vhost',
    /^--vsock: uds= is for the unix backend; with backend=vhost host programs reach the guest over AF_VSOCK at its cid$/,
  );
  refused('cid=3,backend=kernel', /^--vsock: backend must be unix or vhost \(got "kernel"\)$/);
  refused('cid=3,backend=', /backend must be unix or vhost/);
  refused('backend=vhost', /cid=N is required \(cid=N,uds=PATH or cid=N,backend=vhost\)/);
  refused('cid=3,backend=unix', /cid=N and uds=PATH are required/);
  refused('cid=2,backend=vhost', /cid must be a whole number from 3/);
  refused('cid=3,backend=vhost,backend=vhost', /backend given twice/);
  refused(
    'cid=3,backend=vhost,port=1',
    /unknown "port" \(expected cid=N,uds=PATH or cid=N,backend=vhost\)/,
  );
});

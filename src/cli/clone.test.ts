import { test } from 'node:test';
import assert from 'node:assert/strict';
import { expand, MAX_CLONES, parseCloneArgs, planClones, savedVhostVsockCid } from './clone.js';

const base = ['--snapshot', 's', '--mem-file', 'm'];

test('clone arguments: count, patterns and their bounds', () => {
  const a = parseCloneArgs([...base, '--count', '3', '--tap-pattern', 'tapc%d']);
  assert.equal(a.count, 3);
  assert.deepEqual(a.taps, [{ ifaceId: undefined, pattern: 'tapc%d' }]);
  assert.equal(expand('c%d.sock', 12), 'c12.sock');
  const bad: Array<[string[], RegExp]> = [
    [['--count', String(MAX_CLONES + 1)], /from 1 to 64/],
    [['--count', '1.5'], /from 1 to 64/],
    [['--count', '2', '--tap-pattern', 'tap'], /"%d" exactly once/],
    [['--count', '2', '--tap-pattern', 'tap%d%s'], /"%d" exactly once/],
    [['--count', '11', '--tap-pattern', 'tapverylongx-y%d'], /gives "tapverylongx-y10": not a TAP/],
    [['--count', '2', '--tap-pattern', 'a b%d'], /not a TAP name/],
    [['--count', '2', '--vsock-uds-pattern', `/${'v'.repeat(106)}%d`], /longer than 107 bytes/],
    [['--count', '2', '--console-pattern', 'out.txt'], /"%d" exactly once/],
    [['--count', '2', '--tap-pattern', 'a%d', '--tap-pattern', 'b%d'], /one pattern per/],
    [['--count', '2', '--log-level', 'loud'], /--log-level/],
    [['--count', '2', '--bogus'], /Unknown option/],
  ];
  for (const [extra, re] of bad) assert.throws(() => parseCloneArgs([...base, ...extra]), re);
  assert.throws(() => parseCloneArgs(['--mem-file', 'm', '--count', '1']), /--snapshot/);
});

test('clone plans: overrides per clone, checked against the snapshot', () => {
  const args = parseCloneArgs([
    ...base,
    '--count',
    '2',
    '--tap-pattern',
    'tapc%d',
    '--vsock-uds-pattern',
    '/run/v%d.sock',
    '--console-pattern',
    '/tmp/con%d',
  ]);
  const plans = planClones(args, { nets: ['eth0'], vsock: true }, '/tmp/d');
  assert.equal(plans.length, 2);
  assert.equal(plans[1]!.apiSock, '/tmp/d/clone1.api');
  assert.equal(plans[1]!.console, '/tmp/con1');
  assert.deepEqual(plans[1]!.load.network_overrides, [
    { iface_id: 'eth0', host_dev_name: 'tapc1' },
  ]);
  assert.deepEqual(plans[1]!.load.vsock_override, { uds_path: '/run/v1.sock' });
  assert.equal(plans[0]!.load.resume_vm, true);

  const two = { nets: ['eth0', 'eth1'], vsock: false };
  assert.throws(
    () => planClones(parseCloneArgs([...base, '--count', '2', '--tap-pattern', 't%d']), two, '/d'),
    /has 2 network interfaces .* say which one/,
  );
  assert.throws(
    () =>
      planClones(parseCloneArgs([...base, '--count', '2', '--tap-pattern', 'eth0=t%d']), two, '/d'),
    /eth1 needs --tap-pattern eth1=NAME%d/,
  );
  assert.throws(
    () =>
      planClones(parseCloneArgs([...base, '--count', '2', '--tap-pattern', 'eth9=t%d']), two, '/d'),
    /no network interface "eth9"/,
  );
  assert.throws(
    () => planClones(parseCloneArgs([...base, '--count', '2']), { nets: [], vsock: true }, '/d'),
    /--vsock-uds-pattern PATH%d/,
  );
  // One clone may keep the saved TAP and socket.
  assert.equal(
    planClones(parseCloneArgs([...base, '--count', '1']), { nets: ['eth0'], vsock: true }, '/d')
      .length,
    1,
  );
  assert.throws(
    () =>
      planClones(
        parseCloneArgs([...base, '--count', '2', '--api-sock-pattern', `/${'a'.repeat(106)}%d`]),
        { nets: [], vsock: false },
        '/d',
      ),
    /longer than 107/,
  );
});

test('clone plans: a vhost vsock has no socket to re-point, and its CID fits one clone', () => {
  const vhost = { nets: [], vsock: true, vhostVsockCid: 9 };
  const one = planClones(parseCloneArgs([...base, '--count', '1']), vhost, '/d');
  assert.equal(one.length, 1);
  assert.equal(one[0]!.load.vsock_override, undefined);
  assert.throws(
    () => planClones(parseCloneArgs([...base, '--count', '2']), vhost, '/d'),
    /vhost backend: its guest CID 9 can be held by one VM at a time on this host, so 2 clones/,
  );
  assert.throws(
    () =>
      planClones(
        parseCloneArgs([...base, '--count', '1', '--vsock-uds-pattern', '/run/v%d.sock']),
        vhost,
        '/d',
      ),
    /--vsock-uds-pattern: the snapshot's vsock device uses the vhost backend, which has no Unix socket \(its host side is AF_VSOCK at guest CID 9\)/,
  );
  // What the snapshot's configuration says.
  assert.equal(savedVhostVsockCid('{"vsock":{"guest_cid":9,"backend":"vhost"}}'), 9);
  assert.equal(savedVhostVsockCid('{"vsock":{"guest_cid":9,"uds_path":"/v"}}'), undefined);
  assert.equal(savedVhostVsockCid('{"vsock":null}'), undefined);
  assert.equal(savedVhostVsockCid('not json'), undefined);
});

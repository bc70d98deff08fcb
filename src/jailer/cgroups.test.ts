import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { ConfigError } from '../util/errors.js';
import { parseCgroup } from './args.js';
import { parseCgroupMounts, planCgroups } from './cgroups.js';
import { parseLdd } from './tree.js';
import { vmmArgv } from './jail.js';
import { parseJailerArgs } from './args.js';

// This host's layout (a v1/v2 hybrid), abridged from its /proc/mounts.
const MOUNTS = `sysfs /sys sysfs rw,relatime 0 0
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu cgroup rw,relatime,cpu 0 0
cgroup /sys/fs/cgroup/cpuset cgroup rw,relatime,cpuset 0 0
cgroup /sys/fs/cgroup/pids cgroup rw,relatime,pids 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,name=systemd 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
`;
const mounts = parseCgroupMounts(MOUNTS);

describe('jailer cgroups', () => {
  test('/proc/mounts: v1 controllers and the v2 mount', () => {
    assert.equal(mounts.length, 5);
    assert.deepEqual(mounts[0], {
      path: '/sys/fs/cgroup/cpu',
      version: 1,
      controllers: ['rw', 'relatime', 'cpu'],
    });
    assert.deepEqual(mounts[4], { path: '/sys/fs/cgroup/unified', version: 2, controllers: [] });
    assert.equal(parseCgroupMounts('cgroup /a\\040b cgroup rw,cpu 0 0')[0]!.path, '/a b');
  });

  test('v1: one cgroup per hierarchy, <mount>/<parent>/<id>', () => {
    const plans = planCgroups(mounts, 1, 'fc/all', 'vm1', [
      parseCgroup('cpu.shares=512'),
      parseCgroup('pids.max=64'),
      parseCgroup('cpu.cfs_quota_us=1000'),
    ]);
    assert.deepEqual(
      plans.map((p) => [p.dir, p.settings.map((s) => s.file)]),
      [
        ['/sys/fs/cgroup/cpu/fc/all/vm1', ['cpu.shares', 'cpu.cfs_quota_us']],
        ['/sys/fs/cgroup/pids/fc/all/vm1', ['pids.max']],
      ],
    );
    assert.throws(
      () => planCgroups(mounts, 1, 'fc', 'vm1', [parseCgroup('memory.max=1')]),
      (e: unknown) => e instanceof ConfigError && /'memory'.*not mounted/.test(e.message),
    );
    assert.deepEqual(planCgroups(mounts, 1, 'fc', 'vm1', []), []);
  });

  test('v2: controllers enabled from the root down; core files need none', () => {
    const avail = () => ['hugetlb', 'pids'];
    const [p] = planCgroups(
      mounts,
      2,
      'a/b',
      'vm1',
      [parseCgroup('pids.max=10'), parseCgroup('cgroup.max.descendants=0')],
      () => true,
      avail,
    );
    assert.equal(p!.dir, '/sys/fs/cgroup/unified/a/b/vm1');
    assert.deepEqual(
      p!.enable.map((e) => e.file),
      [
        '/sys/fs/cgroup/unified/cgroup.subtree_control',
        '/sys/fs/cgroup/unified/a/cgroup.subtree_control',
        '/sys/fs/cgroup/unified/a/b/cgroup.subtree_control',
      ],
    );
    assert.deepEqual(p!.enable[0]!.controllers, ['pids']);
    const core = planCgroups(
      mounts,
      2,
      'a',
      'vm1',
      [parseCgroup('cgroup.max.depth=1')],
      () => true,
      avail,
    );
    assert.deepEqual(core[0]!.enable, []);
    assert.throws(
      () => planCgroups(mounts, 2, 'a', 'vm1', [parseCgroup('memory.max=1')], () => true, avail),
      (e: unknown) =>
        e instanceof ConfigError && /'memory' is not available.*hugetlb pids/.test(e.message),
    );
    // No settings: the parent itself when it exists, else nothing.
    assert.deepEqual(
      planCgroups(mounts, 2, 'pre/made', 'vm1', [], () => true, avail).map((x) => x.dir),
      ['/sys/fs/cgroup/unified/pre/made'],
    );
    assert.deepEqual(
      planCgroups(mounts, 2, 'pre/made', 'vm1', [], () => false, avail),
      [],
    );
    assert.throws(() => planCgroups(mounts.slice(0, 4), 2, 'a', 'b', []), /no cgroup v2/);
  });
});

describe('jailer tree and argv', () => {
  test('ldd output: every absolute path once, vdso skipped, a missing library refused', () => {
    const text = `/usr/bin/node:
\tlinux-vdso.so.1 (0x00007ffd)
\tlibdl.so.2 => /lib/x86_64-linux-gnu/libdl.so.2 (0x00007f78)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f78)
\t/lib64/ld-linux-x86-64.so.2 (0x00007f78)
/x/typervisor_native.node:
\tlinux-vdso.so.1 (0x00007f50)
\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f50)
\t/lib64/ld-linux-x86-64.so.2 (0x00007f50)
`;
    assert.deepEqual(parseLdd(text), [
      '/lib/x86_64-linux-gnu/libdl.so.2',
      '/lib/x86_64-linux-gnu/libc.so.6',
      '/lib64/ld-linux-x86-64.so.2',
    ]);
    assert.throws(() => parseLdd('\tlibfoo.so.1 => not found\n'), /missing: libfoo/);
  });

  test("the VMM's argv: node, /<exec name>, --id and the timing flags, then the user's", () => {
    const r = parseJailerArgs(
      ['--id', 'a1', '--exec-file', '/bin/sh', '--uid', '1', '--gid', '1', '--', '--no-api'],
      { kind: () => 'file', head: () => new Uint8Array([0x23, 0x21, 0, 0]) },
    );
    assert.equal(r.kind, 'jail');
    if (r.kind !== 'jail') return;
    const t = { monoUs: 123n, cpuUs: 45 };
    assert.deepEqual(vmmArgv('/usr/bin/node', r.config, t), [
      '/usr/bin/node',
      '/sh',
      '--id=a1',
      '--start-time-us=123',
      '--start-time-cpu-us=45',
      '--no-api',
    ]);
    assert.ok(vmmArgv('/n', r.config, t, 7).includes('--parent-cpu-time-us=7'));
    // The claimed /dev/vhost-vsock: its descriptor and CID, before the user's arguments.
    const v = vmmArgv('/n', { ...r.config, vhostVsockCid: 47 }, t, undefined, 9);
    assert.deepEqual(v.slice(-3), ['--vhost-vsock-fd=9', '--vhost-vsock-cid=47', '--no-api']);
    assert.ok(!vmmArgv('/n', r.config, t, undefined, 9).some((a) => a.includes('vhost')));
  });
});

import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { ConfigError } from '../util/errors.js';
import {
  DEFAULT_CHROOT_BASE,
  DEFAULT_NO_FILE,
  MAX_CGROUP_ARGS,
  parseCgroup,
  parseJailerArgs,
  type JailerConfig,
  type PathProbe,
} from './args.js';

const FILES: Record<string, 'file' | 'other'> = {
  '/opt/tv/bin/typervisor': 'file',
  '/opt/tv/bin': 'other',
  '/usr/bin/firecracker': 'file',
  '/var/run/netns/n1': 'file',
};
const probe: PathProbe = {
  kind: (p) => FILES[p] ?? 'missing',
  head: (p) =>
    p === '/usr/bin/firecracker'
      ? new Uint8Array([0x7f, 0x45, 0x4c, 0x46])
      : new Uint8Array([0x23, 0x21, 0x2f, 0x75]),
};
const BASE = [
  '--id',
  'vm-1',
  '--exec-file',
  '/opt/tv/bin/typervisor',
  '--uid',
  '123',
  '--gid',
  '100',
];

function jail(args: string[]): JailerConfig {
  const r = parseJailerArgs(args, probe);
  assert.equal(r.kind, 'jail');
  return (r as { config: JailerConfig }).config;
}
function refused(args: string[], msg: RegExp): void {
  assert.throws(
    () => parseJailerArgs(args, probe),
    (e: unknown) => {
      assert.ok(e instanceof ConfigError, String(e));
      assert.match(e.message, msg);
      return true;
    },
  );
}

describe('typervisor-jailer arguments', () => {
  test('the required flags and Firecracker defaults', () => {
    const c = jail(BASE);
    assert.equal(c.id, 'vm-1');
    assert.equal(c.execName, 'typervisor');
    assert.equal(c.uid, 123);
    assert.equal(c.gid, 100);
    assert.equal(c.chrootBaseDir, DEFAULT_CHROOT_BASE);
    assert.equal(c.cgroupVersion, 1);
    assert.equal(c.parentCgroup, 'typervisor'); // the exec file's name
    assert.deepEqual([...c.resourceLimits], [['no-file', DEFAULT_NO_FILE]]);
    assert.equal(c.daemonize, false);
    assert.equal(c.newPidNs, false);
    assert.deepEqual(c.vmmArgs, []);
    assert.equal(c.netns, undefined);
  });

  test('every option, in both --flag value and --flag=value forms, and the VMM args after --', () => {
    const c = jail([
      ...BASE,
      '--chroot-base-dir=/var/jail/',
      '--netns',
      '/var/run/netns/n1',
      '--cgroup',
      'cpuset.cpus=0-1',
      '--cgroup=pids.max=64',
      '--cgroup-version',
      '2',
      '--parent-cgroup',
      'all/uvms',
      '--resource-limit',
      'fsize=1000',
      '--resource-limit=no-file=512',
      '--daemonize',
      '--new-pid-ns',
      '--',
      '--api-sock',
      '/run/api.sock',
      '--level=Debug',
    ]);
    assert.equal(c.chrootBaseDir, '/var/jail');
    assert.equal(c.netns, '/var/run/netns/n1');
    assert.deepEqual(c.cgroups, [
      { file: 'cpuset.cpus', controller: 'cpuset', value: '0-1' },
      { file: 'pids.max', controller: 'pids', value: '64' },
    ]);
    assert.equal(c.cgroupVersion, 2);
    assert.equal(c.parentCgroup, 'all/uvms');
    assert.equal(c.resourceLimits.get('fsize'), 1000);
    assert.equal(c.resourceLimits.get('no-file'), 512);
    assert.equal(c.daemonize, true);
    assert.equal(c.newPidNs, true);
    assert.deepEqual(c.vmmArgs, ['--api-sock', '/run/api.sock', '--level=Debug']);
  });

  test('help and version need nothing else', () => {
    assert.equal(parseJailerArgs(['--help'], probe).kind, 'help');
    assert.equal(parseJailerArgs(['--version'], probe).kind, 'version');
  });

  test('ids: letters, digits and hyphens, 1-64 characters', () => {
    assert.equal(jail(['--id', 'a'.repeat(64), ...BASE.slice(2)]).id.length, 64);
    for (const bad of ['', 'a'.repeat(65), 'vm_1', 'vm.1', '../x', 'vm 1', 'é'])
      refused(['--id', bad, ...BASE.slice(2)], /invalid --id/);
  });

  test('required flags are named when missing', () => {
    for (const flag of ['--id', '--exec-file', '--uid', '--gid']) {
      const i = BASE.indexOf(flag);
      refused([...BASE.slice(0, i), ...BASE.slice(i + 2)], new RegExp(`${flag} is required`));
    }
  });

  test('the exec file must exist, be a regular file, and be a launcher script', () => {
    const without = BASE.slice(0, 2).concat(BASE.slice(4));
    refused([...without, '--exec-file', '/opt/tv/bin/nope'], /does not exist/);
    refused([...without, '--exec-file', '/opt/tv/bin'], /not a regular file/);
    refused([...without, '--exec-file', 'bin/typervisor'], /absolute path/);
    refused([...without, '--exec-file', '/usr/bin/firecracker'], /ELF binary/);
  });

  test('uid and gid are 32-bit numbers (not -1)', () => {
    const at = (flag: string, v: string) => {
      const a = [...BASE];
      a[a.indexOf(flag) + 1] = v;
      return a;
    };
    assert.equal(jail(at('--uid', '4294967294')).uid, 4294967294);
    for (const bad of ['-1', '4294967295', 'root', '1.5', '', '0x10'])
      refused(at('--uid', bad), /invalid --uid/);
    refused(at('--gid', 'x'), /invalid --gid/);
  });

  test('cgroups: FILE=VALUE, one line, each file once, bounded in number', () => {
    assert.deepEqual(parseCgroup('memory.limit_in_bytes=1G'), {
      file: 'memory.limit_in_bytes',
      controller: 'memory',
      value: '1G',
    });
    for (const bad of ['pids.max', 'pids=1', '../pids.max=1', 'pids/x.max=1', 'PIDS.max=1'])
      refused([...BASE, '--cgroup', bad], /invalid --cgroup/);
    refused([...BASE, '--cgroup', 'pids.max='], /value/);
    refused([...BASE, '--cgroup', 'pids.max=1\n2'], /value/);
    refused([...BASE, '--cgroup', 'pids.max=1', '--cgroup', 'pids.max=2'], /given twice/);
    const many = Array.from({ length: MAX_CGROUP_ARGS + 1 }, (_, i) => ['--cgroup', `cpu.x${i}=1`]);
    refused([...BASE, ...many.flat()], /more than/);
    refused([...BASE, '--cgroup-version', '3'], /invalid --cgroup-version/);
  });

  test('parent cgroup: a relative path without . or ..', () => {
    assert.equal(jail([...BASE, '--parent-cgroup', 'a/b-c/d.e']).parentCgroup, 'a/b-c/d.e');
    for (const bad of ['/abs', 'a/../b', '..', 'a//b', 'a/', 'a b'])
      refused([...BASE, '--parent-cgroup', bad], /invalid --parent-cgroup/);
  });

  test('resource limits: fsize or no-file, a number, each once', () => {
    refused([...BASE, '--resource-limit', 'nproc=10'], /unknown --resource-limit resource 'nproc'/);
    refused([...BASE, '--resource-limit', 'fsize'], /invalid --resource-limit/);
    refused([...BASE, '--resource-limit', 'fsize=-1'], /invalid --resource-limit/);
    refused([...BASE, '--resource-limit', 'fsize=99999999999999999999'], /too large/);
    refused([...BASE, '--resource-limit', 'fsize=1', '--resource-limit', 'fsize=2'], /twice/);
  });

  test('other paths: absolute chroot base and netns; the netns must exist', () => {
    refused([...BASE, '--chroot-base-dir', 'srv'], /absolute/);
    refused([...BASE, '--chroot-base-dir', '/srv/../etc'], /normalized/);
    refused([...BASE, '--netns', '/var/run/netns/none'], /does not exist/);
    refused([...BASE, '--netns', 'n1'], /absolute/);
  });

  test('unknown, repeated, misplaced and jailer-owned arguments', () => {
    refused([...BASE, '--seccomp-level', '2'], /unknown argument --seccomp-level/);
    refused([...BASE, '--id', 'x'], /--id given twice/);
    refused([...BASE, '--daemonize', '--daemonize'], /given twice/);
    refused([...BASE, '--daemonize=yes'], /takes no value/);
    refused([...BASE, '--api-sock', '/x'], /unknown argument --api-sock/);
    refused([...BASE, 'stray'], /unexpected argument 'stray'/);
    refused([...BASE, '--uid'], /needs a value|given twice/);
    refused([...BASE, '--', '--id', 'other'], /jailer's to pass/);
    refused([...BASE, '--', '--start-time-us=5'], /jailer's to pass/);
  });

  test("--vhost-vsock-cid: a guest CID the kernel takes; the descriptor flags are the jailer's", () => {
    assert.equal(jail(BASE).vhostVsockCid, undefined);
    assert.equal(jail([...BASE, '--vhost-vsock-cid', '3']).vhostVsockCid, 3);
    assert.equal(jail([...BASE, '--vhost-vsock-cid=4294967294']).vhostVsockCid, 0xffff_fffe);
    for (const bad of ['2', '0', '4294967295', '99999999999', 'x', '', '-5', '3.5'])
      refused([...BASE, `--vhost-vsock-cid=${bad}`], /--vhost-vsock-cid/);
    refused([...BASE, '--vhost-vsock-cid', '3', '--vhost-vsock-cid', '4'], /given twice/);
    refused([...BASE, '--', '--vhost-vsock-fd=3'], /jailer's to pass/);
    refused([...BASE, '--', '--vhost-vsock-cid', '3'], /jailer's to pass/);
  });
});

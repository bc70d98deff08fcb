/**
 * Needs root, /dev/kvm, gcc and ld. typervisor-jailer builds a jail on this host and a jailed
 * Typervisor boots a tiny guest (test/guests) driven through the API socket inside the chroot:
 * it runs as the given uid/gid, in its own mount namespace (and pid namespace with
 * --new-pid-ns), sees only the minimal read-only tree, cannot load a host path outside the jail,
 * and sits in the cgroups (v1 and v2) with the given limits. Cleans up cgroups and chroots.
 *
 * Until the VMM accepts the jailer's timing flags (--start-time-us...: helper E's branch), the
 * exec file is a test launcher that drops them before loading the VMM (see timingLauncher);
 * once it does, the package's own bin/typervisor is used.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import {
  copyFileSync,
  existsSync,
  lstatSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  rmSync,
  rmdirSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import { join } from 'node:path';
import { call } from '../api/client.js';
import { eventually, guestPath, kvmSkipReason, REPO, tempDir, tinyGuests } from './helpers.js';
import { parseLdd } from '../../src/jailer/tree.js';
import { VMM_STACK_SOFT_KIB } from '../../src/util/stack-limit.js';

const JAILER = join(REPO, 'bin', 'typervisor-jailer');
const CLI = join(REPO, 'bin', 'typervisor');
const UID = 40123;
const GID = 40124;
const PARENT = `typervisor-jailer-test-${process.pid}`;
const NETNS = `tvjail-${process.pid}`;
const V1 = '/sys/fs/cgroup';
const V2 = '/sys/fs/cgroup/unified';

function skipReason(): string | undefined {
  if (process.getuid?.() !== 0) return 'needs root (mounts, mknod, cgroups, setuid)';
  const k = kvmSkipReason();
  if (k) return k;
  const g = tinyGuests();
  if (g.skip) return g.skip;
  if (!existsSync(join(V1, 'pids', 'cgroup.procs')) || !existsSync(join(V1, 'cpu', 'cgroup.procs')))
    return 'no cgroup v1 pids and cpu hierarchies at /sys/fs/cgroup (this test reads them back)';
  if (!existsSync(join(V2, 'cgroup.procs'))) return `no cgroup v2 hierarchy at ${V2}`;
  return undefined;
}
const SKIP = skipReason();
const T = { timeout: 90_000, skip: SKIP ?? false };

/** The exec file: bin/typervisor when the VMM takes the timing flags, else a launcher that drops them. */
function execFile(dir: string): string {
  const r = spawnSync(
    process.execPath,
    [CLI, '--id=probe', '--start-time-us=1', '--start-time-cpu-us=1', '--no-api'],
    { encoding: 'utf8', timeout: 30_000 },
  );
  if (!/Unknown option '--start-time/.test(r.stderr)) return CLI;
  const launcher = join(dir, 'typervisor');
  writeFileSync(
    launcher,
    `#!/usr/bin/env node
// Test-only: the VMM on this branch refuses the jailer's timing flags; drop them.
process.argv = process.argv.filter((a) => !/^--(start-time-us|start-time-cpu-us|parent-cpu-time-us)=/.test(a));
import('../dist/src/cli/main.js');
`,
    { mode: 0o755 },
  );
  return launcher;
}

interface Jailed {
  root: string;
  sock: string;
  pid: number;
  jailer: ChildProcess;
  stderr: () => string;
}

async function startJailed(
  base: string,
  exec: string,
  id: string,
  extra: string[],
): Promise<Jailed> {
  const jailer = spawn(
    process.execPath,
    [
      JAILER,
      '--id',
      id,
      '--exec-file',
      exec,
      '--uid',
      String(UID),
      '--gid',
      String(GID),
      '--chroot-base-dir',
      base,
      '--parent-cgroup',
      PARENT,
      ...extra,
      '--',
      '--api-sock',
      '/run/api.sock',
    ],
    { stdio: ['ignore', 'pipe', 'pipe'] },
  );
  let err = '';
  jailer.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  jailer.stdout!.resume();
  const root = join(base, 'typervisor', id, 'root');
  const sock = join(root, 'run', 'api.sock');
  const up = await eventually(() => existsSync(sock), 30_000);
  assert.ok(up, `no API socket at ${sock}; jailer stderr: ${err}`);
  const pid = Number(readFileSync(join(root, 'typervisor.pid'), 'utf8').trim());
  assert.ok(pid > 1, `pid file: ${pid}`);
  return { root, sock, pid, jailer, stderr: () => err };
}

function status(pid: number, field: string): string {
  const line = readFileSync(`/proc/${pid}/status`, 'utf8')
    .split('\n')
    .find((l) => l.startsWith(`${field}:`));
  return (line ?? '').slice(field.length + 1).trim();
}

/** Gone or a zombie (a daemonized VMM is not our child: helpers.processGone does not apply). */
function gone(pid: number): boolean {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    return stat.slice(stat.lastIndexOf(')') + 2).startsWith('Z');
  } catch {
    return true;
  }
}

const ns = (pid: number | 'self', kind: string) => readlinkSync(`/proc/${pid}/ns/${kind}`);

/** Boots spin.elf copied into the jail; a host path outside it is refused first. */
async function bootInJail(j: Jailed): Promise<void> {
  const outside = await call(j.sock, 'PUT', '/boot-source', {
    kernel_image_path: guestPath('spin'),
  });
  assert.equal(outside.status, 400, outside.body);
  assert.match(outside.body, /does not exist/);
  copyFileSync(guestPath('spin'), join(j.root, 'spin.elf'));
  for (const [path, body] of [
    ['/machine-config', { vcpu_count: 1, mem_size_mib: 32 }],
    ['/boot-source', { kernel_image_path: '/spin.elf' }],
    ['/actions', { action_type: 'InstanceStart' }],
  ] as Array<[string, unknown]>) {
    const r = await call(j.sock, 'PUT', path, body, 20_000);
    assert.equal(r.status, 204, `${path}: ${r.body}; jailer stderr: ${j.stderr()}`);
  }
  assert.equal((await call(j.sock, 'GET', '/')).json.state, 'Running');
}

/** Every non-directory path the jailed process can see, outside /dist and /run. */
function visibleFiles(pid: number): string[] {
  const base = `/proc/${pid}/root`;
  const out: string[] = [];
  const walk = (rel: string) => {
    for (const e of readdirSync(base + rel)) {
      const p = `${rel}/${e}`;
      if (p === '/dist' || p === '/run') continue;
      if (lstatSync(base + p).isDirectory()) walk(p);
      else out.push(p);
    }
  };
  walk('');
  return out.sort();
}

describe('typervisor-jailer on the host (root, KVM)', () => {
  let dir = '';
  let base = '';
  let exec = '';
  const pids: number[] = [];
  before(() => {
    if (SKIP) return;
    dir = tempDir('typervisor-jailer-');
    base = join(dir, 'jails');
    exec = execFile(dir);
  });
  after(async () => {
    for (const pid of pids) {
      try {
        process.kill(pid, 'SIGKILL');
      } catch {
        // gone
      }
      await eventually(() => gone(pid), 10_000);
    }
    // A cgroup whose last task just died can refuse rmdir (EBUSY) for a moment: retry.
    const rmdirSoon = (p: string) =>
      eventually(() => {
        try {
          rmdirSync(p);
          return true;
        } catch (e) {
          return (e as NodeJS.ErrnoException).code === 'ENOENT';
        }
      }, 10_000);
    const left: string[] = [];
    for (const h of [join(V1, 'pids'), join(V1, 'cpu'), V2]) {
      const p = join(h, PARENT);
      if (!existsSync(p)) continue;
      for (const e of readdirSync(p, { withFileTypes: true }))
        if (e.isDirectory() && !(await rmdirSoon(join(p, e.name)))) left.push(join(p, e.name));
      if (!(await rmdirSoon(p))) left.push(p);
    }
    if (existsSync(`/var/run/netns/${NETNS}`)) spawnSync('ip', ['netns', 'del', NETNS]);
    if (dir) rmSync(dir, { recursive: true, force: true });
    assert.deepEqual(left, [], 'cgroups left behind');
  });

  test(
    'jailed VMM: uid/gid, own mount ns, minimal read-only tree, v1 cgroups, rlimits, boots a guest',
    T,
    async () => {
      const netns = `/var/run/netns/${NETNS}`;
      const made = spawnSync('ip', ['netns', 'add', NETNS], { encoding: 'utf8' });
      assert.equal(made.status, 0, `ip netns add: ${made.stderr}`);
      const j = await startJailed(base, exec, 'jail-v1', [
        '--netns',
        netns,
        '--cgroup',
        'pids.max=200',
        '--cgroup',
        'cpu.shares=512',
        '--resource-limit',
        'no-file=1000',
        '--resource-limit',
        'fsize=100000000',
      ]);
      pids.push(j.pid);
      // Exec in place: the jailer's pid is the VMM's.
      assert.equal(j.pid, j.jailer.pid);
      assert.equal(status(j.pid, 'Uid'), `${UID}\t${UID}\t${UID}\t${UID}`);
      assert.equal(status(j.pid, 'Gid'), `${GID}\t${GID}\t${GID}\t${GID}`);
      assert.equal(status(j.pid, 'Groups'), '');
      assert.equal(status(j.pid, 'CapEff'), '0000000000000000');
      assert.notEqual(ns(j.pid, 'mnt'), ns('self', 'mnt'));
      assert.equal(ns(j.pid, 'pid'), ns('self', 'pid'));
      assert.equal(ns(j.pid, 'net'), `net:[${statSync(netns).ino}]`); // joined --netns
      assert.equal(readlinkSync(`/proc/${j.pid}/root`), '/'); // its own root...
      assert.ok(existsSync(`/proc/${j.pid}/root/run/api.sock`)); // ...is the chroot
      const limits = readFileSync(`/proc/${j.pid}/limits`, 'utf8');
      assert.match(limits, /Max open files\s+1000\s+1000/);
      assert.match(limits, /Max file size\s+100000000\s+100000000/);
      // The soft stack limit every VMM runs under (src/util/stack-limit.ts), set by the jailer.
      assert.match(limits, new RegExp(`Max stack size\\s+${VMM_STACK_SOFT_KIB * 1024}\\s`));

      // The v1 cgroups, with their limits, hold the VMM.
      const cg = readFileSync(`/proc/${j.pid}/cgroup`, 'utf8');
      assert.match(cg, new RegExp(`pids:/${PARENT}/jail-v1\\n`));
      assert.match(cg, new RegExp(`cpu:/${PARENT}/jail-v1\\n`));
      assert.equal(
        readFileSync(join(V1, 'pids', PARENT, 'jail-v1', 'pids.max'), 'utf8').trim(),
        '200',
      );
      assert.equal(
        readFileSync(join(V1, 'cpu', PARENT, 'jail-v1', 'cpu.shares'), 'utf8').trim(),
        '512',
      );
      const procs = readFileSync(join(V1, 'pids', PARENT, 'jail-v1', 'cgroup.procs'), 'utf8');
      assert.deepEqual(procs.trim().split('\n'), [String(j.pid)]);

      // What the jail sees: the launcher, package.json, the pid file, node, ldd's libraries, the
      // addon and the device nodes (owned by the VMM), nothing else; every bind mount read-only.
      const ldd = spawnSync(
        'ldd',
        [process.execPath, join(REPO, 'native/build/Release/typervisor_native.node')],
        {
          encoding: 'utf8',
        },
      );
      const expected = new Set([
        '/typervisor',
        '/package.json',
        '/typervisor.pid',
        process.execPath,
        '/native/build/Release/typervisor_native.node',
        '/proc/cpuinfo',
        '/dev/kvm',
        '/dev/net/tun',
        ...(existsSync('/dev/userfaultfd') ? ['/dev/userfaultfd'] : []),
        ...parseLdd(ldd.stdout),
      ]);
      assert.deepEqual(visibleFiles(j.pid), [...expected].sort());
      for (const d of ['/dev/kvm', '/dev/net/tun']) {
        const s = lstatSync(`/proc/${j.pid}/root${d}`);
        assert.ok(s.isCharacterDevice(), d);
        assert.deepEqual([s.uid, s.gid, s.mode & 0o777], [UID, GID, 0o600], d);
      }
      const mountinfo = readFileSync(`/proc/${j.pid}/mountinfo`, 'utf8').trim().split('\n');
      const mounts = mountinfo.map((l) => {
        const f = l.split(' ');
        return { at: f[4]!, opts: f[5]!.split(',') };
      });
      assert.equal(mounts[0]!.at, '/');
      assert.deepEqual(
        mounts
          .slice(1)
          .map((m) => m.at)
          .sort(),
        [
          '/dist',
          '/native/build/Release/typervisor_native.node',
          '/proc/cpuinfo',
          process.execPath,
          ...parseLdd(ldd.stdout),
        ].sort(),
      );
      for (const m of mounts.slice(1)) assert.ok(m.opts.includes('ro'), `${m.at} is read-only`);
      // Nothing of the jail's mounts reached the host's namespace.
      assert.ok(!readFileSync('/proc/self/mountinfo', 'utf8').includes(j.root));

      await bootInJail(j);
      process.kill(j.pid, 'SIGKILL');
      assert.ok(await eventually(() => gone(j.pid), 10_000));
    },
  );

  test(
    '--new-pid-ns --daemonize with cgroup v2: pid 1 of its namespace, new session, stdio on /dev/null',
    T,
    async () => {
      const j = await startJailed(base, exec, 'jail-v2', [
        '--cgroup-version',
        '2',
        '--cgroup',
        'cgroup.max.descendants=0',
        '--cgroup',
        'cgroup.max.depth=0',
        '--new-pid-ns',
        '--daemonize',
      ]);
      pids.push(j.pid);
      const code = await new Promise<number | null>((resolve) =>
        j.jailer.exitCode !== null ? resolve(j.jailer.exitCode) : j.jailer.once('exit', resolve),
      );
      assert.equal(code, 0, j.stderr()); // the jailer leaves once the VMM is spawned
      assert.notEqual(j.pid, j.jailer.pid);
      assert.equal(status(j.pid, 'NSpid'), `${j.pid}\t1`);
      assert.notEqual(ns(j.pid, 'pid'), ns('self', 'pid'));
      assert.notEqual(ns(j.pid, 'mnt'), ns('self', 'mnt'));
      assert.equal(status(j.pid, 'Uid'), `${UID}\t${UID}\t${UID}\t${UID}`);
      const stat = readFileSync(`/proc/${j.pid}/stat`, 'utf8');
      const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
      assert.equal(fields[3], String(j.pid), 'session leader (setsid)');
      for (const fd of [0, 1, 2])
        assert.equal(readlinkSync(`/proc/${j.pid}/fd/${fd}`), '/dev/null');
      // Only stdio and the VMM's own descriptors: nothing the jailer had open survives.
      for (const fd of readdirSync(`/proc/${j.pid}/fd`)) {
        const target = readlinkSync(`/proc/${j.pid}/fd/${fd}`);
        assert.ok(
          !target.includes('/proc/mounts') && !target.includes('netns'),
          `fd ${fd}: ${target}`,
        );
      }

      const cg = join(V2, PARENT, 'jail-v2');
      assert.match(
        readFileSync(`/proc/${j.pid}/cgroup`, 'utf8'),
        new RegExp(`0::/${PARENT}/jail-v2\\n`),
      );
      assert.equal(readFileSync(join(cg, 'cgroup.max.descendants'), 'utf8').trim(), '0');
      assert.equal(readFileSync(join(cg, 'cgroup.max.depth'), 'utf8').trim(), '0');
      assert.deepEqual(readFileSync(join(cg, 'cgroup.procs'), 'utf8').trim().split('\n'), [
        String(j.pid),
      ]);

      await bootInJail(j);
      // As pid 1 it gets only the signals it handles: the VMM's SIGTERM handler stops it.
      process.kill(j.pid, 'SIGTERM');
      assert.ok(await eventually(() => gone(j.pid), 20_000), 'SIGTERM stops the pid-1 VMM');
    },
  );

  test('--daemonize alone: a spawned VMM in its own session, same pid namespace', T, async () => {
    const j = await startJailed(base, exec, 'jail-daemon', ['--daemonize']);
    pids.push(j.pid);
    const code = await new Promise<number | null>((resolve) =>
      j.jailer.exitCode !== null ? resolve(j.jailer.exitCode) : j.jailer.once('exit', resolve),
    );
    assert.equal(code, 0, j.stderr());
    assert.notEqual(j.pid, j.jailer.pid);
    assert.equal(status(j.pid, 'NSpid'), String(j.pid));
    assert.equal(ns(j.pid, 'pid'), ns('self', 'pid'));
    assert.notEqual(ns(j.pid, 'mnt'), ns('self', 'mnt'));
    const stat = readFileSync(`/proc/${j.pid}/stat`, 'utf8');
    assert.equal(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[3], String(j.pid));
    assert.equal((await call(j.sock, 'GET', '/')).json.id, 'jail-daemon');
    process.kill(j.pid, 'SIGKILL');
    assert.ok(await eventually(() => gone(j.pid), 10_000));
  });

  test('refusals change nothing on the host and exit 1', T, () => {
    const run = (args: string[]) =>
      spawnSync(process.execPath, [JAILER, ...args], { encoding: 'utf8', timeout: 30_000 });
    const b = join(dir, 'untouched');
    const common = ['--exec-file', exec, '--uid', '1', '--gid', '1', '--chroot-base-dir', b];
    for (const [args, msg] of [
      [['--id', 'bad_id', ...common], /invalid --id 'bad_id'/],
      [
        ['--id', 'x', ...common.slice(2), '--exec-file', '/nonexistent/typervisor'],
        /does not exist/,
      ],
      [['--id', 'x', ...common, '--cgroup', 'nosuchctl.max=1'], /'nosuchctl' .*not mounted/],
      [
        ['--id', 'x', ...common, '--cgroup-version', '2', '--cgroup', 'nosuchctl.max=1'],
        /'nosuchctl' is not available/,
      ],
      [['--id', 'x', ...common, '--netns', '/nonexistent/netns'], /--netns .* does not exist/],
    ] as Array<[string[], RegExp]>) {
      const r = run(args);
      assert.equal(r.status, 1, `${args.join(' ')}: ${r.stderr}`);
      assert.match(r.stderr, msg);
      assert.match(r.stderr, /^typervisor-jailer: /);
      assert.ok(!existsSync(b), `${args.join(' ')} created ${b}`);
    }
    // A value the kernel refuses: named, and the cgroups made for it are removed again.
    const bad = run([
      '--id',
      'x',
      ...common,
      '--parent-cgroup',
      PARENT,
      '--cgroup',
      'pids.max=lots',
    ]);
    assert.equal(bad.status, 1, bad.stderr);
    assert.match(bad.stderr, /writing 'lots' to \S*pids\.max failed: EINVAL/);
    assert.ok(!existsSync(join(V1, 'pids', PARENT, 'x')), 'cgroup left behind');
    assert.ok(!existsSync(b), `the refused cgroup value created ${b}`);
    assert.equal(run(['--help']).status, 0);
  });
});

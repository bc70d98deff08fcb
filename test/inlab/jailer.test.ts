/**
 * typervisor-jailer with the Debian guest (run inside the lab, as root): a jailed Typervisor in
 * its own mount and pid namespaces, as an unprivileged uid, boots the default guest (kernel and
 * initramfs copied into the chroot) through the API socket in the chroot, refuses the same
 * kernel by its host path, and powers off when the guest does. With --vhost-vsock-cid the
 * jailer claims a guest CID on the host's /dev/vhost-vsock and hands the descriptor over: the
 * jail has no node of its own, a second jailer asking for the CID is refused, and the guest's
 * vsock answers the host through that descriptor. The chroot is under /run (a tmpfs in the lab:
 * device nodes and Unix sockets cannot live on the lab's 9p /tmp).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn, spawnSync } from 'node:child_process';
import {
  closeSync,
  copyFileSync,
  openSync,
  writeSync,
  existsSync,
  mkdtempSync,
  readFileSync,
  readlinkSync,
  rmSync,
  writeFileSync,
} from 'node:fs';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { repoRoot } from '../../src/lab/guest.js';
import { curl, defaultGuest, POWEROFF, skipReason } from './helpers.js';

const opts = { skip: skipReason, timeout: 300_000 };
const MARKER = /TYPERVISOR-BOOT-OK/;
const UID = 40123;
/** The guest CID the jailer claims on /dev/vhost-vsock (no other in-lab test uses it). */
const VHOST_CID = 47;

async function until(
  what: string,
  cond: () => boolean,
  ms: number,
  log: () => string,
): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}\n${log()}`);
    await sleep(100);
  }
}

/** bin/typervisor when the VMM takes the jailer's timing flags, else a launcher dropping them. */
function execFile(dir: string): string {
  const cli = join(repoRoot(), 'bin', 'typervisor');
  const r = spawnSync(process.execPath, [cli, '--id=probe', '--start-time-us=1', '--no-api'], {
    encoding: 'utf8',
  });
  if (!/Unknown option '--start-time/.test(r.stderr)) return cli;
  const launcher = join(dir, 'typervisor');
  writeFileSync(
    launcher,
    `process.argv = process.argv.filter((a) => !/^--(start-time-us|start-time-cpu-us|parent-cpu-time-us)=/.test(a));
import('../dist/src/cli/main.js');
`,
  );
  return launcher;
}

const alive = (pid: number) => {
  try {
    return !readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]!.startsWith('Z');
  } catch {
    return false;
  }
};

test(
  'a jailed Typervisor boots the Debian guest through the API socket in the chroot',
  opts,
  async (t) => {
    const g = defaultGuest();
    spawnSync('modprobe', ['vhost_vsock']); // built in, or a module the lab kernel has
    const dir = mkdtempSync('/run/tv-jailer-');
    const fifo = join(dir, 'console-in');
    execFileSync('mkfifo', ['-m', '600', fifo]);
    const input = openSync(fifo, 'r+');
    const child = spawn(
      process.execPath,
      [
        join(repoRoot(), 'bin', 'typervisor-jailer'),
        ...[
          '--id',
          'lab-1',
          '--exec-file',
          execFile(dir),
          '--uid',
          String(UID),
          '--gid',
          String(UID),
        ],
        ...[
          '--chroot-base-dir',
          join(dir, 'jails'),
          '--new-pid-ns',
          '--vhost-vsock-cid',
          String(VHOST_CID),
          '--',
          '--api-sock',
          '/run/api.sock',
        ],
      ],
      // stdin from a FIFO we hold: Node destroys a child's stdin pipe when that child (the
      // jailer, which spawns the VMM with --new-pid-ns and leaves) exits.
      { stdio: [input, 'pipe', 'pipe'] },
    );
    let out = '';
    let err = '';
    child.stdout!.on('data', (d: Buffer) => (out += d.toString()));
    child.stderr!.on('data', (d: Buffer) => (err += d.toString()));
    const log = () => `--- stdout ---\n${out}\n--- stderr ---\n${err}`;
    const root = join(dir, 'jails', 'typervisor', 'lab-1', 'root');
    const sock = join(root, 'run', 'api.sock');
    let pid = 0;
    try {
      await until('the API socket', () => existsSync(sock), 60_000, log);
      pid = Number(readFileSync(join(root, 'typervisor.pid'), 'utf8'));
      assert.match(
        readFileSync(`/proc/${pid}/status`, 'utf8'),
        new RegExp(`Uid:\\t${UID}\\t${UID}\\t${UID}\\t${UID}\\n`),
      );
      assert.match(
        readFileSync(`/proc/${pid}/status`, 'utf8'),
        new RegExp(`NSpid:\\t${pid}\\t1\\n`),
      );
      assert.notEqual(readlinkSync(`/proc/${pid}/ns/mnt`), readlinkSync('/proc/self/ns/mnt'));

      // --vhost-vsock-cid: the VMM holds the jailer's /dev/vhost-vsock; the jail has no node to
      // open another, and a second jailer asking for the same CID stops before building a jail.
      const fds = execFileSync('ls', [`/proc/${pid}/fd`], { encoding: 'utf8' }).split(/\s+/);
      assert.ok(
        fds.some((fd) => fd && readlinkSync(`/proc/${pid}/fd/${fd}`) === '/dev/vhost-vsock'),
        'the jailed VMM holds /dev/vhost-vsock',
      );
      assert.ok(!existsSync(join(root, 'dev', 'vhost-vsock')), 'no vhost-vsock node in the jail');
      const second = spawnSync(
        process.execPath,
        [
          join(repoRoot(), 'bin', 'typervisor-jailer'),
          ...['--id', 'lab-2', '--exec-file', execFile(dir), '--uid', String(UID)],
          ...['--gid', String(UID), '--chroot-base-dir', join(dir, 'jails')],
          ...['--vhost-vsock-cid', String(VHOST_CID)],
        ],
        { encoding: 'utf8', timeout: 60_000 },
      );
      assert.equal(second.status, 1, second.stderr);
      assert.match(second.stderr, new RegExp(`guest_cid ${VHOST_CID} is in use on this host`));
      assert.ok(!existsSync(join(dir, 'jails', 'typervisor', 'lab-2')), 'no second jail');
      assert.equal(
        curl(sock, 'PUT', '/vsock', { guest_cid: VHOST_CID, backend: 'vhost' }).status,
        204,
      );

      const outside = curl(sock, 'PUT', '/boot-source', { kernel_image_path: g.kernel });
      assert.equal(outside.status, 400, outside.body);
      copyFileSync(g.kernel, join(root, 'vmlinuz'));
      copyFileSync(g.initrd, join(root, 'initrd'));
      assert.equal(
        curl(sock, 'PUT', '/machine-config', { vcpu_count: 1, mem_size_mib: 256 }).status,
        204,
      );
      const boot = curl(sock, 'PUT', '/boot-source', {
        kernel_image_path: '/vmlinuz',
        initrd_path: '/initrd',
        boot_args: 'console=ttyS0 reboot=k panic=1 pci=off quiet',
      });
      assert.equal(boot.status, 204, boot.body);
      const t0 = performance.now();
      const start = curl(sock, 'PUT', '/actions', { action_type: 'InstanceStart' });
      assert.equal(start.status, 204, start.body);
      await until('the boot marker', () => MARKER.test(out), 200_000, log);
      t.diagnostic(
        `jailed: InstanceStart to boot marker ${(performance.now() - t0).toFixed(0)} ms`,
      );
      // The guest answers a connection to a port nobody listens on with a reset: through the
      // host kernel's vhost-vsock, our jailed VMM's rings and the guest's driver, both ways
      // (with no working device the connect would fail with ENODEV or time out instead).
      const probe = spawnSync(
        'socat',
        ['-u', 'OPEN:/dev/null', `VSOCK-CONNECT:${VHOST_CID}:1234`],
        {
          encoding: 'utf8',
          timeout: 30_000,
        },
      );
      assert.match(probe.stderr, /Connection reset by peer/, probe.stderr);
      writeSync(input, `echo guest-says-$((6*7))\n${POWEROFF}\n`);
      await until('the guest shell', () => /guest-says-42/.test(out), 60_000, log);
      await until('the VMM to exit after poweroff', () => !alive(pid), 60_000, log);
    } finally {
      if (pid > 0 && alive(pid)) process.kill(pid, 'SIGKILL');
      child.kill('SIGKILL');
      await sleep(500);
      rmSync(dir, { recursive: true, force: true });
    }
  },
);

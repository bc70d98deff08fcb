/**
 * Builds the jail and runs the VMM in it, in Firecracker's order (its docs/jailer.md), adapted to
 * a multithreaded Node process:
 *  - unshare(CLONE_NEWNS), setns, pivot_root, chroot and chdir change the CALLING THREAD only.
 *    Node's other threads (V8 platform, libuv pool) stay outside, so every step below runs on
 *    the main JS thread with synchronous calls (a libuv-pool fs call would run outside the jail),
 *    and the process ends in execve (which replaces every thread) or posix_spawn from this
 *    thread (the child copies this thread's namespaces, root and credentials).
 *  - setrlimit, the cgroup move (cgroup.procs) and the uid/gid drop (glibc's setgroups/setgid/
 *    setuid, which Node calls, apply to all threads) are process-wide.
 *  - Node cannot fork and keep running JS, so --new-pid-ns and --daemonize spawn the VMM as a
 *    child of the jailer (pid 1 of its namespace with --new-pid-ns); the jailer then writes the
 *    child's pid to /<exec name>.pid and exits 0, as Firecracker's does.
 */
import {
  chmodSync,
  chownSync,
  closeSync,
  copyFileSync,
  existsSync,
  lstatSync,
  mkdirSync,
  openSync,
  readFileSync,
  rmdirSync,
  statSync,
  unlinkSync,
  writeFileSync,
  writeSync,
} from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { native, O_RDONLY, O_RDWR } from '../kvm/native.js';
import { HostError } from '../util/errors.js';
import { deviceNumber, isCharDevice } from '../util/fs.js';
import {
  VHOST_VSOCK_MAJOR,
  VHOST_VSOCK_MINOR,
  VHOST_VSOCK_PATH,
  setGuestCid,
} from '../util/vhost-abi.js';
import { vmmStackLimit } from '../util/stack-limit.js';
import type { JailerConfig } from './args.js';
import { applyCgroups, parseCgroupMounts, planCgroups } from './cgroups.js';
import { ADDON_IN_JAIL, jailTree, sharedLibraries } from './tree.js';

// Linux x86_64 values.
const CLONE_NEWNS = 0x0002_0000;
const CLONE_NEWPID = 0x2000_0000;
const CLONE_NEWNET = 0x4000_0000;
const MS_RDONLY = 1;
const MS_NOSUID = 2;
const MS_NODEV = 4;
const MS_NOEXEC = 8;
const MS_REMOUNT = 32;
const MS_BIND = 4096;
const MS_REC = 16384;
const MS_PRIVATE = 1 << 18;
const MNT_DETACH = 2;
const S_IFCHR = 0o020000;
const RLIMIT_FSIZE = 1;
const RLIMIT_STACK = 3;
const RLIMIT_NOFILE = 7;

/** The device nodes made inside the jail (userfaultfd only when the host has it). */
export const JAIL_DEVICES = ['/dev/kvm', '/dev/net/tun', '/dev/userfaultfd'] as const;

/** The moment the jailer started, for the VMM's --start-time-us / --start-time-cpu-us. */
export interface StartTimes {
  /** CLOCK_MONOTONIC in microseconds (process.hrtime). */
  monoUs: bigint;
  /** The jailer's CPU time (user + system) in microseconds. */
  cpuUs: number;
}

export function startTimes(): StartTimes {
  const c = process.cpuUsage();
  return { monoUs: process.hrtime.bigint() / 1000n, cpuUs: c.user + c.system };
}

/** <base>/<exec name>/<id>/root */
export function chrootDir(c: JailerConfig): string {
  return join(c.chrootBaseDir, c.execName, c.id, 'root');
}

/** dist/src/jailer -> the package root (dist/ and native/ of the same build as this jailer). */
export function packageRoot(): string {
  return join(dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
}

function mkdirs(path: string, mode: number): void {
  mkdirSync(path, { recursive: true, mode });
  chmodSync(path, mode);
}

/** An empty file or directory to mount over (left from an earlier run with the same id is fine). */
function mountPoint(path: string, kind: 'file' | 'dir'): void {
  mkdirs(dirname(path), 0o755);
  if (kind === 'dir') mkdirs(path, 0o755);
  else if (!existsSync(path)) closeSync(openSync(path, 'w', 0o444));
}

function bindReadOnly(source: string, target: string, noexec: boolean): void {
  const n = native();
  n.mount(source, target, null, MS_BIND | MS_REC, null);
  // A bind mount takes its flags from a remount (the first mount ignores MS_RDONLY).
  const flags = MS_BIND | MS_REMOUNT | MS_RDONLY | MS_NOSUID | MS_NODEV | (noexec ? MS_NOEXEC : 0);
  n.mount(null, target, null, flags, null);
}

/**
 * The VMM's argv: node, the launcher, then Firecracker's jailer flags (and the claimed
 * /dev/vhost-vsock descriptor, with --vhost-vsock-cid), then the user's.
 */
export function vmmArgv(
  nodePath: string,
  c: JailerConfig,
  t: StartTimes,
  parentCpuUs?: number,
  vhostVsockFd?: number,
): string[] {
  return [
    nodePath,
    `/${c.execName}`,
    `--id=${c.id}`,
    `--start-time-us=${t.monoUs}`,
    `--start-time-cpu-us=${t.cpuUs}`,
    ...(parentCpuUs !== undefined ? [`--parent-cpu-time-us=${parentCpuUs}`] : []),
    ...(vhostVsockFd !== undefined && c.vhostVsockCid !== undefined
      ? [`--vhost-vsock-fd=${vhostVsockFd}`, `--vhost-vsock-cid=${c.vhostVsockCid}`]
      : []),
    ...c.vmmArgs,
  ];
}

/**
 * --vhost-vsock-cid: opens the host's /dev/vhost-vsock and claims the guest CID on it, as root
 * and before anything on the host changes, so that a CID in use stops the jail at once. The
 * descriptor goes to the VMM (no device node in the jail: a VMM there cannot open the device
 * again and claim more CIDs). Ownership (VHOST_SET_OWNER) is left to the VMM, whose memory the
 * kernel's worker will use.
 */
function claimVhostVsock(cid: number): number {
  const st = statSync(VHOST_VSOCK_PATH, { throwIfNoEntry: false });
  if (!st)
    throw new HostError(
      `--vhost-vsock-cid: ${VHOST_VSOCK_PATH} does not exist on this host (modprobe vhost_vsock)`,
    );
  if (!isCharDevice(st, VHOST_VSOCK_MAJOR, VHOST_VSOCK_MINOR))
    throw new HostError(
      `--vhost-vsock-cid: ${VHOST_VSOCK_PATH} is not the vhost-vsock device on this host`,
    );
  const n = native();
  const fd = n.open(VHOST_VSOCK_PATH, O_RDWR, 0);
  const refused = setGuestCid((f, r, a) => n.ioctl(f, r, a), fd, cid);
  if (refused !== undefined) {
    n.close(fd);
    throw new HostError(`--vhost-vsock-cid: ${refused}`);
  }
  return fd;
}

/**
 * Everything after argument validation. Returns only in the parent of a spawned VMM (with
 * --new-pid-ns or --daemonize), giving the child's pid; otherwise the process becomes the VMM.
 */
export function runJail(c: JailerConfig, t: StartTimes): number {
  const n = native();
  const pkg = packageRoot();
  const nodePath = process.execPath;
  const root = chrootDir(c);

  // 1. Everything that can be refused before the host changes: the cgroup plan (controllers
  // mounted?), the tree the jail will see (ldd forks: before any namespace change), the devices.
  const mounts = parseCgroupMounts(readFileSync('/proc/mounts', 'utf8'));
  const cgroupPlans = planCgroups(mounts, c.cgroupVersion, c.parentCgroup, c.id, c.cgroups);
  const tree = jailTree(pkg, nodePath, sharedLibraries(nodePath, join(pkg, ADDON_IN_JAIL)));
  const devices = JAIL_DEVICES.filter((d) => existsSync(d)).map((d) => {
    const s = statSync(d);
    if (!s.isCharacterDevice()) throw new HostError(`${d} is not a character device on this host`);
    return { path: d, ...deviceNumber(s.rdev) };
  });
  for (const need of ['/dev/kvm', '/dev/net/tun'])
    if (!devices.some((d) => d.path === need))
      throw new HostError(`${need} does not exist on this host`);
  const vhostVsockFd = c.vhostVsockCid !== undefined ? claimVhostVsock(c.vhostVsockCid) : undefined;

  // 2. Cgroups, while /sys/fs/cgroup is still reachable; first, so that a value the kernel
  // refuses leaves nothing behind (applyCgroups undoes its directories).
  applyCgroups(cgroupPlans, mounts, process.pid);

  // 3. The chroot folder, the copied launcher, package.json and the mount points.
  mkdirs(root, 0o755);
  chownSync(root, 0, 0);
  const launcher = join(root, c.execName);
  if (existsSync(launcher)) unlinkSync(launcher);
  copyFileSync(c.execFile, launcher);
  chmodSync(launcher, 0o444);
  writeFileSync(join(root, 'package.json'), '{"type":"module"}\n', { mode: 0o444 });
  for (const e of tree) mountPoint(join(root, e.target), e.kind);
  mkdirs(join(root, 'dev', 'net'), 0o755);
  mkdirs(join(root, 'run'), 0o700);
  chownSync(join(root, 'run'), c.uid, c.gid);

  // 4. Resource limits (process-wide, inherited across exec).
  for (const [name, value] of c.resourceLimits)
    n.setrlimit(name === 'fsize' ? RLIMIT_FSIZE : RLIMIT_NOFILE, value, value);
  // The soft stack limit a VMM runs under (util/stack-limit.ts: no 2 MiB page on the stacks of
  // Node's own threads), whatever started the jailer; the hard limit as it was.
  const stack = vmmStackLimit(readFileSync('/proc/self/limits', 'utf8'));
  if (stack) n.setrlimit(RLIMIT_STACK, stack.soft, stack.hard);

  // 5. Descriptors opened on the host side: the netns handle and /dev/null.
  const netnsFd = c.netns !== undefined ? n.open(c.netns, O_RDONLY, 0) : -1;
  const devNull = c.daemonize ? n.open('/dev/null', O_RDWR, 0) : -1;

  // 6. The mount namespace (this thread) and pivot_root into the chroot.
  n.unshare(CLONE_NEWNS);
  n.mount(null, '/', null, MS_PRIVATE | MS_REC, null); // nothing propagates back to the host
  n.mount(root, root, null, MS_BIND, null); // pivot_root needs the new root to be a mount
  n.mount(null, root, null, MS_BIND | MS_REMOUNT | MS_NOSUID, null);
  for (const e of tree) bindReadOnly(e.source, join(root, e.target), e.noexec);
  const oldRoot = join(root, 'old_root');
  mkdirs(oldRoot, 0o700);
  n.chdir(root);
  n.pivotRoot(root, oldRoot);
  n.umount2('/old_root', MNT_DETACH);
  rmdirSync('/old_root');
  n.chroot('.');
  n.chdir('/');

  // 7. Device nodes inside the jail, owned by the VMM's uid/gid.
  for (const d of devices) {
    if (lstatSync(d.path, { throwIfNoEntry: false })) unlinkSync(d.path);
    n.mknod(d.path, S_IFCHR | 0o600, d.major, d.minor);
    chownSync(d.path, c.uid, c.gid);
  }

  // 8. The network namespace (this thread; the VMM inherits it across exec/spawn).
  if (netnsFd >= 0) {
    n.setns(netnsFd, CLONE_NEWNET);
    n.close(netnsFd);
  }

  // 9. Stdio to /dev/null with --daemonize (the new session comes with the spawn).
  if (devNull >= 0) {
    for (const fd of [0, 1, 2]) n.dup2(devNull, fd);
    n.close(devNull);
  }

  // 10. The pid file, opened while still root (the jail root is root's).
  const pidFile = n.open(
    `/${c.execName}.pid`,
    O_RDWR | 0o100 /* O_CREAT */ | 0o1000 /* O_TRUNC */,
    0o644,
  );
  const spawnChild = c.newPidNs || c.daemonize;
  if (c.newPidNs) n.unshare(CLONE_NEWPID); // needs CAP_SYS_ADMIN: before the drop

  // 11. Drop privileges: no supplementary groups, then gid, then uid (real, effective, saved).
  process.setgroups!([]);
  process.setgid!(c.gid);
  process.setuid!(c.uid);
  if (process.getuid!() !== c.uid || process.geteuid!() !== c.uid || process.getegid!() !== c.gid)
    throw new HostError(`dropping to uid ${c.uid} gid ${c.gid} failed`);

  // 12. Every inherited descriptor but stdio closes at exec; then the VMM.
  n.cloexecFrom(3);
  if (vhostVsockFd !== undefined) n.setInheritable(vhostVsockFd);
  for (const fd of [0, 1, 2]) {
    try {
      n.setInheritable(fd); // Node marks its stdio close-on-exec
    } catch {
      // closed: Node opens /dev/null in its place at start-up (--daemonize always has them)
    }
  }
  if (!spawnChild) {
    writeSync(pidFile, `${process.pid}\n`);
    n.execve(nodePath, vmmArgv(nodePath, c, t, undefined, vhostVsockFd), []);
  }
  const cpu = process.cpuUsage();
  const pid = n.spawn(
    nodePath,
    vmmArgv(nodePath, c, t, cpu.user + cpu.system, vhostVsockFd),
    [],
    c.daemonize,
  );
  writeSync(pidFile, `${pid}\n`);
  closeSync(pidFile);
  return pid;
}

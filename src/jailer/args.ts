/**
 * typervisor-jailer's command line: Firecracker's jailer flags (its docs/jailer.md), parsed and
 * validated before anything on the host changes. Pure: the file-system checks (exec file, netns
 * handle) take their answers from `probe` so that tests can drive every branch.
 */
import { basename, isAbsolute, posix } from 'node:path';
import { ConfigError } from '../util/errors.js';
import { MAX_GUEST_CID, MIN_GUEST_CID, parseGuestCid } from '../util/vhost-abi.js';

export const DEFAULT_CHROOT_BASE = '/srv/jailer';
/** Firecracker's default RLIMIT_NOFILE for the jailed process when --resource-limit omits it. */
export const DEFAULT_NO_FILE = 2048;
export const ID_MAX_LEN = 64;
/** Bounds on repeated flags and on the VMM's arguments (all from a trusted operator, still bounded). */
export const MAX_CGROUP_ARGS = 64;
export const MAX_VMM_ARGS = 256;
const U32_MAX = 0xffff_ffff;

export type ResourceName = 'fsize' | 'no-file';

export interface CgroupSetting {
  /** The cgroup file, `<controller>.<rest>` (cpu.shares, pids.max, cpuset.cpus, ...). */
  file: string;
  /** The text before the first '.', the controller whose hierarchy holds the file. */
  controller: string;
  value: string;
}

export interface JailerConfig {
  id: string;
  /** Absolute path of the exec file (the VMM's launcher script). */
  execFile: string;
  /** basename(execFile): the chroot's middle folder and the file's name inside the jail. */
  execName: string;
  uid: number;
  gid: number;
  chrootBaseDir: string;
  netns?: string;
  cgroups: CgroupSetting[];
  cgroupVersion: 1 | 2;
  /** Relative to each cgroup hierarchy's root; defaults to execName. */
  parentCgroup: string;
  /** Every limit to set, with the no-file default filled in. */
  resourceLimits: Map<ResourceName, number>;
  daemonize: boolean;
  newPidNs: boolean;
  /**
   * --vhost-vsock-cid: the jailer opens /dev/vhost-vsock on the host, claims this guest CID and
   * hands the descriptor to the VMM (which can then use vsock's vhost backend with this CID
   * only; the jail gets no /dev/vhost-vsock node).
   */
  vhostVsockCid?: number;
  /** Everything after `--`, passed to the VMM after the jailer's own --id and timing flags. */
  vmmArgs: string[];
}

/** What the checks need to know about a path on the host. */
export interface PathProbe {
  /** 'file' (regular, after symlinks), 'other' (exists, not a regular file) or 'missing'. */
  kind(path: string): 'file' | 'other' | 'missing';
  /** The first bytes of a regular file (at least 4 when it has them). */
  head(path: string): Uint8Array;
}

export const JAILER_USAGE = `usage: typervisor-jailer --id ID --exec-file FILE --uid UID --gid GID [options] [-- VMM ARGS]
Builds a jail as Firecracker's jailer does, then runs the Typervisor VMM in it (docs/jailer.md).
  --id ID                  1-${ID_MAX_LEN} letters, digits or '-'
  --exec-file FILE         the VMM's launcher script (bin/typervisor), copied into the jail
  --uid UID, --gid GID     the ids the VMM runs as
  --chroot-base-dir DIR    jails are <DIR>/<exec name>/<id>/root (default ${DEFAULT_CHROOT_BASE})
  --netns PATH             join this network namespace (e.g. /var/run/netns/NAME)
  --cgroup FILE=VALUE      write VALUE to FILE in the VMM's cgroup (repeatable)
  --cgroup-version 1|2     the cgroup hierarchy to use (default 1)
  --parent-cgroup PATH     cgroups go to <hierarchy>/<PATH>/<id> (default: the exec file's name)
  --resource-limit R=N     fsize or no-file (repeatable; no-file defaults to ${DEFAULT_NO_FILE})
  --daemonize              new session, stdio to /dev/null, the VMM in a child process
  --new-pid-ns             the VMM is pid 1 of a new PID namespace
  --vhost-vsock-cid CID    claim this guest CID on the host's /dev/vhost-vsock and hand the
                           descriptor to the VMM, for vsock's vhost backend (docs/jailer.md)
  --                       the rest goes to the VMM (after --id and the timing flags)`;

const VALUE_FLAGS = new Set([
  'id',
  'exec-file',
  'uid',
  'gid',
  'chroot-base-dir',
  'netns',
  'cgroup',
  'cgroup-version',
  'parent-cgroup',
  'resource-limit',
  'vhost-vsock-cid',
]);
const REPEATABLE = new Set(['cgroup', 'resource-limit']);
const BOOL_FLAGS = new Set(['daemonize', 'new-pid-ns']);

/** `--help` / `--version`: answered before any validation. */
export type ParsedCommand =
  { kind: 'help' } | { kind: 'version' } | { kind: 'jail'; config: JailerConfig };

export function parseJailerArgs(argv: string[], probe: PathProbe): ParsedCommand {
  const dash = argv.indexOf('--');
  const own = dash < 0 ? argv : argv.slice(0, dash);
  const vmmArgs = dash < 0 ? [] : argv.slice(dash + 1);
  if (own.includes('--help') || own.includes('-h')) return { kind: 'help' };
  if (own.includes('--version')) return { kind: 'version' };

  const single = new Map<string, string>();
  const multi = new Map<string, string[]>();
  const bools = new Set<string>();
  for (let i = 0; i < own.length; i++) {
    const arg = own[i]!;
    if (!arg.startsWith('--'))
      throw new ConfigError(`unexpected argument '${arg}' (VMM arguments go after --)`);
    const eq = arg.indexOf('=');
    const name = arg.slice(2, eq < 0 ? undefined : eq);
    if (BOOL_FLAGS.has(name)) {
      if (eq >= 0) throw new ConfigError(`--${name} takes no value`);
      if (bools.has(name)) throw new ConfigError(`--${name} given twice`);
      bools.add(name);
      continue;
    }
    if (!VALUE_FLAGS.has(name)) throw new ConfigError(`unknown argument --${name}`);
    let value: string;
    if (eq >= 0) value = arg.slice(eq + 1);
    else {
      if (i + 1 >= own.length) throw new ConfigError(`--${name} needs a value`);
      value = own[++i]!;
    }
    if (REPEATABLE.has(name)) {
      const list = multi.get(name) ?? [];
      if (list.length >= MAX_CGROUP_ARGS)
        throw new ConfigError(`--${name} given more than ${MAX_CGROUP_ARGS} times`);
      list.push(value);
      multi.set(name, list);
    } else {
      if (single.has(name)) throw new ConfigError(`--${name} given twice`);
      single.set(name, value);
    }
  }
  const need = (name: string): string => {
    const v = single.get(name);
    if (v === undefined) throw new ConfigError(`--${name} is required`);
    return v;
  };

  const id = need('id');
  if (id.length === 0 || id.length > ID_MAX_LEN || !/^[A-Za-z0-9-]+$/.test(id))
    throw new ConfigError(
      `invalid --id '${id}': 1-${ID_MAX_LEN} characters, only letters, digits and '-'`,
    );

  const execFile = need('exec-file');
  if (!isAbsolute(execFile))
    throw new ConfigError(`--exec-file must be an absolute path: '${execFile}'`);
  const kind = probe.kind(execFile);
  if (kind === 'missing') throw new ConfigError(`--exec-file ${execFile} does not exist`);
  if (kind !== 'file') throw new ConfigError(`--exec-file ${execFile} is not a regular file`);
  const head = probe.head(execFile);
  if (head[0] === 0x7f && head[1] === 0x45 && head[2] === 0x4c && head[3] === 0x46)
    throw new ConfigError(
      `--exec-file ${execFile} is an ELF binary; typervisor-jailer runs a Node launcher script (bin/typervisor) with the jail's node`,
    );
  const execName = basename(execFile);
  if (!/^[A-Za-z0-9._-]+$/.test(execName) || execName.startsWith('.') || execName === 'node')
    throw new ConfigError(
      `--exec-file name '${execName}' must be letters, digits, '.', '_' or '-', not 'node', not starting with '.'`,
    );

  const uid = parseU32('uid', need('uid'));
  const gid = parseU32('gid', need('gid'));

  const baseText = single.get('chroot-base-dir') ?? DEFAULT_CHROOT_BASE;
  const chrootBaseDir = baseText.length > 1 ? baseText.replace(/\/+$/, '') : baseText;
  if (!isAbsolute(chrootBaseDir) || posix.normalize(chrootBaseDir) !== chrootBaseDir)
    throw new ConfigError(`--chroot-base-dir must be an absolute, normalized path: '${baseText}'`);

  const netns = single.get('netns');
  if (netns !== undefined) {
    if (!isAbsolute(netns)) throw new ConfigError(`--netns must be an absolute path: '${netns}'`);
    if (probe.kind(netns) === 'missing') throw new ConfigError(`--netns ${netns} does not exist`);
  }

  const versionText = single.get('cgroup-version') ?? '1';
  if (versionText !== '1' && versionText !== '2')
    throw new ConfigError(`invalid --cgroup-version '${versionText}': 1 or 2`);
  const cgroupVersion = versionText === '1' ? 1 : 2;

  const cgroups = (multi.get('cgroup') ?? []).map(parseCgroup);
  const files = new Set<string>();
  for (const c of cgroups) {
    if (files.has(c.file)) throw new ConfigError(`--cgroup ${c.file} given twice`);
    files.add(c.file);
  }

  const parentCgroup = single.get('parent-cgroup') ?? execName;
  const segments = parentCgroup.split('/');
  if (
    parentCgroup.length > 1024 ||
    segments.some((s) => s === '' || s === '.' || s === '..' || !/^[A-Za-z0-9._:@-]+$/.test(s))
  )
    throw new ConfigError(
      `invalid --parent-cgroup '${parentCgroup}': a relative path of names (letters, digits, '.', '_', ':', '@', '-'), no '.' or '..'`,
    );

  const resourceLimits = new Map<ResourceName, number>();
  for (const r of multi.get('resource-limit') ?? []) {
    const m = /^([a-z-]+)=(\d{1,20})$/.exec(r);
    if (!m) throw new ConfigError(`invalid --resource-limit '${r}': RESOURCE=NUMBER`);
    const name = m[1]!;
    if (name !== 'fsize' && name !== 'no-file')
      throw new ConfigError(`unknown --resource-limit resource '${name}': fsize or no-file`);
    const n = Number(m[2]);
    if (!Number.isSafeInteger(n))
      throw new ConfigError(`--resource-limit ${name}: ${m[2]} is too large`);
    if (resourceLimits.has(name)) throw new ConfigError(`--resource-limit ${name} given twice`);
    resourceLimits.set(name, n);
  }
  if (!resourceLimits.has('no-file')) resourceLimits.set('no-file', DEFAULT_NO_FILE);

  const cidText = single.get('vhost-vsock-cid');
  let vhostVsockCid: number | undefined;
  if (cidText !== undefined) {
    vhostVsockCid = parseGuestCid(cidText);
    if (vhostVsockCid === undefined)
      throw new ConfigError(
        `invalid --vhost-vsock-cid '${cidText.slice(0, 40)}': a guest CID from ${MIN_GUEST_CID} to ${MAX_GUEST_CID}`,
      );
  }

  if (vmmArgs.length > MAX_VMM_ARGS)
    throw new ConfigError(`more than ${MAX_VMM_ARGS} VMM arguments after --`);
  for (const a of vmmArgs) {
    if (
      a === '--id' ||
      a.startsWith('--id=') ||
      a.startsWith('--start-time-') ||
      a.startsWith('--parent-cpu-time-us') ||
      a.startsWith('--vhost-vsock-')
    )
      throw new ConfigError(
        `VMM argument '${a}' is the jailer's to pass (it passes --id, the timing flags and the vhost-vsock descriptor itself)`,
      );
    if (a.includes('\0')) throw new ConfigError('a VMM argument contains a NUL byte');
  }

  return {
    kind: 'jail',
    config: {
      id,
      execFile,
      execName,
      uid,
      gid,
      chrootBaseDir,
      ...(netns !== undefined ? { netns } : {}),
      cgroups,
      cgroupVersion,
      parentCgroup,
      resourceLimits,
      daemonize: bools.has('daemonize'),
      newPidNs: bools.has('new-pid-ns'),
      ...(vhostVsockCid !== undefined ? { vhostVsockCid } : {}),
      vmmArgs,
    },
  };
}

function parseU32(name: string, text: string): number {
  if (!/^\d{1,10}$/.test(text) || Number(text) >= U32_MAX)
    throw new ConfigError(`invalid --${name} '${text}': a number from 0 to ${U32_MAX - 1}`);
  return Number(text);
}

/** `<controller>.<rest>=<value>`: the file is one name (no '/'), the value one line. */
export function parseCgroup(text: string): CgroupSetting {
  const eq = text.indexOf('=');
  const file = eq < 0 ? text : text.slice(0, eq);
  const value = eq < 0 ? '' : text.slice(eq + 1);
  const m = /^([a-z_0-9]+)\.[A-Za-z0-9_.]+$/.exec(file);
  if (eq < 0 || !m)
    throw new ConfigError(
      `invalid --cgroup '${text}': FILE=VALUE, FILE like cpu.shares or pids.max`,
    );
  if (value.length === 0 || value.length > 4096 || /[\n\0]/.test(value))
    throw new ConfigError(
      `invalid --cgroup ${file} value: one non-empty line of at most 4096 bytes`,
    );
  return { file, controller: m[1]!, value };
}

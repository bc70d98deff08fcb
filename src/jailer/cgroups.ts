/**
 * The jailed VMM's cgroups, as Firecracker's jailer makes them: for each hierarchy that holds a
 * controller named by --cgroup, `<hierarchy root>/<parent-cgroup>/<id>` is created, the values
 * written, then the jailer's pid moved in (through cgroup.procs, which moves every thread: Node
 * has several, where Firecracker's single-threaded jailer writes `tasks`). Hierarchies are found
 * in /proc/mounts (cgroup v1: one mount per controller set; v2: the cgroup2 mount).
 * Synchronous file calls only (see jail.ts: every step runs on the main thread).
 */
import {
  closeSync,
  rmdirSync,
  existsSync,
  mkdirSync,
  openSync,
  readFileSync,
  writeSync,
  constants,
} from 'node:fs';
import { join } from 'node:path';
import { ConfigError, HostError } from '../util/errors.js';
import type { CgroupSetting } from './args.js';

export interface CgroupMount {
  path: string;
  version: 1 | 2;
  /** v1: the controllers in the mount options (cpu, memory, name=systemd...); v2: empty. */
  controllers: string[];
}

/** The cgroup mounts in /proc/mounts text (octal escapes in paths decoded). */
export function parseCgroupMounts(text: string): CgroupMount[] {
  const out: CgroupMount[] = [];
  for (const line of text.split('\n')) {
    const f = line.split(' ');
    if (f.length < 4) continue;
    const path = f[1]!.replace(/\\([0-7]{3})/g, (_, o: string) =>
      String.fromCharCode(parseInt(o, 8)),
    );
    if (f[2] === 'cgroup2') out.push({ path, version: 2, controllers: [] });
    else if (f[2] === 'cgroup') {
      const opts = f[3]!.split(',');
      out.push({ path, version: 1, controllers: opts });
    }
  }
  return out;
}

/** One cgroup directory to create, its settings, and (v2) the controllers to enable above it. */
export interface CgroupPlan {
  dir: string;
  settings: CgroupSetting[];
  /** v2 only: [cgroup.subtree_control file, controllers] from the hierarchy root down. */
  enable: Array<{ file: string; controllers: string[] }>;
}

/**
 * The directories for `settings`, or a ConfigError naming a controller no hierarchy holds.
 * v2 with no settings: the parent cgroup itself when it exists (Firecracker moves the process
 * there, "contrary to its name"), else nothing.
 */
export function planCgroups(
  mounts: CgroupMount[],
  version: 1 | 2,
  parent: string,
  id: string,
  settings: CgroupSetting[],
  exists: (path: string) => boolean = existsSync,
  v2Available: (root: string) => string[] = availableV2,
): CgroupPlan[] {
  if (version === 1) {
    const byPath = new Map<string, CgroupPlan>();
    for (const s of settings) {
      const m = mounts.find((x) => x.version === 1 && x.controllers.includes(s.controller));
      if (!m)
        throw new ConfigError(
          `cgroup v1 controller '${s.controller}' (for ${s.file}) is not mounted on this host`,
        );
      const dir = join(m.path, parent, id);
      const plan = byPath.get(dir) ?? { dir, settings: [], enable: [] };
      plan.settings.push(s);
      byPath.set(dir, plan);
    }
    return [...byPath.values()];
  }
  const root = mounts.find((x) => x.version === 2);
  if (!root)
    throw new ConfigError('no cgroup v2 hierarchy is mounted on this host (--cgroup-version 2)');
  if (settings.length === 0) {
    const dir = join(root.path, parent);
    return exists(dir) ? [{ dir, settings: [], enable: [] }] : [];
  }
  // Core files (cgroup.max.descendants...) need no controller.
  const wanted = [...new Set(settings.map((s) => s.controller))].filter((c) => c !== 'cgroup');
  const available = v2Available(root.path);
  for (const c of wanted)
    if (!available.includes(c))
      throw new ConfigError(
        `cgroup v2 controller '${c}' is not available in ${root.path} (has: ${available.join(' ') || 'none'})`,
      );
  const enable: CgroupPlan['enable'] = [];
  if (wanted.length > 0) {
    let dir = root.path;
    for (const seg of parent.split('/')) {
      enable.push({ file: join(dir, 'cgroup.subtree_control'), controllers: wanted });
      dir = join(dir, seg);
    }
    enable.push({ file: join(dir, 'cgroup.subtree_control'), controllers: wanted });
  }
  return [{ dir: join(root.path, parent, id), settings, enable }];
}

function availableV2(root: string): string[] {
  try {
    return readFileSync(join(root, 'cgroup.controllers'), 'utf8')
      .trim()
      .split(/\s+/)
      .filter(Boolean);
  } catch {
    return [];
  }
}

/** Writes `text` to an existing cgroup file (O_WRONLY: some are write-only, none are created). */
export function writeCgroupFile(path: string, text: string): void {
  let fd: number;
  try {
    fd = openSync(path, constants.O_WRONLY);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code;
    throw new HostError(
      code === 'ENOENT'
        ? `cgroup file ${path} does not exist`
        : `cannot open cgroup file ${path}: ${code}`,
    );
  }
  try {
    writeSync(fd, text);
  } catch (e) {
    throw new HostError(
      `writing '${text}' to ${path} failed: ${(e as NodeJS.ErrnoException).code}`,
    );
  } finally {
    closeSync(fd);
  }
}

/** cpuset.cpus/mems of a new v1 cpuset cgroup start empty: copy them down from the nearest set parent. */
function inheritCpuset(mountPath: string, dir: string): void {
  const rel = dir.slice(mountPath.length).split('/').filter(Boolean);
  for (const file of ['cpuset.cpus', 'cpuset.mems']) {
    let value = readFileSync(join(mountPath, file), 'utf8').trim();
    let cur = mountPath;
    for (const seg of rel) {
      cur = join(cur, seg);
      const own = readFileSync(join(cur, file), 'utf8').trim();
      if (own === '') writeCgroupFile(join(cur, file), value);
      else value = own;
    }
  }
}

/** mkdir -p that records each directory it creates (parents first). */
function mkdirTracked(path: string, created: string[]): void {
  const parts = path.split('/').filter(Boolean);
  let cur = '';
  for (const part of parts) {
    cur += `/${part}`;
    if (!existsSync(cur)) {
      mkdirSync(cur);
      created.push(cur);
    }
  }
}

/**
 * Creates the cgroups of `plans` and writes their values; only when every value is in, moves
 * `pid` (all its threads) into each. A refused value (EINVAL for `pids.max=lots`...) removes the
 * cgroups this call created and throws: nothing moved, nothing left. (Controllers it enabled in a
 * v2 `cgroup.subtree_control` stay enabled.)
 */
export function applyCgroups(plans: CgroupPlan[], mounts: CgroupMount[], pid: number): void {
  const created: string[] = [];
  try {
    for (const p of plans) {
      for (const e of p.enable) {
        mkdirTracked(join(e.file, '..'), created);
        const on = readFileSync(e.file, 'utf8').trim().split(/\s+/);
        const missing = e.controllers.filter((c) => !on.includes(c));
        if (missing.length > 0) writeCgroupFile(e.file, missing.map((c) => `+${c}`).join(' '));
      }
      mkdirTracked(p.dir, created);
      const m = mounts.find((x) => p.dir.startsWith(x.path + '/'));
      if (m && m.version === 1 && m.controllers.includes('cpuset')) inheritCpuset(m.path, p.dir);
      for (const s of p.settings) writeCgroupFile(join(p.dir, s.file), s.value);
    }
  } catch (e) {
    for (const dir of created.reverse()) {
      try {
        rmdirSync(dir);
      } catch {
        // not empty or busy: left for the operator, as Firecracker leaves everything
      }
    }
    throw e;
  }
  for (const p of plans) writeCgroupFile(join(p.dir, 'cgroup.procs'), String(pid));
}

/**
 * `--drive path=FILE[,ro][,root][,serial=ID]`, `--rng` and `--rootfs` turned into virtio device
 * configs, plus the `root=/dev/vdX` the root drive adds to the command line.
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ConfigError } from '../util/errors.js';
import type { VirtioConfig } from '../vmm/virtio-wiring.js';

export interface DriveSpec {
  path: string;
  readOnly: boolean;
  root: boolean;
  serial?: string;
}

export function parseDrive(spec: string): DriveSpec {
  const d: Partial<DriveSpec> = { readOnly: false, root: false };
  for (const part of spec.split(',')) {
    const eq = part.indexOf('=');
    const key = eq < 0 ? part : part.slice(0, eq);
    const value = eq < 0 ? undefined : part.slice(eq + 1);
    if (key === 'path' && value) d.path = value;
    else if (key === 'ro' && value === undefined) d.readOnly = true;
    else if (key === 'root' && value === undefined) d.root = true;
    else if (key === 'serial' && value !== undefined) d.serial = value;
    else
      throw new ConfigError(
        `--drive: unknown or malformed "${part}" (expected path=FILE[,ro][,root][,serial=ID])`,
      );
  }
  if (!d.path) throw new ConfigError(`--drive ${spec}: path=FILE is required`);
  return d as DriveSpec;
}

/** vda, vdb, ..., vdz, vdaa: the name Linux gives the n-th virtio disk. */
export function virtioDiskName(n: number): string {
  let s = '';
  for (let i = n + 1; i > 0; i = Math.floor((i - 1) / 26))
    s = String.fromCharCode(97 + ((i - 1) % 26)) + s;
  return `vd${s}`;
}

/** Device configs in slot order (disks first, in the order given, then the rng). */
export function virtioConfigs(
  drives: DriveSpec[],
  rng: boolean,
): { configs: VirtioConfig[]; rootArg?: string } {
  const roots = drives.filter((d) => d.root);
  if (roots.length > 1) throw new ConfigError('only one --drive can have the root flag');
  const configs: VirtioConfig[] = drives.map((d) => ({
    kind: 'block' as const,
    path: d.path,
    readOnly: d.readOnly,
    ...(d.serial !== undefined ? { serial: d.serial } : {}),
  }));
  if (rng) configs.push({ kind: 'rng' });
  const rootIdx = drives.findIndex((d) => d.root);
  const rootArg =
    rootIdx < 0
      ? undefined
      : `root=/dev/${virtioDiskName(rootIdx)}${drives[rootIdx]!.readOnly ? ' ro' : ' rw'}`;
  return { configs, rootArg };
}

/**
 * A private copy of the project's Debian root disk for one run (sparse, so it costs little),
 * removed by the returned cleanup. The cached image itself is never written by a guest.
 */
export function privateRootfsCopy(image: string): { path: string; cleanup: () => void } {
  const dir = mkdtempSync(join(tmpdir(), 'typervisor-rootfs-'));
  const path = join(dir, 'rootfs.ext4');
  const r = spawnSync('cp', ['--sparse=always', image, path], { encoding: 'utf8' });
  if (r.status !== 0) {
    rmSync(dir, { recursive: true, force: true });
    throw new ConfigError(`cannot copy the root disk ${image}: ${r.stderr.trim() || 'cp failed'}`);
  }
  return { path, cleanup: () => rmSync(dir, { recursive: true, force: true }) };
}

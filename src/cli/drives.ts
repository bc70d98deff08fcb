/**
 * `--drive path=FILE[,ro][,root][,serial=ID][,blockdev][,sync|,async]` turned into drives of
 * VmResources (Firecracker's DriveConfig), and the private root disk of `--rootfs`.
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ConfigError } from '../util/errors.js';
import type { DriveConfig } from '../vmm/index.js';

/** The shape of a --drive, in its error messages. */
const DRIVE_SPEC = 'path=FILE[,ro][,root][,serial=ID][,blockdev][,sync|,async]';

/** GET_ID holds 20 bytes (VIRTIO_BLK_ID_BYTES). */
const SERIAL_MAX = 20;

/**
 * One --drive. Its drive_id is its serial when given (GET_ID answers the drive id, as
 * Firecracker's does), else `drive<N>`.
 */
export function parseDrive(spec: string, index: number): DriveConfig {
  let path: string | undefined;
  let readOnly = false;
  let root = false;
  let serial: string | undefined;
  let blockDevice = false;
  let sync = false;
  let async = false;
  for (const part of spec.split(',')) {
    const eq = part.indexOf('=');
    const key = eq < 0 ? part : part.slice(0, eq);
    const value = eq < 0 ? undefined : part.slice(eq + 1);
    if (key === 'path' && value) path = value;
    else if (key === 'ro' && value === undefined) readOnly = true;
    else if (key === 'root' && value === undefined) root = true;
    else if (key === 'serial' && value !== undefined) serial = value;
    // A host block device as the image: refused unless asked for (allow_block_device).
    else if (key === 'blockdev' && value === undefined) blockDevice = true;
    // Firecracker's io_engine: "Sync", or "Async" (io_uring; Sync where the host lacks it).
    // Neither: the drive's io_engine is left unset, i.e. the default, Async.
    else if (key === 'sync' && value === undefined) sync = true;
    else if (key === 'async' && value === undefined) async = true;
    else throw new ConfigError(`--drive: unknown or malformed "${part}" (expected ${DRIVE_SPEC})`);
  }
  if (!path) throw new ConfigError(`--drive ${spec}: path=FILE is required`);
  if (sync && async)
    throw new ConfigError(`--drive ${spec}: sync and async together (one io_engine per drive)`);
  if (serial !== undefined && (serial === '' || Buffer.byteLength(serial) > SERIAL_MAX))
    throw new ConfigError(`--drive ${spec}: serial must be 1 to ${SERIAL_MAX} bytes`);
  return {
    drive_id: serial ?? `drive${index}`,
    path_on_host: path,
    is_root_device: root,
    is_read_only: readOnly,
    ...(blockDevice ? { allow_block_device: true } : {}),
    ...(sync ? { io_engine: 'Sync' as const } : {}),
    ...(async ? { io_engine: 'Async' as const } : {}),
  };
}

/** Every --drive, in order; at most one root. */
export function parseDrives(specs: readonly string[]): DriveConfig[] {
  const drives = specs.map((s, i) => parseDrive(s, i));
  if (drives.filter((d) => d.is_root_device).length > 1)
    throw new ConfigError('only one --drive can have the root flag');
  const ids = new Set(drives.map((d) => d.drive_id));
  if (ids.size !== drives.length) throw new ConfigError('two --drive options with one serial');
  return drives;
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

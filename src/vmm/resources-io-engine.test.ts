/**
 * A drive's io_engine in the VM description: unset is the default, "Async" (issue 17; where
 * io_uring is unavailable the device serves it with Sync), and the block config says it was
 * the default; "Sync" or "Async" given stays what was given. GET /vm/config reports the engine,
 * and a recorded configuration (snapshots) keeps "unset" unset.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ConfigError } from '../util/errors.js';
import {
  DEFAULT_IO_ENGINE,
  checkDrive,
  configFromSpec,
  validateResources,
  validateRestoreConfig,
  wireVmConfig,
  type DriveConfig,
  type VmResources,
} from './resources.js';

const dir = mkdtempSync(join(tmpdir(), 'typervisor-io-engine-'));
process.on('exit', () => rmSync(dir, { recursive: true, force: true }));
const kernel = join(dir, 'vmlinux');
writeFileSync(kernel, 'k');

for (const id of ['unset', 'sync', 'async'])
  writeFileSync(join(dir, `${id}.img`), Buffer.alloc(4096));

const drive = (id: string, engine?: 'Sync' | 'Async'): DriveConfig => ({
  drive_id: id,
  is_root_device: false,
  is_read_only: true,
  path_on_host: join(dir, `${id}.img`),
  ...(engine ? { io_engine: engine } : {}),
});

const resources = (): VmResources => ({
  machine: { vcpu_count: 1, mem_size_mib: 64 },
  boot: { kernel_image_path: kernel },
  drives: [drive('unset'), drive('sync', 'Sync'), drive('async', 'Async')],
});

/** Each block device's [id, engine, defaulted]. */
const engines = (devices: ReadonlyArray<{ kind: string; id: string }>) =>
  devices.map((d) => {
    const b = d as { id: string; ioEngine?: string; ioEngineDefaulted?: boolean };
    return [b.id, b.ioEngine, b.ioEngineDefaulted === true];
  });

test('the default engine is "Async"', () => {
  assert.equal(DEFAULT_IO_ENGINE, 'Async');
});

test('a drive without io_engine reaches its block config as Async, marked as the default', () => {
  const spec = validateResources(resources());
  assert.deepEqual(engines(spec.devices), [
    ['unset', 'Async', true],
    ['sync', 'Sync', false],
    ['async', 'Async', false],
  ]);
});

test('GET /vm/config reports "Async" for a drive that left io_engine unset; "Sync" given stays "Sync"', () => {
  const spec = validateResources(resources());
  const wire = wireVmConfig(configFromSpec(spec)) as { drives: Array<Record<string, unknown>> };
  assert.deepEqual(
    wire.drives.map((d) => [d.drive_id, d.io_engine]),
    [
      ['unset', 'Async'],
      ['sync', 'Sync'],
      ['async', 'Async'],
    ],
  );
});

test('a recorded configuration keeps unset unset and an engine given as given (snapshot load)', () => {
  const spec = validateResources(resources());
  const config = configFromSpec(spec);
  assert.deepEqual(
    config.drives.map((d) => [d.drive_id, d.io_engine]),
    [
      ['unset', undefined],
      ['sync', 'Sync'],
      ['async', 'Async'],
    ],
  );
  const restored = validateRestoreConfig(JSON.parse(JSON.stringify(config)) as unknown);
  assert.deepEqual(engines(restored.devices), engines(spec.devices));
});

test('io_engine other than "Sync" or "Async" is refused, naming the drive', () => {
  assert.throws(
    () => checkDrive({ ...drive('d0'), io_engine: 'sync' as 'Sync' }),
    (e: unknown) =>
      e instanceof ConfigError &&
      e.message === 'drive d0: io_engine must be "Sync" or "Async", not "sync"',
  );
});

/**
 * `--drive` specs turned into Firecracker-shaped drives (no file is opened here; the device
 * opens and checks the image at start). The engine: `,sync` or `,async` says it, neither leaves
 * io_engine unset (the default, "Async").
 */
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ConfigError } from '../util/errors.js';
import { validateResources } from '../vmm/index.js';
import { parseDrive, parseDrives } from './drives.js';

const dir = mkdtempSync(join(tmpdir(), 'drive-args-'));
const kernel = join(dir, 'kernel');
writeFileSync(kernel, 'x');
after(() => rmSync(dir, { recursive: true, force: true }));

const refused = (spec: string, re: RegExp) =>
  assert.throws(
    () => parseDrive(spec, 0),
    (e: unknown) => e instanceof ConfigError && re.test(e.message) && !e.message.includes('\n'),
  );

test('--drive: the flags in Firecracker field names; no engine flag leaves io_engine unset', () => {
  assert.deepEqual(parseDrive('path=/d.img', 0), {
    drive_id: 'drive0',
    path_on_host: '/d.img',
    is_root_device: false,
    is_read_only: false,
  });
  assert.deepEqual(parseDrive('path=/r.img,root,ro,serial=disk1,blockdev', 3), {
    drive_id: 'disk1',
    path_on_host: '/r.img',
    is_root_device: true,
    is_read_only: true,
    allow_block_device: true,
  });
});

test('--drive ,sync is io_engine "Sync"; ,async is "Async"', () => {
  assert.equal(parseDrive('path=/d.img,sync', 0).io_engine, 'Sync');
  assert.equal(parseDrive('sync,path=/d.img,ro', 0).io_engine, 'Sync');
  assert.equal(parseDrive('path=/d.img,async', 0).io_engine, 'Async');
  assert.equal(parseDrive('path=/d.img', 0).io_engine, undefined);
});

test('--drive ,sync and ,async together: a ConfigError naming both', () => {
  refused('path=/d.img,sync,async', /--drive path=\/d\.img,sync,async: sync and async together/);
  refused('path=/d.img,async,ro,sync', /sync and async together/);
});

test('--drive: engine flags take no value; the error lists them', () => {
  refused('path=/d.img,sync=1', /unknown or malformed "sync=1" \(expected .*\[,sync\|,async\]\)/);
  refused('path=/d.img,async=yes', /unknown or malformed "async=yes"/);
  refused('path=/d.img,Sync', /unknown or malformed "Sync"/);
});

test('--drive engines reach the block devices: unset is Async by default, ,sync stays Sync', () => {
  const drives = parseDrives(['path=/a.img,root', 'path=/b.img,sync', 'path=/c.img,async']);
  const spec = validateResources({
    machine: { vcpu_count: 1, mem_size_mib: 64 },
    boot: { kernel_image_path: kernel },
    drives,
  });
  assert.deepEqual(
    spec.devices.map((d) =>
      d.kind === 'block' ? [d.id, d.ioEngine, d.ioEngineDefaulted === true] : [d.id],
    ),
    [
      ['drive0', 'Async', true],
      ['drive1', 'Sync', false],
      ['drive2', 'Async', false],
    ],
  );
});

/**
 * Host paths given to the API or the config file (boot-source, drives): checked on an opened
 * descriptor at PUT time, refusals name the field and the reason, block devices only on request.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdtempSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ConfigError } from '../util/errors.js';
import {
  configFromSpec,
  validateBootSource,
  validateDrive,
  validateResources,
} from './resources.js';

const refused = (f: () => unknown, re: RegExp) =>
  assert.throws(f, (e: unknown) => e instanceof ConfigError && re.test(e.message));

test('boot-source: kernel_image_path and initrd_path named in refusals', () => {
  const dir = mkdtempSync(join(tmpdir(), 'tv-paths-'));
  try {
    const k = join(dir, 'k');
    writeFileSync(k, 'kernel');
    refused(
      () => validateBootSource({ kernel_image_path: '/dev/zero' }),
      /^kernel_image_path \/dev\/zero is a character device, not a regular file$/,
    );
    refused(
      () => validateBootSource({ kernel_image_path: k, initrd_path: dir }),
      /^initrd_path .* is a directory/,
    );
    refused(
      () => validateBootSource({ kernel_image_path: join(dir, 'gone') }),
      /^kernel_image_path .*gone does not exist$/,
    );
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('drives: path_on_host named; a block device only with allow_block_device', () => {
  refused(
    () =>
      validateDrive({
        drive_id: 'd',
        is_root_device: false,
        is_read_only: true,
        path_on_host: '/dev/null',
      }),
    /^drive d: path_on_host \/dev\/null is a character device, not a regular file$/,
  );
  const blk = ['/dev/loop7', '/dev/loop0'].find(
    (p) => existsSync(p) && statSync(p).isBlockDevice(),
  );
  if (!blk || process.getuid?.() !== 0) return; // needs root and a loop device node
  const d = { drive_id: 'd', is_root_device: false, is_read_only: true, path_on_host: blk };
  refused(() => validateDrive(d), /path_on_host .* is a block device; .*allow_block_device/);
  assert.equal(validateDrive({ ...d, allow_block_device: true }).path_on_host, blk);
});

test('allow_block_device reaches the block device config', () => {
  const dir = mkdtempSync(join(tmpdir(), 'tv-paths-'));
  try {
    const k = join(dir, 'k');
    const img = join(dir, 'img');
    writeFileSync(k, 'kernel');
    writeFileSync(img, Buffer.alloc(4096));
    const spec = validateResources({
      machine: { vcpu_count: 1, mem_size_mib: 64 },
      boot: { kernel_image_path: k },
      drives: [
        {
          drive_id: 'a',
          is_root_device: false,
          is_read_only: true,
          path_on_host: img,
          allow_block_device: true,
        },
      ],
    });
    const blk = spec.devices.find((c) => c.kind === 'block');
    assert.equal((blk as { allowBlockDevice?: boolean }).allowBlockDevice, true);
    // ...and back into the configuration a snapshot records.
    assert.equal(configFromSpec(spec).drives[0]?.allow_block_device, true);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

/**
 * Kernel, initrd and drive images: opened once, checked on the descriptor, errors naming the
 * field and the reason; FIFOs, devices and directories refused without hanging.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import {
  closeSync,
  existsSync,
  fstatSync,
  mkdirSync,
  mkdtempSync,
  readSync,
  renameSync,
  rmSync,
  statSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ConfigError } from '../util/errors.js';
import { checkBootImage, openHostFile, readBootImage } from './image-file.js';

const refused = (f: () => unknown, re: RegExp) =>
  assert.throws(f, (e: unknown) => e instanceof ConfigError && re.test(e.message));

test('boot images: regular non-empty files only, errors name the field and the reason', () => {
  const dir = mkdtempSync(join(tmpdir(), 'tv-img-'));
  try {
    const k = join(dir, 'kernel');
    writeFileSync(k, 'MZ kernel bytes');
    assert.equal(Buffer.from(readBootImage('kernel_image_path', k)).toString(), 'MZ kernel bytes');
    // A look at the header reads only that much; a file shorter than it, whole.
    assert.equal(Buffer.from(readBootImage('kernel_image_path', k, undefined, 2)).toString(), 'MZ');
    assert.equal(readBootImage('kernel_image_path', k, undefined, 4096).length, 15);
    refused(
      () => readBootImage('kernel_image_path', join(dir, 'nope')),
      /^kernel_image_path .*nope does not exist$/,
    );
    mkdirSync(join(dir, 'sub'));
    refused(
      () => checkBootImage('initrd_path', join(dir, 'sub')),
      /^initrd_path .*sub is a directory/,
    );
    // /dev/zero would never end and /etc-style devices are not images.
    refused(
      () => readBootImage('kernel_image_path', '/dev/zero'),
      /is a character device, not a regular file/,
    );
    const fifo = join(dir, 'fifo');
    execFileSync('mkfifo', [fifo]);
    refused(() => readBootImage('initrd_path', fifo), /initrd_path .*is a FIFO/); // and did not hang
    writeFileSync(join(dir, 'empty'), '');
    refused(() => checkBootImage('kernel_image_path', join(dir, 'empty')), /is empty/);
    refused(() => readBootImage('kernel_image_path', k, 4), /is 15 bytes, larger than the 4 bytes/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('a block device is refused unless allowed; the hint says how to allow it', () => {
  const blk = ['/dev/loop7', '/dev/loop0'].find(
    (p) => existsSync(p) && statSync(p).isBlockDevice(),
  );
  if (!blk || process.getuid?.() !== 0) return; // needs root and a loop device node
  refused(
    () => openHostFile('drive d: path_on_host', blk, { blockDeviceHint: 'set allow_block_device' }),
    /^drive d: path_on_host \/dev\/loop\d is a block device; refused unless asked for explicitly \(set allow_block_device\)$/,
  );
  const { fd, stat } = openHostFile('path_on_host', blk, { allowBlockDevice: true });
  assert.ok(stat.isBlockDevice());
  closeSync(fd);
});

test('the descriptor is the file: swapping the path after the open changes nothing', () => {
  const dir = mkdtempSync(join(tmpdir(), 'tv-img-'));
  try {
    const img = join(dir, 'disk.img');
    writeFileSync(img, Buffer.alloc(4096, 1));
    const { fd, stat } = openHostFile('path_on_host', img, { write: true });
    try {
      // Someone swaps the path for a bigger file (or a device) after the check.
      writeFileSync(join(dir, 'other'), Buffer.alloc(1 << 20, 2));
      renameSync(join(dir, 'other'), img);
      assert.equal(stat.size, 4096);
      assert.equal(fstatSync(fd).size, 4096, 'the size and data come from what was opened');
      const b = Buffer.alloc(1);
      readSync(fd, b, 0, 1, 0);
      assert.equal(b[0], 1);
    } finally {
      closeSync(fd);
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

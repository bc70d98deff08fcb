/** Firecracker's flags that Typervisor takes: --mmds-size-limit, --enable-pci, --version. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawnSync } from 'node:child_process';
import { closeSync, openSync, readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { DEFAULT_MAX_PAYLOAD } from '../api/server.js';
import { FIRECRACKER_FLAGS, parseFirecrackerArgs, versionText } from './firecracker.js';

const CLI = fileURLToPath(new URL('../../../bin/typervisor', import.meta.url));
const PKG = JSON.parse(readFileSync(new URL('../../../package.json', import.meta.url), 'utf8')) as {
  version: string;
};

test('--mmds-size-limit: bytes, defaulting to the payload limit as Firecracker does', () => {
  assert.equal(parseFirecrackerArgs([]).mmdsSizeLimit, DEFAULT_MAX_PAYLOAD);
  assert.equal(
    parseFirecrackerArgs(['--http-api-max-payload-size', '512000']).mmdsSizeLimit,
    512_000,
  );
  assert.equal(parseFirecrackerArgs(['--mmds-size-limit', '51200']).mmdsSizeLimit, 51_200);
  assert.equal(parseFirecrackerArgs(['--mmds-size-limit=0']).mmdsSizeLimit, 0);
  for (const bad of ['', '1e3', '12kB', '1000000000', ' 5'])
    assert.throws(
      () => parseFirecrackerArgs(['--mmds-size-limit', bad]),
      /--mmds-size-limit must be a whole number of bytes/,
      bad,
    );
  assert.throws(() => parseFirecrackerArgs(['--mmds-size-limit']), /mmds-size-limit/);
  assert.throws(() => parseFirecrackerArgs(['--mmds-size-limit', '-1']), /mmds-size-limit/);
});

test('--enable-pci is refused with a message that says why and what to do', () => {
  assert.throws(
    () => parseFirecrackerArgs(['--enable-pci']),
    /--enable-pci: PCI is not supported.*virtio-mmio.*run without --enable-pci/,
  );
  assert.throws(() => parseFirecrackerArgs(['--enable-pci=yes']), /enable-pci/);
});

test('the new flags select the Firecracker entry, and a refused flag exits 153', () => {
  assert.ok(FIRECRACKER_FLAGS.includes('--mmds-size-limit'));
  assert.ok(FIRECRACKER_FLAGS.includes('--enable-pci'));
  const r = spawnSync(process.execPath, [CLI, '--enable-pci', '--api-sock', '/nonexistent/s'], {
    encoding: 'utf8',
    timeout: 20_000,
  });
  assert.equal(r.status, 153, r.stderr);
  assert.match(r.stderr, /PCI is not supported/);
});

test("--version has Firecracker's shape: 'Name vX.Y.Z', then an empty line", () => {
  const expected = `Typervisor v${PKG.version}\n\n`;
  assert.equal(versionText(), expected);
  // What Firecracker's test framework does with the first line, with our name.
  const first = versionText().split('\n')[0]!;
  assert.equal(/^Typervisor v(.+)/.exec(first)?.[1], PKG.version);
  // Bare, and among Firecracker's flags (both run as `firecracker --version` is).
  for (const args of [['--version'], ['--api-sock', '/nonexistent/s', '--version']])
    assert.equal(execFileSync(process.execPath, [CLI, ...args], { encoding: 'utf8' }), expected);
});

test('--vhost-vsock-fd / --vhost-vsock-cid: together, and only an open /dev/vhost-vsock', () => {
  assert.equal(parseFirecrackerArgs([]).vhostVsock, undefined);
  assert.throws(() => parseFirecrackerArgs(['--vhost-vsock-fd', '3']), /go together/);
  assert.throws(() => parseFirecrackerArgs(['--vhost-vsock-cid', '3']), /go together/);
  for (const fd of ['0', '2', '70000', 'x'])
    assert.throws(
      () => parseFirecrackerArgs([`--vhost-vsock-fd=${fd}`, '--vhost-vsock-cid=3']),
      /--vhost-vsock-fd must be/,
    );
  for (const cid of ['2', '4294967295', 'x'])
    assert.throws(
      () => parseFirecrackerArgs(['--vhost-vsock-fd=3', `--vhost-vsock-cid=${cid}`]),
      /--vhost-vsock-cid must be/,
    );
  // A descriptor number nothing has open, and an open file that is not the device.
  assert.throws(
    () => parseFirecrackerArgs(['--vhost-vsock-fd=65000', '--vhost-vsock-cid=3']),
    /65000 is not an open descriptor/,
  );
  const fd = openSync(fileURLToPath(import.meta.url), 'r');
  try {
    assert.throws(
      () => parseFirecrackerArgs([`--vhost-vsock-fd=${fd}`, '--vhost-vsock-cid=3']),
      new RegExp(`--vhost-vsock-fd ${fd} is not /dev/vhost-vsock`),
    );
  } finally {
    closeSync(fd);
  }
  assert.ok(FIRECRACKER_FLAGS.includes('--vhost-vsock-fd'));
});

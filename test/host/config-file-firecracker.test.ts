/**
 * Needs /dev/kvm, gcc and ld. A configuration file of exactly the shape Firecracker's own
 * examples have (its tests/framework/vm_config.json: every section present, features we lack
 * as null or [], optional fields as null) boots a tiny guest with --config-file, and what GET
 * /vm/config then answers is that same shape again.
 */
import { describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { CLI, tempDir } from '../api/client.js';
import { firecrackerExampleConfig } from '../../src/api/testing/firecracker-example.js';
import { guestPath, tinyGuests } from './helpers.js';

const guests = tinyGuests();
const T = { timeout: 60_000, skip: guests.skip ?? false };

describe("--config-file with Firecracker's example configuration (KVM)", () => {
  test('it boots, and a section naming what the VM lacks is refused, saying which', T, () => {
    const dir = tempDir();
    const disk = join(dir, 'rootfs.ext4');
    writeFileSync(disk, Buffer.alloc(1024 * 1024));
    const cfg = join(dir, 'vm_config.json');
    const config = firecrackerExampleConfig(guestPath('poweroff'), disk);
    writeFileSync(cfg, JSON.stringify(config, null, 2));
    const r = spawnSync(process.execPath, [CLI, '--no-api', '--config-file', cfg], {
      encoding: 'utf8',
      timeout: 40_000,
    });
    assert.equal(r.status, 0, r.stderr);
    assert.equal(r.stdout, 'tiny guest up\n');

    writeFileSync(
      cfg,
      JSON.stringify({ ...config, 'mmds-config': { network_interfaces: ['eth0'] } }),
    );
    const bad = spawnSync(process.execPath, [CLI, '--no-api', '--config-file', cfg], {
      encoding: 'utf8',
      timeout: 20_000,
    });
    // MMDS on an interface the file does not define: refused before anything runs, naming it.
    assert.equal(bad.status, 152, bad.stderr);
    assert.match(
      bad.stderr,
      /network interface IDs .* does not correspond to any existing network interface \("eth0"\)/,
    );
    assert.equal(bad.stdout, '', 'the guest never ran');
  });
});

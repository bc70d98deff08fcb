import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  configFromSpec,
  resourcesFromConfig,
  validateMachineConfig,
  validateResources,
  validateRestoreConfig,
  type VmResources,
} from './resources.js';

const dir = mkdtempSync(join(tmpdir(), 'typervisor-dirty-config-'));
process.on('exit', () => rmSync(dir, { recursive: true, force: true }));
const kernel = join(dir, 'vmlinux');
writeFileSync(kernel, 'k');

const res = (track?: boolean): VmResources => ({
  machine: {
    vcpu_count: 1,
    mem_size_mib: 32,
    ...(track !== undefined ? { track_dirty_pages: track } : {}),
  },
  boot: { kernel_image_path: kernel },
});

test('track_dirty_pages: true is accepted and reaches the spec and the recorded configuration', () => {
  assert.equal(
    validateMachineConfig({ vcpu_count: 1, mem_size_mib: 32, track_dirty_pages: true })
      .track_dirty_pages,
    true,
  );
  const spec = validateResources(res(true));
  assert.equal(spec.trackDirtyPages, true);
  const config = configFromSpec(spec);
  assert.equal(config['machine-config'].track_dirty_pages, true);
  // The config file's path: configuration -> resources -> spec keeps it.
  assert.equal(validateResources(resourcesFromConfig(config)).trackDirtyPages, true);
  // A snapshot's saved configuration with it loads (the load decides tracking itself).
  assert.equal(validateRestoreConfig(JSON.parse(JSON.stringify(config))).vcpus, 1);
});

test('without track_dirty_pages (or false) nothing is tracked', () => {
  assert.equal(validateResources(res()).trackDirtyPages, undefined);
  assert.equal(validateResources(res(false)).trackDirtyPages, undefined);
  assert.equal(configFromSpec(validateResources(res()))['machine-config'].track_dirty_pages, false);
});

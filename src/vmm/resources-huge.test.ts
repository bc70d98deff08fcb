/**
 * machine-config huge_pages in the VM description: what is accepted, what the spec and the
 * recorded configuration carry, and what is refused with the field named.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ConfigError } from '../util/errors.js';
import {
  configFromSpec,
  resourcesFromConfig,
  validateMachineConfig,
  validateResources,
  type VmResources,
} from './resources.js';

const dir = mkdtempSync(join(tmpdir(), 'typervisor-huge-config-'));
process.on('exit', () => rmSync(dir, { recursive: true, force: true }));
const kernel = join(dir, 'vmlinux');
writeFileSync(kernel, 'k');

const res = (huge?: string, mem = 64): VmResources => ({
  machine: {
    vcpu_count: 1,
    mem_size_mib: mem,
    ...(huge !== undefined ? { huge_pages: huge as '2M' } : {}),
  },
  boot: { kernel_image_path: kernel },
});

test('huge_pages "2M" reaches the spec and the recorded configuration', () => {
  const spec = validateResources(res('2M'));
  assert.equal(spec.hugePages, '2M');
  const config = configFromSpec(spec);
  assert.equal(config['machine-config'].huge_pages, '2M');
  // The config file's path keeps it.
  assert.equal(validateResources(resourcesFromConfig(config)).hugePages, '2M');
  // "None" and no field: 4 KiB pages.
  assert.equal(validateResources(res('None')).hugePages, undefined);
  assert.equal(validateResources(res()).hugePages, undefined);
  assert.equal(configFromSpec(validateResources(res()))['machine-config'].huge_pages, 'None');
});

test('huge_pages: other values, odd sizes and a balloon are refused, naming the field', () => {
  const refused = (r: VmResources, re: RegExp) =>
    assert.throws(
      () => validateResources(r),
      (e: unknown) => e instanceof ConfigError && re.test(e.message),
    );
  refused(res('Transparent'), /^huge_pages: "Transparent" is not supported \(use "None" or "2M"\)/);
  refused(res('1G'), /^huge_pages: "1G"/);
  refused(res('2M', 65), /^mem_size_mib must be a multiple of 2 with huge_pages "2M" \(got 65\)/);
  refused(
    { ...res('2M'), balloon: { amount_mib: 0, deflate_on_oom: false } },
    /^balloon: not available with huge_pages "2M"/,
  );
  // An odd size without huge pages is fine, and so is a balloon.
  assert.equal(validateMachineConfig(res(undefined, 65).machine).mem_size_mib, 65);
  assert.equal(
    validateResources({ ...res('None'), balloon: { amount_mib: 0, deflate_on_oom: false } }).devices
      .length,
    1,
  );
});

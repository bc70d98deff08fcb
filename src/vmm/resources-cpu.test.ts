/**
 * CPU templates and smt in the VM description: validateResources' spec, the configuration a
 * spec gives back (what a snapshot records), GET /vm/config, and a snapshot's saved
 * configuration checked again at restore.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  configFromSpec,
  cpuTemplateMsrAddrs,
  emptyVmConfig,
  normalizeCpuConfig,
  validateResources,
  validateRestoreConfig,
  wireVmConfig,
  type VmResources,
} from './resources.js';

const dir = mkdtempSync(join(tmpdir(), 'typervisor-cpu-config-'));
process.on('exit', () => rmSync(dir, { recursive: true, force: true }));
const boot = { kernel_image_path: join(dir, 'vmlinux') };
writeFileSync(boot.kernel_image_path, 'k');
const template = {
  cpuid_modifiers: [
    { leaf: '0x7', subleaf: '0x0', flags: 1, modifiers: [{ register: 'ebx', bitmap: '0b0' }] },
  ],
  msr_modifiers: [{ addr: '0xc0000103', bitmap: '0b1' }],
};

test('the spec carries smt and the template; the configuration it gives back has them', () => {
  const r: VmResources = {
    machine: { vcpu_count: 2, mem_size_mib: 64, smt: true },
    boot,
    cpu_config: normalizeCpuConfig(template),
  };
  const spec = validateResources(r);
  assert.equal(spec.smt, true);
  assert.ok(spec.cpuTemplate && 'custom' in spec.cpuTemplate);
  assert.equal(spec.cpuTemplate.custom.msr_modifiers[0]!.addr, 0xc000_0103);
  const c = configFromSpec(spec);
  assert.equal(c['machine-config'].smt, true);
  assert.deepEqual(c['cpu-config'], normalizeCpuConfig(template));
  assert.deepEqual(wireVmConfig(c)['cpu-config'], normalizeCpuConfig(template));
  assert.deepEqual(cpuTemplateMsrAddrs(c), [0xc000_0103]);

  const t2s = validateResources({
    machine: { vcpu_count: 1, mem_size_mib: 64, cpu_template: 'T2S' },
    boot,
  });
  assert.deepEqual(t2s.cpuTemplate, { static: 'T2S' });
  const c2 = configFromSpec(t2s);
  assert.equal(c2['machine-config'].cpu_template, 'T2S');
  assert.deepEqual(cpuTemplateMsrAddrs(c2), [0x10a]); // IA32_ARCH_CAPABILITIES
  assert.equal(
    validateResources({ machine: { vcpu_count: 1, mem_size_mib: 64, cpu_template: 'None' }, boot })
      .cpuTemplate,
    undefined,
  );
  assert.deepEqual(cpuTemplateMsrAddrs(emptyVmConfig()), []);
  assert.equal(wireVmConfig(emptyVmConfig())['cpu-config'], null);
});

test("a snapshot's saved cpu-config is checked at restore and kept for GET /vm/config", () => {
  const c = configFromSpec(
    validateResources({
      machine: { vcpu_count: 2, mem_size_mib: 64, smt: true },
      boot,
      cpu_config: normalizeCpuConfig(template),
    }),
  );
  const saved = JSON.parse(JSON.stringify(c));
  const r = validateRestoreConfig(saved);
  assert.deepEqual(r.config['cpu-config'], normalizeCpuConfig(template));
  assert.equal(r.config['machine-config'].smt, true);
  // Older snapshots have no cpu-config key; a crafted one is refused by field.
  const { 'cpu-config': _gone, ...old } = saved;
  assert.equal(validateRestoreConfig(old).config['cpu-config'], null);
  assert.throws(
    () =>
      validateRestoreConfig({
        ...saved,
        'cpu-config': { msr_modifiers: [{ addr: '0x1', bitmap: '0b2' }] },
      }),
    { name: 'ConfigError', message: /msr_modifiers\[0\]\.bitmap: "0b2" has "2"/ },
  );
  assert.throws(
    () => validateRestoreConfig({ ...saved, 'cpu-config': 'path' }),
    /cpu-config: expected an object/,
  );
});

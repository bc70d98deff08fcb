import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  configFromSpec,
  emptyVmConfig,
  validateBalloon,
  validateResources,
  validateRestoreConfig,
  wireVmConfig,
} from './resources.js';
import { ConfigError } from '../util/errors.js';

const machine = { vcpu_count: 1, mem_size_mib: 64 };
// A file that exists (the boot source is checked to be one; nothing is booted here).
const boot = { kernel_image_path: process.execPath };

test('balloon config: checked against the memory, last device, round-trips through a spec', () => {
  assert.throws(
    () => validateBalloon({ amount_mib: 65, deflate_on_oom: false }, 64),
    /Amount of pages requested is too large/,
  );
  assert.throws(
    () =>
      validateBalloon({ amount_mib: 1, deflate_on_oom: false, stats_polling_interval_s: 1.5 }, 64),
    ConfigError,
  );
  const balloon = { amount_mib: 8, deflate_on_oom: true, stats_polling_interval_s: 2 };
  const spec = validateResources({ machine, boot, entropy: {}, balloon });
  assert.deepEqual(
    spec.devices.map((d) => d.kind),
    ['rng', 'balloon'],
  );
  assert.deepEqual(spec.devices[1], {
    kind: 'balloon',
    id: 'balloon',
    amountMib: 8,
    deflateOnOom: true,
    statsPollingIntervalS: 2,
    freePageHinting: false,
    freePageReporting: false,
  });
  const full = {
    ...balloon,
    free_page_hinting: false,
    free_page_reporting: false,
  };
  assert.deepEqual(configFromSpec(spec).balloon, full);
  assert.deepEqual(wireVmConfig({ ...emptyVmConfig(), balloon }).balloon, full);
  assert.equal(wireVmConfig(emptyVmConfig()).balloon, null);
});

test("balloon config: a snapshot's saved section is checked like a PUT", () => {
  const cfg = { 'machine-config': machine, balloon: { amount_mib: 4, deflate_on_oom: false } };
  const r = validateRestoreConfig(cfg);
  assert.equal(r.devices.at(-1)?.kind, 'balloon');
  assert.equal(r.config.balloon?.amount_mib, 4);
  assert.throws(
    () => validateRestoreConfig({ ...cfg, balloon: { amount_mib: 4096, deflate_on_oom: false } }),
    /too large/,
  );
  assert.throws(
    () => validateRestoreConfig({ ...cfg, balloon: { amount_mib: 4, bogus: 1 } }),
    /unknown field `bogus`/,
  );
});

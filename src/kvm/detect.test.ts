import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { detectKvm } from './detect.js';

const dirs: string[] = [];
after(() => {
  for (const d of dirs) rmSync(d, { recursive: true, force: true });
});

/** A fake host: a /dev/kvm stand-in, /sys/module entries, and cpuinfo flags. */
function host(opts: { dev?: boolean; modules?: string[]; flags?: string }) {
  const d = mkdtempSync(join(tmpdir(), 'detect-'));
  dirs.push(d);
  const devKvm = join(d, 'kvm');
  if (opts.dev !== false) writeFileSync(devKvm, '');
  const sysModule = join(d, 'module');
  mkdirSync(sysModule);
  for (const m of opts.modules ?? []) mkdirSync(join(sysModule, m));
  const cpuinfo = join(d, 'cpuinfo');
  writeFileSync(cpuinfo, `processor\t: 0\nflags\t\t: fpu sse2 ${opts.flags ?? ''} lm\n`);
  return { devKvm, sysModule, cpuinfo };
}

test('no /dev/kvm: not usable', () => {
  const r = detectKvm(host({ dev: false, modules: ['kvm'], flags: 'svm' }));
  assert.equal(r.usable, false);
  assert.equal(r.kind, 'none');
  assert.equal(r.canRunStockGuests, false);
  assert.match(r.reason, /does not exist/);
});

test('PVM host (kvm_pvm, no vmx/svm): usable, cannot run stock guests', () => {
  const r = detectKvm(host({ modules: ['kvm', 'kvm_pvm'], flags: 'hypervisor' }));
  assert.deepEqual([r.usable, r.kind, r.canRunStockGuests], [true, 'pvm', false]);
  assert.match(r.reason, /PVM/);
});

test('hardware AMD-V and Intel VT-x: runs stock guests', () => {
  for (const [flag, mod] of [
    ['svm', 'kvm_amd'],
    ['vmx', 'kvm_intel'],
  ] as const) {
    const r = detectKvm(host({ modules: ['kvm', mod], flags: flag }));
    assert.deepEqual([r.usable, r.kind, r.canRunStockGuests], [true, 'hardware', true], flag);
    assert.match(r.reason, new RegExp(flag));
  }
});

test('this host: a consistent answer', () => {
  const r = detectKvm();
  assert.equal(typeof r.reason, 'string');
  if (r.kind === 'none') assert.equal(r.usable, false);
  if (r.canRunStockGuests) assert.equal(r.kind, 'hardware');
});

/**
 * smt and a custom CPU template as a stock Linux guest sees them (run inside the lab): one boot
 * from --config-file with 2 vCPUs, smt on, and a template that clears RDRAND (leaf 1 ECX bit
 * 30). Linux must report both vCPUs as threads of one core; RDRAND must be gone from
 * /proc/cpuinfo, or, on a host whose KVM puts its own feature bits back, Typervisor must have
 * said so. About 30 s in the lab.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { defaultGuest, describeRun, skipReason, typervisor, POWEROFF } from './helpers.js';

const opts = { skip: skipReason, timeout: 240_000 };
const MARKER = /TYPERVISOR-BOOT-OK/;

test('smt and a custom template: siblings, cores and flags in /proc/cpuinfo', opts, async () => {
  const g = defaultGuest();
  const dir = mkdtempSync(join(tmpdir(), 'tv-cpu-'));
  try {
    const cfg = join(dir, 'vm.json');
    writeFileSync(
      cfg,
      JSON.stringify({
        'boot-source': {
          kernel_image_path: g.kernel,
          initrd_path: g.initrd,
          boot_args: 'console=ttyS0 reboot=k panic=1 pci=off quiet',
        },
        'machine-config': { vcpu_count: 2, mem_size_mib: 256, smt: true },
        'cpu-config': {
          cpuid_modifiers: [
            {
              leaf: '0x1',
              subleaf: '0x0',
              flags: 0,
              modifiers: [{ register: 'ecx', bitmap: '0bx0' + 'x'.repeat(30) }],
            },
          ],
        },
      }),
    );
    const r = await typervisor(
      ['--no-api', '--config-file', cfg],
      [
        'echo VENDOR=$(grep -m1 vendor_id /proc/cpuinfo | cut -d: -f2)',
        'echo SIBLINGS=$(grep -m1 siblings /proc/cpuinfo | cut -d: -f2)',
        'echo CORES=$(grep -m1 "cpu cores" /proc/cpuinfo | cut -d: -f2)',
        'echo THREADS=$(cat /sys/devices/system/cpu/cpu0/topology/thread_siblings_list)',
        'echo RDRAND=$(grep -c -w rdrand /proc/cpuinfo)',
        POWEROFF,
        '',
      ].join('\n'),
      200_000,
      MARKER,
    );
    assert.equal(r.code, 0, describeRun(r));
    assert.match(r.stdout, /SIBLINGS= ?2\b/, describeRun(r));
    assert.match(r.stdout, /CORES= ?1\b/, describeRun(r));
    assert.match(r.stdout, /THREADS=0-1\b/, describeRun(r));
    const rdrand = Number(/RDRAND=(\d+)/.exec(r.stdout)?.[1] ?? NaN);
    const warned = /CPU template not fully applied: CPUID leaf 0x1 subleaf 0x0 ecx/.test(r.stderr);
    assert.ok(rdrand === 0 || warned, `RDRAND in ${rdrand} CPUs and no warning\n${describeRun(r)}`);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

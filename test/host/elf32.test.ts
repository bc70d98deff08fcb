/**
 * Needs /dev/kvm, gcc (with -m32) and ld. ELF32 kernels with a PVH note (helper P, issue 15):
 * test/guests/tiny.S built as an ELF32 i386 image (`ld -m elf_i386`, the 4-byte Xen PVH note it
 * already carries) boots and powers off, as it does built as ELF64.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { join } from 'node:path';
import { REPO, kvmSkipReason, runCli, tempDir } from './helpers.js';

function build(dir: string): string | undefined {
  const src = join(REPO, 'test', 'guests');
  const obj = join(dir, 'poweroff32.o');
  const elf = join(dir, 'poweroff32.elf');
  const cc = spawnSync('gcc', ['-m32', '-c', '-o', obj, '-DMODE_POWEROFF', join(src, 'tiny.S')], {
    encoding: 'utf8',
  });
  if (cc.status !== 0) return undefined;
  const ld = spawnSync(
    'ld',
    [
      '-m',
      'elf_i386',
      '-nostdlib',
      '-static',
      '-T',
      join(src, 'tiny.ld'),
      '-z',
      'noexecstack',
      '-o',
      elf,
      obj,
    ],
    { encoding: 'utf8' },
  );
  return ld.status === 0 ? elf : undefined;
}

const kvm = kvmSkipReason();
const dir = kvm ? '' : tempDir('typervisor-elf32-');
const elf = kvm ? undefined : build(dir);
const skip =
  kvm ?? (elf ? undefined : 'gcc -m32 / ld -m elf_i386 cannot build an ELF32 guest here');

test(
  'an ELF32 i386 kernel with a PVH note boots and powers off',
  { skip: skip ?? false, timeout: 60_000 },
  async (t) => {
    const r = await runCli(['run', '--kernel', elf!, '--memory', '32'], { timeoutMs: 45_000 });
    t.diagnostic(`exit ${r.code} in ${r.ms.toFixed(0)} ms, stdout ${JSON.stringify(r.stdout)}`);
    assert.equal(r.timedOut, false);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout, 'tiny guest up\n');
  },
);

/**
 * Needs /dev/kvm (some checks happen after the VM is created), gcc and ld. Bad input to
 * `typervisor run`: each case must give ONE clear line on stderr naming the problem, nothing on
 * stdout, exit 2 (usage, images) or 3 (host), quickly, and leave no process behind.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import {
  closeSync,
  mkdirSync,
  openSync,
  readFileSync,
  ftruncateSync,
  writeFileSync,
} from 'node:fs';
import { join } from 'node:path';
import { detectKvm } from '../../src/kvm/detect.js';
import { makeBzImage } from '../fixtures/kernel-images.js';
import {
  cachedBzImage,
  childPids,
  guestPath,
  oneLine,
  processGone,
  runCli,
  tempDir,
  tinyGuests,
} from './helpers.js';

const guests = tinyGuests();
const skip = guests.skip ?? false;
const T = { timeout: 20_000, skip };
const kvm = detectKvm();
/** Where KVM cannot run stock kernels, the CLI refuses a bzImage before looking further. */
const pvmOnly = kvm.usable && !kvm.canRunStockGuests;

let dir = '';
let truncatedBz = '';
let truncatedFrom = '';

before(() => {
  if (skip) return;
  dir = tempDir();
  writeFileSync(join(dir, 'empty'), '');
  writeFileSync(join(dir, 'garbage'), randomBytes(64 * 1024));
  mkdirSync(join(dir, 'a-directory'));
  const real = cachedBzImage();
  if (real) {
    truncatedFrom = `the first 2 KiB of ${real}`;
    writeFileSync(join(dir, 'truncated-bz'), readFileSync(real).subarray(0, 2048));
  } else {
    // A header that says 30 setup sectors (15 KiB), cut at 2 KiB, as a real one would be.
    truncatedFrom = 'a synthesized setup header (30 setup sectors) cut at 2 KiB';
    writeFileSync(join(dir, 'truncated-bz'), makeBzImage({ setupSects: 30 }).subarray(0, 2048));
  }
  truncatedBz = join(dir, 'truncated-bz');
  // A sparse 40 MiB initrd: too big for 32 MiB of guest memory, cheap on disk.
  const fd = openSync(join(dir, 'big-initrd'), 'w');
  ftruncateSync(fd, 40 * 1024 * 1024);
  closeSync(fd);
  writeFileSync(join(dir, 'small-initrd'), 'not really a cpio archive');
});

interface Case {
  name: string;
  args: () => string[];
  code: number;
  /** What the one stderr line must say. */
  says: RegExp;
}

const kernel = () => guestPath('poweroff');
const run = (...a: string[]) => ['run', '--memory', '32', ...a];

const cases: Case[] = [
  {
    name: 'missing kernel file',
    args: () => run('--kernel', join(dir, 'nope')),
    code: 2,
    says: /kernel_image_path .*nope does not exist/,
  },
  {
    name: 'a directory as kernel',
    args: () => run('--kernel', join(dir, 'a-directory')),
    code: 2,
    says: /is a directory/,
  },
  {
    name: 'an empty kernel',
    args: () => run('--kernel', join(dir, 'empty')),
    code: 2,
    says: /kernel_image_path .* is empty/,
  },
  {
    name: 'a garbage kernel',
    args: () => run('--kernel', join(dir, 'garbage')),
    code: 2,
    says: /neither a bzImage nor an ELF/,
  },
  {
    name: 'a truncated bzImage with --allow-pvm',
    args: () => run('--kernel', truncatedBz, '--allow-pvm'),
    code: 2,
    says: /bzImage.*(end of the file|truncated|too short)/i,
  },
  {
    name: 'a missing initrd',
    args: () => run('--kernel', kernel(), '--initrd', join(dir, 'nope')),
    code: 2,
    says: /initrd_path .*nope does not exist/,
  },
  {
    name: 'a directory as initrd',
    args: () => run('--kernel', kernel(), '--initrd', dir),
    code: 2,
    says: /initrd_path .* is a directory/,
  },
  {
    name: 'an initrd too big for guest memory',
    args: () => run('--kernel', kernel(), '--initrd', join(dir, 'big-initrd')),
    code: 2,
    says: /initrd .*does not fit/,
  },
  {
    name: '--vcpus 0',
    args: () => run('--kernel', kernel(), '--vcpus', '0'),
    code: 2,
    says: /vcpu.*1 to 64/,
  },
  {
    name: '--vcpus 65',
    args: () => run('--kernel', kernel(), '--vcpus', '65'),
    code: 2,
    says: /vcpu.*1 to 64/,
  },
  {
    name: '--vcpus abc',
    args: () => run('--kernel', kernel(), '--vcpus', 'abc'),
    code: 2,
    says: /--vcpus must be a whole number/,
  },
  {
    name: '--vcpus -1',
    args: () => run('--kernel', kernel(), '--vcpus=-1'),
    code: 2,
    says: /--vcpus must be a whole number/,
  },
  {
    name: '--memory 1',
    args: () => ['run', '--kernel', kernel(), '--memory', '1'],
    code: 2,
    says: /mem.*16 to/,
  },
  {
    name: '--memory abc',
    args: () => ['run', '--kernel', kernel(), '--memory', 'abc'],
    code: 2,
    says: /--memory must be a whole number/,
  },
  {
    name: '--memory 1e3',
    args: () => ['run', '--kernel', kernel(), '--memory', '1e3'],
    code: 2,
    says: /--memory must be a whole number/,
  },
  {
    name: 'a 3000-byte --cmdline',
    args: () => run('--kernel', kernel(), '--cmdline', 'x'.repeat(3000)),
    code: 2,
    says: /command line is 3000 bytes; the limit is \d+/,
  },
  {
    name: 'an unknown flag',
    args: () => run('--kernel', kernel(), '--frobnicate'),
    code: 2,
    says: /--frobnicate/,
  },
  { name: 'a flag without its value', args: () => ['run', '--kernel'], code: 2, says: /--kernel/ },
  {
    name: 'a stray positional argument',
    args: () => run('--kernel', kernel(), 'extra'),
    code: 2,
    says: /extra/,
  },
  {
    name: 'a bad --log-level',
    args: () => run('--kernel', kernel(), '--log-level', 'loud'),
    code: 2,
    says: /--log-level/,
  },
  {
    name: 'an unknown command',
    args: () => ['frobnicate'],
    code: 2,
    says: /unknown command "frobnicate"/,
  },
];

describe('typervisor run: bad input gives one line and a usage/host exit code', () => {
  after(() => assert.deepEqual(childPids(), [], 'child processes left behind'));

  for (const c of cases) {
    test(c.name, T, async (t) => {
      const r = await runCli(c.args(), { timeoutMs: 10_000 });
      t.diagnostic(`exit ${r.code} in ${r.ms.toFixed(0)} ms: ${r.stderr.trim().slice(0, 200)}`);
      assert.equal(r.timedOut, false, 'the CLI hung');
      assert.ok(processGone(r.pid));
      assert.equal(r.stdout, '');
      const line = oneLine(r.stderr);
      assert.match(line, /^typervisor: /);
      assert.match(line, c.says);
      assert.doesNotMatch(line, /\n|at .*\.js:\d+/, 'no stack trace');
      assert.equal(r.code, c.code, line);
    });
  }

  test(
    `a truncated bzImage without --allow-pvm (${pvmOnly ? 'PVM host: refused' : 'hardware KVM: image error'})`,
    T,
    async (t) => {
      t.diagnostic(`image: ${truncatedFrom}`);
      const r = await runCli(run('--kernel', truncatedBz), { timeoutMs: 10_000 });
      const line = oneLine(r.stderr);
      if (pvmOnly) {
        assert.equal(r.code, 3, line);
        assert.match(line, /cannot run stock Linux kernels.*npm run lab/);
      } else {
        assert.equal(r.code, 2, line);
      }
    },
  );

  test(
    'a real bzImage on a PVM-only host points to the lab (exit 3) unless --allow-pvm',
    {
      ...T,
      skip:
        skip ||
        (!pvmOnly && 'this host has hardware KVM') ||
        (!cachedBzImage() && 'no bzImage built (npm run guest)'),
    },
    async () => {
      const r = await runCli(run('--kernel', cachedBzImage()!), { timeoutMs: 10_000 });
      const line = oneLine(r.stderr);
      assert.equal(r.code, 3, line);
      assert.match(
        line,
        /^typervisor: this host's KVM cannot run stock Linux kernels .*run it in the lab: npm run lab/,
      );
      assert.equal(r.stdout, '');
    },
  );

  test(
    'a synthesized bzImage header is refused the same way on a PVM-only host',
    { ...T, skip: skip || (!pvmOnly && 'this host has hardware KVM') },
    async () => {
      const p = join(dir, 'synth-bz');
      writeFileSync(p, makeBzImage());
      const r = await runCli(run('--kernel', p), { timeoutMs: 10_000 });
      assert.equal(r.code, 3, r.stderr);
      assert.match(oneLine(r.stderr), /npm run lab/);
    },
  );

  test('a small initrd that fits is accepted (the tiny guest ignores it)', T, async () => {
    const r = await runCli(run('--kernel', kernel(), '--initrd', join(dir, 'small-initrd')), {
      timeoutMs: 10_000,
    });
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout, 'tiny guest up\n');
  });
});

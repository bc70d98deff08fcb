/**
 * Needs /dev/kvm, gcc and ld. Bad --drive input to `typervisor run` is refused before boot with
 * one clear line and exit 2; an odd-sized image is rounded down with a warning, as Firecracker
 * does; a host-read-only image can be attached read-only.
 */
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, readFileSync, readdirSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { guestPath, kvmSkipReason, oneLine, runCli, tempDir } from './helpers.js';

const skip = kvmSkipReason();
const T = { skip, timeout: 60_000 };
const dir = skip ? '' : tempDir('typervisor-drives-');
/**
 * An idle loop device (no backing file: size 0), for the block-device cases; undefined where there
 * is none (the lab's kernel has no loop devices): those cases are then skipped, saying so.
 */
function idleLoopDevice(): string | undefined {
  let names: string[] = [];
  try {
    names = readdirSync('/sys/block').filter((n) => /^loop\d+$/.test(n));
  } catch {
    return undefined;
  }
  const idle = names.find((n) => {
    try {
      return readFileSync(`/sys/block/${n}/size`, 'utf8').trim() === '0' && existsSync(`/dev/${n}`);
    } catch {
      return false;
    }
  });
  return idle === undefined ? undefined : `/dev/${idle}`;
}
const loopDev = skip ? undefined : idleLoopDevice();
const img = (name: string, size: number) => {
  const p = join(dir, name);
  writeFileSync(p, Buffer.alloc(size));
  return p;
};
const subdir = (name: string) => {
  const p = join(dir, name);
  mkdirSync(p, { recursive: true });
  return p;
};
const run = (...drives: string[]) =>
  runCli([
    'run',
    '--kernel',
    guestPath('poweroff'),
    '--memory',
    '32',
    ...drives.flatMap((d) => ['--drive', d]),
  ]);

let immutable: string | undefined;
after(() => {
  if (immutable) spawnSync('chattr', ['-i', immutable]);
});

for (const [what, spec, says] of [
  [
    'a missing image',
    () => `path=${join(dir, 'missing.img')}`,
    /missing\.img.*(ENOENT|does not exist)/,
  ],
  ['a directory', () => `path=${subdir('adir')}`, /is a directory/],
  ['an unknown option', () => `path=${img('a.img', 4096)},bogus`, /unknown or malformed "bogus"/],
  ['no path', () => 'ro', /path=FILE is required/],
  ['an image under 512 bytes', () => `path=${img('tiny.img', 100)}`, /tiny\.img/],
  // A host block device (an idle loop device) is refused unless the drive says blockdev; with
  // it, the type check passes and the empty device is refused for its size.
  ['a host block device', () => `path=${loopDev},ro`, /path_on_host is a block device; refused/],
  ['a block device asked for', () => `path=${loopDev},ro,blockdev`, /smaller than one sector/],
  ['a character device', () => 'path=/dev/zero,ro', /not a regular file/],
] as const) {
  const noLoop = what.includes('block device') && !skip && loopDev === undefined;
  const opts = noLoop ? { ...T, skip: 'no idle loop device (/sys/block/loopN of size 0)' } : T;
  test(`--drive with ${what}: one line, exit 2`, opts, async () => {
    const r = await run(spec());
    assert.equal(r.code, 2, r.stderr);
    assert.match(oneLine(r.stderr), says);
    assert.equal(r.stdout, '');
  });
}

test('two drives on one file: exit 2 naming both', T, async () => {
  const p = img('same.img', 4096);
  const r = await run(`path=${p}`, `path=${p},ro`);
  assert.equal(r.code, 2, r.stderr);
  assert.match(oneLine(r.stderr), /same image/);
});

test('two root drives: exit 2', T, async () => {
  const r = await run(`path=${img('r1.img', 4096)},root`, `path=${img('r2.img', 4096)},root`);
  assert.equal(r.code, 2, r.stderr);
  assert.match(oneLine(r.stderr), /only one --drive can have the root flag/);
});

test(
  'a size that is not a multiple of 512 is rounded down with a warning, and the VM runs',
  T,
  async () => {
    const r = await run(`path=${img('odd.img', 1000)}`);
    assert.equal(r.code, 0, r.stderr);
    assert.match(r.stderr, /not a multiple of 512/);
    assert.match(r.stdout, /tiny guest up/);
  },
);

test(
  'an image the host will not let us write: refused read-write, accepted read-only',
  T,
  async (t) => {
    const p = img('immutable.img', 4096);
    if (spawnSync('chattr', ['+i', p]).status !== 0)
      return t.skip('chattr +i is not supported here');
    immutable = p;
    const rw = await run(`path=${p}`);
    assert.equal(rw.code, 2, rw.stderr);
    assert.match(oneLine(rw.stderr), /not writable/);
    const ro = await run(`path=${p},ro`);
    assert.equal(ro.code, 0, ro.stderr);
    spawnSync('chattr', ['-i', p]);
    immutable = undefined;
  },
);

after(() => dir && rmSync(dir, { recursive: true, force: true }));

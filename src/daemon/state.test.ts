import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, readdirSync, rmSync, symlinkSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { bindDirPrefix } from '../api/server.js';
import { rehearsalStem, removeBindDirs, StateDir } from './state.js';

test('rehearsalStem: a hidden name beside the first socket, named by the pid', () => {
  assert.equal(rehearsalStem('/run/t/pool-9-1.sock', 42), '/run/t/.pool-9-1.sock.rehearsal-42');
});

test('cleanStale removes a rehearsal image a killed pool process left, and nothing else', () => {
  const dir = mkdtempSync(join(tmpdir(), 'typervisor-state-'));
  try {
    const s = new StateDir(dir);
    writeFileSync(`${rehearsalStem(join(dir, 'pool-9-1.sock'), 1234)}.elf`, 'x');
    writeFileSync(join(dir, 'kernel.elf'), 'not ours');
    writeFileSync(join(dir, '.x.rehearsal-notapid.elf'), 'not a rehearsal name');
    // A link under a rehearsal's name is not a file of ours: left alone, never followed.
    symlinkSync('/etc/hostname', join(dir, '.pool-9-2.sock.rehearsal-77.elf'));
    const r = s.cleanStale();
    assert.deepEqual(r.removed, ['.pool-9-1.sock.rehearsal-1234.elf']);
    assert.deepEqual(readdirSync(dir).sort(), [
      '.pool-9-2.sock.rehearsal-77.elf',
      '.x.rehearsal-notapid.elf',
      'kernel.elf',
    ]);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('removeBindDirs removes the bind directories of one pid (or any), with their socket only', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'typervisor-state-'));
  try {
    // What listenPrivate makes (src/api/server.ts), with a bound socket in it.
    const mine = mkdtempSync(join(dir, bindDirPrefix(4321)));
    const server = createServer();
    await new Promise<void>((ok) => server.listen(join(mine, 's'), ok));
    server.close();
    mkdtempSync(join(dir, bindDirPrefix(4321))); // an empty one
    const other = mkdtempSync(join(dir, bindDirPrefix(99)));
    // Something that is not a bind directory's content: the directory stays.
    const busy = mkdtempSync(join(dir, bindDirPrefix(4321)));
    writeFileSync(join(busy, 'data'), 'x');
    mkdirSync(join(dir, '.typervisor-4321-toolongname'));
    assert.equal(removeBindDirs(dir, 4321).length, 2);
    assert.deepEqual(
      readdirSync(dir).sort(),
      [
        '.typervisor-4321-toolongname',
        busy.slice(dir.length + 1),
        other.slice(dir.length + 1),
      ].sort(),
    );
    assert.deepEqual(removeBindDirs(dir), [other.slice(dir.length + 1)]);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { cloneMemory, formatCloneMemory, summariseCloneSmaps } from './clone-memory.js';

const mapping = (hdr: string, f: Record<string, number>) =>
  [hdr, ...Object.entries(f).map(([k, v]) => `${k}:${' '.repeat(16 - k.length)}${v} kB`)].join(
    '\n',
  );

const SMAPS = [
  mapping('7f0000000000-7f0002000000 rw-p 00000000 00:2a 4242 /dev/shm/x/vm.mem', {
    Size: 32768,
    Rss: 1200,
    Pss: 500,
    Shared_Clean: 1000,
    Shared_Dirty: 0,
    Private_Clean: 0,
    Private_Dirty: 200,
    Anonymous: 200,
  }),
  mapping('55d000000000-55d000100000 r-xp 00000000 08:01 99 /usr/bin/node', {
    Size: 1024,
    Rss: 800,
    Pss: 100,
    Shared_Clean: 800,
    Private_Dirty: 0,
  }),
  mapping('7f1000000000-7f1000400000 rw-p 00000000 00:00 0 ', {
    Size: 4096,
    Rss: 3000,
    Pss: 3000,
    Private_Dirty: 3000,
    Anonymous: 3000,
  }),
].join('\n');

test('the memory file mapping is told apart: by path, or by inode (a renamed file)', () => {
  const m = summariseCloneSmaps(SMAPS, 7, { path: '/dev/shm/x/vm.mem', ino: 1 });
  assert.deepEqual(m, {
    pid: 7,
    rssKiB: 5000,
    pssKiB: 3600,
    ownedKiB: 3200,
    guestCopiedKiB: 200,
    nonGuestRssKiB: 3800,
    guestFile: {
      mappings: 1,
      rssKiB: 1200,
      pssKiB: 500,
      sharedKiB: 1000,
      privateCleanKiB: 0,
      privateDirtyKiB: 200,
    },
  });
  const byIno = summariseCloneSmaps(SMAPS, 7, { path: '/elsewhere', ino: 4242 });
  assert.equal(byIno.guestFile.rssKiB, 1200);
  // An anonymous mapping (inode 0) never matches, and without a file nothing is guest memory.
  const none = summariseCloneSmaps(SMAPS, 7, { path: '', ino: 0 });
  assert.equal(none.guestFile.mappings, 0);
  assert.equal(none.nonGuestRssKiB, 5000);
  assert.equal(summariseCloneSmaps(SMAPS, 7).ownedKiB, 3200);
});

test('the report: a line per clone and the total', () => {
  const m = summariseCloneSmaps(SMAPS, 7, { path: '/dev/shm/x/vm.mem', ino: 1 });
  const lines = formatCloneMemory([m, { ...m, pid: 8 }], 32);
  assert.equal(lines.length, 3);
  assert.match(lines[0]!, /^clone 0 \(pid 7\): owns 3\.13 MiB \(guest pages written 0\.20 MiB/);
  assert.match(lines[2]!, /^total over 2 clone\(s\): owned 6\.25 MiB \(3\.13 MiB per clone\)/);
});

test('this process: real smaps parse, and a bad pid is refused', () => {
  const m = cloneMemory(process.pid);
  assert.ok(m.rssKiB > 1024 && m.ownedKiB > 0 && m.ownedKiB <= m.rssKiB);
  assert.throws(() => cloneMemory(0), /not a process id/);
});

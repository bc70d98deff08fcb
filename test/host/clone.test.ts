/**
 * Needs /dev/kvm, gcc and ld. `typervisor clone` with the counting tiny guest (count.elf prints
 * 1, 2, 3... in hex): one VM is booted, paused and snapshotted; `clone --count 3` restores three
 * VMs from that one snapshot, each in its own process with its own console file. Each continues
 * the count from the same value on its own; the memory file's pages are shared between them
 * (each clone's Pss of the mapping is well under its Rss, and what each owns is far below the
 * guest's size); SIGTERM to `clone` stops every clone. Then the bounds: --count over the cap,
 * bad patterns and a missing TAP pattern are one line and exit 2 with nothing started.
 */
import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { call, startServer, type ServerProcess } from '../api/client.js';
import { cloneMemory } from '../../src/vmm/clone-memory.js';
import { CLI, guestPath, oneLine, processGone, runCli, tempDir, tinyGuests } from './helpers.js';
import { BANNER, numbers, until, lineCount } from './counting-guest.js';

const guests = tinyGuests();
const T = { timeout: 120_000, skip: guests.skip ?? false };
const MEM_MIB = 32;
const N = 3;

const readOr = (p: string) => (existsSync(p) ? readFileSync(p, 'latin1') : '');

describe('typervisor clone with the counting tiny guest (KVM)', () => {
  const servers: ServerProcess[] = [];
  after(async () => {
    for (const s of servers) await s.kill();
  });
  const dir = tempDir();
  const state = join(dir, 'vm.snap');
  const mem = join(dir, 'vm.mem');
  let aOut = '';

  test(
    'one snapshot, three clones: each counts on from the same value, pages shared',
    T,
    async () => {
      const a = await startServer();
      servers.push(a);
      await call(a.sock, 'PUT', '/machine-config', { vcpu_count: 1, mem_size_mib: MEM_MIB });
      await call(a.sock, 'PUT', '/boot-source', { kernel_image_path: guestPath('count') });
      assert.equal(
        (await call(a.sock, 'PUT', '/actions', { action_type: 'InstanceStart' })).status,
        204,
      );
      await until(() => lineCount(a.stdout()) >= 6, 20_000, 'A to count to 5');
      assert.equal((await call(a.sock, 'PATCH', '/vm', { state: 'Paused' })).status, 204);
      const r = await call(
        a.sock,
        'PUT',
        '/snapshot/create',
        { snapshot_path: state, mem_file_path: mem },
        30_000,
      );
      assert.equal(r.status, 204, r.body);
      await new Promise((res) => setTimeout(res, 200));
      aOut = a.stdout();
      await a.kill();
      const aNums = numbers(aOut);
      const lastA = aNums[aNums.length - 1]!;

      const consoles = Array.from({ length: N }, (_, i) => join(dir, `console${i}.txt`));
      const child = spawn(
        process.execPath,
        [
          CLI,
          'clone',
          '--snapshot',
          state,
          '--mem-file',
          mem,
          '--count',
          String(N),
          '--console-pattern',
          join(dir, 'console%d.txt'),
          '--api-sock-pattern',
          join(dir, 'c%d.api'),
          '--report',
        ],
        { stdio: ['ignore', 'pipe', 'pipe'] },
      );
      let out = '';
      let err = '';
      child.stdout!.setEncoding('utf8').on('data', (s: string) => (out += s));
      child.stderr!.setEncoding('utf8').on('data', (s: string) => (err += s));
      const exited = new Promise<number | null>((res) => child.on('exit', (c) => res(c)));
      try {
        await until(() => /^total over/m.test(out), 60_000, `clone to report (stderr: ${err})`);
        const pids = [
          ...out.matchAll(/^clone (\d+): pid (\d+), api (\S+), running \(load ([\d.]+) ms\)$/gm),
        ];
        assert.equal(pids.length, N, out);
        pids.forEach((m, i) => {
          assert.equal(Number(m[1]), i);
          assert.equal(m[3], join(dir, `c${i}.api`));
        });
        // The memory report: a line per clone and the total.
        assert.equal([...out.matchAll(/^clone \d+ \(pid \d+\): owns [\d.]+ MiB/gm)].length, N, out);

        // Each clone counts on from where the snapshot was taken, on its own.
        await until(
          () => consoles.every((c) => lineCount(readOr(c)) >= 20),
          30_000,
          'every clone to count 20',
        );
        const firsts: number[] = [];
        for (const c of consoles) {
          // Read after A's output: when the pause fell in the middle of a line, A printed its
          // start and the clone prints the rest (a slow machine, such as the lab, makes that
          // likely), and the two make one line.
          const ns = numbers(aOut + readOr(c)).slice(aNums.length);
          assert.ok(ns.length >= 20, `${c}: ${ns.length} numbers`);
          for (let i = 1; i < ns.length; i++)
            assert.equal(ns[i], ns[i - 1]! + 1, `${c}: ${ns[i - 1]} then ${ns[i]}`);
          assert.equal(ns[0], lastA + 1, `${c} starts at ${ns[0]}, A ended at ${lastA}`);
          firsts.push(ns[0]!);
        }
        assert.ok(
          firsts.every((f) => f === firsts[0]),
          `clones start at ${firsts.join(', ')}`,
        );

        // Memory: each clone maps the memory file privately; its pages are the page cache's.
        // Judged on the pages still the file's: the ones a guest wrote are its own copies
        // (Private_Dirty, counted whole in Pss: guestCopiedKiB, checked below), and with a
        // tiny guest two of those outweigh its few shared pages. The clones start seconds apart
        // in the lab, so one may map a page the others have not touched yet: sampled again for
        // up to 10 s until every clone's share is about a third.
        const fileShare = (m: ReturnType<typeof cloneMemory>) => ({
          rss: m.guestFile.rssKiB - m.guestFile.privateDirtyKiB,
          pss: m.guestFile.pssKiB - m.guestFile.privateDirtyKiB,
        });
        const shared = (m: ReturnType<typeof cloneMemory>) => {
          const f = fileShare(m);
          return f.pss * 2 < f.rss + 8;
        };
        let mems = pids.map((m) => cloneMemory(Number(m[2]), mem));
        for (const settle = Date.now() + 10_000; !mems.every(shared) && Date.now() < settle;) {
          await new Promise((res) => setTimeout(res, 200));
          mems = pids.map((m) => cloneMemory(Number(m[2]), mem));
        }
        for (const m of mems) {
          assert.ok(m.guestFile.mappings >= 1, `pid ${m.pid}: the memory file is not mapped`);
          assert.ok(m.guestFile.rssKiB > 0, `pid ${m.pid}: no guest page resident`);
          // Three processes map the same pages: each one's share is about a third.
          const f = fileShare(m);
          assert.ok(
            shared(m),
            `pid ${m.pid}: Pss ${f.pss} KiB of Rss ${f.rss} KiB of the file's pages: not shared (${m.guestFile.privateDirtyKiB} KiB copied besides)`,
          );
          assert.ok(
            m.guestCopiedKiB < (MEM_MIB * 1024) / 8,
            `pid ${m.pid}: ${m.guestCopiedKiB} KiB of guest pages copied`,
          );
          assert.ok(m.ownedKiB < m.rssKiB, `pid ${m.pid}`);
        }

        // SIGTERM to clone stops every clone, and clone exits 0.
        child.kill('SIGTERM');
        const code = await Promise.race([
          exited,
          new Promise((res) => setTimeout(() => res('timeout'), 30_000)),
        ]);
        assert.equal(code, 0, err);
        for (const m of pids)
          await until(
            () => processGone(Number(m[2])) && !existsSync(`/proc/${m[2]}`),
            5_000,
            `clone pid ${m[2]} to end`,
          );
        // The consoles stopped growing.
        const sizes = consoles.map((c) => readOr(c).length);
        await new Promise((res) => setTimeout(res, 200));
        assert.deepEqual(
          consoles.map((c) => readOr(c).length),
          sizes,
        );
      } finally {
        if (child.exitCode === null) child.kill('SIGKILL');
      }
    },
  );

  test('bad arguments: one line, exit 2, nothing started', T, async () => {
    assert.ok(aOut.length > 0, 'needs the snapshot of the first test');
    const base = ['clone', '--snapshot', state, '--mem-file', mem];
    const cases: Array<[string[], RegExp]> = [
      [['--count', '65'], /--count must be a whole number from 1 to 64/],
      [['--count', '0'], /--count must be a whole number from 1 to 64/],
      [
        ['--count', '2', '--api-sock-pattern', join(dir, 'x.api')],
        /must contain "%d" exactly once/,
      ],
      [
        ['--count', '2', '--api-sock-pattern', join(dir, 'x%d%d.api')],
        /must contain "%d" exactly once/,
      ],
      [
        ['--count', '2', '--api-sock-pattern', `/tmp/${'x'.repeat(110)}%d`],
        /longer than 107 bytes/,
      ],
      [['--count', '12', '--tap-pattern', 'tapclonelong-x%d'], /not a TAP name/],
      [['--count', '2', '--tap-pattern', 'tapc%d'], /the snapshot has 0 network interfaces/],
      [
        ['--count', '2', '--vsock-uds-pattern', join(dir, 'v%d.sock')],
        /the snapshot has no vsock device/,
      ],
      [['--count', '2', '--mem-file', join(dir, 'nope')], /not a regular file/],
    ];
    for (const [extra, re] of cases) {
      const r = await runCli([...base, ...extra]);
      assert.equal(r.code, 2, `${extra.join(' ')}: ${r.stderr}`);
      assert.match(oneLine(r.stderr), re, extra.join(' '));
      assert.equal(r.stdout, '');
    }
    const junk = join(dir, 'console0.txt'); // not a snapshot
    const r = await runCli(['clone', '--snapshot', junk, '--mem-file', mem, '--count', '1']);
    assert.equal(r.code, 2);
    assert.match(oneLine(r.stderr), /cannot read snapshot/);
  });
});

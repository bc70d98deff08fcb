/**
 * Needs /dev/kvm, gcc and ld. Diff snapshots end to end with countmem.elf, a tiny guest whose
 * count lives in guest RAM (incremented there, then printed), so a restore is right only if the
 * memory file has the guest's latest writes.
 *
 * A boots with track_dirty_pages, counts, pauses: Full S1. It resumes, counts on, pauses: Diff
 * S2 (a sparse file of S1's size holding only the pages written since S1). A is killed. S2's
 * state over S1's memory alone restarts the count from S1's value (the Diff holds what changed);
 * once `typervisor snapshot rebase` has merged S2's memory onto S1's, S2 loads in a fresh process
 * and the count continues from S2 exactly. A VM loaded with track_dirty_pages takes a Diff of its
 * own that merges and loads the same way. Without dirty page tracking a Diff is refused with
 * Firecracker's message and nothing is written. And with the benchmark's blk-loop guest (a
 * polled virtio-blk driver): pages only the device writes (its used ring, read data) are in a
 * Diff, as KVM's dirty log alone would miss them.
 */
import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { copyFileSync, existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { call, startServer, tempDir, type ServerProcess } from '../api/client.js';
import { spawnSync } from 'node:child_process';
import { closeSync, openSync, writeFileSync } from 'node:fs';
import { native, SEEK_DATA, SEEK_HOLE } from '../../src/kvm/native.js';
import { guestPath, REPO, runCli, tinyGuests } from './helpers.js';
import { BANNER, numbers, assertConsecutive, until, lineCount } from './counting-guest.js';

const guests = tinyGuests();
const T = { timeout: 120_000, skip: guests.skip ?? false };
const MEM_MIB = 32;
const PAGE = 4096;
/** Where countmem.elf keeps its count (test/guests/tiny.S). */
const COUNT_ADDR = 0x200000;
const DIFF_REFUSED =
  'Create snapshot error: Diff snapshots are not allowed on uVMs with dirty page tracking disabled.';
const fault = (r: { json?: { fault_message?: string } }) => r.json?.fault_message ?? '';

const settle = () => new Promise((r) => setTimeout(r, 200));
/** The 4 KiB pages holding data in a (sparse) file. */
function dataPages(path: string): Set<number> {
  const n = native();
  const fd = openSync(path, 'r');
  const size = statSync(path).size;
  const out = new Set<number>();
  try {
    for (let pos = 0; pos < size;) {
      const d = n.lseek(fd, pos, SEEK_DATA);
      if (d < 0) break;
      let h = n.lseek(fd, d, SEEK_HOLE);
      if (h < 0) h = size;
      for (let pg = Math.floor(d / PAGE); pg < Math.ceil(h / PAGE); pg++) out.add(pg);
      pos = h;
    }
  } finally {
    closeSync(fd);
  }
  return out;
}

/** Bytes a file has on disk. */
const allocated = (p: string) => statSync(p).blocks * 512;

describe('Diff snapshots with the counting-in-memory tiny guest (KVM)', () => {
  const servers: ServerProcess[] = [];
  after(async () => {
    for (const s of servers) await s.kill();
  });
  const serve = async () => {
    const s = await startServer();
    servers.push(s);
    return s;
  };
  const dir = tempDir();
  const p = (name: string) => join(dir, name);

  const create = (sock: string, type: 'Full' | 'Diff', name: string) =>
    call(
      sock,
      'PUT',
      '/snapshot/create',
      { snapshot_path: p(`${name}.snap`), mem_file_path: p(`${name}.mem`), snapshot_type: type },
      30_000,
    );
  const load = (sock: string, state: string, mem: string, extra: object = {}) =>
    call(
      sock,
      'PUT',
      '/snapshot/load',
      {
        snapshot_path: p(`${state}.snap`),
        mem_backend: { backend_type: 'File', backend_path: p(mem) },
        resume_vm: true,
        ...extra,
      },
      30_000,
    );
  const pause = async (s: ServerProcess) => {
    assert.equal((await call(s.sock, 'PATCH', '/vm', { state: 'Paused' })).status, 204);
    await settle(); // the pipe's last bytes
    return s.stdout();
  };

  test('Full, Diff, rebase, load: the count continues from the Diff exactly', T, async () => {
    const a = await serve();
    let r = await call(a.sock, 'PUT', '/machine-config', {
      vcpu_count: 1,
      mem_size_mib: MEM_MIB,
      track_dirty_pages: true,
    });
    assert.equal(r.status, 204, r.body);
    assert.equal((await call(a.sock, 'GET', '/machine-config')).json.track_dirty_pages, true);
    r = await call(a.sock, 'PUT', '/boot-source', { kernel_image_path: guestPath('countmem') });
    assert.equal(r.status, 204, r.body);
    r = await call(a.sock, 'PUT', '/actions', { action_type: 'InstanceStart' });
    assert.equal(r.status, 204, r.body);
    await until(() => lineCount(a.stdout()) >= 21, 20_000, 'A to count to 20');

    const out1 = await pause(a);
    r = await create(a.sock, 'Full', 's1');
    assert.equal(r.status, 204, r.body);
    copyFileSync(p('s1.mem'), p('s1-alone.mem'));
    const n1 = numbers(out1);

    assert.equal((await call(a.sock, 'PATCH', '/vm', { state: 'Resumed' })).status, 204);
    await until(() => lineCount(a.stdout()) >= lineCount(out1) + 20, 20_000, 'A to count on');
    const out2 = await pause(a);
    // A create that fails (no such directory) takes the dirty pages and must put them back.
    r = await create(a.sock, 'Diff', 'no-such-dir/s2');
    assert.equal(r.status, 400, r.body);
    assert.match(fault(r), /^Create snapshot error: .*no-such-dir/);
    r = await create(a.sock, 'Diff', 's2');
    assert.equal(r.status, 204, r.body);
    await settle();
    assert.equal(a.stdout(), out2, 'A printed while paused');
    await a.kill();
    const n2 = numbers(out2);
    assertConsecutive(n2, 'A');
    assert.ok(n2.length >= n1.length + 20);

    // S2's memory: S1's size, only the pages written since S1 (the count, the stack).
    const full = allocated(p('s1.mem'));
    const diff = allocated(p('s2.mem'));
    assert.equal(statSync(p('s2.mem')).size, MEM_MIB * 1024 * 1024);
    assert.ok(diff > 0, 'the Diff holds the count page');
    assert.ok(diff <= 16 * PAGE && diff < full, `Diff ${diff} bytes on disk, Full ${full}`);
    // The count page holds S2's count (one more when the pause fell mid-line).
    const count = readFileSync(p('s2.mem')).readUInt32LE(COUNT_ADDR);
    const last2 = n2[n2.length - 1]!;
    assert.ok(count === last2 || count === last2 + 1, `count ${count}, A printed ${last2}`);
    const ins = await runCli(['snapshot', 'inspect', p('s2.snap'), '--json']);
    assert.equal(ins.code, 0, ins.stderr);
    assert.equal((JSON.parse(ins.stdout) as { memory: { type: string } }).memory.type, 'Diff');
    console.log(`# Full S1: ${full} bytes on disk; Diff S2: ${diff} bytes on disk`);

    // S2's state over S1's memory alone: the count comes from RAM, so it restarts from S1's.
    const c = await serve();
    r = await load(c.sock, 's2', 's1-alone.mem');
    assert.equal(r.status, 204, r.body);
    await until(() => lineCount(c.stdout()) >= 3, 20_000, 'C to count');
    // (A line cut at S2's pause is finished from the register first.)
    const back = numbers(out2 + c.stdout()).slice(n2.length);
    const s1Count = n1[n1.length - 1]!;
    assert.ok(
      back.some((x) => x >= s1Count + 1 && x <= s1Count + 2),
      `S2 state over S1 memory printed ${back.slice(0, 3).join(', ')}; S1 ended at ${s1Count}`,
    );
    await c.kill();

    // Merge, then load S2: the count continues from S2 with no gap and no repeat.
    const rb = await runCli(['snapshot', 'rebase', '--base', p('s1.mem'), '--diff', p('s2.mem')]);
    assert.equal(rb.code, 0, rb.stderr);
    assert.match(rb.stdout, /merged \d+ bytes in \d+ extent\(s\)/);
    const b = await serve();
    r = await load(b.sock, 's2', 's1.mem', { track_dirty_pages: true });
    assert.equal(r.status, 204, r.body);
    await until(() => lineCount(b.stdout()) >= 20, 20_000, 'B to count 20 more');
    assertConsecutive(numbers(out2 + b.stdout()), 'A until S2, then B');

    // B tracks dirty pages from its load: its own Diff S3 merges onto S2's merged memory.
    const out3 = await pause(b);
    // (through the CLI this time: it pauses, which a paused VM takes as a no-op, then creates)
    const cli = await runCli([
      'snapshot',
      'create',
      '--api-sock',
      b.sock,
      '--snapshot-path',
      p('s3.snap'),
      '--mem-file-path',
      p('s3.mem'),
      '--type',
      'Diff',
    ]);
    assert.equal(cli.code, 0, cli.stderr);
    await b.kill();
    assert.ok(allocated(p('s3.mem')) <= 16 * PAGE, `Diff S3 ${allocated(p('s3.mem'))} bytes`);
    copyFileSync(p('s1.mem'), p('s3-full.mem'));
    const rb3 = await runCli([
      'snapshot',
      'rebase',
      '--base',
      p('s3-full.mem'),
      '--diff',
      p('s3.mem'),
    ]);
    assert.equal(rb3.code, 0, rb3.stderr);
    const d = await serve();
    r = await load(d.sock, 's3', 's3-full.mem');
    assert.equal(r.status, 204, r.body);
    await until(() => lineCount(d.stdout()) >= 5, 20_000, 'D to count');
    assertConsecutive(numbers(out2 + out3 + d.stdout()), 'A, B until S3, then D');
    await d.kill();
  });

  test('Diff without dirty page tracking: 400, nothing written', T, async () => {
    const a = await serve();
    await call(a.sock, 'PUT', '/machine-config', { vcpu_count: 1, mem_size_mib: MEM_MIB });
    await call(a.sock, 'PUT', '/boot-source', { kernel_image_path: guestPath('count') });
    assert.equal(
      (await call(a.sock, 'PUT', '/actions', { action_type: 'InstanceStart' })).status,
      204,
    );
    await until(() => lineCount(a.stdout()) >= 3, 20_000, 'the guest to count');
    const before = readdirSync(dir).sort();
    // Refused whatever the state (Firecracker checks it first): running, then paused.
    for (const state of ['Running', 'Paused']) {
      if (state === 'Paused') await pause(a);
      const r = await create(a.sock, 'Diff', 'untracked');
      assert.equal(r.status, 400, r.body);
      assert.equal(fault(r), DIFF_REFUSED, state);
    }
    assert.deepEqual(readdirSync(dir).sort(), before);
    assert.ok(!existsSync(p('untracked.mem')));
    // The VM is still fine: a Full works.
    const r = await create(a.sock, 'Full', 'untracked-full');
    assert.equal(r.status, 204, r.body);
    await a.kill();

    // The CLI says the same on one line and exits 2.
    const cli = await runCli(['snapshot', 'rebase', '--base', p('untracked-full.mem')]);
    assert.equal(cli.code, 2);
    assert.match(cli.stderr, /^typervisor: snapshot rebase: --base and --diff are required\n$/);
    const same = await runCli([
      'snapshot',
      'rebase',
      '--base',
      p('untracked-full.mem'),
      '--diff',
      p('untracked-full.mem'),
    ]);
    assert.equal(same.code, 2);
    assert.match(same.stderr, /the base and the diff are the same file/);
    assert.ok(readFileSync(p('untracked-full.mem')).length === MEM_MIB * 1024 * 1024);
  });

  // bench/guests/blkloop.S (64 KiB reads, polled): its used ring (0x202000) and the middle of
  // its data buffer (0x211000-0x21efff) are written only by the device, never by the guest.
  const BLK_USED = 0x202000;
  const BLK_DEVICE_ONLY = Array.from({ length: 14 }, (_, i) => 0x211 + i);
  const benchDir = guests.skip ? '' : tempDir();
  const benchBuilt =
    guests.skip === undefined &&
    spawnSync('sh', [join(REPO, 'bench', 'guests', 'build.sh'), benchDir, '1000', '100', '5000000'])
      .status === 0;

  test(
    'device writes (virtio-blk data, used ring) are in a Diff',
    { ...T, skip: guests.skip ?? (benchBuilt ? false : 'bench/guests/build.sh failed') },
    async () => {
      const sectors = 2051;
      const img = Buffer.alloc(sectors * 512);
      for (let i = 0; i < sectors; i++) img.writeUInt32LE(i, i * 512);
      writeFileSync(p('blk.img'), img);
      const a = await serve();
      const put = async (path: string, body: object) => {
        const r = await call(a.sock, 'PUT', path, body);
        assert.equal(r.status, 204, `${path}: ${r.body}`);
      };
      await put('/machine-config', { vcpu_count: 1, mem_size_mib: 64, track_dirty_pages: true });
      await put('/boot-source', { kernel_image_path: join(benchDir, 'blk64k-big.elf') });
      await put('/drives/disk', {
        drive_id: 'disk',
        path_on_host: p('blk.img'),
        is_root_device: false,
        is_read_only: true,
      });
      await put('/actions', { action_type: 'InstanceStart' });
      await until(() => a.stdout().startsWith('M\n'), 20_000, 'the blk-loop guest to start');
      const usedIdx = (mem: string) => readFileSync(p(mem)).readUInt16LE(BLK_USED + 2);

      await settle();
      await pause(a);
      let r = await create(a.sock, 'Full', 'b1');
      assert.equal(r.status, 204, r.body);
      assert.equal((await call(a.sock, 'PATCH', '/vm', { state: 'Resumed' })).status, 204);
      await new Promise((res) => setTimeout(res, 1000));
      await pause(a);
      r = await create(a.sock, 'Diff', 'b2');
      assert.equal(r.status, 204, r.body);
      r = await create(a.sock, 'Full', 'b3'); // the same paused state, in full
      assert.equal(r.status, 204, r.body);
      await a.kill();
      assert.equal(a.stdout(), 'M\n', 'the guest found no error and did not finish');

      assert.notEqual(usedIdx('b3.mem'), usedIdx('b1.mem'), 'no request between S1 and S2');
      const pages = dataPages(p('b2.mem'));
      const want = [BLK_USED / PAGE, ...BLK_DEVICE_ONLY];
      assert.deepEqual(
        want.filter((pg) => !pages.has(pg)),
        [],
        `device-written pages missing from the Diff (it has ${[...pages].map((x) => x.toString(16)).join(' ')})`,
      );
      // And they hold what the full snapshot of the same state holds.
      const diff = readFileSync(p('b2.mem'));
      const full = readFileSync(p('b3.mem'));
      for (const pg of want)
        assert.ok(
          diff
            .subarray(pg * PAGE, (pg + 1) * PAGE)
            .equals(full.subarray(pg * PAGE, (pg + 1) * PAGE)),
          `page 0x${pg.toString(16)}`,
        );
      console.log(
        `# blk-loop Diff: ${pages.size} pages; used.idx ${usedIdx('b1.mem')} at S1, ${usedIdx('b3.mem')} at S2`,
      );
    },
  );
});

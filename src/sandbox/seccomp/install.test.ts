/**
 * How the seccomp settings travel from the main thread to the workers: the default leaves the
 * workers' environment data alone (a worker without any applies the default filters, and the
 * main thread need not load node:worker_threads for it); any other setting is put there, and
 * a later default replaces it. Checked in workers, as the VMM's threads see them.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { once } from 'node:events';
import { fileURLToPath } from 'node:url';
import { Worker, getEnvironmentData } from 'node:worker_threads';
import { bigThreadStacks, configureSeccomp, seccompSettings } from './install.js';

const KEY = 'typervisor:seccomp';

/** What a worker started now reads with seccompSettings(). */
async function seenByWorker(): Promise<unknown> {
  const mod = new URL('./install.js', import.meta.url).href;
  const w = new Worker(
    `import(${JSON.stringify(mod)}).then((m) => require('node:worker_threads').parentPort.postMessage(m.seccompSettings()));`,
    { eval: true },
  );
  const [msg] = (await once(w, 'message')) as [unknown];
  await w.terminate();
  return msg;
}

test('seccomp settings: the default sets no environment data; others do; a later default replaces them', async () => {
  configureSeccomp({ mode: 'default' });
  assert.equal(getEnvironmentData(KEY), undefined);
  assert.deepEqual(seccompSettings(), { mode: 'default' });
  assert.deepEqual(await seenByWorker(), { mode: 'default' });

  configureSeccomp({ mode: 'off' });
  assert.deepEqual(getEnvironmentData(KEY), { mode: 'off' });
  assert.deepEqual(seccompSettings(), { mode: 'off' });
  assert.deepEqual(await seenByWorker(), { mode: 'off' });

  configureSeccomp({ mode: 'default' });
  assert.deepEqual(getEnvironmentData(KEY), { mode: 'default' });
  assert.deepEqual(seccompSettings(), { mode: 'default' });
  assert.deepEqual(await seenByWorker(), { mode: 'default' });
});

/**
 * A child that installs the process filter (asking for `poolThreads`, if given) and prints how
 * many threads it gained, and what it left in UV_THREADPOOL_SIZE.
 */
function poolChild(poolThreads: number | undefined, env: NodeJS.ProcessEnv = {}, thpOff = false) {
  // CommonJS, the module by require (Node 20: --experimental-require-module): an import()
  // would read files through libuv's pool and so start it before the filter does.
  const code = `
    const { readFileSync } = require('node:fs');
    // (not readdir of /proc/self/task: the filter has no getdents64)
    const threads = () => Number(/^Threads:\\s+(\\d+)/m.exec(readFileSync('/proc/self/status', 'utf8'))[1]);
    const { installProcessFilter } = require(${JSON.stringify(fileURLToPath(new URL('./install.js', import.meta.url)))});
    const thp = () => Number(/^THP_enabled:\\s+(\\d)/m.exec(readFileSync('/proc/self/status', 'utf8'))?.[1] ?? -1);
    ${thpOff ? `require(${JSON.stringify(fileURLToPath(new URL('../../kvm/native.js', import.meta.url)))}).native().setThpDisable(true);` : ''}
    const before = threads();
    installProcessFilter({ mode: 'default' }, ${poolThreads === undefined ? '{}' : `{ poolThreads: ${poolThreads} }`});
    // the thread stacks of 2 MiB or more, and how many of them say 'nh' (MADV_NOHUGEPAGE)
    const { bigThreadStacks } = require(${JSON.stringify(fileURLToPath(new URL('./install.js', import.meta.url)))});
    const big = bigThreadStacks(readFileSync('/proc/self/maps', 'latin1'));
    const flags = new Map();
    let at;
    for (const l of readFileSync('/proc/self/smaps', 'latin1').split('\\n')) {
      const h = /^([0-9a-f]+)-[0-9a-f]+ /.exec(l);
      if (h) at = BigInt('0x' + h[1]);
      else if (l.startsWith('VmFlags:')) flags.set(at, l.split(/\\s+/).slice(1));
    }
    const nh = big.filter(([start]) => (flags.get(start) ?? []).includes('nh')).length;
    console.log(JSON.stringify({ added: threads() - before, env: process.env.UV_THREADPOOL_SIZE ?? null, thp: thp(), big: big.length, nh }));
  `;
  const base = { ...process.env };
  delete base.UV_THREADPOOL_SIZE;
  const r = spawnSync(
    process.execPath,
    ['--experimental-require-module', '--no-warnings', '-e', code],
    {
      encoding: 'utf8',
      env: { ...base, ...env },
      timeout: 30_000,
    },
  );
  assert.equal(r.status, 0, r.stderr);
  return JSON.parse(r.stdout) as {
    added: number;
    env: string | null;
    thp: number;
    big: number;
    nh: number;
  };
}

/** What a child's pool start did to its threads and environment (not its stacks' advice). */
function threadsOf(...a: Parameters<typeof poolChild>) {
  const { added, env, thp } = poolChild(...a);
  return { added, env, thp };
}

test("the process filter starts libuv's pool: Node's four threads, or as many as asked unless the user set UV_THREADPOOL_SIZE", () => {
  assert.deepEqual(threadsOf(undefined), { added: 4, env: null, thp: 1 });
  // The CLI's one thread, and the variable not left behind for the VMM's children.
  assert.deepEqual(threadsOf(1), { added: 1, env: null, thp: 1 });
  // The user's setting wins, and stays theirs.
  assert.deepEqual(threadsOf(1, { UV_THREADPOOL_SIZE: '2' }), { added: 2, env: '2', thp: 1 });
});

test("every thread stack of 2 MiB or more (the pool's 8 MiB) gets MADV_NOHUGEPAGE: khugepaged leaves it alone", () => {
  // This child runs without the launcher's stack limit: Node's platform threads have 8 MiB
  // stacks too, so there are at least 1 + 4 of them.
  const r = poolChild(1);
  assert.ok(r.big >= 5, `big stacks: ${r.big}`);
  assert.equal(r.nh, r.big);
});

test('bigThreadStacks: a 4 KiB guard right below an anonymous rw mapping of 2 MiB or more', () => {
  const maps = [
    '00400000-00b6f000 r-xp 00000000 08:01 1234 /usr/bin/node',
    '7f0000000000-7f0000001000 ---p 00000000 00:00 0 ',
    '7f0000001000-7f0000801000 rw-p 00000000 00:00 0 ', // 8 MiB: a stack
    '7f0000900000-7f0000901000 ---p 00000000 00:00 0 ',
    '7f0000901000-7f0000ac1000 rw-p 00000000 00:00 0 ', // 1792 KiB: too small
    '7f0000b00000-7f0000b02000 ---p 00000000 00:00 0 ', // an 8 KiB PROT_NONE: not a guard
    '7f0000b02000-7f0001302000 rw-p 00000000 00:00 0 ',
    '7f0001400000-7f0001401000 ---p 00000000 00:00 0 ',
    '7f0001401000-7f0001c01000 rw-p 00001000 08:01 99 /some/file', // file-backed
    '7f0001d00000-7f0001d01000 ---p 00000000 00:00 0 ',
    '7f0001e01000-7f0002601000 rw-p 00000000 00:00 0 ', // not where the guard ends
    '7f0002700000-7f0002701000 ---p 00000000 00:00 0 ',
    '7f0002701000-7f0002942000 rw-p 00000000 00:00 0 ', // exactly 2 MiB + 260 KiB (merged)
    '7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]',
  ].join('\n');
  assert.deepEqual(bigThreadStacks(maps), [
    [0x7f0000001000n, 8n << 20n],
    [0x7f0002701000n, (2n << 20n) + 260n * 1024n],
  ]);
});

test('the pool starts with THP off for the process, which is then put back as it was', () => {
  // On (1) after the start, as before it (the pool's stacks got their first faults meanwhile);
  // a process whose parent turned THP off keeps it off.
  assert.equal(poolChild(1).thp, 1);
  assert.equal(poolChild(1, {}, true).thp, 0);
});

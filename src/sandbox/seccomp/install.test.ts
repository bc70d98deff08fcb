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
import { configureSeccomp, seccompSettings } from './install.js';

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
    console.log(JSON.stringify({ added: threads() - before, env: process.env.UV_THREADPOOL_SIZE ?? null, thp: thp() }));
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
  return JSON.parse(r.stdout) as { added: number; env: string | null; thp: number };
}

test("the process filter starts libuv's pool: Node's four threads, or as many as asked unless the user set UV_THREADPOOL_SIZE", () => {
  assert.deepEqual(poolChild(undefined), { added: 4, env: null, thp: 1 });
  // The CLI's one thread, and the variable not left behind for the VMM's children.
  assert.deepEqual(poolChild(1), { added: 1, env: null, thp: 1 });
  // The user's setting wins, and stays theirs.
  assert.deepEqual(poolChild(1, { UV_THREADPOOL_SIZE: '2' }), { added: 2, env: '2', thp: 1 });
});

test('the pool starts with THP off for the process, which is then put back as it was', () => {
  // On (1) after the start, as before it (the pool's stacks got their first faults meanwhile);
  // a process whose parent turned THP off keeps it off.
  assert.equal(poolChild(1).thp, 1);
  assert.equal(poolChild(1, {}, true).thp, 0);
});

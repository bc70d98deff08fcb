import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { newWorker, WORKER_STACK_MB, workerExecArgv } from './worker-argv.js';

test('workerExecArgv drops the main script options and keeps the rest', () => {
  assert.deepEqual(workerExecArgv(['--input-type=module', '-e', 'x()']), []);
  assert.deepEqual(workerExecArgv(['--expose-gc', '--eval', 'x()', '--cpu-prof']), [
    '--expose-gc',
    '--cpu-prof',
  ]);
  assert.deepEqual(
    workerExecArgv(['-p', '1+1', '--input-type', 'module', '--max-old-space-size=64']),
    ['--max-old-space-size=64'],
  );
  assert.deepEqual(workerExecArgv(['--eval=x()', '--print=1', '-pe', '2']), []);
});

test('workerExecArgv: undefined (inherit as Node does) when there is nothing to drop', () => {
  assert.equal(workerExecArgv([]), undefined);
  assert.equal(workerExecArgv(['--expose-gc', '--test-force-exit']), undefined);
});

test('newWorker: the stack is WORKER_STACK_MB, under 2 MiB (no 2 MiB page can back it)', async () => {
  assert.ok(WORKER_STACK_MB * 1024 < 2048);
  const dir = mkdtempSync(join(tmpdir(), 'worker-stack-'));
  const file = join(dir, 'w.cjs');
  // How deep JS recurses on a thread's stack: on the worker's (V8 keeps 192 KiB of it for
  // itself) at least as deep as on the main thread's 984 KiB, and not as deep as on Node's
  // default 4 MiB (~4x the main thread's).
  const deepest = `let d = 0;
    const f = (n) => { d = n; return f(n + 1) + 1; };
    try { f(0); } catch {}`;
  writeFileSync(file, `${deepest}\nrequire('node:worker_threads').parentPort.postMessage(d);`);
  const mainDepth = new Function(`${deepest}\nreturn d;`)() as number;
  const w = newWorker(file);
  try {
    assert.equal(w.resourceLimits?.stackSizeMb, WORKER_STACK_MB);
    const depth = await new Promise<number>((r) => w.once('message', r));
    assert.ok(depth >= mainDepth, `worker ${depth} frames, main thread ${mainDepth}`);
    assert.ok(depth < mainDepth * 3, `worker ${depth} frames, main thread ${mainDepth}`);
  } finally {
    await w.terminate();
    rmSync(dir, { recursive: true, force: true });
  }
});

test('newWorker: a stack size given by the caller wins', async () => {
  const w = newWorker(new URL('data:text/javascript,'), { resourceLimits: { stackSizeMb: 3 } });
  try {
    assert.equal(w.resourceLimits?.stackSizeMb, 3);
  } finally {
    await w.terminate();
  }
});

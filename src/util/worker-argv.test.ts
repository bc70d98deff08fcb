import { test } from 'node:test';
import assert from 'node:assert/strict';
import { workerExecArgv } from './worker-argv.js';

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

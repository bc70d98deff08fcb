/**
 * How the seccomp settings travel from the main thread to the workers: the default leaves the
 * workers' environment data alone (a worker without any applies the default filters, and the
 * main thread need not load node:worker_threads for it); any other setting is put there, and
 * a later default replaces it. Checked in workers, as the VMM's threads see them.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
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

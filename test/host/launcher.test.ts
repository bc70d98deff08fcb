/**
 * The launchers (bin/typervisor, bin/typervisor-jailer) as a user execs them: their shell line
 * drops NODE_EXTRA_CA_CERTS, sets the soft stack limit (src/util/stack-limit.ts) and keeps the
 * hard one, passes every argument through unchanged, and leaves the VMM running when the limit
 * cannot be set; the JavaScript after it is also a valid ES module (the jailer's copy runs as
 * one). The API mode is used because it starts without /dev/kvm and waits.
 */
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import {
  copyFileSync,
  existsSync,
  mkdtempSync,
  readFileSync,
  rmSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { VMM_STACK_SOFT_KIB } from '../../src/util/stack-limit.js';
import { CLI, REPO } from './helpers.js';

const dir = mkdtempSync(join(tmpdir(), 'tv launcher '));
after(() => rmSync(dir, { recursive: true, force: true }));

function stackLimits(pid: number): [string, string] {
  const m = /^Max stack size\s+(\S+)\s+(\S+)/m.exec(readFileSync(`/proc/${pid}/limits`, 'utf8'));
  assert.ok(m, 'a stack line in /proc/PID/limits');
  return [m[1]!, m[2]!];
}

async function waitFor(path: string, ms: number): Promise<void> {
  const end = Date.now() + ms;
  while (!existsSync(path)) {
    if (Date.now() > end) assert.fail(`${path} did not appear within ${ms} ms`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

test('bin/typervisor: no CA variable, soft stack limit set, hard kept, arguments intact', async () => {
  // A socket path with spaces and a quote: "$@" passes it through as one argument.
  const sock = join(dir, "api 'x'.sock");
  const child = spawn(CLI, ['--api-sock', sock], {
    stdio: ['ignore', 'ignore', 'pipe'],
    env: { ...process.env, NODE_EXTRA_CA_CERTS: '/nonexistent/ca.pem' },
  });
  let stderr = '';
  child.stderr.setEncoding('utf8').on('data', (s: string) => (stderr += s));
  try {
    await waitFor(sock, 20_000);
    const pid = child.pid!;
    assert.deepEqual(stackLimits(pid), [
      String(VMM_STACK_SOFT_KIB * 1024),
      stackLimits(process.pid)[1],
    ]);
    const env = readFileSync(`/proc/${pid}/environ`, 'utf8').split('\0');
    assert.ok(!env.some((e) => e.startsWith('NODE_EXTRA_CA_CERTS=')), 'the CA variable is gone');
    const argv = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
    assert.deepEqual(argv.slice(-3, -1), ['--api-sock', sock], 'one argument, as given');
    assert.equal(readFileSync(`/proc/${pid}/comm`, 'utf8').trim(), 'node', 'sh exec-ed node');
  } finally {
    child.kill('SIGTERM');
    await new Promise((r) => child.once('close', r));
  }
  assert.doesNotMatch(stderr, /Error|warning/i, stderr);
});

test('a hard stack limit below it leaves the limit as it is, and the VMM still runs', () => {
  for (const name of ['typervisor', 'typervisor-jailer']) {
    const r = spawnSync(
      '/bin/sh',
      ['-c', `ulimit -s 1536 && exec "$0" --version`, join(REPO, 'bin', name)],
      {
        encoding: 'utf8',
      },
    );
    assert.equal(r.status, 0, `${name}: ${r.stderr}`);
    assert.match(r.stdout, /\d+\.\d+\.\d+/, name);
    assert.equal(r.stderr, '', name);
  }
});

test('the launchers are valid ES modules too (the jailer runs its copy as one)', () => {
  const esm = join(dir, 'esm');
  spawnSync('mkdir', ['-p', esm]);
  writeFileSync(join(esm, 'package.json'), '{"type":"module"}\n');
  for (const name of ['typervisor', 'typervisor-jailer']) {
    copyFileSync(join(REPO, 'bin', name), join(esm, `${name}.js`));
    const r = spawnSync(process.execPath, ['--check', join(esm, `${name}.js`)], {
      encoding: 'utf8',
    });
    assert.equal(r.status, 0, `${name}: ${r.stderr}`);
  }
});

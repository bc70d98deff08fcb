// Typervisor on stock Linux guests: runs the test/inlab suite inside the lab in one boot of it
// (each of those tests boots Debian's cloud kernel with Typervisor on the lab's AMD-V KVM).
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { ensureImage, repoRoot } from '../../src/lab/guest.js';
import { runInLab } from '../../src/lab/lab.js';

test(
  'Typervisor boots stock Linux guests in the lab (test/inlab)',
  { timeout: 1_500_000 },
  async () => {
    ensureImage('kernel');
    ensureImage('initramfs');
    const r = await runInLab({
      command: ['node', 'scripts/run-tests.mjs', 'test/inlab'],
      cwd: repoRoot(),
      timeoutSec: 1_400,
    });
    // The inner runner writes TAP ("# pass 3") or, on the lab's terminal, its spec format
    // ("ℹ pass 3", maybe coloured): match both, without the colours.
    const text = r.output.replace(/\x1b\[[0-9;]*m/g, '');
    const summary = text
      .split('\n')
      .filter((l) => /^\s*(#|ℹ) (tests|pass|fail|skipped)/.test(l))
      .join(', ');
    process.stderr.write(
      `in-lab suite: ${summary} (lab boot ${r.bootMs} ms, total ${r.totalMs} ms)\n`,
    );
    assert.equal(r.code, 0, `${r.error ?? ''}\n${r.output}`);
    assert.match(text, /^\s*(#|ℹ) fail 0\s*$/m, r.output);
    assert.doesNotMatch(
      text,
      /^\s*(#|ℹ) skipped [1-9]/m,
      `in-lab tests were skipped:\n${r.output}`,
    );
  },
);

/**
 * util/stack-limit.ts: which stack limit the jailer sets from /proc/self/limits, and the
 * launchers' shell line sets the same soft limit.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { fileURLToPath } from 'node:url';
import { VMM_STACK_SOFT_KIB, vmmStackLimit } from './stack-limit.js';

const REPO = fileURLToPath(new URL('../../../', import.meta.url));
const WANT = VMM_STACK_SOFT_KIB * 1024;

function limits(soft: string, hard: string): string {
  return [
    'Limit                     Soft Limit           Hard Limit           Units     ',
    'Max file size             unlimited            unlimited            bytes     ',
    `Max stack size            ${soft.padEnd(21)}${hard.padEnd(21)}bytes     `,
    'Max core file size        0                    unlimited            bytes     ',
  ].join('\n'); // as the kernel writes it: padded with spaces to the end of each line
}

test('the limit is under 2 MiB: no stack sized by it can hold an aligned 2 MiB page', () => {
  assert.ok(WANT < 2 * 1024 * 1024 && WANT > 984 * 1024 + 256 * 1024);
});

test('the soft limit is lowered to it and the hard limit kept', () => {
  assert.deepEqual(vmmStackLimit(limits('8388608', 'unlimited')), { soft: WANT, hard: -1 });
  assert.deepEqual(vmmStackLimit(limits('unlimited', 'unlimited')), { soft: WANT, hard: -1 });
  assert.deepEqual(vmmStackLimit(limits('8388608', '16777216')), { soft: WANT, hard: 16777216 });
  // a smaller soft limit is raised to it, as the launcher's `ulimit -S -s` does
  assert.deepEqual(vmmStackLimit(limits('1048576', 'unlimited')), { soft: WANT, hard: -1 });
});

test('nothing is set when it is set already, the hard limit is below it, or the text is odd', () => {
  assert.equal(vmmStackLimit(limits(String(WANT), 'unlimited')), undefined);
  assert.equal(vmmStackLimit(limits('1048576', '1048576')), undefined);
  assert.equal(vmmStackLimit(limits('8388608', 'lots')), undefined);
  assert.equal(vmmStackLimit('Max file size  unlimited  unlimited  bytes'), undefined);
  assert.equal(vmmStackLimit(''), undefined);
});

test("this process's own limits read as they should (the jailer reads its own the same way)", () => {
  const text = readFileSync('/proc/self/limits', 'utf8');
  const m = /^Max stack size +(\S+) +(\S+) +bytes *$/m.exec(text);
  assert.ok(m, text);
  const num = (v: string) => (v === 'unlimited' ? -1 : Number(v));
  const [soft, hard] = [num(m[1]!), num(m[2]!)];
  const expect = soft === WANT || (hard !== -1 && hard < WANT) ? undefined : { soft: WANT, hard };
  assert.deepEqual(vmmStackLimit(text), expect);
});

test('both launchers set this soft limit in their shell line, before node starts', () => {
  for (const name of ['typervisor', 'typervisor-jailer']) {
    const lines = readFileSync(`${REPO}/bin/${name}`, 'utf8').split('\n');
    assert.equal(lines[0], '#!/bin/sh', name);
    assert.equal(
      lines[1],
      `':' //; unset NODE_EXTRA_CA_CERTS; ulimit -S -s ${VMM_STACK_SOFT_KIB} 2>/dev/null; exec node "$0" "$@"`,
      name,
    );
  }
});

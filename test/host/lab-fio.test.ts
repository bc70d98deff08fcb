// The in-lab fio sub-suite's parsing (bench/lab-fio.ts), without a lab: fio's terse lines give
// each job's figure and the bytes it moved, and the guest's interrupt counts around each job give
// interrupts per MB; the shell's echo of the commands is never taken for a result.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { parse } from '../../bench/lab-fio.js';

/** A terse v3 line: read io KiB [5], bw KiB/s [6], IOPS [7]; write io KiB [46], bw KiB/s [47]. */
function terse(read: [number, number, number], write: [number, number] = [0, 0]): string {
  const f = new Array<string>(48).fill('0');
  f[0] = '3';
  [f[5], f[6], f[7]] = read.map(String) as [string, string, string];
  [f[46], f[47]] = write.map(String) as [string, string];
  return f.join(';');
}

test('lab-fio parse: figures and interrupts per MB per job', () => {
  const out = [
    "root@guest:~# echo IRQ0A $(irqs); fio --name=j0 ... | sed 's/^/FIO0;/'; echo IRQ0B $(irqs)",
    'IRQ0A 10',
    `FIO0;${terse([51200, 10240, 2560])}`,
    'IRQ0B 1010',
    'IRQ1A 1010',
    `root@guest:~# FIO1;${terse([1024000, 204800, 200])}`,
    'IRQ1B 1510',
    'IRQ2A 1510',
    `FIO2;${terse([0, 0, 0], [2048000, 409600])}`,
  ].join('\r\n');
  const r = parse(out);
  assert.deepEqual(r.values, [2560, (204800 * 1024) / 1e6, (409600 * 1024) / 1e6]);
  assert.equal(r.irqPerMB[0], 1000 / ((51200 * 1024) / 1e6));
  assert.equal(r.irqPerMB[1], 500 / ((1024000 * 1024) / 1e6));
  assert.equal(r.irqPerMB[2], null, 'no count after the job: not measured');
});

test('lab-fio parse: a job without its figure or with counts going back has no interrupt rate', () => {
  const r = parse(
    ['IRQ0A 50', 'IRQ0B 40', `FIO0;${terse([4096, 800, 200])}`, 'IRQ1A 1', 'IRQ1B 9'].join('\n'),
  );
  assert.deepEqual(r.irqPerMB, [null, null, null]);
  assert.equal(r.values[0], 200);
  assert.equal(r.values[1], null);
});

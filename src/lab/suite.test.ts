import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { repoRoot } from './guest.js';
import {
  failureExcerpts,
  fileDoneLines,
  filesToRetry,
  mergeProgress,
  parseSuiteOutput,
  progressOf,
  retryBudgetSec,
  suiteVerdict,
  withAskedPlan,
  type SuiteProgress,
} from './suite.js';

const done = (f: string, code: number, tests: number, fail: number, skipped = 0) =>
  `# file done: ${f} exit ${code} tests ${tests} pass ${tests - fail - skipped} fail ${fail} skipped ${skipped}`;

// What scripts/run-tests.mjs --heartbeat printed in a lab that froze during c.test.js.
const frozen = [
  'TAP version 13',
  '# files: a.test.js b.test.js c.test.js d.test.js',
  '# heartbeat 30 s',
  'ok 1 - a one',
  done('a.test.js', 0, 2, 0),
  '# Subtest: b',
  'not ok 1 - b one',
  done('b.test.js', 1, 3, 1),
  '# heartbeat 60 s',
  '# Subtest: c one',
].join('\n');

test('a lab that froze: the retry runs the files that did not finish, not the one that failed', () => {
  const p = parseSuiteOutput(frozen);
  assert.deepEqual(p.planned, ['a.test.js', 'b.test.js', 'c.test.js', 'd.test.js']);
  assert.deepEqual([...p.done.keys()], ['a.test.js', 'b.test.js']);
  assert.deepEqual(p.done.get('b.test.js'), {
    file: 'b.test.js',
    code: 1,
    tests: 3,
    pass: 2,
    fail: 1,
    skipped: 0,
  });
  assert.deepEqual(filesToRetry(p, false), ['c.test.js', 'd.test.js']);
  // The lab's kernel broke: what failed on it runs again too; what passed stands.
  assert.deepEqual(filesToRetry(p, true), ['b.test.js', 'c.test.js', 'd.test.js']);
  // A lab that froze before the runner listed its files: run them all.
  assert.equal(
    filesToRetry(parseSuiteOutput('TAP version 13\n# heartbeat 30 s\n'), false),
    undefined,
  );
});

test('the verdict: every planned file finished and passed, counts summed; a failure stands', () => {
  const first = parseSuiteOutput(frozen);
  const retry = parseSuiteOutput(
    ['# files: c.test.js d.test.js', done('c.test.js', 0, 4, 0), done('d.test.js', 0, 1, 0)].join(
      '\n',
    ),
  );
  const merged = mergeProgress(first, retry);
  const v = suiteVerdict(merged);
  assert.equal(v.ok, false);
  assert.equal(v.summary, 'tests 10, pass 9, fail 1, skipped 0 in 4 files');
  assert.deepEqual(v.problems, ['b.test.js: exit 1, tests 3, pass 2, fail 1, skipped 0']);

  // The same with b passing (a retry after the lab broke): all good.
  const fixed = mergeProgress(merged, parseSuiteOutput(done('b.test.js', 0, 3, 0)));
  assert.deepEqual(suiteVerdict(fixed), {
    ok: true,
    summary: 'tests 10, pass 10, fail 0, skipped 0 in 4 files',
    problems: [],
  });

  // A file that never finished, one that skipped a test, one with no summary (-1), no tests.
  const bad: SuiteProgress = parseSuiteOutput(
    [
      '\x1b[32m# files: a.test.js b.test.js c.test.js d.test.js e.test.js\x1b[0m\r',
      done('a.test.js', 0, 2, 0, 1),
      '# file done: b.test.js exit 0 tests -1 pass -1 fail -1 skipped -1',
      done('c.test.js', 0, 0, 0),
      done('d.test.js', 0, 1, 0),
    ].join('\n'),
  );
  assert.deepEqual(suiteVerdict(bad).problems, [
    'a.test.js: exit 0, tests 2, pass 1, fail 0, skipped 1',
    'b.test.js: exit 0, tests -1, pass -1, fail -1, skipped -1',
    'c.test.js: exit 0, tests 0, pass 0, fail 0, skipped 0',
    'e.test.js: did not finish',
  ]);
  assert.deepEqual(suiteVerdict(parseSuiteOutput('')).problems, [
    'the runner never listed its files',
  ]);
});

test('scripts/run-tests.mjs --heartbeat prints what parseSuiteOutput reads; --only keeps files', () => {
  const name = `.suite-test-${process.pid}`;
  const dir = join(repoRoot(), 'dist', name);
  mkdirSync(dir, { recursive: true });
  try {
    const t = "import { test } from 'node:test';\n";
    writeFileSync(join(dir, 'a.test.js'), `${t}test('a1', () => {}); test('a2', () => {});\n`);
    writeFileSync(
      join(dir, 'b.test.js'),
      `${t}test('b1', () => { throw new Error('no'); }); test('b2', { skip: true }, () => {});\n`,
    );
    writeFileSync(join(dir, 'c.test.js'), `${t}test('c1', () => {});\n`);
    // Not as a child of this test: node's runner would skip the files of a nested run.
    const env = { ...process.env };
    delete env.NODE_TEST_CONTEXT;
    const run = (...args: string[]) =>
      spawnSync(process.execPath, [join(repoRoot(), 'scripts', 'run-tests.mjs'), ...args], {
        encoding: 'utf8',
        env,
        timeout: 60_000,
      });
    const report = join(dir, 'report.txt');
    const all = run('--heartbeat', '30', '--report', report, name);
    assert.equal(all.status, 1, all.stderr);
    const p = parseSuiteOutput(all.stdout);
    // The report holds the same two kinds of line, and nothing else.
    const lines = readFileSync(report, 'utf8').trimEnd().split('\n');
    assert.deepEqual(
      lines.map((l) => l.split(' ').slice(0, 4).join(' ')),
      [
        '# files: a.test.js b.test.js',
        '# file done: a.test.js',
        '# file done: b.test.js',
        '# file done: c.test.js',
      ],
    );
    assert.deepEqual(parseSuiteOutput(lines.join('\n')), p);
    assert.deepEqual(p.planned, ['a.test.js', 'b.test.js', 'c.test.js']);
    assert.deepEqual(
      [...p.done.values()].map((r) => [r.file, r.code, r.tests, r.pass, r.fail, r.skipped]),
      [
        ['a.test.js', 0, 2, 2, 0, 0],
        ['b.test.js', 1, 2, 0, 1, 1],
        ['c.test.js', 0, 1, 1, 0, 0],
      ],
    );
    const some = run('--heartbeat', '30', '--only', 'c.test.js,a.test.js', name);
    assert.equal(some.status, 0, some.stderr);
    assert.deepEqual(parseSuiteOutput(some.stdout).planned, ['a.test.js', 'c.test.js']);
    assert.equal(run('--heartbeat', '30', '--report').status, 2);
    const wrong = run('--heartbeat', '30', '--only', 'x.test.js', name);
    assert.equal(wrong.status, 2);
    assert.match(wrong.stderr, /--only: no such test file: x\.test\.js/);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('the retry shares the whole lab budget with the first attempt', () => {
  // A hang early: the retry gets a whole attempt.
  assert.equal(retryBudgetSec(500, 1800, 2700, 300), 1800);
  // Late: what is left of the total.
  assert.equal(retryBudgetSec(1650.4, 1800, 2700, 300), 1049);
  // Too little left for a boot and a file: no retry.
  assert.equal(retryBudgetSec(2500, 1800, 2700, 300), undefined);
  assert.equal(retryBudgetSec(2800, 1800, 2700, 300), undefined);
});

test('fileDoneLines hands on each whole "# file done:" line as it comes, and nothing else', () => {
  const got: string[] = [];
  const feed = fileDoneLines((l) => got.push(l));
  feed('# heartbeat 30 s\nok 1 - x\n# file d');
  assert.deepEqual(got, []);
  feed(
    `one: a.test.js exit 0 tests 1 pass 1 fail 0 skipped 0\n\x1b[31m${done('b.test.js', 1, 2, 1)}\x1b[0m\r\n`,
  );
  assert.deepEqual(got, [
    'file done: a.test.js exit 0 tests 1 pass 1 fail 0 skipped 0',
    'file done: b.test.js exit 1 tests 2 pass 1 fail 1 skipped 0',
  ]);
  // A line that never ends is kept bounded, not grown without limit.
  for (let i = 0; i < 100; i++) feed('x'.repeat(10_000));
  feed('\n');
  assert.equal(got.length, 2);
});

test('failureExcerpts: each failed test of the failed files, with the start of its error', () => {
  // The shape node's TAP reporter prints for a failed assertion with a multi-line message.
  const out = [
    '# files: a.test.js b.test.js c.test.js',
    'not ok 1 - a one',
    '  ---',
    '  duration_ms: 5',
    "  failureType: 'testCodeFailure'",
    '  error: |-',
    '    exit 1: the guest triple-faulted (KVM_EXIT_SHUTDOWN on vCPU 0)',
    '    --- stdout ---',
    '    [    1.0] Linux version 6.1',
    '    name: a line of the message that looks like a key',
    "  code: 'ERR_ASSERTION'",
    '  stack: |-',
    '    at x (file.js:1:1)',
    '  ...',
    done('a.test.js', 1, 1, 1),
    'not ok 1 - b one',
    '  ---',
    "  error: 'not this file'",
    '  ...',
    done('b.test.js', 1, 1, 1),
    'ok 1 - c one',
    'not ok 2 - c two',
    '  ---',
    "  error: 'no TYPERVISOR-BOOT-OK within 240000 ms'",
    "  code: 'ERR_TEST_FAILURE'",
    '  ...',
    done('c.test.js', 1, 2, 1),
  ].join('\n');
  assert.equal(
    failureExcerpts(out, ['a.test.js', 'c.test.js']),
    [
      'a.test.js: not ok - a one',
      'error: |-',
      'exit 1: the guest triple-faulted (KVM_EXIT_SHUTDOWN on vCPU 0)',
      '--- stdout ---',
      '[    1.0] Linux version 6.1',
      'name: a line of the message that looks like a key',
      'c.test.js: not ok - c two',
      "error: 'no TYPERVISOR-BOOT-OK within 240000 ms'",
    ].join('\n'),
  );
  // Long errors are cut: at most 24 lines per test.
  const long = [
    'not ok 1 - d',
    '  error: |-',
    ...Array.from({ length: 100 }, (_, i) => `    line ${i}`),
    done('d.test.js', 1, 1, 1),
  ].join('\n');
  assert.equal(failureExcerpts(long, ['d.test.js']).split('\n').length, 1 + 24);
  assert.equal(failureExcerpts(out, []), '');
});

test("a file list garbled by the lab's console: the asked files are the plan, and they all passed", () => {
  // CI of 1fd1354: four bytes of "event-idx.test.js" lost on the serial console.
  const out = [
    '# files: a.test.js event-idst.js c.test.js',
    done('a.test.js', 0, 2, 0),
    done('event-idx.test.js', 0, 1, 0),
    done('c.test.js', 0, 3, 0),
  ].join('\n');
  const asked = ['a.test.js', 'event-idx.test.js', 'c.test.js'];
  assert.equal(suiteVerdict(parseSuiteOutput(out)).ok, false, 'the console plan alone fails');
  const { progress, garbled } = withAskedPlan(parseSuiteOutput(out), asked);
  assert.deepEqual(garbled, ['event-idst.js']);
  assert.deepEqual(suiteVerdict(progress), {
    ok: true,
    summary: 'tests 6, pass 6, fail 0, skipped 0 in 3 files',
    problems: [],
  });
  // An asked file that never reported is still missing; a runner that never listed its files
  // still fails.
  const short = withAskedPlan(parseSuiteOutput(out), [...asked, 'd.test.js']).progress;
  assert.deepEqual(suiteVerdict(short).problems, ['d.test.js: did not finish']);
  const never = withAskedPlan(parseSuiteOutput(done('a.test.js', 0, 2, 0)), asked).progress;
  assert.equal(never.planned, undefined);
  assert.equal(suiteVerdict(never).ok, false);
});

test('the report file counts over the console; the console fills in what the report lacks', () => {
  const asked = ['a.test.js', 'event-idx.test.js', 'c.test.js'];
  // The console lost bytes of a "file done" line (and of the list); the report has them whole.
  const console = [
    '# files: a.test.js event-idst.js c.test.js',
    done('a.test.js', 0, 2, 0),
    done('event-idx.test.js', 0, 1, 0).replace('pass 1', 'pas 1'),
    done('c.test.js', 0, 3, 0),
  ].join('\n');
  const report = [
    `# files: ${asked.join(' ')}`,
    done('a.test.js', 0, 2, 0),
    done('event-idx.test.js', 0, 1, 0),
    done('c.test.js', 0, 3, 0),
  ].join('\n');
  assert.deepEqual(
    suiteVerdict(withAskedPlan(parseSuiteOutput(console), asked).progress).problems,
    ['event-idx.test.js: did not finish'],
  );
  const p = progressOf(console, report);
  assert.deepEqual(p.planned, asked);
  assert.equal(suiteVerdict(withAskedPlan(p, asked).progress).ok, true);
  // A report that stops short (the lab ended as it wrote): the console's line stands in.
  const cut = progressOf(console, report.split('\n').slice(0, 3).join('\n'));
  assert.deepEqual([...cut.done.keys()].sort(), asked.slice().sort());
  // No report at all (it could not be written): the console alone, as before.
  assert.deepEqual(progressOf(console, ''), parseSuiteOutput(console));
  // A failure in the report is not hidden by a console line that says otherwise.
  const failed = progressOf(done('c.test.js', 0, 3, 0), done('c.test.js', 1, 3, 1));
  assert.equal(failed.done.get('c.test.js')!.fail, 1);
});

// Reading the in-lab suite's progress from its output, for the harness outside the lab
// (test/lab/typervisor.test.ts). scripts/run-tests.mjs --heartbeat runs the suite's files one
// at a time and prints, in whole lines:
//   # files: a.test.js b.test.js ...
//   # file done: a.test.js exit 0 tests 3 pass 3 fail 0 skipped 0
// A lab that froze part-way (or whose kernel broke) is run again once; that retry runs only
// the files that had not finished (and, when the lab's kernel broke, those that failed on it):
// a file that finished keeps its result, so a failure of ours is never run again on its own.

export interface FileResult {
  file: string;
  /** The file's `node --test` exit code. */
  code: number;
  tests: number;
  pass: number;
  fail: number;
  skipped: number;
}

export interface SuiteProgress {
  /** The files the runner said it would run, in order; undefined if it never said. */
  planned?: string[];
  /** The files that finished, by name (the last line for a name wins). */
  done: Map<string, FileResult>;
}

const FILES = /^# files: (.*)$/m;
const DONE_LINE =
  '^# file done: (\\S+) exit (-?\\d+) tests (-?\\d+) pass (-?\\d+) fail (-?\\d+) skipped (-?\\d+)\\s*$';
const DONE = new RegExp(DONE_LINE, 'gm');
const DONE_ONE = new RegExp(DONE_LINE);

/** Output without the lab tty's colour codes and carriage returns. */
export function plainText(output: string): string {
  return output.replace(/\x1b\[[0-9;]*m/g, '').replace(/\r/g, '');
}

/** The progress printed in one run's output (colours and \r from the lab's tty ignored). */
export function parseSuiteOutput(output: string): SuiteProgress {
  const plain = plainText(output);
  const files = FILES.exec(plain);
  const planned = files ? files[1]!.trim().split(/\s+/).filter(Boolean) : undefined;
  const done = new Map<string, FileResult>();
  for (const m of plain.matchAll(DONE)) {
    const [code, tests, pass, fail, skipped] = m.slice(2, 7).map(Number) as [
      number,
      number,
      number,
      number,
      number,
    ];
    done.set(m[1]!, { file: m[1]!, code, tests, pass, fail, skipped });
  }
  return { planned, done };
}

/**
 * The progress of one run from the runner's report file (`--report`: the same lines, written
 * through the lab's 9p share) and its console output. The report is what counts: the console is
 * a serial line that can lose bytes (CI of 1fd1354 lost four in the middle of a file name), so a
 * "# file done:" line there can be garbled or missing while the report holds it whole. The
 * console still fills in what the report lacks: a report that could not be written, or one whose
 * last line was written just before the lab stopped.
 */
export function progressOf(consoleOutput: string, report: string): SuiteProgress {
  const fromReport = parseSuiteOutput(report);
  const fromConsole = parseSuiteOutput(consoleOutput);
  // The report's lines over the console's, as a retry's over the first run's.
  const merged = mergeProgress(fromConsole, fromReport);
  return { ...merged, planned: fromReport.planned ?? fromConsole.planned };
}

/**
 * The progress with the plan the harness asked for (`asked`: the files' base names, recursively
 * under test/inlab and the host files it named, or its --only list) instead of the runner's
 * `# files:` line, which crosses the lab's serial console: CI of 1fd1354 read
 * "event-idst.js" there (four bytes of "event-idx.test.js" lost), waited for a file that never
 * existed, and failed a suite whose 30 files had all passed. `garbled`: the console's names that
 * were not asked for (a lost or changed byte), for the log. A runner that never listed its files
 * stays so (it never started).
 */
export function withAskedPlan(
  p: SuiteProgress,
  asked: readonly string[],
): { progress: SuiteProgress; garbled: string[] } {
  if (!p.planned) return { progress: p, garbled: [] };
  const want = new Set(asked);
  const garbled = p.planned.filter((f) => !want.has(f));
  return { progress: { planned: [...asked], done: p.done }, garbled };
}

/** A file passed: it exited 0, ran tests, none failed and none was skipped. */
export function filePassed(r: FileResult): boolean {
  return r.code === 0 && r.tests > 0 && r.fail === 0 && r.skipped === 0 && r.pass === r.tests;
}

/**
 * The files the one retry runs, or undefined for all of them (the runner never listed its
 * files). `labBroke`: the lab's kernel reported that it broke while the suite ran, so a file
 * that failed on that machine is run again too; otherwise only files that did not finish.
 */
export function filesToRetry(p: SuiteProgress, labBroke: boolean): string[] | undefined {
  if (!p.planned) return undefined;
  return p.planned.filter((f) => {
    const r = p.done.get(f);
    return !r || (labBroke && !filePassed(r));
  });
}

/** The first run's progress with the retry's results over it (the plan stays the first's). */
export function mergeProgress(first: SuiteProgress, retry: SuiteProgress): SuiteProgress {
  const done = new Map(first.done);
  for (const [f, r] of retry.done) done.set(f, r);
  return { planned: first.planned ?? retry.planned, done };
}

export interface SuiteVerdict {
  ok: boolean;
  /** "tests 25, pass 25, fail 0, skipped 0 in 16 files" */
  summary: string;
  /** One line per file that did not pass or never finished. */
  problems: string[];
}

export function suiteVerdict(p: SuiteProgress): SuiteVerdict {
  const problems: string[] = [];
  if (!p.planned || p.planned.length === 0) problems.push('the runner never listed its files');
  const sum = { tests: 0, pass: 0, fail: 0, skipped: 0 };
  for (const f of p.planned ?? []) {
    const r = p.done.get(f);
    if (!r) {
      problems.push(`${f}: did not finish`);
      continue;
    }
    sum.tests += r.tests;
    sum.pass += r.pass;
    sum.fail += r.fail;
    sum.skipped += r.skipped;
    if (!filePassed(r))
      problems.push(
        `${f}: exit ${r.code}, tests ${r.tests}, pass ${r.pass}, fail ${r.fail}, skipped ${r.skipped}`,
      );
  }
  const summary = `tests ${sum.tests}, pass ${sum.pass}, fail ${sum.fail}, skipped ${sum.skipped} in ${p.planned?.length ?? 0} files`;
  return { ok: problems.length === 0, summary, problems };
}

/**
 * The time the one retry gets, or undefined when too little of the lab's whole budget is left
 * for it to be worth a boot (then the first attempt's failure stands, saying so). The suite's
 * two attempts share `totalSec`, so that a lab that is slow and then hangs cannot hold CI for
 * two whole attempts (CI of 39b6a76 ran out of its 90 minutes).
 */
export function retryBudgetSec(
  elapsedSec: number,
  attemptSec: number,
  totalSec: number,
  minSec: number,
): number | undefined {
  const left = Math.floor(Math.min(attemptSec, totalSec - elapsedSec));
  return left >= minSec ? left : undefined;
}

/**
 * Splits a stream of output into whole lines and hands each "# file done:" line to `onLine` as
 * it comes (the harness prints them at once, so that a run cut short still shows how far the
 * lab got). Returns the function to feed chunks to.
 */
export function fileDoneLines(onLine: (line: string) => void): (chunk: string) => void {
  let partial = '';
  return (chunk) => {
    const lines = (partial + chunk).split('\n');
    partial = (lines.pop() ?? '').slice(-4096);
    for (const l of lines) {
      const plain = plainText(l);
      if (DONE_ONE.test(plain)) onLine(plain.slice(2).trimEnd());
    }
  };
}

/** Lines of one failure's error kept for the head of a failed run's message. */
const EXCERPT_LINES = 24;
const EXCERPT_CHARS = 2_000;

/**
 * For each failed file, the name of each test that failed in it and the start of its error (the
 * TAP report's `error:` block, up to EXCERPT_LINES lines and EXCERPT_CHARS characters per
 * test), read from the file's part of the output (the lines before its "# file done:" line).
 * CI keeps only the head of a failure's message, and the suite's whole output is long: this goes
 * first, so that why a guest failed (a triple fault, a timeout and what the console said) is
 * what a reader of CI's record sees.
 */
export function failureExcerpts(output: string, files: readonly string[]): string {
  const plain = plainText(output);
  const out: string[] = [];
  let from = 0;
  for (const m of plain.matchAll(DONE)) {
    const part = plain.slice(from, m.index);
    from = m.index! + m[0].length;
    if (!files.includes(m[1]!)) continue;
    const lines = part.split('\n');
    for (let i = 0; i < lines.length; i++) {
      const head = /^\s*not ok \d+ - (.*)$/.exec(lines[i]!);
      if (!head) continue;
      const kept: string[] = [];
      // The YAML key `error:` and its block: the lines indented deeper than the key.
      let keyIndent = -1;
      for (let j = i + 1; j < lines.length && !/^\s*(not )?ok \d+ - /.test(lines[j]!); j++) {
        const l = lines[j]!;
        const indent = l.length - l.trimStart().length;
        if (keyIndent < 0) {
          if (/^\s*error:/.test(l)) keyIndent = indent;
          else continue;
        } else if (l.trim() !== '' && indent <= keyIndent) break;
        kept.push(l.trim());
        if (kept.length >= EXCERPT_LINES) break;
      }
      let text = kept.join('\n');
      if (text.length > EXCERPT_CHARS) text = `${text.slice(0, EXCERPT_CHARS)} [...]`;
      out.push(`${m[1]}: not ok - ${head[1]}${text ? `\n${text}` : ''}`);
    }
  }
  return out.join('\n');
}

#!/usr/bin/env node
// Runs node's test runner over every compiled *.test.js under the given folders of dist/
// (Node 20's runner takes files, not globs). Usage: node scripts/run-tests.mjs src test/host
//
// --heartbeat N: also prints "# heartbeat <s> s" every N seconds, between whole lines of the
// runner's output. The in-lab suite runs with it, so that the harness outside the lab can tell
// a frozen lab (no output at all, not even the heartbeat) from a slow or stuck test of ours
// (heartbeats keep coming; the test fails by its own timeout and is never retried).
//
// With --heartbeat the files also run one at a time, each in its own `node --test` (the
// lab has 2 CPUs, so node's runner ran them one at a time anyway), and the runner prints
//   # files: a.test.js b.test.js ...            (before the first, in the order they run)
//   # file done: a.test.js exit 0 tests 3 pass 3 fail 0 skipped 0   (after each)
// so that a harness whose lab froze part-way knows which files finished, and runs only the
// others in its one retry (src/lab/suite.ts). --only a.test.js,b.test.js keeps those files.
// --report FILE (with --heartbeat): those two kinds of line also go to FILE, each appended and
// synced as it is printed. The lab's harness reads its verdict there: the file crosses the
// lab's 9p share (cache=mmap, written through), where the console (a serial line) can lose
// bytes.
// A folder takes every test file under it; a file (test/host/a.test.js) takes that one.
import {
  readdirSync,
  statSync,
  existsSync,
  mkdirSync,
  openSync,
  writeSync,
  fsyncSync,
  closeSync,
} from 'node:fs';
import { join } from 'node:path';
import { spawn, spawnSync } from 'node:child_process';

const root = new URL('..', import.meta.url).pathname;
const args = process.argv.slice(2);
let heartbeatSec = 0;
const hb = args.indexOf('--heartbeat');
if (hb >= 0) {
  heartbeatSec = Number(args[hb + 1]);
  if (!Number.isInteger(heartbeatSec) || heartbeatSec <= 0) {
    console.error(`--heartbeat takes a whole number of seconds, not ${args[hb + 1]}`);
    process.exit(2);
  }
  args.splice(hb, 2);
}
let report = null;
const rp = args.indexOf('--report');
if (rp >= 0) {
  report = args[rp + 1];
  if (!report || report.startsWith('--')) {
    console.error('--report takes a file name');
    process.exit(2);
  }
  args.splice(rp, 2);
}
let only = null;
const on = args.indexOf('--only');
if (on >= 0) {
  only = new Set((args[on + 1] ?? '').split(',').filter(Boolean));
  args.splice(on, 2);
}
const files = [];
const walk = (d) => {
  for (const e of readdirSync(d)) {
    const p = join(d, e);
    if (statSync(p).isDirectory()) walk(p);
    else if (p.endsWith('.test.js')) files.push(p);
  }
};
for (const dir of args) {
  const d = join(root, 'dist', dir);
  if (!existsSync(d)) continue;
  if (statSync(d).isDirectory()) walk(d);
  else if (d.endsWith('.test.js')) files.push(d);
}
const base = (f) => f.slice(f.lastIndexOf('/') + 1);
const isHostFile = (f) => f.includes('/dist/test/host/');
// With --heartbeat or --only, files are named by their base name ("# file done", the lab's
// retry): two of one name would be one.
const byName = new Map();
for (const f of heartbeatSec || on >= 0 ? files : []) {
  const name = base(f);
  if (byName.has(name) && byName.get(name) !== f) {
    console.error(`two test files named ${name}: ${byName.get(name)} and ${f}`);
    process.exit(2);
  }
  byName.set(name, f);
}
if (only) {
  const known = new Set(files.map(base));
  const unknown = [...only].filter((n) => !known.has(n));
  if (unknown.length > 0 || only.size === 0) {
    console.error(`--only: no such test file: ${unknown.join(', ') || '(none given)'}`);
    process.exit(2);
  }
  files.splice(0, files.length, ...files.filter((f) => only.has(base(f))));
}
if (files.length === 0) {
  console.error(`no test files under ${args.join(', ')}`);
  process.exit(1);
}
// --test-force-exit: a file's process ends once its tests have, even if something of it is
// still alive (a test that timed out leaves its VMs and sockets behind). Without it one such
// file held the whole in-lab suite until the lab's own limit (23 min; CI of 92febbb). A hang at
// exit of the library is tested on its own (test/host/library.test.ts: a child program).
//
// Files are given in name order, except those in LAST, which come at the end. The
// in-lab native vCPU test is one: runs of it left the lab itself broken (a reset, hangs, one
// lab-kernel panic) within minutes in every lab boot that had them (bench/lab-bootloop.ts,
// docs/lab.md), and the tests after it in the same boot would pay for that.
const LAST = new Set(['vcpu-threads.test.js']);
const ordered = files.sort().sort((a, b) => Number(LAST.has(base(a))) - Number(LAST.has(base(b))));
// TYPERVISOR_HOST_TESTS_TMPDIR: the temp directory of test/host's files (made if missing). The
// in-lab suite runs some of them (test/lab/typervisor.test.ts), and they make Unix sockets in
// the temp directory, which the lab's /tmp (the host's, over 9p) cannot hold.
const hostTmp = process.env.TYPERVISOR_HOST_TESTS_TMPDIR;
const fileEnv = (file) => {
  if (!hostTmp || !isHostFile(file)) return process.env;
  mkdirSync(hostTmp, { recursive: true });
  return { ...process.env, TMPDIR: hostTmp };
};
// Files run by node itself (`node --test-force-exit FILE`: the file's own TAP on stdout), not
// under `node --test`, whose parent reads each file's events from the file's stdout. Node 20's
// reader loops for ever at 100% CPU when that stream ends in an incomplete event (nodejs/node
// #62693, fixed in later Nodes by #62704): CI of 715c949 hung there once the in-lab suite had
// ended (failed, with a 32 KiB message), as an earlier run had (docs/lab.md). The in-lab
// suite's file is one test that runs ~25 minutes.
const DIRECT = new Set(['typervisor.test.js']);
if (!heartbeatSec) {
  const viaRunner = ordered.filter((f) => !DIRECT.has(base(f)));
  const direct = ordered.filter((f) => DIRECT.has(base(f)));
  let status = 0;
  if (viaRunner.length > 0) {
    // One runner for every file: the host files' temp directory (above) is the whole run's.
    const host = viaRunner.find(isHostFile);
    const r = spawnSync(process.execPath, ['--test', '--test-force-exit', ...viaRunner], {
      stdio: 'inherit',
      env: host ? fileEnv(host) : process.env,
    });
    status = r.status ?? 1;
  }
  for (const f of direct) {
    console.log(`# ${base(f)}, run by node directly (scripts/run-tests.mjs: DIRECT)`);
    const r = spawnSync(process.execPath, ['--test-force-exit', f], {
      stdio: 'inherit',
      env: fileEnv(f),
    });
    if (status === 0) status = r.status ?? 1;
  }
  process.exit(status);
}
// With a heartbeat the runner's stdout and stderr come through here, so the heartbeat only
// goes out at a line boundary of both and never splits a line of the runner's summary.
const started = Date.now();
const atLineStart = { stdout: true, stderr: true };
// A line left unfinished for two beats (a test writing part of a line) does not silence it:
// the heartbeat then starts a line of its own.
let missed = 0;
const timer = setInterval(() => {
  const whole = atLineStart.stdout && atLineStart.stderr;
  if (!whole && ++missed < 2) return;
  missed = 0;
  const s = Math.round((Date.now() - started) / 1000);
  process.stdout.write(`${whole ? '' : '\n'}# heartbeat ${s} s\n`);
  atLineStart.stdout = atLineStart.stderr = true;
}, heartbeatSec * 1000);

/** Runs one file's tests; resolves with its exit code and its summary's counts. */
function runFile(file) {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, ['--test', '--test-force-exit', file], {
      stdio: ['inherit', 'pipe', 'pipe'],
      env: fileEnv(file),
    });
    let out = '';
    for (const name of ['stdout', 'stderr']) {
      child[name].on('data', (b) => {
        process[name].write(b);
        atLineStart[name] = b.length > 0 && b[b.length - 1] === 0x0a;
        // The summary is at the end: keep a tail long enough for it, not the whole output.
        if (name === 'stdout') out = (out + b.toString('utf8')).slice(-4096);
      });
    }
    child.on('close', (code, signal) => {
      const plain = out.replace(/\x1b\[[0-9;]*m/g, '');
      const count = (k) => {
        const m = [...plain.matchAll(new RegExp(`^\\s*(?:#|ℹ) ${k} (\\d+)\\s*$`, 'gm'))].pop();
        return m ? Number(m[1]) : -1;
      };
      resolve({
        code: code ?? (signal ? 1 : 0),
        counts: ['tests', 'pass', 'fail', 'skipped'].map((k) => `${k} ${count(k)}`).join(' '),
      });
    });
  });
}

const line = (text) => {
  process.stdout.write(`${atLineStart.stdout && atLineStart.stderr ? '' : '\n'}${text}\n`);
  atLineStart.stdout = atLineStart.stderr = true;
  if (report) {
    const fd = openSync(report, 'a');
    try {
      writeSync(fd, `${text}\n`);
      fsyncSync(fd);
    } finally {
      closeSync(fd);
    }
  }
};
line(`# files: ${ordered.map(base).join(' ')}`);
let worst = 0;
for (const f of ordered) {
  const { code, counts } = await runFile(f);
  line(`# file done: ${base(f)} exit ${code} ${counts}`);
  if (code !== 0) worst = code;
}
clearInterval(timer);
process.exit(worst);

/**
 * log_path / metrics_path: no symlink followed, created 0600, only a FIFO or a one-link regular
 * file, appended to; PUT /logger does not keep the descriptor it replaces.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import {
  closeSync,
  existsSync,
  linkSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  symlinkSync,
  writeFileSync,
  writeSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ConfigError } from '../util/errors.js';
import { LoggerControl } from './logger.js';
import { Counters, MetricsSystem } from './metrics.js';
import { openOutputFile, OUTPUT_FILE_MODE } from './output-file.js';

function tmp(): string {
  return mkdtempSync(join(tmpdir(), 'tv-out-'));
}

test('a symlink as log or metrics path is refused, naming the field; its target is untouched', () => {
  const dir = tmp();
  try {
    const victim = join(dir, 'victim');
    writeFileSync(victim, 'secret\n');
    const link = join(dir, 'log');
    symlinkSync(victim, link);
    assert.throws(
      () => openOutputFile('log_path', link),
      (e: Error) => e instanceof ConfigError && /^log_path .*symbolic link/.test(e.message),
    );
    const m = new MetricsSystem('t');
    assert.throws(() => m.init({ metrics_path: link }), /metrics_path .*symbolic link/);
    assert.equal(m.initialized, false);
    const dangling = join(dir, 'dangling');
    symlinkSync(join(dir, 'would-be-created'), dangling);
    assert.throws(() => openOutputFile('log_path', dangling), /symbolic link/);
    assert.equal(existsSync(join(dir, 'would-be-created')), false);
    assert.equal(readFileSync(victim, 'utf8'), 'secret\n');
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('a missing path is created 0600 whatever the umask; an existing file is appended to', () => {
  const dir = tmp();
  const old = process.umask(0);
  try {
    const p = join(dir, 'metrics');
    const fd = openOutputFile('metrics_path', p);
    closeSync(fd);
    assert.equal(statSync(p).mode & 0o777, OUTPUT_FILE_MODE);
    writeFileSync(p, 'first\n');
    const fd2 = openOutputFile('metrics_path', p);
    writeSync(fd2, 'second\n');
    closeSync(fd2);
    assert.equal(readFileSync(p, 'utf8'), 'first\nsecond\n');
  } finally {
    process.umask(old);
    rmSync(dir, { recursive: true, force: true });
  }
});

test('devices, directories and hard links are refused; a FIFO is accepted', () => {
  const dir = tmp();
  try {
    assert.throws(() => openOutputFile('log_path', '/dev/null'), /not a regular file or FIFO/);
    assert.throws(() => openOutputFile('log_path', dir), /log_path .*directory/);
    const f = join(dir, 'f');
    writeFileSync(f, '');
    linkSync(f, join(dir, 'g'));
    assert.throws(() => openOutputFile('log_path', f), /2 hard links/);
    const fifo = join(dir, 'fifo');
    execFileSync('mkfifo', [fifo]);
    closeSync(openOutputFile('log_path', fifo)); // no reader: neither blocks nor fails
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('PUT /logger again and again keeps one log descriptor open', () => {
  const dir = tmp();
  const logger = new LoggerControl(new Counters());
  try {
    const fds = () => readdirSync('/proc/self/fd').length;
    logger.configure({ log_path: join(dir, 'log0') });
    const before = fds();
    for (let i = 1; i <= 20; i++) logger.configure({ log_path: join(dir, `log${i}`) });
    assert.equal(fds(), before);
    process.stderr.write('to the last log\n');
    assert.equal(readFileSync(join(dir, 'log20'), 'utf8'), 'to the last log\n');
    assert.throws(() => logger.configure({ log_path: join(dir, 'no/such/dir') }), /log_path/);
    assert.equal(fds(), before, 'a refused path opens nothing');
  } finally {
    logger.restore();
    rmSync(dir, { recursive: true, force: true });
  }
});

/**
 * Helpers for the host tests (they need /dev/kvm, gcc and ld): build the tiny guests once per
 * test process into a temp dir, run the real CLI as a child process with a hard timeout, and
 * check that nothing is left behind (no child process, no zombie, no extra thread).
 */
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

/** The repository root (this file runs as dist/test/host/helpers.js). */
export const REPO = fileURLToPath(new URL('../../../', import.meta.url));
export const CLI = join(REPO, 'bin', 'typervisor');

/**
 * TYPERVISOR_TEST_TIME_SCALE (an integer, 1 to 100; default 1): how many times slower than a
 * KVM host this machine runs the tests' guests. The in-lab suite sets it for the test/host files
 * it runs on the lab's emulated machine (test/lab/typervisor.test.ts). Time windows and limits
 * that a slow machine meets without anything being wrong (how long a guest's poll may wait, how
 * long a flood is watched) are multiplied by it; what a test counts inside them is not.
 */
export const TIME_SCALE = timeScale(process.env.TYPERVISOR_TEST_TIME_SCALE);

export function timeScale(v: string | undefined): number {
  if (v === undefined || v === '') return 1;
  const n = Number(v);
  if (!Number.isInteger(n) || n < 1 || n > 100)
    throw new Error(
      `TYPERVISOR_TEST_TIME_SCALE must be an integer from 1 to 100, not ${JSON.stringify(v)}`,
    );
  return n;
}

/** Why host tests cannot run here, or undefined when they can. */
export function kvmSkipReason(): string | undefined {
  if (!existsSync('/dev/kvm')) return '/dev/kvm does not exist on this host';
  return undefined;
}

/** Why the tests of bench/guests (built with gcc and ld) cannot run here, or undefined. */
export function benchGuestSkipReason(): string | undefined {
  for (const tool of ['gcc', 'ld']) {
    if (spawnSync('sh', ['-c', `command -v ${tool}`]).status !== 0)
      return `${tool} is not installed: cannot build bench/guests`;
  }
  return kvmSkipReason();
}

let guestDir: string | undefined;
let guestSkip: string | undefined;
const tempDirs: string[] = [];

/** A temp dir removed when the test process exits. */
export function tempDir(prefix = 'typervisor-test-'): string {
  const d = mkdtempSync(join(tmpdir(), prefix));
  tempDirs.push(d);
  return d;
}
process.on('exit', () => {
  for (const d of tempDirs) rmSync(d, { recursive: true, force: true });
});

/**
 * Builds every tiny guest variant (test/guests/build.sh) into a temp dir, once per process.
 * Returns the dir, or { skip } when gcc/ld are missing (the test should then skip, saying so).
 */
export function tinyGuests():
  { dir: string; skip?: undefined } | { dir?: undefined; skip: string } {
  if (guestDir) return { dir: guestDir };
  if (guestSkip) return { skip: guestSkip };
  for (const tool of ['gcc', 'ld']) {
    if (spawnSync('sh', ['-c', `command -v ${tool}`]).status !== 0) {
      guestSkip = `${tool} is not installed: cannot build the tiny guests (test/guests/build.sh)`;
      return { skip: guestSkip };
    }
  }
  const kvm = kvmSkipReason();
  if (kvm) {
    guestSkip = kvm;
    return { skip: guestSkip };
  }
  const dir = tempDir('typervisor-guests-');
  const r = spawnSync('sh', [join(REPO, 'test', 'guests', 'build.sh'), dir], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`test/guests/build.sh failed (${r.status}): ${r.stderr}`);
  guestDir = dir;
  return { dir };
}

export function guestPath(name: string): string {
  const g = tinyGuests();
  if (!g.dir) throw new Error(g.skip);
  return join(g.dir, `${name}.elf`);
}

export interface CliResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  ms: number;
  pid: number;
  timedOut: boolean;
}

export interface CliOptions {
  /** Bytes for stdin (then closed); without it stdin is 'ignore'. */
  input?: string;
  /** Keep stdin open (a pipe) without writing anything. */
  holdStdin?: boolean;
  timeoutMs?: number;
  /** Called with each stdout chunk (e.g. to signal the child once the guest is up). */
  onStdout?: (text: string, child: import('node:child_process').ChildProcess) => void;
  env?: NodeJS.ProcessEnv;
}

/** Runs `node bin/typervisor ...args`; SIGKILLs it after timeoutMs and says so in the result. */
export function runCli(args: string[], opts: CliOptions = {}): Promise<CliResult> {
  const timeoutMs = opts.timeoutMs ?? 15_000;
  const started = performance.now();
  const piped = opts.input !== undefined || opts.holdStdin === true;
  const child = spawn(process.execPath, [CLI, ...args], {
    cwd: REPO,
    stdio: [piped ? 'pipe' : 'ignore', 'pipe', 'pipe'],
    env: {
      ...process.env,
      TYPERVISOR_LOG: undefined,
      TYPERVISOR_LOG_FORMAT: undefined,
      ...opts.env,
    },
  });
  let stdout = '';
  let stderr = '';
  let timedOut = false;
  child.stdout!.setEncoding('utf8').on('data', (s: string) => {
    stdout += s;
    opts.onStdout?.(stdout, child);
  });
  child.stderr!.setEncoding('utf8').on('data', (s: string) => (stderr += s));
  if (child.stdin) {
    child.stdin.on('error', () => undefined); // the CLI may exit before reading its input
    if (opts.input !== undefined) child.stdin.end(opts.input);
  }
  const timer = setTimeout(() => {
    timedOut = true;
    child.kill('SIGKILL');
  }, timeoutMs);
  return new Promise((resolve, reject) => {
    child.on('error', (e) => {
      clearTimeout(timer);
      reject(e);
    });
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      child.stdin?.destroy();
      resolve({
        code,
        signal,
        stdout,
        stderr,
        ms: performance.now() - started,
        pid: child.pid!,
        timedOut,
      });
    });
  });
}

/**
 * The child is gone and reaped: no /proc entry, or the pid was recycled by a process that is
 * not our child (a zombie we failed to reap would still list us as its parent).
 */
export function processGone(pid: number): boolean {
  try {
    return parentOf(readFileSync(`/proc/${pid}/stat`, 'utf8')) !== process.pid;
  } catch {
    return true;
  }
}

/** The ppid field of /proc/PID/stat (the command name in parentheses may contain spaces). */
function parentOf(stat: string): number {
  return Number(stat.slice(stat.lastIndexOf(')') + 2).split(' ')[1]);
}

/** Live child processes of this process (from /proc), zombies included. */
export function childPids(): number[] {
  const out: number[] = [];
  for (const e of readdirSync('/proc')) {
    if (!/^\d+$/.test(e)) continue;
    try {
      if (parentOf(readFileSync(`/proc/${e}/stat`, 'utf8')) === process.pid) out.push(Number(e));
    } catch {
      // gone meanwhile
    }
  }
  return out;
}

/**
 * Threads of this process right now, not counting the kernel's per-VM helper tasks
 * ("kvm-nx-lpage-recovery", "kvm-pit/...": they show up in /proc/self/task too but belong to
 * KVM, and live exactly as long as the VM; see kvmLeftovers()).
 */
export function threadCount(): number {
  let n = 0;
  for (const t of readdirSync('/proc/self/task')) {
    try {
      if (!readFileSync(`/proc/self/task/${t}/comm`, 'utf8').startsWith('kvm-')) n++;
    } catch {
      // exited meanwhile
    }
  }
  return n;
}

/**
 * What keeps a VM alive in the kernel after the VMM has torn it down: a mapping of a vCPU's
 * kvm_run (an mmap of the vCPU fd holds the vCPU and so the whole VM, even after every fd is
 * closed), and the kernel tasks KVM runs for a live VM. Both must be zero once no VM runs.
 */
export function kvmLeftovers(): { vcpuMappings: string[]; kvmTasks: string[] } {
  const vcpuMappings = readFileSync('/proc/self/maps', 'utf8')
    .split('\n')
    .filter((l) => l.includes('anon_inode:kvm-vcpu'));
  const kvmTasks: string[] = [];
  for (const t of readdirSync('/proc/self/task')) {
    try {
      const comm = readFileSync(`/proc/self/task/${t}/comm`, 'utf8').trim();
      if (comm.startsWith('kvm-')) kvmTasks.push(`${t} ${comm}`);
    } catch {
      // exited meanwhile
    }
  }
  return { vcpuMappings, kvmTasks };
}

/** Polls `f` every 10 ms until it holds or `ms` pass; returns its last value. */
export async function eventually(f: () => boolean, ms: number): Promise<boolean> {
  const end = Date.now() + ms;
  for (;;) {
    if (f()) return true;
    if (Date.now() > end) return false;
    await new Promise((r) => setTimeout(r, 10));
  }
}

/** One line of stderr, naming the tool: `typervisor: ...`. */
export function oneLine(stderr: string): string {
  const lines = stderr.split('\n').filter((l) => l.length > 0);
  if (lines.length !== 1)
    throw new Error(`expected one line on stderr, got ${lines.length}: ${JSON.stringify(stderr)}`);
  return lines[0]!;
}

/** A stock bzImage, if the project's guest kernel has been built on this machine. */
export function cachedBzImage(): string | undefined {
  const home = process.env.HOME;
  if (!home) return undefined;
  const cache = join(home, '.cache', 'typervisor');
  if (!existsSync(cache)) return undefined;
  for (const d of readdirSync(cache)
    .filter((x) => x.startsWith('kernel-'))
    .sort()) {
    const p = join(cache, d, 'vmlinuz');
    if (existsSync(p)) return p;
  }
  return undefined;
}

// The lab: an emulated machine (QEMU TCG, -cpu max: AMD-V with NPT) that runs Debian's
// generic kernel with kvm_amd, so /dev/kvm inside is real AMD-V KVM even where the host's
// KVM is PVM. The host's / is shared over 9p and the lab's init chroots into it, so a
// command runs as root at the caller's cwd with the host's Node and tools.
//
// Channels: ttyS0 <-> QEMU stdio is the command's terminal (stdin/stdout/stderr); ttyS1 is
// the kernel console, logged to <run>/console.log (shown when the lab fails). The run dir
// (a host temp dir, visible inside through the share) carries run.sh in and ready/exit out.
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { ensureImage, imagePaths } from './guest.js';
import { labDiagnosis } from './lab-diag.js';

export interface LabOptions {
  command: string[];
  cwd?: string;
  /** Whole run, boot included. Default $TYPERVISOR_LAB_TIMEOUT or 1200 s. */
  timeoutSec?: number;
  /** No ready signal from the lab within this → failure. Default 180 s. */
  bootTimeoutSec?: number;
  /** Sent to the command's stdin once it runs, then EOF. */
  input?: string | Buffer;
  /** 'capture' (default): output is collected (and streamed to onOutput).
   *  'inherit': QEMU uses our stdout; if our stdin is a TTY the session is interactive,
   *  otherwise our stdin is forwarded until EOF. */
  stdio?: 'capture' | 'inherit';
  onOutput?: (chunk: Buffer) => void;
  /** Called once the lab has booted and the command is starting. */
  onReady?: () => void;
  env?: Record<string, string>;
  signal?: AbortSignal;
}

export interface LabResult {
  /** The command's exit code; 124 timeout, 125 lab failure, 130 aborted. */
  code: number;
  output: string;
  /** Start of QEMU to the command starting, ms. */
  bootMs: number;
  totalMs: number;
  error?: string;
  /**
   * The lab kernel's own reports that it broke while the command ran (a CPU stuck in the
   * kernel, an RCU stall, a BUG or Oops, a hung task): the headline lines from its console,
   * at most LAB_FAULT_LINES of them. Empty when it reported none.
   */
  labFaults: string[];
}

/**
 * Lines of the lab kernel's console that say the lab machine itself broke. Its stack traces
 * follow them in console.log (loglevel=5 lets them through).
 */
export const LAB_FAULT =
  /soft lockup|hard LOCKUP|rcu: INFO: .*stall|self-detected stall|BUG: |Oops|general protection fault|Kernel panic|blocked for more than \d+ seconds|stack-protector|corrupted stack/;
const LAB_FAULT_LINES = 20;

/** The lab-fault lines of a lab console log (see LAB_FAULT). */
export function labFaultsIn(consoleLog: string): string[] {
  return consoleLog
    .split('\n')
    .filter((l) => LAB_FAULT.test(l))
    .slice(0, LAB_FAULT_LINES);
}

/** Environment passed into the lab (the rest of the host's env is not). */
const PASS_ENV = /^(PATH|HOME|TERM|CI|LANG|LC_.*|TZ|USER|GITHUB_.*|TYPERVISOR_.*|NODE_OPTIONS)$/;

const sq = (s: string) => `'${s.replace(/'/g, `'\\''`)}'`;

export function labQemuBinary(): string {
  const r = spawnSync('sh', ['-c', 'command -v qemu-system-x86_64'], { encoding: 'utf8' });
  const bin = r.stdout.trim();
  if (r.status !== 0 || !bin) {
    throw new Error(
      'lab: qemu-system-x86_64 not found; run scripts/setup.sh (installs qemu-system-x86)',
    );
  }
  return bin;
}

export async function runInLab(opts: LabOptions): Promise<LabResult> {
  const qemu = labQemuBinary();
  const lab = imagePaths('lab', ensureImage('lab'));
  const timeoutSec = opts.timeoutSec ?? Number(process.env.TYPERVISOR_LAB_TIMEOUT ?? 1200);
  const bootTimeoutSec = opts.bootTimeoutSec ?? 180;
  const inherit = opts.stdio === 'inherit';
  const interactive = inherit && opts.input === undefined && process.stdin.isTTY === true;
  const cwd = resolve(opts.cwd ?? process.cwd());
  const run = mkdtempSync(join(tmpdir(), 'typervisor-lab-'));

  const env = { ...opts.env };
  for (const [k, v] of Object.entries(process.env)) {
    if (PASS_ENV.test(k) && v !== undefined && !(k in env)) env[k] = v;
  }
  const lines = ['# written by src/lab/lab.ts; run by the lab init in the chroot'];
  if (interactive) {
    const { rows, columns } = process.stdout;
    if (rows && columns) lines.push(`stty rows ${rows} cols ${columns} 2>/dev/null`);
  } else {
    // A pipe, not a user: no echo of the input, no CRs added, ^C is data; ^D still ends input.
    lines.push('stty -echo -onlcr -isig -ixon 2>/dev/null');
  }
  for (const [k, v] of Object.entries(env)) lines.push(`export ${k}=${sq(v)}`);
  lines.push(`cd ${sq(cwd)} || exit 126`);
  lines.push(`: >${sq(join(run, 'ready'))}`);
  lines.push(`exec ${opts.command.map(sq).join(' ')}`);
  writeFileSync(join(run, 'run.sh'), lines.join('\n') + '\n');

  const smp = process.env.TYPERVISOR_LAB_SMP ?? '2';
  const mem = process.env.TYPERVISOR_LAB_MEM ?? '2560';
  // cache=mmap: guest writes reach the host at once (exit code, test output), mmap works.
  const ninep = process.env.TYPERVISOR_LAB_9P ?? 'cache=mmap';
  // The lab's KVM keeps the guests' page tables in software (shadow paging), not in the
  // emulated AMD-V's nested paging (NPT): docs/lab.md "Shadow paging in the lab".
  // TYPERVISOR_LAB_NPT=1 turns NPT back on.
  const npt = process.env.TYPERVISOR_LAB_NPT === '1' ? 1 : 0;
  const append = [
    'console=ttyS1 loglevel=5 softlockup_all_cpu_backtrace=1 panic=-1 mitigations=off',
    `kvm_amd.npt=${npt}`,
    `lab.run=${run} lab.9p=${ninep}`,
  ].join(' ');
  const args = [
    ...['-accel', 'tcg', '-cpu', 'max', '-smp', smp, '-m', mem, '-M', 'q35'],
    ...['-kernel', lab.LAB_KERNEL!, '-initrd', lab.LAB_INITRAMFS!, '-append', append],
    ...['-nodefaults', '-no-user-config', '-display', 'none', '-no-reboot'],
    ...['-chardev', 'stdio,id=con,signal=off', '-serial', 'chardev:con'],
    ...['-serial', `file:${join(run, 'console.log')}`],
    // The monitor, for lab-diag.ts when the lab stops making progress.
    ...['-monitor', `unix:${join(run, 'monitor.sock')},server=on,wait=off`],
    ...['-fsdev', 'local,id=host,path=/,security_model=passthrough,multidevs=remap'],
    ...['-device', 'virtio-9p-pci,fsdev=host,mount_tag=hostroot'],
  ];
  if (run.includes(' ') || cwd.includes('\n')) throw new Error('lab: temp dir path has spaces');

  // setpriv --pdeathsig: QEMU dies with us even if we are SIGKILLed.
  const hasSetpriv = spawnSync('sh', ['-c', 'command -v setpriv']).status === 0;
  const [file, argv] = hasSetpriv
    ? ['setpriv', ['--pdeathsig', 'TERM', '--', qemu, ...args]]
    : [qemu, args];
  const t0 = Date.now();
  const child = spawn(file, argv, {
    stdio: [interactive ? 'inherit' : 'pipe', inherit ? 'inherit' : 'pipe', 'pipe'],
  });

  const out: Buffer[] = [];
  child.stdout?.on('data', (b: Buffer) => {
    out.push(b);
    opts.onOutput?.(b);
  });
  let stderr = '';
  child.stderr!.on('data', (b: Buffer) => {
    stderr += b.toString();
    if (inherit) process.stderr.write(b);
  });
  child.stdin?.on('error', () => {}); // QEMU gone: nothing more to send.

  let error: string | undefined;
  let failCode = 0;
  let bootMs = -1;
  const fail = (code: number, msg: string) => {
    if (error === undefined) {
      error = msg;
      failCode = code;
    }
    kill(child);
  };
  const onReady = () => {
    bootMs = Date.now() - t0;
    opts.onReady?.();
    if (child.stdin) feedInput(child, opts.input, inherit);
  };
  const poll = setInterval(() => {
    if (bootMs < 0 && existsSync(join(run, 'ready'))) onReady();
    else if (bootMs < 0 && Date.now() - t0 > bootTimeoutSec * 1000) {
      fail(125, `lab: did not come up within ${bootTimeoutSec} s`);
    }
  }, 50);
  // A timeout or an abort (the harness's hung-lab detection) ends the lab after a look at what
  // it was doing (lab-diag.ts: QEMU's threads, the CPUs' RIPs), kept in the error.
  let diagnosis = '';
  let diagnosing = false;
  const failAfterLook = (code: number, msg: string) => {
    if (error !== undefined || diagnosing || child.pid === undefined) return fail(code, msg);
    diagnosing = true;
    const map = join(run, 'kallsyms');
    void labDiagnosis(child.pid, join(run, 'monitor.sock'), map).then((d) => {
      diagnosis = d;
      fail(code, msg);
    });
  };
  const timer = setTimeout(
    () =>
      failAfterLook(
        124,
        `lab: timed out after ${timeoutSec} s (--timeout / TYPERVISOR_LAB_TIMEOUT)`,
      ),
    timeoutSec * 1000,
  );
  const onAbort = () => failAfterLook(130, 'lab: interrupted');
  opts.signal?.addEventListener('abort', onAbort);

  const status = await new Promise<number | null>((res) => {
    child.on('error', (e) => {
      fail(125, `lab: cannot start QEMU: ${e.message}`);
      res(null);
    });
    child.on('close', (c) => res(c));
  });
  clearInterval(poll);
  clearTimeout(timer);
  opts.signal?.removeEventListener('abort', onAbort);

  let code = failCode;
  const exitFile = join(run, 'exit');
  if (error === undefined) {
    if (existsSync(exitFile)) code = Number(readFileSync(exitFile, 'utf8').trim());
    else {
      code = 125;
      error = `lab: ended without an exit code (QEMU status ${status})`;
    }
  }
  const consoleLog = existsSync(join(run, 'console.log'))
    ? readFileSync(join(run, 'console.log'), 'utf8')
    : '';
  if (error !== undefined) {
    const log = consoleLog.split('\n').slice(-25).join('\n');
    error += `${diagnosis ? `\n${diagnosis}` : ''}${stderr ? `\nQEMU stderr:\n${stderr.trim()}` : ''}\nlab console (last lines):\n${log}`;
  }
  if (!process.env.TYPERVISOR_LAB_KEEP) rmSync(run, { recursive: true, force: true });
  return {
    code,
    output: Buffer.concat(out).toString(),
    bootMs,
    totalMs: Date.now() - t0,
    error,
    labFaults: labFaultsIn(consoleLog),
  };
}

/** Input goes in only once the command runs (bytes sent during boot would be echoed or
 *  lost); ^D ends it (the guest tty is in canonical mode; a second ^D if the last line is
 *  unterminated). With stdio 'inherit' and no input, our own stdin is forwarded. */
function feedInput(child: ChildProcess, input: string | Buffer | undefined, inherit: boolean) {
  const stdin = child.stdin!;
  const eof = (last: number | undefined) =>
    stdin.end(last === 0x0a || last === undefined ? '\x04' : '\x04\x04');
  if (input !== undefined) {
    const b = Buffer.from(input);
    stdin.write(b);
    eof(b[b.length - 1]);
  } else if (inherit) {
    let last: number | undefined;
    process.stdin.on('data', (b: Buffer) => {
      last = b[b.length - 1];
      stdin.write(b);
    });
    process.stdin.on('end', () => eof(last));
  } else {
    eof(undefined);
  }
}

function kill(child: ChildProcess) {
  if (child.exitCode !== null || child.signalCode !== null) return;
  child.kill('SIGTERM');
  setTimeout(() => {
    if (child.exitCode === null && child.signalCode === null) child.kill('SIGKILL');
  }, 3000).unref();
}

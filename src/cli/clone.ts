/**
 * `typervisor clone`: N VMs restored from one snapshot, each in its own process.
 *
 * Each clone is `typervisor --api-sock SOCK` (its own process group, so a terminal's Ctrl-C
 * reaches only this command, which then stops them in order) loaded with PUT /snapshot/load
 * and resume_vm, the same loadSnapshot() as `run --restore`, with its own network and vsock
 * overrides from the patterns. Every clone maps the memory file MAP_PRIVATE: the pages no clone
 * writes stay shared in the page cache, so memory per clone is what its guest writes plus the
 * VMM's own (see src/vmm/clone-memory.ts, printed with --report or on SIGUSR1).
 *
 * Exit codes: 0 every clone ended well (stopped by SIGINT/SIGTERM, or its guest powered off);
 * 1 a clone failed to start or ended in a failure; 2 bad arguments or a snapshot that cannot be
 * read (nothing started then).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import {
  closeSync,
  existsSync,
  mkdtempSync,
  openSync,
  rmSync,
  statSync,
  type PathLike,
} from 'node:fs';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { ConfigError } from '../util/errors.js';
import {
  cloneMemory,
  fileMatch,
  formatCloneMemory,
  MAX_TAP_NAME,
  MAX_UDS_PATH,
  readSnapshotFile,
  type CloneMemory,
} from '../vmm/index.js';
import { apiCall } from './snapshot.js';
import { monoMs } from '../util/clock.js';

/** At most this many clones per command. */
export const MAX_CLONES = 64;
/** How long a clone may take to open its API socket, and then to load (ms). */
export const CLONE_SOCKET_TIMEOUT_MS = 30_000;
export const CLONE_LOAD_TIMEOUT_MS = 60_000;
/** After SIGTERM, a clone that has not exited in this long is killed (its own bound is 15 s). */
export const CLONE_STOP_TIMEOUT_MS = 20_000;

const EXIT_OK = 0;
const EXIT_FAILED = 1;
const EXIT_USAGE = 2;

export const CLONE_USAGE = `usage: typervisor clone --snapshot STATE --mem-file MEM --count N [options]
Starts N VMs restored from one snapshot, each in its own process, and keeps them running until
SIGINT/SIGTERM (then stops them all). The memory file is mapped privately by each clone, so the
pages no clone writes are shared (the page cache).
  --snapshot STATE           the state file (typervisor snapshot create)
  --mem-file MEM             its memory file
  --count N                  number of clones, 1-${MAX_CLONES}
  --tap-pattern [ID=]NAME%d  the TAP of clone i for the saved interface ID ("%d" becomes i,
                             from 0); ID may be left out when the snapshot has one interface.
                             Repeatable; needed for every saved interface when N > 1
  --vsock-uds-pattern PATH%d the vsock socket of clone i (needed when the snapshot has vsock
                             and N > 1; a vsock with backend "vhost" has no socket, and its
                             guest CID fits one clone only)
  --api-sock-pattern PATH%d  the API socket of clone i (default: in a temp dir)
  --console-pattern FILE%d|none  clone i's console output to FILE (default none)
  --report                   print memory per clone once they all run (and on SIGUSR1)
  --log-level L              error | warn | info | debug, passed to every clone`;

/** What the flags ask for, checked. */
export interface CloneArgs {
  snapshot: string;
  memFile: string;
  count: number;
  /** Saved interface id -> TAP name pattern. */
  taps: Array<{ ifaceId: string | undefined; pattern: string }>;
  vsockPattern?: string;
  apiSockPattern?: string;
  consolePattern?: string;
  report: boolean;
  logLevel?: string;
}

/** The pattern with i in place of its one %d. */
export function expand(pattern: string, i: number): string {
  return pattern.replace('%d', String(i));
}

/** A pattern has exactly one %d and no other '%'. */
function checkPattern(flag: string, pattern: string): void {
  const pct = pattern.split('%').length - 1;
  if (pct !== 1 || !pattern.includes('%d'))
    throw new ConfigError(
      `${flag} must contain "%d" exactly once (and no other '%'), which becomes the clone's number (got "${pattern}")`,
    );
}

/** Every name a pattern makes for clones 0..count-1 passes `check` (the longest is the last). */
function checkExpanded(
  flag: string,
  pattern: string,
  count: number,
  check: (name: string) => string | undefined,
): void {
  checkPattern(flag, pattern);
  for (const i of [0, count - 1]) {
    const why = check(expand(pattern, i));
    if (why) throw new ConfigError(`${flag} "${pattern}" gives "${expand(pattern, i)}": ${why}`);
  }
}

const tapProblem = (n: string) =>
  Buffer.byteLength(n) > MAX_TAP_NAME || /[/:\s]/.test(n) || n.length === 0
    ? `not a TAP name (1 to ${MAX_TAP_NAME} bytes, no '/', ':' or spaces)`
    : undefined;
const socketProblem = (p: string) =>
  Buffer.byteLength(p) > MAX_UDS_PATH
    ? `longer than ${MAX_UDS_PATH} bytes (a Unix socket path)`
    : undefined;

export function parseCloneArgs(argv: string[]): CloneArgs {
  let v;
  try {
    v = parseArgs({
      args: argv,
      strict: true,
      allowPositionals: false,
      options: {
        snapshot: { type: 'string' },
        'mem-file': { type: 'string' },
        count: { type: 'string' },
        'tap-pattern': { type: 'string', multiple: true },
        'vsock-uds-pattern': { type: 'string' },
        'api-sock-pattern': { type: 'string' },
        'console-pattern': { type: 'string' },
        report: { type: 'boolean' },
        'log-level': { type: 'string' },
      },
    }).values;
  } catch (e) {
    throw new ConfigError((e as Error).message.split('\n')[0]!);
  }
  if (v.snapshot === undefined) throw new ConfigError('clone needs --snapshot STATE');
  if (v['mem-file'] === undefined) throw new ConfigError('clone needs --mem-file MEM');
  if (v.count === undefined) throw new ConfigError('clone needs --count N');
  const count = /^\d{1,4}$/.test(v.count) ? Number(v.count) : NaN;
  if (!(count >= 1 && count <= MAX_CLONES))
    throw new ConfigError(
      `--count must be a whole number from 1 to ${MAX_CLONES} (got "${v.count}")`,
    );
  const taps = (v['tap-pattern'] ?? []).map((t) => {
    const m = /^([^=]+)=(.*)$/.exec(t);
    const tap = { ifaceId: m?.[1], pattern: m ? m[2]! : t };
    checkExpanded('--tap-pattern', tap.pattern, count, tapProblem);
    return tap;
  });
  const ids = taps.map((t) => t.ifaceId ?? '');
  if (new Set(ids).size !== ids.length)
    throw new ConfigError('--tap-pattern: one pattern per interface');
  const vsock = v['vsock-uds-pattern'];
  if (vsock !== undefined)
    checkExpanded('--vsock-uds-pattern', vsock, count, (p) =>
      p.length === 0 ? 'empty' : socketProblem(p),
    );
  const api = v['api-sock-pattern'];
  if (api !== undefined) checkExpanded('--api-sock-pattern', api, count, socketProblem);
  const cons = v['console-pattern'];
  if (cons !== undefined && cons !== 'none') checkPattern('--console-pattern', cons);
  const level = v['log-level'];
  if (level !== undefined && !['error', 'warn', 'info', 'debug'].includes(level))
    throw new ConfigError('--log-level must be error, warn, info or debug');
  return {
    snapshot: resolve(v.snapshot),
    memFile: resolve(v['mem-file']),
    count,
    taps,
    ...(vsock !== undefined ? { vsockPattern: vsock } : {}),
    ...(api !== undefined ? { apiSockPattern: api } : {}),
    ...(cons !== undefined && cons !== 'none' ? { consolePattern: cons } : {}),
    report: v.report ?? false,
    ...(level !== undefined ? { logLevel: level } : {}),
  };
}

/** One clone's PUT /snapshot/load body. */
export interface ClonePlan {
  index: number;
  apiSock: string;
  console?: string;
  load: {
    snapshot_path: string;
    mem_backend: { backend_type: 'File'; backend_path: string };
    resume_vm: true;
    network_overrides?: Array<{ iface_id: string; host_dev_name: string }>;
    vsock_override?: { uds_path: string };
  };
}

/**
 * The clones' plans, checked against what the snapshot holds: every saved interface gets a TAP
 * pattern and a saved vsock device a socket pattern when there is more than one clone (two
 * processes cannot share one TAP or listen on one socket path); a pattern for a device the
 * snapshot does not have is an error.
 */
export function planClones(
  a: CloneArgs,
  saved: { nets: string[]; vsock: boolean; vhostVsockCid?: number },
  apiDir: string,
): ClonePlan[] {
  const taps = new Map<string, string>();
  for (const t of a.taps) {
    let id = t.ifaceId;
    if (id === undefined) {
      if (saved.nets.length !== 1)
        throw new ConfigError(
          `--tap-pattern ${t.pattern}: the snapshot has ${saved.nets.length} network interfaces (${saved.nets.join(', ') || 'none'}); say which one as ID=${t.pattern}`,
        );
      id = saved.nets[0]!;
    }
    if (!saved.nets.includes(id))
      throw new ConfigError(
        `--tap-pattern: the snapshot has no network interface "${id}" (it has ${saved.nets.join(', ') || 'none'})`,
      );
    if (taps.has(id)) throw new ConfigError(`--tap-pattern: interface ${id} given twice`);
    taps.set(id, t.pattern);
  }
  const cid = saved.vhostVsockCid;
  if (cid !== undefined) {
    if (a.vsockPattern !== undefined)
      throw new ConfigError(
        `--vsock-uds-pattern: the snapshot's vsock device uses the vhost backend, which has no Unix socket (its host side is AF_VSOCK at guest CID ${cid})`,
      );
    // The host kernel gives a CID to one vhost-vsock device at a time (EADDRINUSE), and a load
    // cannot change the saved CID: a second clone would fail at load.
    if (a.count > 1)
      throw new ConfigError(
        `the snapshot's vsock device uses the vhost backend: its guest CID ${cid} can be held by one VM at a time on this host, so ${a.count} clones cannot be restored from it`,
      );
  }
  if (a.count > 1) {
    const missing = saved.nets.filter((n) => !taps.has(n));
    if (missing.length > 0)
      throw new ConfigError(
        `the snapshot's network interface ${missing[0]} needs --tap-pattern ${missing[0]}=NAME%d: ${a.count} clones cannot share one TAP`,
      );
    if (saved.vsock && a.vsockPattern === undefined)
      throw new ConfigError(
        `the snapshot has a vsock device: give --vsock-uds-pattern PATH%d (${a.count} clones cannot listen on one socket path)`,
      );
  }
  if (a.vsockPattern !== undefined && !saved.vsock)
    throw new ConfigError('--vsock-uds-pattern: the snapshot has no vsock device');
  const apiPattern = a.apiSockPattern ?? join(apiDir, 'clone%d.api');
  checkExpanded('--api-sock-pattern', apiPattern, a.count, socketProblem);
  const plans: ClonePlan[] = [];
  for (let i = 0; i < a.count; i++) {
    const nets = [...taps].map(([id, p]) => ({ iface_id: id, host_dev_name: expand(p, i) }));
    plans.push({
      index: i,
      apiSock: expand(apiPattern, i),
      ...(a.consolePattern !== undefined ? { console: expand(a.consolePattern, i) } : {}),
      load: {
        snapshot_path: a.snapshot,
        mem_backend: { backend_type: 'File', backend_path: a.memFile },
        resume_vm: true,
        ...(nets.length > 0 ? { network_overrides: nets } : {}),
        ...(a.vsockPattern !== undefined
          ? { vsock_override: { uds_path: expand(a.vsockPattern, i) } }
          : {}),
      },
    });
  }
  const apis = new Set(plans.map((p) => resolve(p.apiSock)));
  if (apis.size !== plans.length) throw new ConfigError('--api-sock-pattern gives one path twice');
  return plans;
}

/** The bin/typervisor script next to this build (dist/src/cli/clone.js -> bin/typervisor). */
const BIN = new URL('../../../bin/typervisor', import.meta.url).pathname;

interface Clone {
  plan: ClonePlan;
  child: ChildProcess;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  loadMs?: number;
}

function canConnect(sock: string): Promise<boolean> {
  return new Promise((res) => {
    const s = connect(sock);
    s.once('connect', () => {
      s.destroy();
      res(true);
    });
    s.once('error', () => res(false));
  });
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Waits for the clone's API socket, then loads the snapshot into it (resumed). */
async function startClone(c: Clone): Promise<void> {
  const deadline = Date.now() + CLONE_SOCKET_TIMEOUT_MS;
  let gone = false;
  void c.exited.then(() => (gone = true));
  while (!(existsSync(c.plan.apiSock) && (await canConnect(c.plan.apiSock)))) {
    if (gone) throw new Error('its process exited before opening its API socket');
    if (Date.now() > deadline)
      throw new Error(`no API socket ${c.plan.apiSock} after ${CLONE_SOCKET_TIMEOUT_MS / 1000} s`);
    await sleep(10);
  }
  const t0 = monoMs();
  const r = await apiCall(
    c.plan.apiSock,
    'PUT',
    '/snapshot/load',
    c.plan.load,
    CLONE_LOAD_TIMEOUT_MS,
  );
  c.loadMs = monoMs() - t0;
  if (r.status !== 204) throw new Error(`PUT /snapshot/load: ${r.status} ${r.fault ?? ''}`.trim());
}

/** What the snapshot holds that the overrides must cover (read and checked before anything starts). */
function savedDevices(path: string): {
  nets: string[];
  vsock: boolean;
  vhostVsockCid?: number;
  memMib: number;
} {
  const r = readSnapshotFile(path);
  if (!r.ok) throw new ConfigError(`cannot read snapshot ${path}: ${r.error.message}`);
  const cid = savedVhostVsockCid(r.value.config);
  return {
    nets: r.value.devices.filter((d) => d.kind === 'net').map((d) => d.id),
    vsock: r.value.devices.some((d) => d.kind === 'vsock'),
    ...(cid !== undefined ? { vhostVsockCid: cid } : {}),
    memMib: r.value.machine.memMib,
  };
}

/**
 * The guest CID of the saved vsock device when it uses the vhost backend, from the snapshot's
 * configuration (JSON); undefined otherwise, or when it cannot be read (the load says why).
 */
export function savedVhostVsockCid(configJson: string): number | undefined {
  let c: unknown;
  try {
    c = JSON.parse(configJson);
  } catch {
    return undefined;
  }
  const v = (c as { vsock?: { backend?: unknown; guest_cid?: unknown } | null } | null)?.vsock;
  return v?.backend === 'vhost' && typeof v.guest_cid === 'number' ? v.guest_cid : undefined;
}

function openConsole(path: PathLike): number {
  try {
    return openSync(path, 'w');
  } catch (e) {
    throw new ConfigError(
      `--console-pattern: cannot open ${String(path)}: ${(e as Error).message}`,
    );
  }
}

export async function cloneCommand(argv: string[]): Promise<number> {
  if (argv.includes('--help') || argv.includes('-h')) {
    process.stdout.write(CLONE_USAGE + '\n');
    return EXIT_OK;
  }
  let args: CloneArgs;
  let plans: ClonePlan[];
  let memMib: number;
  const apiDir = mkdtempSync(join(tmpdir(), 'typervisor-clone-'));
  try {
    args = parseCloneArgs(argv);
    const saved = savedDevices(args.snapshot);
    memMib = saved.memMib;
    if (!statSync(args.memFile, { throwIfNoEntry: false })?.isFile())
      throw new ConfigError(`--mem-file ${args.memFile}: not a regular file`);
    plans = planClones(args, saved, apiDir);
    for (const p of plans)
      if (existsSync(p.apiSock))
        throw new ConfigError(
          `clone ${p.index}: ${p.apiSock} already exists (another clone's socket?)`,
        );
  } catch (e) {
    rmSync(apiDir, { recursive: true, force: true });
    process.stderr.write(`typervisor: ${(e as Error).message}\n`);
    return EXIT_USAGE;
  }

  const clones: Clone[] = [];
  let stopping = false;
  const killAll = () => {
    for (const c of clones)
      if (c.child.exitCode === null && c.child.signalCode === null) c.child.kill('SIGKILL');
  };
  process.on('exit', killAll); // nothing outlives this command, whatever happens to it
  const stopAll = async (): Promise<void> => {
    stopping = true;
    for (const c of clones)
      if (c.child.exitCode === null && c.child.signalCode === null) c.child.kill('SIGTERM');
    const timer = setTimeout(killAll, CLONE_STOP_TIMEOUT_MS);
    await Promise.all(clones.map((c) => c.exited));
    clearTimeout(timer);
  };
  let signalled: (() => void) | undefined;
  const onSignal = () => signalled?.();
  const signalledP = new Promise<'signal'>((r) => (signalled = () => r('signal')));
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  process.on('SIGHUP', onSignal);

  const report = (): CloneMemory[] => {
    const match = fileMatch(args.memFile);
    const mems: CloneMemory[] = [];
    for (const c of clones) {
      try {
        mems.push(cloneMemory(c.child.pid!, match));
      } catch {
        // ended meanwhile
      }
    }
    return mems;
  };
  const printReport = () => {
    for (const l of formatCloneMemory(report(), memMib)) process.stdout.write(`${l}\n`);
  };

  try {
    for (const plan of plans) {
      const out = plan.console !== undefined ? openConsole(plan.console) : 'ignore';
      let child: ChildProcess;
      try {
        child = spawn(
          process.execPath,
          [BIN, '--api-sock', plan.apiSock, ...(args.logLevel ? ['--level', args.logLevel] : [])],
          { stdio: ['ignore', out, 'pipe'], detached: true },
        );
      } finally {
        if (typeof out === 'number') closeSync(out);
      }
      const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((r) =>
        child.on('exit', (code, signal) => r({ code, signal })),
      );
      child.on('error', (e) =>
        process.stderr.write(`typervisor: clone ${plan.index}: ${e.message}\n`),
      );
      let partial = '';
      child.stderr!.setEncoding('utf8').on('data', (s: string) => {
        const lines = (partial + s).split('\n');
        partial = lines.pop()!;
        for (const l of lines) process.stderr.write(`clone ${plan.index}: ${l}\n`);
      });
      clones.push({ plan, child, exited });
    }
    const started = Promise.allSettled(clones.map((c) => startClone(c)));
    const first = await Promise.race([started, signalledP]);
    if (first === 'signal') {
      await stopAll();
      return EXIT_OK;
    }
    const failed = first.flatMap((r, i) =>
      r.status === 'rejected' ? [[i, r.reason as Error] as const] : [],
    );
    if (failed.length > 0) {
      for (const [i, e] of failed) process.stderr.write(`typervisor: clone ${i}: ${e.message}\n`);
      process.stderr.write(
        `typervisor: ${failed.length} of ${clones.length} clone(s) failed to start; stopping them all\n`,
      );
      await stopAll();
      return EXIT_FAILED;
    }
    for (const c of clones)
      process.stdout.write(
        `clone ${c.plan.index}: pid ${c.child.pid}, api ${c.plan.apiSock}, running (load ${c.loadMs!.toFixed(1)} ms)\n`,
      );
    if (args.report) printReport();
    process.on('SIGUSR1', printReport);

    // Running: until a signal, or until every clone has ended on its own.
    let bad = false;
    const watched = clones.map((c) =>
      c.exited.then(({ code, signal }) => {
        if (stopping) return;
        if (code !== 0) bad = true;
        process.stderr.write(
          `typervisor: clone ${c.plan.index} (pid ${c.child.pid}) ended: ${signal ? `signal ${signal}` : `exit ${code}`}\n`,
        );
      }),
    );
    const end = await Promise.race([Promise.all(watched).then(() => 'done' as const), signalledP]);
    if (end === 'signal') {
      await stopAll();
      return bad ? EXIT_FAILED : EXIT_OK;
    }
    return bad ? EXIT_FAILED : EXIT_OK;
  } catch (e) {
    process.stderr.write(`typervisor: ${(e as Error).message}\n`);
    await stopAll();
    return e instanceof ConfigError ? EXIT_USAGE : EXIT_FAILED;
  } finally {
    process.off('SIGUSR1', printReport);
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    process.off('SIGHUP', onSignal);
    rmSync(apiDir, { recursive: true, force: true });
  }
}

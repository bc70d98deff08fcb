/**
 * API mode's start-up (issue 18): `typervisor --api-sock S`, exec'd as a user runs it, from
 * spawn to the first `GET /` answered over S, in wall ms and the process's CPU ms by then:
 *  - every thread's schedstat run time (ns resolution; threads that already ended are missing),
 *  - /proc/PID/stat utime+stime (every thread, ended ones included; clock ticks, 10 ms steps),
 *  - the main thread's own schedstat.
 * Beside a bare Node floor (`node` with an HTTP server on a Unix socket, the launcher's
 * environment) and any other launchers given (`--base PATH`: e.g. a copy of an older build),
 * interleaved with the order rotating every round; medians (min-max).
 *
 * `node dist/bench/api-start.js [--runs N] [--base PATH]... [--json]`; also run by the start-up
 * suite (bench/run.ts, `--suite startup`). See docs/bench.md "API mode start-up".
 */
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, readdirSync, rmSync } from 'node:fs';
import { request } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';
import { TYPERVISOR, stat as statOf, type Row, type Stat } from './common.js';

const stat = (xs: number[]): Stat => statOf(xs) ?? { median: NaN, min: NaN, max: NaN, n: 0 };

/** One thing that serves HTTP on a Unix socket: the command, given the socket's path. */
export interface ApiStarter {
  name: string;
  argv: (sock: string) => string[];
}

/** Node with nothing but an HTTP server on the socket: what any Node VMM pays at least. */
const FLOOR_SRC = "require('node:http').createServer((q,s)=>s.end('{}')).listen(process.argv[1])";

export function floorStarter(): ApiStarter {
  return {
    name: 'bare node (floor)',
    argv: (sock) => [
      '/usr/bin/env',
      '-u',
      'NODE_EXTRA_CA_CERTS',
      process.execPath,
      '-e',
      FLOOR_SRC,
      sock,
    ],
  };
}

export function launcherStarter(name: string, launcher: string): ApiStarter {
  return { name, argv: (sock) => [launcher, '--api-sock', sock] };
}

export interface ApiStartSample {
  wallMs: number;
  /** Sum of every live thread's schedstat run time. */
  threadsCpuMs: number;
  /** utime + stime from /proc/PID/stat (process-wide, 10 ms ticks). */
  statCpuMs: number;
  /** The main thread's schedstat run time. */
  mainCpuMs: number;
}

const TICK_MS = 10; // USER_HZ 100 on Linux

function schedMs(path: string): number {
  try {
    return Number(readFileSync(path, 'utf8').split(' ')[0]) / 1e6;
  } catch {
    return 0; // the thread ended meanwhile
  }
}

function cpuNow(pid: number): Omit<ApiStartSample, 'wallMs'> {
  let threads = 0;
  for (const tid of readdirSync(`/proc/${pid}/task`))
    threads += schedMs(`/proc/${pid}/task/${tid}/schedstat`);
  const f = readFileSync(`/proc/${pid}/stat`, 'utf8');
  // Fields after the command's closing parenthesis: utime is field 14, stime 15 (1-based).
  const rest = f.slice(f.lastIndexOf(')') + 2).split(' ');
  const ticks = Number(rest[11]) + Number(rest[12]);
  return {
    threadsCpuMs: threads,
    statCpuMs: ticks * TICK_MS,
    mainCpuMs: schedMs(`/proc/${pid}/schedstat`),
  };
}

/** GET / over the socket: resolves with the status, or rejects (not listening yet). */
function getRoot(sock: string): Promise<number> {
  return new Promise((resolve, reject) => {
    const r = request({ socketPath: sock, path: '/', method: 'GET', agent: false }, (res) => {
      res.resume();
      resolve(res.statusCode ?? 0);
    });
    r.on('error', reject);
    r.end();
  });
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** One cold start: spawn -> the first answer to GET /, sampled then; the process is killed. */
export async function apiStartOnce(s: ApiStarter, dir: string): Promise<ApiStartSample> {
  const sock = join(dir, 'api.sock');
  rmSync(sock, { force: true });
  const [cmd, ...args] = s.argv(sock);
  const t0 = performance.now();
  const child = spawn(cmd!, args, { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  child.stderr!.on('data', (b: Buffer) => (stderr += b.toString()));
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  try {
    for (;;) {
      if (existsSync(sock)) {
        const status = await getRoot(sock).catch(() => -1);
        if (status >= 0) {
          const wallMs = performance.now() - t0;
          const cpu = cpuNow(child.pid!);
          if (status !== 200) throw new Error(`GET / answered ${status}`);
          return { wallMs, ...cpu };
        }
      }
      if (child.exitCode !== null) throw new Error(`exited (${child.exitCode}) before answering`);
      if (performance.now() - t0 > 20_000) throw new Error('no answer within 20 s');
      await sleep(0.2);
    }
  } catch (e) {
    throw new Error(`${s.name}: ${(e as Error).message}\n${stderr.slice(-1000)}`);
  } finally {
    child.kill('SIGKILL');
    await exited;
    rmSync(sock, { force: true });
  }
}

export interface ApiStartResult {
  name: string;
  wall: Stat;
  threadsCpu: Stat;
  statCpu: Stat;
  mainCpu: Stat;
}

export async function apiStartBench(
  starters: ApiStarter[],
  runs: number,
  log: (s: string) => void = () => {},
): Promise<ApiStartResult[]> {
  const dir = mkdtempSync(join(tmpdir(), 'typervisor-bench-api-start-'));
  const samples = starters.map(() => [] as ApiStartSample[]);
  try {
    for (let r = 0; r < runs; r++) {
      for (let k = 0; k < starters.length; k++) {
        const i = (k + r) % starters.length;
        samples[i]!.push(await apiStartOnce(starters[i]!, dir));
      }
      log(`api-start: round ${r + 1}/${runs} done`);
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  return starters.map((s, i) => {
    const xs = samples[i]!;
    return {
      name: s.name,
      wall: stat(xs.map((x) => x.wallMs)),
      threadsCpu: stat(xs.map((x) => x.threadsCpuMs)),
      statCpu: stat(xs.map((x) => x.statCpuMs)),
      mainCpu: stat(xs.map((x) => x.mainCpuMs)),
    };
  });
}

const cell = (s: Stat) => `${s.median.toFixed(1)} (${s.min.toFixed(1)}–${s.max.toFixed(1)})`;

export function apiStartTable(results: ApiStartResult[]): string {
  const lines = [
    '| launcher | exec → GET / answered, ms | CPU ms, all threads (schedstat) | CPU ms, /proc/PID/stat (10 ms ticks) | CPU ms, main thread |',
    '|---|---|---|---|---|',
  ];
  for (const r of results)
    lines.push(
      `| ${r.name} | ${cell(r.wall)} | ${cell(r.threadsCpu)} | ${cell(r.statCpu)} | ${cell(r.mainCpu)} |`,
    );
  return lines.join('\n');
}

/** The start-up suite's rows: this tree's launcher (typervisor column), no QEMU counterpart. */
export async function apiStartRows(runs: number, log: (s: string) => void): Promise<Row[]> {
  const [tv, floor] = await apiStartBench(
    [launcherStarter('typervisor', TYPERVISOR), floorStarter()],
    runs,
    log,
  );
  return [
    {
      suite: 'micro',
      metric: 'API: exec → GET / answered (bench/api-start.ts)',
      unit: 'ms',
      note: `bare Node floor ${floor!.wall.median.toFixed(1)} ms`,
      typervisor: tv!.wall,
    },
    {
      suite: 'micro',
      metric: 'API: CPU ms by GET / answered (all threads)',
      unit: 'ms',
      note: `bare Node floor ${floor!.threadsCpu.median.toFixed(1)} ms; Firecracker: ≤ 8`,
      typervisor: tv!.threadsCpu,
    },
  ];
}

async function main() {
  const { values: v } = parseArgs({
    options: {
      runs: { type: 'string', default: '10' },
      base: { type: 'string', multiple: true, default: [] },
      json: { type: 'boolean', default: false },
    },
  });
  const runs = Number(v.runs);
  if (!Number.isInteger(runs) || runs < 1 || runs > 1000) {
    process.stderr.write('api-start: --runs takes 1-1000\n');
    process.exit(2);
  }
  const starters = [launcherStarter('this tree', TYPERVISOR)];
  for (const b of v.base!) {
    if (!existsSync(b)) {
      process.stderr.write(`api-start: --base ${b}: no such launcher\n`);
      process.exit(2);
    }
    starters.push(launcherStarter(b, b));
  }
  starters.push(floorStarter());
  const res = await apiStartBench(starters, runs, (s) => process.stderr.write(`${s}\n`));
  process.stdout.write(
    v.json
      ? `${JSON.stringify(res)}\n`
      : `${apiStartTable(res)}\n\n${runs} interleaved rounds; medians (min–max).\n`,
  );
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  main().catch((e) => {
    process.stderr.write(`api-start: ${(e as Error).stack ?? e}\n`);
    process.exit(1);
  });
}

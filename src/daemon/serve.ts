/**
 * `typervisor serve`: the host daemon (docs/daemon.md). An HTTP API on a Unix socket (0600, the
 * wire behaviour of the Firecracker-compatible server, src/api/server.ts) that creates VMs from a
 * warm pool, each with its own Firecracker-compatible API socket in the state directory.
 */
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { Counters } from '../api/metrics.js';
import { DEFAULT_MAX_PAYLOAD, startApiServer } from '../api/server.js';
import { log } from '../util/log.js';
import { applySeccomp, seccompSettingsFromFlags } from '../sandbox/seccomp/options.js';
import { routeDaemon, type DaemonAction } from './api.js';
import { MODES, type Backend, type Mode } from './backend.js';
import { Daemon, DEFAULT_MAX_VMS } from './daemon.js';
import { ProcessBackend } from './process-backend.js';
import { StateDir } from './state.js';
import { HEAP_CAPS, HEAP_REEXEC_ENV, heapReexec, type HeapCap } from './heap.js';
import { execInPlace } from '../sandbox/exec.js';
import { mallocTrim } from '../vmm/malloc-trim.js';
import { IdleTrim, TRIM_IDLE_MS } from './trim.js';

export const DEFAULT_POOL = 2;
/** The pool's largest size: each warm VMM process costs ~40 MB of RSS. */
export const MAX_POOL = 64;
export const MAX_VMS_LIMIT = 4096;

export const SERVE_USAGE = `usage: typervisor serve --socket PATH [options]
The host daemon: creates VMs from a warm pool over an HTTP API on a Unix socket (docs/daemon.md).
  --socket PATH      the daemon's API socket (created 0600)
  --pool N           warm VMM capacity kept ready (default ${DEFAULT_POOL}, at most ${MAX_POOL})
  --mode M           process (default: a VMM process per VM) or shared (VMs in this process)
  --state-dir DIR    VM API sockets and process records (default $TMPDIR/typervisor-serve-UID)
  --max-vms N        VMs running at once (default ${DEFAULT_MAX_VMS}, at most ${MAX_VMS_LIMIT})
  --max-payload N    largest request body in bytes (default ${DEFAULT_MAX_PAYLOAD})
  --no-seccomp       no seccomp filters (shared mode: this process's; process mode: the VMMs')
  --heap-cap C       small (default: this process runs with a fixed V8 young generation, its
                     RSS flat over any number of VMs) or none (V8's own sizing)`;

export interface ServeArgs {
  socket: string;
  pool: number;
  mode: Mode;
  stateDir: string;
  maxVms: number;
  maxPayload: number;
  noSeccomp: boolean;
  heapCap: HeapCap;
}

function intFlag(
  v: string | undefined,
  name: string,
  def: number,
  min: number,
  max: number,
): number {
  if (v === undefined) return def;
  const n = Number(v);
  if (!/^\d+$/.test(v) || n < min || n > max)
    throw new Error(
      `--${name} must be a whole number from ${min} to ${max} (got "${v.slice(0, 40)}")`,
    );
  return n;
}

export function parseServeArgs(argv: string[]): ServeArgs {
  const { values: v } = parseArgs({
    args: argv,
    strict: true,
    allowPositionals: false,
    options: {
      socket: { type: 'string' },
      pool: { type: 'string' },
      mode: { type: 'string' },
      'state-dir': { type: 'string' },
      'max-vms': { type: 'string' },
      'max-payload': { type: 'string' },
      'no-seccomp': { type: 'boolean' },
      'heap-cap': { type: 'string' },
    },
  });
  if (v.socket === undefined) throw new Error('--socket PATH is required');
  const mode = (v.mode ?? 'process') as Mode;
  if (!MODES.includes(mode)) throw new Error(`--mode must be process or shared (got "${v.mode}")`);
  const heapCap = (v['heap-cap'] ?? 'small') as HeapCap;
  if (!HEAP_CAPS.includes(heapCap))
    throw new Error(`--heap-cap must be small or none (got "${v['heap-cap']}")`);
  const uid = process.getuid?.() ?? 0;
  return {
    socket: resolve(v.socket),
    pool: intFlag(v.pool, 'pool', DEFAULT_POOL, 0, MAX_POOL),
    mode,
    stateDir: resolve(v['state-dir'] ?? join(tmpdir(), `typervisor-serve-${uid}`)),
    maxVms: intFlag(v['max-vms'], 'max-vms', DEFAULT_MAX_VMS, 1, MAX_VMS_LIMIT),
    maxPayload: intFlag(v['max-payload'], 'max-payload', DEFAULT_MAX_PAYLOAD, 1024, 1 << 24),
    noSeccomp: v['no-seccomp'] ?? false,
    heapCap,
  };
}

async function backendFor(args: ServeArgs, state: StateDir): Promise<Backend> {
  if (args.mode === 'process')
    return new ProcessBackend(args.pool, state, args.noSeccomp ? ['--no-seccomp'] : []);
  // Shared mode runs guests here: this process takes the VMM's own filters (the API mode's:
  // main, vcpu, device roles), before the first worker is prewarmed. Process mode installs none
  // here: a filter is inherited across fork and exec and stacks with the child's own, so a
  // daemon filter would have to allow every syscall of every VMM role besides process
  // creation; each VMM process installs its own filters itself.
  if (!args.noSeccomp)
    log('info', `daemon: ${applySeccomp(seccompSettingsFromFlags(false, undefined))}`);
  const { SharedBackend } = await import('./shared-backend.js');
  return new SharedBackend(args.pool, { noSeccomp: args.noSeccomp });
}

/**
 * `--heap-cap small`: runs this process again (execve: the same pid, nothing started yet) with
 * the daemon's V8 heap flags (src/daemon/heap.ts); returns only when it need not, or when the
 * execve failed (then the daemon runs on with V8's own sizing, and says so).
 */
function reexecWithHeapFlags(cap: HeapCap): void {
  const marked = process.env[HEAP_REEXEC_ENV] !== undefined;
  // Not passed on: VMM processes (process mode) and anything else this daemon starts.
  delete process.env[HEAP_REEXEC_ENV];
  if (marked) return;
  const r = heapReexec(cap, process);
  if (!r) return;
  try {
    execInPlace(r.path, r.argv, r.env);
  } catch (e) {
    log(
      'warn',
      `daemon: no heap cap (re-executing with ${r.argv.join(' ')}: ${(e as Error).message})`,
    );
  }
}

export async function serveCommand(argv: string[]): Promise<number> {
  if (argv.includes('--help') || argv.includes('-h')) {
    process.stdout.write(SERVE_USAGE + '\n');
    return 0;
  }
  let args: ServeArgs;
  try {
    args = parseServeArgs(argv);
  } catch (e) {
    process.stderr.write(`typervisor serve: ${(e as Error).message}\n`);
    return 2;
  }
  reexecWithHeapFlags(args.heapCap);
  const state = new StateDir(args.stateDir);
  try {
    state.prepare();
    state.claim();
  } catch (e) {
    process.stderr.write(`typervisor serve: ${(e as Error).message}\n`);
    return 1;
  }
  const stale = state.cleanStale();
  if (stale.killed.length > 0 || stale.removed.length > 0)
    log(
      'info',
      `daemon: cleaned up after an earlier daemon: ended VMM processes [${stale.killed.join(', ')}], removed ${stale.removed.length} files`,
    );
  const counters = new Counters();
  const backend = await backendFor(args, state);
  // Shared mode: the V8 heaps collected and glibc's arenas trimmed when the daemon goes idle
  // (trim.ts; docs/daemon.md "Memory").
  const collect = backend.collectGarbage?.bind(backend);
  const trim = args.mode === 'shared' ? new IdleTrim(mallocTrim, TRIM_IDLE_MS, collect) : undefined;
  const daemon = new Daemon(backend, state, counters, args.maxVms, trim);
  let server;
  try {
    server = await startApiServer<DaemonAction>({
      socketPath: args.socket,
      maxPayload: args.maxPayload,
      counters,
      route: routeDaemon,
      concurrent: true,
      handle: (a) => daemon.handle(a),
    });
  } catch (e) {
    process.stderr.write(`typervisor serve: ${(e as Error).message}\n`);
    await daemon.shutdown();
    state.release();
    return 1;
  }
  log(
    'info',
    `daemon: serving on ${args.socket} (${args.mode} mode, pool ${args.pool}, state ${args.stateDir})`,
  );
  let stopping: Promise<void> | undefined;
  const done = new Promise<void>((resolveDone) => {
    const stop = (sig: NodeJS.Signals) => {
      if (stopping) {
        // A second signal: out now (the VMM processes are ended by the next daemon's start).
        process.stderr.write(`typervisor serve: ${sig} while stopping: exiting at once\n`);
        process.exit(1);
      }
      stopping = (async () => {
        log('info', 'daemon: stopping every VM');
        await server.close();
        await daemon.shutdown();
        state.release();
      })().then(resolveDone);
    };
    process.on('SIGTERM', stop);
    process.on('SIGINT', stop);
  });
  await done;
  return 0;
}

/**
 * Node options for the threads the VMM starts. A Worker inherits process.execArgv, and Node
 * refuses some of it in a worker: a program run as `node --input-type=module -e '...'` (an
 * embedder of the library) gave every vCPU worker "--input-type can only be used with string
 * input". The script options (-e/--eval, -p/--print with their text, --input-type) concern the
 * main script only and are left out; every other option (--cpu-prof, ...) stays.
 */
import { Worker, type WorkerOptions } from 'node:worker_threads';
import { VMM_STACK_SOFT_KIB } from './stack-limit.js';

const WITH_VALUE = new Set(['-e', '--eval', '-p', '--print', '--input-type', '-pe']);
const ALONE = new Set(['-i', '--interactive']);

/** process.execArgv without the main script's options; undefined when it has none of them. */
export function workerExecArgv(argv: readonly string[] = process.execArgv): string[] | undefined {
  const out: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (WITH_VALUE.has(a)) {
      i++; // its value
      continue;
    }
    if (ALONE.has(a) || /^--(eval|print|input-type)=/.test(a)) continue;
    out.push(a);
  }
  return out.length === argv.length ? undefined : out;
}

/**
 * A worker thread's stack, MiB (Node's default is 4): under 2 MiB, as the stack limit makes
 * every other thread's (util/stack-limit.ts), so that no 2 MiB page can back it where THP is
 * `always`, neither at its first fault nor later by khugepaged. V8 keeps 192 KiB of it for
 * itself: JS gets ~1.56 MiB, more than the main thread's 984 KiB.
 */
export const WORKER_STACK_MB = VMM_STACK_SOFT_KIB / 1024;

/**
 * A Worker with workerExecArgv(): inherited as Node does when there is nothing to leave out.
 * Given explicitly, execArgv must not hold per-process or V8 options (`--expose-gc`: Node
 * throws ERR_WORKER_INVALID_EXEC_ARGV, where it silently accepts them inherited); then the
 * worker gets none (V8's flags are the process's anyway). Its stack is WORKER_STACK_MB unless
 * `opts.resourceLimits` says otherwise.
 */
export function newWorker(url: URL | string, options: WorkerOptions = {}): Worker {
  const opts = {
    ...options,
    resourceLimits: { stackSizeMb: WORKER_STACK_MB, ...options.resourceLimits },
  };
  const execArgv = workerExecArgv();
  if (!execArgv) return new Worker(url, opts);
  try {
    return new Worker(url, { ...opts, execArgv });
  } catch (e) {
    if ((e as { code?: string }).code !== 'ERR_WORKER_INVALID_EXEC_ARGV') throw e;
    return new Worker(url, { ...opts, execArgv: [] });
  }
}

/**
 * Installing the filters, per thread role (docs/security.md).
 *
 * Order, and why each role ends with exactly its list:
 * 1. The main thread calls installProcessFilter() once the VMM's command line is read and before
 *    any VM is built. It installs processPolicy() with SECCOMP_FILTER_FLAG_TSYNC: every thread
 *    of the process gets it, the ones Node started before us included (V8 platform workers, the
 *    libuv pool, prewarmed vCPU workers still waiting for their start message). TSYNC works
 *    only while no thread has a filter of its own, which holds at that point.
 * 2. Each vCPU or device worker calls installWorkerFilter() when its start-up is done (modules
 *    loaded, memory mapped, devices built). Its own list stacks on the inherited one; since the
 *    process list is a superset of each worker list, what the worker may do is its own list.
 *    Threads created later inherit their creator's filters (kernel: copy_seccomp at clone).
 * The settings travel to workers as environment data (worker_threads.setEnvironmentData,
 * copied into each Worker created after it is set): without any, the default filters apply, so
 * VMs built in-process (tests, the API) run their workers filtered too.
 *
 * TYPERVISOR_SECCOMP_AUDIT=<role>|all turns the named role's default action into
 * SECCOMP_RET_LOG: calls outside the list are allowed and logged by the kernel (dmesg, audit
 * type=1326 with syscall=N), which is how the lists were measured. Never for production.
 */
import { getEnvironmentData, setEnvironmentData } from 'node:worker_threads';
import { readFileSync, stat } from 'node:fs';
import { native } from '../../kvm/native.js';
import {
  compilePolicyBytes,
  SECCOMP_FILTER_FLAG_TSYNC,
  SECCOMP_RET_KILL_PROCESS,
  SECCOMP_RET_LOG,
  type Policy,
} from './filter.js';
import { defaultPolicy, processPolicy, LOOP_WATCHER, VCPU_RUNNER, type Role } from './roles.js';

const ENV_KEY = 'typervisor:seccomp';

/** What the VMM was told: the default filters, none (--no-seccomp), or a user's (--seccomp-filter). */
export type SeccompSettings =
  | { mode: 'default' }
  | { mode: 'off' }
  | {
      mode: 'custom';
      policies: Record<Role, Policy>;
      defaultActions: Record<Role, number>;
      source: string;
    };

/**
 * The settings this thread was given by configureSeccomp (the main thread's), and whether they
 * went into the workers' environment data.
 */
let configured: SeccompSettings | undefined;
let shared = false;

/**
 * Sets what this process's workers will install (main thread, before they are created). The
 * default needs no environment data (a worker without any applies the default filters), so
 * a VMM that keeps them does not load node:worker_threads for this: a native-vCPU VM without
 * virtio devices starts no worker at all, and that module (with node:stream under it) was
 * ~1 MiB of its peak RSS.
 */
export function configureSeccomp(s: SeccompSettings): void {
  configured = s;
  if (s.mode === 'default' && !shared) return;
  setEnvironmentData(ENV_KEY, s as never);
  shared = true;
}

export function seccompSettings(): SeccompSettings {
  if (configured) return configured;
  const s = getEnvironmentData(ENV_KEY) as SeccompSettings | undefined;
  return s ?? { mode: 'default' };
}

function policies(s: SeccompSettings): Record<Role, Policy> {
  if (s.mode === 'custom') return s.policies;
  return {
    main: defaultPolicy('main'),
    vcpu: defaultPolicy('vcpu'),
    device: defaultPolicy('device'),
  };
}

function defaultActionFor(role: Role, s: SeccompSettings): number {
  const audit = process.env.TYPERVISOR_SECCOMP_AUDIT;
  if (audit === role || audit === 'all') return SECCOMP_RET_LOG;
  return s.mode === 'custom' ? s.defaultActions[role] : SECCOMP_RET_KILL_PROCESS;
}

/**
 * The default programs compiled when the bundle was made (scripts/bundle.mjs defines this name
 * in the bundles: base64 per role); not defined in dist/. Compiling one costs each thread ~2.5 ms
 * of CPU at start-up; the bytes are the same (`programFor` at build time, from the same code).
 */
declare const __TYPERVISOR_SECCOMP_DEFAULT__: Record<Role, string> | undefined;

function precompiled(role: Role): Uint8Array | undefined {
  if (typeof __TYPERVISOR_SECCOMP_DEFAULT__ === 'undefined') return undefined;
  const b64 = __TYPERVISOR_SECCOMP_DEFAULT__?.[role];
  return b64 === undefined ? undefined : new Uint8Array(Buffer.from(b64, 'base64'));
}

/** The program a role's thread installs (the process filter for 'main'). */
export function programFor(role: Role, s: SeccompSettings = seccompSettings()): Uint8Array {
  if (s.mode === 'default' && process.env.TYPERVISOR_SECCOMP_AUDIT === undefined) {
    const pre = precompiled(role);
    if (pre) return pre;
  }
  const p = policies(s);
  return compilePolicyBytes(
    role === 'main' ? processPolicy(p) : p[role],
    defaultActionFor(role, s),
  );
}

/**
 * Main thread only: the process-wide filter, synchronised to every thread (see the file
 * comment). Returns false when seccomp is off. Throws (with the thread's id) when TSYNC cannot
 * apply. The callers make sure of the thread: the CLI's and the daemon's entry points run on it
 * by construction, and the library (src/lib/host.ts) checks `isMainThread` first. Not checked
 * here: that would load node:worker_threads into every VMM, which a native-vCPU VM without
 * devices has no other use for (configureSeccomp).
 */
export function installProcessFilter(
  s: SeccompSettings = seccompSettings(),
  o: { poolThreads?: number } = {},
): boolean {
  if (s.mode === 'off') return false;
  const prog = programFor('main', s);
  // The libuv pool starts on its first use, from whichever thread asks first: start it here,
  // so its threads are the main thread's children and get this filter (not a worker's).
  startThreadPool(o.poolThreads);
  native().seccompInstall(prog, SECCOMP_FILTER_FLAG_TSYNC);
  return true;
}

/**
 * Starts libuv's thread pool now, from this thread (queued work creates its threads at once).
 * `threads`: how many, unless the user set UV_THREADPOOL_SIZE (libuv reads it once, as the pool
 * starts; it is not left in the environment for the VMM's children). The CLI asks for one: the
 * VMM queues no work of its own there (with --no-seccomp the pool never starts at all), and
 * each of the pool's threads has an 8 MiB stack, which a THP host backs with a 2 MiB page
 * whenever its top is 2 MiB-aligned (seen in the lab: +2 MiB of RSS in most runs of a
 * micro VM with libuv's default four; docs/architecture.md "Start-up"). The library leaves
 * the pool as Node makes it: its embedder's work may run there.
 */
function startThreadPool(threads?: number): void {
  const own = threads !== undefined && process.env.UV_THREADPOOL_SIZE === undefined;
  if (own) process.env.UV_THREADPOOL_SIZE = String(threads);
  // No 2 MiB page under the pool's stacks: libuv creates its threads (and waits for each to
  // start) inside this stat, and glibc writes each thread's descriptor at its stack's top from
  // here, so the stacks' first faults all happen while THP is off for the process (a few ms;
  // the VM's RAM does not exist yet). In the lab the one pool thread's stack was a 2 MiB page
  // in 3 runs of 5. Put back as it was (a parent may have turned it off for us).
  let was: boolean | undefined;
  try {
    was = native().setThpDisable(true);
  } catch {
    // a kernel without PR_SET_THP_DISABLE (before 3.15): the stacks may get 2 MiB pages
  }
  try {
    stat('/', () => {});
  } finally {
    if (was === false) native().setThpDisable(false);
    if (own) delete process.env.UV_THREADPOOL_SIZE;
  }
  // Its first page was small, but khugepaged (max_ptes_none 511 by default) still collapses a
  // range with a single page present into a 2 MiB page: in the lab an idle VMM's pool stack got
  // one between 2 and 15 s after start (+1.5 MiB of RSS). libuv fixes that stack at 8 MiB, so
  // every thread stack that can hold an aligned 2 MiB range gets MADV_NOHUGEPAGE (the pool's;
  // Node's platform threads' too when no launcher set the stack limit).
  try {
    for (const [start, length] of bigThreadStacks(readFileSync('/proc/self/maps', 'latin1')))
      native().noHugePages(start, length);
  } catch {
    // no /proc (a jail: its launcher's limits apply), or a kernel that refused the advice
  }
}

const TWO_MIB = 2n << 20n;

/**
 * The thread stacks in /proc/self/maps text that are 2 MiB or more, as [start, length]: glibc
 * maps a thread's stack with its guard page, one PROT_NONE page, right below it (a 4 KiB `---p`
 * anonymous mapping followed by an anonymous `rw-p` one that starts where the guard ends).
 * A mapping merged with a neighbour above it is returned whole.
 */
export function bigThreadStacks(maps: string): Array<[bigint, bigint]> {
  const out: Array<[bigint, bigint]> = [];
  let guardEnd = -1n;
  for (const line of maps.split('\n')) {
    const m = /^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ (\d+)\s*(.*)$/.exec(line);
    if (!m) continue;
    const start = BigInt(`0x${m[1]}`);
    const end = BigInt(`0x${m[2]}`);
    const anon = m[4] === '0' && m[5] === '';
    if (anon && m[3] === 'rw-p' && start === guardEnd && end - start >= TWO_MIB)
      out.push([start, end - start]);
    guardEnd = anon && m[3] === '---p' && end - start === 4096n ? end : -1n;
  }
  return out;
}

/**
 * A worker thread: its role's filter, stacked on what it inherited. False when seccomp is off.
 * The thread is named after its role first (`threadName`, e.g. tv-vcpu0): ps -T and the
 * kernel's seccomp audit lines (comm=) then tell the roles apart.
 */
export function installWorkerFilter(role: Exclude<Role, 'main'>, threadName?: string): boolean {
  const s = seccompSettings();
  native().setThreadName(threadName ?? `tv-${role}`);
  if (s.mode === 'off') return false;
  native().seccompInstall(programFor(role, s), 0);
  return true;
}

/**
 * The program a vCPU runner thread installs on itself (roles.ts VCPU_RUNNER), or null when
 * seccomp is off. A custom filter file (--seccomp-filter) does not name runners: they keep the
 * default list, which is a subset of the vcpu role's.
 */
export function runnerProgram(s: SeccompSettings = seccompSettings()): Uint8Array | null {
  if (s.mode === 'off') return null;
  const audit = process.env.TYPERVISOR_SECCOMP_AUDIT;
  const action =
    audit === 'vcpu-runner' || audit === 'all' ? SECCOMP_RET_LOG : SECCOMP_RET_KILL_PROCESS;
  return compilePolicyBytes(VCPU_RUNNER, action);
}

/** The program of a loop runner's watcher thread (roles.ts LOOP_WATCHER), or null (seccomp off). */
export function watcherProgram(s: SeccompSettings = seccompSettings()): Uint8Array | null {
  if (s.mode === 'off') return null;
  const audit = process.env.TYPERVISOR_SECCOMP_AUDIT;
  const action =
    audit === 'vcpu-runner' || audit === 'all' ? SECCOMP_RET_LOG : SECCOMP_RET_KILL_PROCESS;
  return compilePolicyBytes(LOOP_WATCHER, action);
}

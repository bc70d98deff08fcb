/**
 * The daemon's V8 heap limits (docs/daemon.md "Memory"). Under the daemon's allocation rate V8
 * grows its young generation (new_space 4 -> 32 MiB reserved, in the main isolate and in every
 * worker) and never gives it back, so the RSS of a shared-mode daemon climbed ~25-35 MiB over
 * its first few thousand VMs with a live heap of ~8 MB. Fixed heap limits keep it flat.
 *
 * V8 takes heap limits from its flags when an isolate is made, so `typervisor serve` puts them on
 * its own command line: it re-executes itself (execve: the same pid, before any worker starts)
 * with DAEMON_HEAP_FLAGS, and an environment marker so that it does so once. A V8 flag changes
 * V8's flag hash, which V8 checks before it takes a code cache: scripts/bundle.mjs makes a
 * second set of caches of the bundles this process runs (main, vcpu-worker, device-worker)
 * under exactly these flags (scripts/bundle-loader.cjs picks them by the flags). Process-mode
 * VMM processes are spawned with `process.execPath CLI ...` and no execArgv: they do not get
 * the flags.
 */

/**
 * The V8 flags of the daemon's process (`--heap-cap small`, the default). Semi-spaces of 1 MiB:
 * the young generation stays at 2 MiB (it grew to 32 MiB). An old generation limit of 1 GiB:
 * not to bound the heap (a shared-mode VM holds ~30 KiB of it: 4,096 VMs fit many times), but
 * because V8 scales how far it lets the old generation grow past its live size between full
 * collections with that limit (a factor of up to 4 above 2 GiB, ~1.3-1.6 below 1 GiB; the
 * default here is ~4 GiB): over a 2,000-VM churn the old space then stops at 14-16 MiB
 * reserved instead of ~19.5 (docs/daemon.md "Memory"). And compaction on every full GC (below).
 */
export const DAEMON_HEAP_FLAGS: readonly string[] = [
  '--max-semi-space-size=1',
  '--max-old-space-size=1024',
  // Every full collection also compacts the old generation, so its pages are given back as the
  // live heap allows (V8 compacts only pages it judges fragmented enough otherwise): a 1,000-VM
  // shared-mode churn after 500 left old space at 11.2 -> 11.2 MiB reserved and RSS +1.4 and
  // -0.7 MiB, against 11.2 -> 13.2 and 11.5 -> 13.5, RSS +4.7 and +4.7, at the same rate.
  '--compact-on-every-full-gc',
  // The global gc(): a shared-mode daemon collects its heaps (its own and its idle vCPU
  // workers') when it goes idle (src/daemon/trim.ts).
  '--expose-gc',
];

/**
 * glibc's malloc tunable the daemon re-executes with (in GLIBC_TUNABLES): a fixed mmap threshold,
 * glibc's own default of 128 KiB. Left dynamic (glibc's default), the threshold rises to the size
 * of any mmapped block freed (up to 32 MiB), and from then on blocks below it are carved out of
 * the arenas, whose free chunks stay resident between live ones. A shared-mode churn (1,000 VMs
 * after 500, with the warm and sustained rounds before it) measured RSS 109.6 → 117.5 and 111.1
 * → 117.8 MiB with it dynamic, 103.4 → 108.3 and 102.0 → 106.7 fixed, at the same rate
 * (docs/daemon.md "Memory").
 */
export const DAEMON_MALLOC_TUNABLE = 'glibc.malloc.mmap_threshold=131072';

/** GLIBC_TUNABLES with the daemon's tunable added, unless the caller set that tunable. */
export function withMallocTunable(current: string | undefined): string {
  if (current === undefined || current === '') return DAEMON_MALLOC_TUNABLE;
  if (current.split(':').some((t) => t.startsWith('glibc.malloc.mmap_threshold='))) return current;
  return `${current}:${DAEMON_MALLOC_TUNABLE}`;
}

/** Set in the environment of the re-executed daemon (and removed there at once). */
export const HEAP_REEXEC_ENV = 'TYPERVISOR_SERVE_REEXEC';

export const HEAP_CAPS = ['small', 'none'] as const;
export type HeapCap = (typeof HEAP_CAPS)[number];

/** A flag's name: `--max-semi-space-size=1` -> `--max-semi-space-size` (`_` read as `-`). */
function flagName(a: string): string {
  const eq = a.indexOf('=');
  return (eq < 0 ? a : a.slice(0, eq)).replace(/_/g, '-');
}

export interface ProcessView {
  execPath: string;
  /** process.execArgv */
  execArgv: readonly string[];
  /** process.argv: [node, script, ...args] */
  argv: readonly string[];
  env: Readonly<Record<string, string | undefined>>;
}

export interface Reexec {
  path: string;
  argv: string[];
  env: Record<string, string>;
}

/**
 * What to execve so that this process runs with the daemon's heap flags, or undefined when it
 * need not: `none`, already re-executed (the marker), or every flag already given (a flag the
 * caller set itself, e.g. another `--max-semi-space-size`, is kept and not overridden).
 * The node options and the script's arguments are kept as they are; NODE_EXTRA_CA_CERTS is
 * left out of the environment (as bin/typervisor does: Node reads that file at every start), and
 * glibc's malloc gets DAEMON_MALLOC_TUNABLE (glibc reads its tunables once, at exec).
 */
export function heapReexec(cap: HeapCap, p: ProcessView): Reexec | undefined {
  if (cap === 'none' || p.env[HEAP_REEXEC_ENV] !== undefined) return undefined;
  const given = new Set(p.execArgv.map(flagName));
  const missing = DAEMON_HEAP_FLAGS.filter((f) => !given.has(flagName(f)));
  if (missing.length === 0 || p.argv.length < 2) return undefined;
  const env: Record<string, string> = {};
  for (const [k, v] of Object.entries(p.env))
    if (v !== undefined && k !== 'NODE_EXTRA_CA_CERTS') env[k] = v;
  env[HEAP_REEXEC_ENV] = '1';
  env.GLIBC_TUNABLES = withMallocTunable(p.env.GLIBC_TUNABLES);
  return {
    path: p.execPath,
    argv: [p.execPath, ...p.execArgv, ...missing, ...p.argv.slice(1)],
    env,
  };
}

/**
 * The soft stack limit (RLIMIT_STACK) a VMM process runs under, and why.
 *
 * glibc gives a thread its stack size from this limit when the creator names none, and so does
 * libuv's uv_thread_create. Node starts its V8 platform threads (four, plus the delayed-task
 * thread) that way, before any of our code runs: under the usual 8 MiB limit each has an 8 MiB
 * stack. Where transparent huge pages are `always` (Debian's default), a stack whose top is
 * 2 MiB-aligned has its first page, written when the thread is made, backed by a 2 MiB page;
 * how often a top lands aligned depends on what was mapped before it, and in some lab boots one
 * of the five did in most runs (+2 MiB of RSS each time: issue 18's peak against QEMU's).
 * A limit under 2 MiB makes every such stack too small to hold an aligned 2 MiB range, so none
 * ever gets one. 1792 KiB leaves the main thread V8's own stack limit (984 KiB) and room for
 * native frames, the environment and arguments (execve allows a quarter of it, 448 KiB, for
 * those). Threads that name their size are not affected: our Node workers are given the same
 * size (util/worker-argv.ts WORKER_STACK_MB); libuv's pool keeps its 8 MiB, started with THP off
 * and then advised MADV_NOHUGEPAGE (src/sandbox/seccomp/install.ts startThreadPool).
 *
 * bin/typervisor and bin/typervisor-jailer set it in their shell line (`ulimit -S -s 1792`)
 * before Node starts; the jailer sets it again before it execs the jailed VMM, whatever
 * started the jailer. The hard limit is left as it is; a hard limit below this leaves the soft
 * one as it is too.
 */
export const VMM_STACK_SOFT_KIB = 1792;

/** What to pass to setrlimit(RLIMIT_STACK): soft and hard in bytes, -1 for unlimited. */
export interface StackLimit {
  soft: number;
  hard: number;
}

function limitValue(text: string): number | undefined {
  if (text === 'unlimited') return -1;
  return /^\d+$/.test(text) ? Number(text) : undefined;
}

/**
 * The stack limit to set, from the text of /proc/self/limits: soft VMM_STACK_SOFT_KIB with the
 * hard limit kept, or undefined when the soft one is that already, the hard one is below it, or
 * the text has no readable "Max stack size" line (then nothing is changed).
 */
export function vmmStackLimit(procLimits: string): StackLimit | undefined {
  const m = /^Max stack size\s+(\S+)\s+(\S+)\s+bytes\s*$/m.exec(procLimits);
  if (!m) return undefined;
  const soft = limitValue(m[1]!);
  const hard = limitValue(m[2]!);
  if (soft === undefined || hard === undefined) return undefined;
  const want = VMM_STACK_SOFT_KIB * 1024;
  if (soft === want || (hard !== -1 && hard < want)) return undefined;
  return { soft: want, hard };
}

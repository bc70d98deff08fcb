/** The exit bound behind stop signals, shared by `typervisor run` and the API mode. */
/**
 * The last resort behind a stop signal: the VMM ends a VM within its own bounds (vCPUs 5 s plus
 * 1 s for a stuck thread, each teardown step 3 s), so this fires only if something else hangs.
 */
export const SIGNAL_EXIT_DEADLINE_MS = 15_000;
const EXIT_STUCK = 1;

/**
 * After SIGTERM, SIGINT or SIGHUP the process ends, whatever else hangs: within
 * SIGNAL_EXIT_DEADLINE_MS, or at once on a second signal, with a one-line reason and exit 1.
 * The commands' own handlers (stop the VM, flush metrics) run as well: these only add a bound.
 */
export function boundExitAfterSignals(): void {
  let first: string | undefined;
  const onSignal = (sig: NodeJS.Signals) => {
    if (first !== undefined) {
      process.stderr.write(
        `typervisor: ${sig} after ${first}: exiting without waiting for the VM\n`,
      );
      process.exit(EXIT_STUCK);
    }
    first = sig;
    const t = setTimeout(() => {
      process.stderr.write(
        `typervisor: still running ${SIGNAL_EXIT_DEADLINE_MS / 1000} s after ${sig}: exiting\n`,
      );
      process.exit(EXIT_STUCK);
    }, SIGNAL_EXIT_DEADLINE_MS);
    t.unref();
  };
  for (const sig of ['SIGTERM', 'SIGINT', 'SIGHUP'] as const) process.on(sig, onSignal);
}

/**
 * The command-line side of seccomp, shared by `typervisor run` and the Firecracker-style entry:
 * `--no-seccomp` and `--seccomp-filter FILE` (mutually exclusive, as in Firecracker).
 */
import { configureSeccomp, installProcessFilter, type SeccompSettings } from './install.js';
import { loadUserFilter } from './user-filter.js';

/** The settings the flags ask for; throws (FilterFileError, Error) on a bad combination or file. */
export function seccompSettingsFromFlags(
  noSeccomp: boolean,
  filterPath: string | undefined,
): SeccompSettings {
  if (noSeccomp && filterPath !== undefined)
    throw new Error('--no-seccomp and --seccomp-filter cannot be used together');
  if (noSeccomp) return { mode: 'off' };
  if (filterPath === undefined) return { mode: 'default' };
  const f = loadUserFilter(filterPath);
  return {
    mode: 'custom',
    policies: f.policies,
    defaultActions: f.defaultActions,
    source: filterPath,
  };
}

/**
 * Main thread, before any VM is built: records the settings for the workers to come and installs
 * the process filter. Returns a one-line description for the log.
 */
export function applySeccomp(s: SeccompSettings): string {
  configureSeccomp(s);
  // One thread in libuv's pool, which the VMM does not use (install.ts startThreadPool).
  if (!installProcessFilter(s, { poolThreads: 1 })) return 'seccomp: off (--no-seccomp)';
  return s.mode === 'custom' ? `seccomp: filters from ${s.source}` : 'seccomp: default filters';
}

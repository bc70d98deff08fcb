/**
 * The `typervisor-jailer` command (bin/typervisor-jailer): Firecracker's jailer for Typervisor.
 * Exit codes: 0 (help, version, or the parent of a spawned VMM), 1 for anything that stopped the
 * jail (a bad argument changes nothing on the host; a failure later names the failing step).
 */
import { closeSync, openSync, readFileSync, readSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { TypervisorError } from '../util/errors.js';
import { JAILER_USAGE, parseJailerArgs, type PathProbe } from './args.js';
import { packageRoot, runJail, startTimes } from './jail.js';

export const EXIT_JAILER_ERROR = 1;

/** The real file system's answers for the argument checks. */
export const hostProbe: PathProbe = {
  kind(path) {
    const s = statSync(path, { throwIfNoEntry: false });
    return s === undefined ? 'missing' : s.isFile() ? 'file' : 'other';
  },
  head(path) {
    const b = new Uint8Array(4);
    const fd = openSync(path, 'r');
    try {
      readSync(fd, b, 0, 4, 0);
    } finally {
      closeSync(fd);
    }
    return b;
  },
};

function main(argv: string[]): number {
  const t = startTimes();
  const parsed = parseJailerArgs(argv, hostProbe);
  if (parsed.kind === 'help') {
    process.stdout.write(`${JAILER_USAGE}\n`);
    return 0;
  }
  if (parsed.kind === 'version') {
    const pkg = JSON.parse(readFileSync(join(packageRoot(), 'package.json'), 'utf8')) as {
      version: string;
    };
    process.stdout.write(`typervisor-jailer ${pkg.version}\n`);
    return 0;
  }
  if (process.getuid!() !== 0)
    throw new TypervisorError(
      'typervisor-jailer must run as root (it mounts, mknods and drops to --uid)',
    );
  runJail(parsed.config, t); // returns only in the parent of a spawned VMM
  return 0;
}

try {
  process.exitCode = main(process.argv.slice(2));
} catch (e) {
  // Ours, a failed syscall of the shim (it names the call and errno) or of node:fs (the path):
  // one line. Anything else is a bug: its stack.
  const oneLine =
    e instanceof TypervisorError ||
    (e instanceof Error && typeof (e as { code?: unknown }).code === 'string');
  const msg = oneLine
    ? (e as Error).message
    : e instanceof Error
      ? (e.stack ?? e.message)
      : String(e);
  process.stderr.write(`typervisor-jailer: ${msg}\n`);
  process.exitCode = EXIT_JAILER_ERROR;
}

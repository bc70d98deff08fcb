/**
 * Opening `log_path` and `metrics_path` (PUT /logger, PUT /metrics, --log-path, --metrics-path,
 * the config file's logger and metrics blocks) without handing the VMM's privileges to whoever
 * can write the directory they are in.
 *
 * Firecracker opens both with open_file_nonblock() (src/vmm/src/utils/mod.rs): read + write +
 * O_NONBLOCK + create, so a FIFO with no reader yet neither blocks nor fails with ENXIO, and a
 * missing path becomes a file. We keep that, and add:
 * - O_NOFOLLOW: a symlink as the last component is refused (ELOOP), so a local user cannot
 *   point a root VMM's log at /etc/shadow from a directory they can write;
 * - mode 0600 when the file is created (never wider, whatever the umask);
 * - what was opened is checked on the descriptor (fstat): a FIFO, or a regular file with one
 *   link (a hard link to another file is refused), nothing else (no devices, sockets or
 *   directories);
 * - O_APPEND (no effect on a FIFO): Firecracker opens without it and so overwrites an existing
 *   file from offset 0; we append, which never destroys what was there.
 * - O_CLOEXEC (node:fs adds it to every open): the descriptor does not reach child processes.
 */
import { closeSync, constants, fstatSync, openSync } from 'node:fs';
import { ConfigError } from '../util/errors.js';

/** Linux O_NOFOLLOW (node:fs.constants has it on Linux; spelled out so the intent is visible). */
const O_NOFOLLOW = constants.O_NOFOLLOW;
export const OUTPUT_FILE_MODE = 0o600;

/** The reasons an output path is refused, in words (ELOOP with O_NOFOLLOW means a symlink). */
function reason(e: NodeJS.ErrnoException): string {
  switch (e.code) {
    case 'ELOOP':
      return 'it is a symbolic link (refused: give the real path)';
    case 'ENOENT':
      return 'its directory does not exist';
    case 'EISDIR':
      return 'it is a directory';
    case 'EACCES':
    case 'EPERM':
      return 'permission denied';
    case 'ENXIO':
    case 'ENODEV':
      return 'it is a device or socket, not a file or FIFO';
    default:
      return e.code ?? e.message;
  }
}

/**
 * Opens `path` for the logger or the metrics (`field` names the field in errors); returns the
 * descriptor, which the caller owns. Throws ConfigError naming the field, the path and why.
 */
export function openOutputFile(field: string, path: string): number {
  if (typeof path !== 'string' || path === '' || path.includes('\0'))
    throw new ConfigError(`${field}: not a valid path`);
  let fd: number;
  try {
    fd = openSync(
      path,
      constants.O_RDWR |
        constants.O_CREAT |
        constants.O_APPEND |
        constants.O_NONBLOCK |
        O_NOFOLLOW |
        constants.O_NOCTTY,
      OUTPUT_FILE_MODE,
    );
  } catch (e) {
    throw new ConfigError(`${field} ${path}: cannot open: ${reason(e as NodeJS.ErrnoException)}`);
  }
  try {
    const st = fstatSync(fd);
    if (st.isFIFO()) return fd;
    if (!st.isFile())
      throw new ConfigError(`${field} ${path}: not a regular file or FIFO (refused)`);
    if (st.nlink > 1) {
      throw new ConfigError(
        `${field} ${path}: the file has ${st.nlink} hard links (refused: it may be another file's name)`,
      );
    }
    return fd;
  } catch (e) {
    closeSync(fd);
    throw e;
  }
}

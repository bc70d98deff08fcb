/**
 * Opening the host files a VM is made from (kernel, initrd, drive images) so that the file
 * checked is the file used: each is opened once, its type and size come from fstat on that
 * descriptor (never from a stat of the path before or after), and the content is read from that
 * same descriptor. Swapping the path between a check and an open therefore changes nothing: there
 * is no second look-up.
 *
 * O_NONBLOCK on every open: a FIFO named as an image must not hang the VMM in open(2) (it is
 * refused by the type check). Errors are ConfigErrors that name the field (kernel_image_path,
 * initrd_path, path_on_host...), the path and the reason.
 */
import { closeSync, constants, fstatSync, openSync, readSync, type Stats } from 'node:fs';
import { ConfigError } from '../util/errors.js';

/** The largest kernel or initrd read into memory (guest RAM must hold it anyway). */
export const MAX_BOOT_IMAGE_BYTES = 1024 * 1024 * 1024;

export interface HostFileOptions {
  /** Open read-write (a writable drive); default read-only. */
  write?: boolean;
  /** A block device is accepted (a drive with allow_block_device); default: regular files only. */
  allowBlockDevice?: boolean;
  /** The text that tells the user how to allow a block device (named in the refusal). */
  blockDeviceHint?: string;
}

export interface OpenedHostFile {
  fd: number;
  /** fstat of `fd`: what was checked. */
  stat: Stats;
}

function fileType(st: Stats): string {
  if (st.isDirectory()) return 'a directory';
  if (st.isBlockDevice()) return 'a block device';
  if (st.isCharacterDevice()) return 'a character device';
  if (st.isFIFO()) return 'a FIFO';
  if (st.isSocket()) return 'a socket';
  return 'not a regular file';
}

function openError(field: string, path: string, e: NodeJS.ErrnoException, write: boolean): string {
  const why =
    e.code === 'ENOENT'
      ? 'does not exist'
      : e.code === 'ENOTDIR'
        ? 'is not reachable (a component of the path is not a directory)'
        : e.code === 'EISDIR'
          ? 'is a directory, not a regular file'
          : e.code === 'EACCES' || e.code === 'EPERM'
            ? write
              ? 'is not writable (or not readable) by this user'
              : 'is not readable by this user'
            : e.code === 'EROFS'
              ? 'is on a read-only file system (attach it read-only)'
              : `cannot be opened (${e.code ?? e.message})`;
  return `${field} ${path} ${why}`;
}

/**
 * Opens `path` once and checks the descriptor: a regular file, or a block device when allowed.
 * The caller owns `fd`. Throws ConfigError.
 */
export function openHostFile(
  field: string,
  path: string,
  opts: HostFileOptions = {},
): OpenedHostFile {
  if (typeof path !== 'string' || path === '' || path.includes('\0'))
    throw new ConfigError(`${field}: not a valid path`);
  let fd: number;
  try {
    fd = openSync(
      path,
      (opts.write ? constants.O_RDWR : constants.O_RDONLY) |
        constants.O_NONBLOCK |
        constants.O_NOCTTY,
    );
  } catch (e) {
    throw new ConfigError(openError(field, path, e as NodeJS.ErrnoException, !!opts.write));
  }
  try {
    const stat = fstatSync(fd);
    if (stat.isBlockDevice() && !opts.allowBlockDevice) {
      throw new ConfigError(
        `${field} ${path} is a block device; refused unless asked for explicitly${opts.blockDeviceHint ? ` (${opts.blockDeviceHint})` : ''}`,
      );
    }
    if (!stat.isFile() && !stat.isBlockDevice())
      throw new ConfigError(`${field} ${path} is ${fileType(stat)}, not a regular file`);
    return { fd, stat };
  } catch (e) {
    closeSync(fd);
    throw e;
  }
}

/**
 * A kernel or initrd: opened once, a non-empty regular file of at most `max` bytes, read whole
 * from that descriptor (its size taken from the same fstat). A file that shrinks while it is
 * read is refused; one that grows is read up to the size checked.
 */
export function readBootImage(
  field: string,
  path: string,
  max: number = MAX_BOOT_IMAGE_BYTES,
  /** Read only the first `head` bytes (the checks are the same): a look at the header. */
  head?: number,
): Uint8Array {
  const { fd, stat } = openHostFile(field, path);
  try {
    if (stat.size === 0) throw new ConfigError(`${field} ${path} is empty`);
    if (stat.size > max) {
      throw new ConfigError(
        `${field} ${path} is ${stat.size} bytes, larger than the ${max} bytes an image may be`,
      );
    }
    const out = Buffer.allocUnsafe(head === undefined ? stat.size : Math.min(head, stat.size));
    let at = 0;
    while (at < out.length) {
      let n: number;
      try {
        n = readSync(fd, out, at, out.length - at, at);
      } catch (e) {
        throw new ConfigError(
          `${field} ${path}: read failed: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`,
        );
      }
      if (n === 0) throw new ConfigError(`${field} ${path} shrank while being read`);
      at += n;
    }
    return out;
  } finally {
    closeSync(fd);
  }
}

/** Checks what readBootImage() would refuse, without reading (PUT /boot-source). */
export function checkBootImage(
  field: string,
  path: string,
  max: number = MAX_BOOT_IMAGE_BYTES,
): void {
  const { fd, stat } = openHostFile(field, path);
  closeSync(fd);
  if (stat.size === 0) throw new ConfigError(`${field} ${path} is empty`);
  if (stat.size > max) {
    throw new ConfigError(
      `${field} ${path} is ${stat.size} bytes, larger than the ${max} bytes an image may be`,
    );
  }
}

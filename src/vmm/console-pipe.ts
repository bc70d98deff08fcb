/**
 * A private pipe for one VM's serial console in an embedding process (the library, src/lib/):
 * the VM writes its console to the write end (console-output.ts reopens it non-blocking, as it
 * does any pipe), the caller reads the read end as a stream. Node has no pipe(2) of its own: a
 * FIFO is made in a fresh 0700 directory, both ends opened non-blocking, and the name removed
 * at once, leaving an anonymous pipe only this process holds.
 */
import { closeSync, constants, mkdtempSync, openSync, rmdirSync, unlinkSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { native } from '../kvm/native.js';

const S_IFIFO = 0o010000;

export interface ConsolePipe {
  /** The read end (non-blocking): wrap it in a net.Socket, which then owns it. */
  readFd: number;
  /** The write end: give it to buildVm as consoleFd, then close it (the VM has its own). */
  writeFd: number;
}

export function consolePipe(): ConsolePipe {
  const dir = mkdtempSync(join(tmpdir(), 'typervisor-console-'));
  const path = join(dir, 'fifo');
  try {
    native().mknod(path, S_IFIFO | 0o600, 0, 0);
    // The read end first: opening a FIFO write-only and non-blocking fails without a reader.
    const readFd = openSync(path, constants.O_RDONLY | constants.O_NONBLOCK);
    let writeFd: number;
    try {
      writeFd = openSync(path, constants.O_WRONLY | constants.O_NONBLOCK);
    } catch (e) {
      closeSync(readFd);
      throw e;
    }
    return { readFd, writeFd };
  } finally {
    try {
      unlinkSync(path);
    } catch {
      // not made
    }
    rmdirSync(dir);
  }
}

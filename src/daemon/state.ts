/**
 * The daemon's state directory: one record per VMM process it started (`vmm-<pid>.json`: pid,
 * start time, command line), so that a daemon restarted after a crash or a SIGKILL finds the
 * VMM processes and sockets the last one left and ends them. A pid is only signalled when it is
 * really ours: /proc/PID/stat's start time and /proc/PID/cmdline must both match the record (a
 * recycled pid matches neither).
 */
import {
  chmodSync,
  lstatSync,
  mkdirSync,
  readdirSync,
  readFileSync,
  renameSync,
  rmdirSync,
  unlinkSync,
  writeFileSync,
} from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { bindDirPid } from '../api/server.js';
import { unlinkIfOurs } from '../util/fs.js';

export interface ProcessRecord {
  pid: number;
  /** /proc/PID/stat field 22: clock ticks after boot at which the process started. */
  startTime: string;
  /** /proc/PID/cmdline, NUL-separated. */
  cmdline: string;
}

/** The start time and command line of a live process, or undefined if it is gone. */
export function processIdentity(pid: number): Omit<ProcessRecord, 'pid'> | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
    // The command name is in parentheses and may contain spaces: fields count after the last ')'.
    const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
    const startTime = fields[19]; // field 22 overall (fields[0] is field 3, the state)
    if (startTime === undefined) return undefined;
    const state = fields[0];
    if (state === 'Z' || state === 'X') return undefined;
    return { startTime, cmdline: readFileSync(`/proc/${pid}/cmdline`, 'latin1') };
  } catch {
    return undefined;
  }
}

/**
 * Where a pool process's rehearsal (src/cli/api-rehearsal.ts) puts its socket and guest image:
 * `<stem>.sock` and `<stem>.elf` beside the process's first API socket, named by its pid. The
 * daemon removes both when that process ends (a process killed mid-rehearsal cannot).
 */
export function rehearsalStem(apiSock: string, pid: number): string {
  return join(dirname(apiSock), `.${basename(apiSock)}.rehearsal-${pid}`);
}

/**
 * Removes the temporary directories a VMM process killed while binding a socket left in `dir`
 * (those of `pid`, or of any pid): each holds nothing or the one socket `s`; anything else in
 * one means it is not ours, and it stays. Returns the names removed.
 */
export function removeBindDirs(dir: string, pid?: number): string[] {
  const removed: string[] = [];
  let names: string[];
  try {
    names = readdirSync(dir);
  } catch {
    return removed;
  }
  for (const name of names) {
    const owner = bindDirPid(name);
    if (owner === undefined || (pid !== undefined && owner !== pid)) continue;
    const full = join(dir, name);
    try {
      if (!lstatSync(full).isDirectory()) continue;
      unlinkIfOurs(join(full, 's'), (st) => st.isSocket());
      rmdirSync(full); // ENOTEMPTY: something else is in it, and it stays
      removed.push(name);
    } catch {
      // gone meanwhile, or not ours
    }
  }
  return removed;
}

/** A rehearsal's guest image (rehearsalStem), for cleanStale; its socket is a `.sock`. */
const REHEARSAL_IMAGE = /^\.[^/]+\.rehearsal-\d+\.elf$/;

export class StateDir {
  constructor(readonly dir: string) {}

  /** Creates the directory (0700) if needed. */
  prepare(): void {
    mkdirSync(this.dir, { recursive: true, mode: 0o700 });
    chmodSync(this.dir, 0o700);
  }

  path(name: string): string {
    return join(this.dir, name);
  }

  /**
   * Takes the directory for this daemon: refused while the daemon recorded in `daemon.json` still
   * runs (its VMs' processes must not be taken for strays); otherwise records this process.
   */
  claim(): void {
    const p = this.path('daemon.json');
    try {
      const r = JSON.parse(readFileSync(p, 'utf8')) as ProcessRecord;
      const now = processIdentity(r.pid);
      if (
        r.pid !== process.pid &&
        now &&
        now.startTime === r.startTime &&
        now.cmdline === r.cmdline
      )
        throw new Error(`another daemon (pid ${r.pid}) uses the state directory ${this.dir}`);
    } catch (e) {
      if ((e as Error).message.startsWith('another daemon')) throw e;
      // none, or unreadable: ours now
    }
    const me = processIdentity(process.pid);
    writeFileSync(p, JSON.stringify({ pid: process.pid, ...me }), { mode: 0o600 });
  }

  release(): void {
    try {
      const r = JSON.parse(readFileSync(this.path('daemon.json'), 'utf8')) as ProcessRecord;
      if (r.pid === process.pid) unlinkSync(this.path('daemon.json'));
    } catch {
      // gone
    }
  }

  private recordPath(pid: number): string {
    return this.path(`vmm-${pid}.json`);
  }

  /** Records a VMM process just started (written to a temporary name, then renamed). */
  record(pid: number): void {
    const id = processIdentity(pid);
    if (!id) return; // already gone: nothing to find later
    const tmp = this.recordPath(pid) + '.tmp';
    writeFileSync(tmp, JSON.stringify({ pid, ...id }), { mode: 0o600 });
    renameSync(tmp, this.recordPath(pid));
  }

  forget(pid: number): void {
    try {
      unlinkSync(this.recordPath(pid));
    } catch {
      // never written, or already removed
    }
  }

  /**
   * Ends the VMM processes an earlier daemon left (SIGKILL: they serve nobody now) and removes
   * their records, every socket left in the directory, a rehearsal's guest image and the
   * directories a socket was being bound in (removeBindDirs). Returns what it did.
   */
  cleanStale(): { killed: number[]; removed: string[] } {
    const killed: number[] = [];
    const removed: string[] = [];
    for (const name of readdirSync(this.dir)) {
      const full = this.path(name);
      if (/^vmm-\d+\.json(\.tmp)?$/.test(name)) {
        try {
          const r = JSON.parse(readFileSync(full, 'utf8')) as ProcessRecord;
          const now = Number.isInteger(r.pid) && r.pid > 1 ? processIdentity(r.pid) : undefined;
          if (now && now.startTime === r.startTime && now.cmdline === r.cmdline) {
            process.kill(r.pid, 'SIGKILL');
            killed.push(r.pid);
          }
        } catch {
          // unreadable record (a crash mid-write): nothing to verify a pid against
        }
        unlinkSync(full);
        removed.push(name);
      } else if (REHEARSAL_IMAGE.test(name)) {
        // A rehearsal's guest image (a regular file of ours; never a link followed).
        if (unlinkIfOurs(full, (st) => st.isFile())) removed.push(name);
      } else if (/\.sock$/.test(name)) {
        // Only sockets (never a file someone put here under that name).
        if (unlinkIfOurs(full, (st) => st.isSocket())) removed.push(name);
      }
    }
    removed.push(...removeBindDirs(this.dir));
    return { killed, removed };
  }
}

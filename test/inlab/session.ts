/**
 * An interactive Typervisor run for the network and vsock tests: commands go to the guest's
 * console when the test wants (after a marker), and the test waits for markers in the output.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { join } from 'node:path';
import { repoRoot } from '../../src/lab/guest.js';

export class GuestSession {
  readonly child: ChildProcess;
  out = '';
  err = '';
  readonly t0 = Date.now();
  readonly exited: Promise<number | null>;
  private waiters: Array<() => void> = [];

  /** `prefix`: argv run before node (e.g. `ip netns exec NS`). */
  constructor(args: string[], prefix: string[] = []) {
    const argv = [...prefix, process.execPath, join(repoRoot(), 'bin', 'typervisor'), ...args];
    this.child = spawn(argv[0]!, argv.slice(1), { stdio: ['pipe', 'pipe', 'pipe'] });
    this.child.stdout!.on('data', (d: Buffer) => {
      this.out += d.toString();
      this.waiters.forEach((w) => w());
    });
    this.child.stderr!.on('data', (d: Buffer) => (this.err += d.toString()));
    this.child.stdin!.on('error', () => undefined);
    this.exited = new Promise((resolve) => this.child.on('close', (code) => resolve(code)));
  }

  send(text: string): void {
    this.child.stdin!.write(text);
  }

  /** Resolves with the first match of `re` in the output (searched from the start). */
  waitFor(re: RegExp, timeoutMs: number): Promise<RegExpMatchArray> {
    return new Promise((resolve, reject) => {
      const check = () => {
        const m = this.out.match(re);
        if (!m) return false;
        clearTimeout(timer);
        this.waiters = this.waiters.filter((w) => w !== check);
        resolve(m);
        return true;
      };
      const timer = setTimeout(() => {
        this.waiters = this.waiters.filter((w) => w !== check);
        reject(new Error(`no ${re} within ${timeoutMs} ms\n${this.describe()}`));
      }, timeoutMs);
      if (!check()) this.waiters.push(check);
      void this.exited.then(() => {
        if (!check()) {
          clearTimeout(timer);
          reject(new Error(`exited before ${re}\n${this.describe()}`));
        }
      });
    });
  }

  kill(): void {
    this.child.kill('SIGKILL');
  }

  describe(): string {
    return `after ${Date.now() - this.t0} ms\n--- stdout ---\n${this.out.slice(-6000)}\n--- stderr ---\n${this.err.slice(-3000)}`;
  }
}

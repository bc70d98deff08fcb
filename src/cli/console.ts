/**
 * The guest's serial console on this process's stdin: raw mode on a TTY (with Ctrl-A x to
 * quit, as QEMU does), a plain pipe otherwise. Input is held back until the guest's driver has
 * the port open, and never dropped: when the UART's ring is full we wait for it to drain.
 */
import type { AttachedDevices } from '../vmm/index.js';
import { log } from '../util/log.js';

const CTRL_A = 0x01;
const POLL_MS = 10;

export class Console {
  private pending: Buffer[] = [];
  private pumping = false;
  private stopped = false;
  private escape = false;
  private timer: NodeJS.Timeout | undefined;
  private readonly onData = (chunk: Buffer) => this.input(chunk);

  constructor(
    private readonly devices: AttachedDevices,
    private readonly quit: () => void,
  ) {}

  start(): void {
    const stdin = process.stdin;
    if (stdin.isTTY) stdin.setRawMode(true);
    stdin.on('data', this.onData);
    stdin.on('error', () => undefined);
  }

  stop(): void {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    const stdin = process.stdin;
    stdin.off('data', this.onData);
    if (stdin.isTTY) stdin.setRawMode(false);
    stdin.pause();
    stdin.unref?.();
    stdin.destroy();
  }

  private input(chunk: Buffer): void {
    if (process.stdin.isTTY) chunk = this.filterEscape(chunk);
    if (chunk.length === 0) return;
    this.pending.push(chunk);
    void this.pump();
  }

  /** Ctrl-A x quits; Ctrl-A Ctrl-A sends one Ctrl-A. */
  private filterEscape(chunk: Buffer): Buffer {
    const out: number[] = [];
    for (const b of chunk) {
      if (this.escape) {
        this.escape = false;
        if (b === 0x78 /* x */) {
          this.quit();
          return Buffer.alloc(0);
        }
        out.push(b);
      } else if (b === CTRL_A) this.escape = true;
      else out.push(b);
    }
    return Buffer.from(out);
  }

  private async pump(): Promise<void> {
    if (this.pumping) return;
    this.pumping = true;
    const serial = this.devices.serial;
    while (!this.stopped && this.pending.length > 0) {
      if (!serial.receiverEnabled()) {
        await new Promise((r) => (this.timer = setTimeout(r, POLL_MS)));
        continue;
      }
      const head = this.pending[0]!;
      const n = serial.pushInput(head);
      log('debug', `console: ${n} of ${head.length} input bytes taken by the UART`);
      if (n === head.length) this.pending.shift();
      else {
        this.pending[0] = head.subarray(n);
        await Promise.race([
          serial.waitForInputSpace(),
          new Promise((r) => (this.timer = setTimeout(r, 100))),
        ]);
      }
    }
    this.pumping = false;
  }
}

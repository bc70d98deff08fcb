/**
 * The guest's serial console on this process's stdin: raw mode on a TTY (with Ctrl-A x to
 * quit, as QEMU does), a plain pipe otherwise. Input is held back until the guest's driver has
 * the port open, and never dropped: when the UART's ring is full we wait for it to drain.
 *
 * What waits is bounded (issue 12): at most CONSOLE_INPUT_BUFFER_BYTES (plus the chunk that
 * crossed the mark) are held here; past that stdin is paused, so the writer on the other side
 * of the pipe or terminal is held back by the kernel instead of us buffering without end. It
 * is resumed once the guest has taken the held bytes down to half the bound.
 */
import { fstatSync } from 'node:fs';
import { FdInput, type AttachedDevices } from '../vmm/index.js';
import { isCharDevice } from '../util/fs.js';
import { log } from '../util/log.js';

/**
 * How the console reads this process's stdin: not at all ('null': /dev/null, a service's, the
 * daemon's VMMs': reading it would make process.stdin, start libuv's pool and get end-of-file
 * at once, ~0.5 MiB of a micro VM's peak RSS for no input); through the
 * shim's fd watch ('fd': a pipe or a socket, FdInput); or as Node's process.stdin ('stream': a
 * terminal, which needs raw mode, or a file, which epoll cannot watch).
 */
export function stdinKind(): 'null' | 'fd' | 'stream' {
  try {
    const st = fstatSync(0);
    if (isCharDevice(st, 1, 3)) return 'null';
    return st.isFIFO() || st.isSocket() ? 'fd' : 'stream';
  } catch {
    return 'stream'; // no fd 0: Node's process.stdin copes
  }
}

/** The console's stdin: undefined for /dev/null, FdInput for a pipe or socket, else process.stdin. */
export function consoleStdin(): ConsoleInput | undefined {
  const kind = stdinKind();
  if (kind === 'null') return undefined;
  if (kind === 'fd') {
    try {
      return new FdInput(0);
    } catch {
      // the shim refused the fd (e.g. 256 watches in use): Node's stream reads it instead
    }
  }
  return process.stdin;
}

/** Console input held while the guest is not reading; past this stdin is paused. */
export const CONSOLE_INPUT_BUFFER_BYTES = 64 * 1024;
const CTRL_A = 0x01;
/** While the port is closed, how often to look again (backing off from the first to the second). */
const PORT_POLL_MIN_MS = 10;
const PORT_POLL_MAX_MS = 200;
const SPACE_WAIT_MS = 100;

/** What the console needs of the UART. */
export type ConsoleSerial = Pick<
  AttachedDevices['serial'],
  'receiverEnabled' | 'pushInput' | 'waitForInputSpace'
>;

/** What the console needs of stdin (process.stdin, FdInput, or a stand-in in tests). */
export interface ConsoleInput {
  isTTY?: boolean;
  setRawMode?(raw: boolean): unknown;
  unref?(): unknown;
  on(event: 'data', fn: (b: Buffer) => void): unknown;
  on(event: 'error', fn: (e: Error) => void): unknown;
  off(event: 'data', fn: (b: Buffer) => void): unknown;
  pause(): unknown;
  resume(): unknown;
  destroy(): unknown;
}

export class Console {
  private pending: Buffer[] = [];
  private pendingBytes = 0;
  /** stdin is paused because pendingBytes reached the bound. */
  private held = false;
  private pumping = false;
  private stopped = false;
  private escape = false;
  private timer: NodeJS.Timeout | undefined;
  private readonly onData = (chunk: Buffer) => this.input(chunk);
  private readonly inputBound: number;
  /** Times stdin was paused because the guest was not taking input. */
  pauses = 0;

  constructor(
    private readonly devices: { serial: ConsoleSerial },
    private readonly quit: () => void,
    /** undefined: nothing to read (stdin is /dev/null). */
    private readonly stdin: ConsoleInput | undefined = consoleStdin(),
    inputBound = CONSOLE_INPUT_BUFFER_BYTES,
  ) {
    this.inputBound = inputBound;
  }

  /** Input bytes read from stdin that the guest has not taken yet. */
  get bufferedInput(): number {
    return this.pendingBytes;
  }

  start(): void {
    const stdin = this.stdin;
    if (!stdin) return;
    if (stdin.isTTY) stdin.setRawMode?.(true);
    stdin.on('data', this.onData);
    stdin.on('error', () => undefined);
  }

  stop(): void {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    const stdin = this.stdin;
    if (!stdin) return;
    stdin.off('data', this.onData);
    if (stdin.isTTY) stdin.setRawMode?.(false);
    stdin.pause();
    stdin.unref?.();
    stdin.destroy();
  }

  private input(chunk: Buffer): void {
    if (this.stdin?.isTTY) chunk = this.filterEscape(chunk);
    if (chunk.length === 0) return;
    this.pending.push(chunk);
    this.pendingBytes += chunk.length;
    if (!this.held && this.pendingBytes >= this.inputBound) {
      this.held = true;
      this.pauses += 1;
      this.stdin?.pause();
      log('debug', `console: ${this.pendingBytes} input bytes wait for the guest; stdin paused`);
    }
    void this.pump();
  }

  /** `n` bytes went to the guest: resume stdin once half the bound is free again. */
  private taken(n: number): void {
    this.pendingBytes -= n;
    if (this.held && !this.stopped && this.pendingBytes <= this.inputBound / 2) {
      this.held = false;
      this.stdin?.resume();
      log('debug', 'console: the guest takes input again; stdin resumed');
    }
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

  private sleep(ms: number): Promise<void> {
    return new Promise((r) => (this.timer = setTimeout(r, ms)));
  }

  private async pump(): Promise<void> {
    if (this.pumping) return;
    this.pumping = true;
    const serial = this.devices.serial;
    let poll = PORT_POLL_MIN_MS;
    while (!this.stopped && this.pending.length > 0) {
      if (!serial.receiverEnabled()) {
        await this.sleep(poll);
        poll = Math.min(poll * 2, PORT_POLL_MAX_MS);
        continue;
      }
      poll = PORT_POLL_MIN_MS;
      const head = this.pending[0]!;
      const n = serial.pushInput(head);
      log('debug', `console: ${n} of ${head.length} input bytes taken by the UART`);
      if (n === head.length) this.pending.shift();
      else this.pending[0] = head.subarray(n);
      this.taken(n);
      if (n < head.length) {
        await Promise.race([serial.waitForInputSpace(), this.sleep(SPACE_WAIT_MS)]);
      }
    }
    this.pumping = false;
  }
}

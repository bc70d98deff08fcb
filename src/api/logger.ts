/**
 * The logger configuration of the Firecracker-style entry (PUT /logger, --level, --log-path).
 * src/util/log.ts writes one line per event to stderr; with a log path we send the process's
 * stderr writes to that file or FIFO instead (non-blocking: a full FIFO drops the line and
 * counts it, it never stalls the VMM), which is what Firecracker's logger does with its output.
 */
import { closeSync, writeSync } from 'node:fs';
import { ConfigError } from '../util/errors.js';
import { setLogLevel, type Level } from '../util/log.js';
import { validateLogger, type LoggerConfig } from '../vmm/index.js';
import type { Counters } from './metrics.js';
import { openOutputFile } from './output-file.js';

const LEVEL_MAP: Record<string, Level | 'off'> = {
  error: 'error',
  warning: 'warn',
  warn: 'warn',
  info: 'info',
  debug: 'debug',
  trace: 'debug',
  off: 'off',
};

export class LoggerControl {
  private fd: number | undefined;
  private config: LoggerConfig | undefined;
  private readonly originalWrite = process.stderr.write.bind(process.stderr);

  constructor(private readonly counters: Counters) {}

  get configuration(): LoggerConfig | undefined {
    return this.config;
  }

  /** Applies a logger configuration; on error nothing has changed. */
  configure(cfg: LoggerConfig): void {
    validateLogger(cfg);
    const level = cfg.level === undefined ? undefined : LEVEL_MAP[cfg.level.toLowerCase()];
    // Opened last among the checks: a refused request leaves nothing open.
    const fd = cfg.log_path === undefined ? undefined : openOutputFile('log_path', cfg.log_path);
    if (level !== undefined) setLogLevel(level === 'off' ? 'error' : level);
    this.silenced = level === 'off' ? true : level !== undefined ? false : this.silenced;
    if (fd !== undefined) this.redirect(fd);
    this.config = { ...this.config, ...cfg };
  }

  private silenced = false;

  /**
   * Sends stderr to `fd` and closes the descriptor it replaces (each PUT /logger with a path
   * would otherwise keep one more open file for the life of the process).
   */
  private redirect(fd: number): void {
    const previous = this.fd;
    this.fd = fd;
    if (previous !== undefined && previous !== fd) {
      try {
        closeSync(previous);
      } catch {
        // already closed
      }
      return; // stderr already goes through the hook below, which reads this.fd
    }
    const counters = this.counters;
    const self = this;
    // Every later stderr line (util/log.ts, error reports) goes to the log file.
    process.stderr.write = function (chunk: string | Uint8Array, ...rest: unknown[]): boolean {
      const cb = rest.find((r) => typeof r === 'function') as ((e?: Error) => void) | undefined;
      if (!self.silenced && self.fd !== undefined) {
        try {
          writeSync(self.fd, typeof chunk === 'string' ? Buffer.from(chunk) : chunk);
        } catch {
          counters.inc('logger', 'missed_log_count');
        }
      }
      cb?.();
      return true;
    } as typeof process.stderr.write;
  }

  /** Puts stderr back (tests and shutdown). */
  restore(): void {
    process.stderr.write = this.originalWrite as typeof process.stderr.write;
    if (this.fd !== undefined) {
      try {
        closeSync(this.fd);
      } catch {
        // already closed
      }
      this.fd = undefined;
    }
  }
}

/**
 * The logger configuration of the Firecracker-style entry (PUT /logger, --level, --log-path).
 * src/util/log.ts writes one line per event to stderr; with a log path we send the process's
 * stderr writes to that file or FIFO instead (non-blocking: a full FIFO drops the line and
 * counts it, it never stalls the VMM), which is what Firecracker's logger does with its output.
 */
import { constants, openSync, writeSync } from 'node:fs';
import { ConfigError } from '../util/errors.js';
import { setLogLevel, type Level } from '../util/log.js';
import { validateLogger, type LoggerConfig } from '../vmm/index.js';
import type { Counters } from './metrics.js';

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
    let fd: number | undefined;
    if (cfg.log_path !== undefined) {
      try {
        fd = openSync(
          cfg.log_path,
          constants.O_RDWR | constants.O_CREAT | constants.O_NONBLOCK | constants.O_APPEND,
          0o600,
        );
      } catch (e) {
        throw new ConfigError(
          `Failed to open the log file ${cfg.log_path}: ${(e as Error).message}`,
        );
      }
    }
    const level = cfg.level === undefined ? undefined : LEVEL_MAP[cfg.level.toLowerCase()];
    if (level !== undefined) setLogLevel(level === 'off' ? 'error' : level);
    this.silenced = level === 'off' ? true : level !== undefined ? false : this.silenced;
    if (fd !== undefined) this.redirect(fd);
    this.config = { ...this.config, ...cfg };
  }

  private silenced = false;

  private redirect(fd: number): void {
    this.fd = fd;
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
  }
}

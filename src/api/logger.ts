/**
 * The logger configuration of the Firecracker-style entry (PUT /logger, --level, --log-path).
 * src/util/log.ts writes one line per event to stderr; with a log path we send the process's
 * stderr writes to that file or FIFO instead (non-blocking: a full FIFO drops the line and
 * counts it, it never stalls the VMM), which is what Firecracker's logger does with its output.
 *
 * Given an instance id (the Firecracker entry), lines take Firecracker's format
 * (src/vmm/src/logger/logging.rs there): `<local time to the ns> [<id>:<thread>] <message>`,
 * with `:<LEVEL>` after the thread when show_level is on and `:<file>:<line>` after that when
 * show_log_origin is on. Lines that reach stderr already written ("typervisor: warn: ..." from
 * the device and vCPU workers, whose output Node pipes through the main thread's stderr) are
 * rewritten into the same format with thread "-" (Firecracker's name for an unnamed thread).
 */
import { closeSync, writeSync } from 'node:fs';
import { STATUS_CODES } from 'node:http';
import { ConfigError } from '../util/errors.js';
import { logsAt, setLineFormatter, setLogLevel, type Level } from '../util/log.js';
import { fcTimestamp, validateLogger, type LoggerConfig } from '../vmm/index.js';
import type { Counters } from './metrics.js';
import { openOutputFile } from './output-file.js';
import { epochMs } from '../util/clock.js';

const LEVEL_MAP: Record<string, Level | 'off'> = {
  error: 'error',
  warning: 'warn',
  warn: 'warn',
  info: 'info',
  debug: 'debug',
  trace: 'debug',
  off: 'off',
};

/** Firecracker's (Rust log's) level names, shown with show_level. */
const LEVEL_NAME: Record<Level, string> = {
  error: 'ERROR',
  warn: 'WARN',
  info: 'INFO',
  debug: 'DEBUG',
};

export interface LineFormat {
  instanceId: string;
  showLevel: boolean;
  showOrigin: boolean;
}

/** The caller of log() (the first stack frame outside the logging modules), as `file:line`. */
function origin(): string {
  const stack = new Error().stack?.split('\n').slice(1) ?? [];
  for (const frame of stack) {
    if (/[/\\]util[/\\]log\.js|[/\\]api[/\\]logger\.js/.test(frame)) continue;
    const m = /\(?(?:file:\/\/)?([^()\s]+):(\d+):\d+\)?\s*$/.exec(frame);
    if (m) return `${m[1]!.replace(/^.*?[/\\](dist[/\\])/, '')}:${m[2]}`;
  }
  return '?:?';
}

/** One line in Firecracker's format, without the newline. */
export function formatFcLine(
  f: LineFormat,
  level: Level,
  message: string,
  thread: string,
  now = epochMs(),
): string {
  return `${fcTimestamp(now)} ${lineHead(f, level, thread, f.showOrigin ? origin() : undefined)} ${message}`;
}

/** A line's `[id:thread(:LEVEL)(:origin)]`. */
function lineHead(f: LineFormat, level: Level, thread: string, org?: string): string {
  const lvl = f.showLevel ? `:${LEVEL_NAME[level]}` : '';
  return `[${f.instanceId}:${thread}${lvl}${org === undefined ? '' : `:${org}`}]`;
}

const FC_METHOD: Record<string, string> = {
  GET: 'Get',
  PUT: 'Put',
  PATCH: 'Patch',
  DELETE: 'Delete',
};

/**
 * Firecracker's line for a request received (api_server/parsed_request.rs): the method, the
 * path and, except for /mmds and (below Debug) /cpu-config, the body, each quoted as Rust's
 * Debug quotes a string (JSON's escapes are the same for these).
 */
export function requestLine(
  method: string,
  url: string,
  body: string | undefined,
  debug: boolean,
): string {
  const m = FC_METHOD[method] ?? method;
  const path = url.split('?')[0]!;
  const q = JSON.stringify;
  if (body === undefined || path === '/mmds')
    return `The API server received a ${m} request on ${q(path)}.`;
  if (path === '/cpu-config' && !debug)
    return `The API server received a ${m} request on ${q(path)}. To view the CPU template received by the API, configure log-level to DEBUG.`;
  return `The API server received a ${m} request on ${q(path)} with body ${q(body)}.`;
}

/** Firecracker's line for the outcome of a request (success at Info, failure at Error). */
export function outcomeLine(status: number, fault: string | undefined): string {
  const text = STATUS_CODES[status] ?? 'Unknown';
  if (status < 400) return `The request was executed successfully. Status code: ${status} ${text}.`;
  return `Received Error. Status code: ${status} ${text}. Message: ${fault ?? ''}`;
}

/** The actions whose time Firecracker logs (api_server/mod.rs), by their latencies_us name. */
const TIMED_ACTION: Record<string, string> = {
  full_create_snapshot: 'create full snapshot',
  diff_create_snapshot: 'create diff snapshot',
  load_snapshot: 'load snapshot',
  pause_vm: 'pause vm',
  resume_vm: 'resume vm',
};

/** `'pause vm' API request took 1234 us.`, or undefined for a name Firecracker does not time. */
export function latencyLine(metric: string, us: number): string | undefined {
  const action = TIMED_ACTION[metric];
  return action === undefined ? undefined : `'${action}' API request took ${us} us.`;
}

/** A line our workers or error paths wrote as `typervisor: [level: ]message`, parsed. */
const RAW_LINE = /^typervisor: (?:(error|warn|debug): )?(.*)$/s;
/** A line already in Firecracker's format. */
const FC_LINE = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9} \[/;

export class LoggerControl {
  private fd: number | undefined;
  private config: LoggerConfig | undefined;
  private readonly originalWrite = process.stderr.write.bind(process.stderr);
  private hooked = false;
  /** Firecracker's line format, when an instance id was given. */
  readonly format: LineFormat | undefined;

  constructor(
    private readonly counters: Counters,
    opts: { instanceId?: string } = {},
  ) {
    if (opts.instanceId !== undefined) {
      const format: LineFormat = {
        instanceId: opts.instanceId,
        showLevel: false,
        showOrigin: false,
      };
      this.format = format;
      // Firecracker's default level is Info (TYPERVISOR_LOG, when set, still wins).
      if (process.env.TYPERVISOR_LOG === undefined) setLogLevel('info');
      setLineFormatter((level, message, fields) =>
        formatFcLine(
          format,
          level,
          message,
          typeof fields.thread === 'string' ? fields.thread : 'main',
        ),
      );
      this.hook();
    }
  }

  /** Rewrites a chunk's raw lines into Firecracker's format (lines already in it pass). */
  private reformat(text: string): string {
    const f = this.format;
    if (!f) return text;
    return text
      .split('\n')
      .map((line) => {
        if (line === '' || FC_LINE.test(line)) return line;
        const m = RAW_LINE.exec(line);
        const level = (m?.[1] as Level | undefined) ?? (m ? 'info' : 'error');
        return formatFcLine(f, level, m ? m[2]! : line, '-');
      })
      .join('\n');
  }

  /**
   * Where, and after which prefix, another thread may write a line of `thread` itself (the boot
   * timer's, from the vCPU thread that takes the marker: boot-timer.ts): the log's descriptor
   * and `[id:thread]`. Undefined when the line must go through log(): no Firecracker format,
   * the level filters it out, the log is off, or show_log_origin (it names log()'s caller).
   */
  directLine(thread: string, level: Level): { fd: number; head: string } | undefined {
    const f = this.format;
    if (!f || !this.hooked || this.silenced || f.showOrigin || !logsAt(level)) return undefined;
    return { fd: this.fd ?? 2, head: lineHead(f, level, thread) };
  }

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
    if (this.format) {
      if (cfg.show_level !== undefined) this.format.showLevel = cfg.show_level;
      if (cfg.show_log_origin !== undefined) this.format.showOrigin = cfg.show_log_origin;
    }
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
    }
    this.hook(); // stderr goes through the hook, which reads this.fd
  }

  /**
   * Every later stderr line (util/log.ts, error reports, the workers' lines) goes through here:
   * to the log file once there is one (else to stderr), in Firecracker's format when set.
   */
  private hook(): void {
    if (this.hooked) return;
    this.hooked = true;
    const counters = this.counters;
    const self = this;
    process.stderr.write = function (chunk: string | Uint8Array, ...rest: unknown[]): boolean {
      const cb = rest.find((r) => typeof r === 'function') as ((e?: Error) => void) | undefined;
      if (!self.silenced) {
        const text = typeof chunk === 'string' ? chunk : Buffer.from(chunk).toString('utf8');
        const out = Buffer.from(self.reformat(text));
        try {
          writeSync(self.fd ?? 2, out);
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
    this.hooked = false;
    if (this.format) setLineFormatter(undefined);
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

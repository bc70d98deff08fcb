/**
 * A small structured logger: one line per event on stderr ("typervisor: LEVEL message"), or JSON
 * lines when TYPERVISOR_LOG_FORMAT=json. Level from TYPERVISOR_LOG (error|warn|info|debug).
 */
export type Level = 'error' | 'warn' | 'info' | 'debug';
const ORDER: Record<Level, number> = { error: 0, warn: 1, info: 2, debug: 3 };

let threshold: Level =
  (process.env.TYPERVISOR_LOG as Level) in ORDER ? (process.env.TYPERVISOR_LOG as Level) : 'warn';
const json = process.env.TYPERVISOR_LOG_FORMAT === 'json';

export function setLogLevel(l: Level): void {
  threshold = l;
}

export function getLogLevel(): Level {
  return threshold;
}

/** Whether log() writes a line of this level to stderr now (its level, no sink set). */
export function logsAt(level: Level): boolean {
  return ORDER[level] <= ORDER[threshold] && sink === undefined;
}

/**
 * Formats one line (without its newline). The Firecracker entry installs Firecracker's format
 * (src/api/logger.ts); `undefined` puts back the default.
 */
export type LineFormatter = (
  level: Level,
  message: string,
  fields: Record<string, unknown>,
) => string;
let formatter: LineFormatter | undefined;
export function setLineFormatter(f: LineFormatter | undefined): void {
  formatter = f;
}

/**
 * Where lines go instead of stderr while set: the API mode's rehearsal (src/cli/api-rehearsal.ts)
 * keeps its own lines out of the VMM's log. `undefined` puts back stderr.
 */
let sink: ((line: string) => void) | undefined;
export function setLogSink(f: ((line: string) => void) | undefined): void {
  sink = f;
}

export function log(level: Level, message: string, fields: Record<string, unknown> = {}): void {
  if (ORDER[level] > ORDER[threshold]) return;
  const line = formatter
    ? formatter(level, message, fields)
    : json
      ? JSON.stringify({ time: new Date().toISOString(), level, message, ...fields })
      : `typervisor: ${level === 'info' ? '' : level + ': '}${message}`;
  if (sink) sink(line);
  else process.stderr.write(line + '\n');
}

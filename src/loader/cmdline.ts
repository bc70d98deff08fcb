/**
 * The kernel command line, built up piece by piece and validated as it grows. Linux splits it on
 * spaces and honours double quotes around a value (lib/cmdline.c next_arg), so a value with a
 * space is quoted and a value holding a quote is refused. Only printable ASCII is accepted: the
 * boot protocol gives no encoding, and a NUL would end the string early.
 */
import { ConfigError } from '../util/errors.js';
import { type Result, err, ok } from '../util/result.js';

/** Linux's COMMAND_LINE_SIZE on x86 (layout.ts CMDLINE_MAX_SIZE), including the NUL. */
export const DEFAULT_CMDLINE_CAPACITY = 2048;

export class Cmdline {
  private text = '';

  /** capacity counts the terminating NUL, so the text may hold capacity - 1 characters. */
  constructor(readonly capacity: number = DEFAULT_CMDLINE_CAPACITY) {
    if (!Number.isSafeInteger(capacity) || capacity < 1) throw new Error('bad cmdline capacity');
  }

  /** A command line from a whole user-supplied string (validated, not re-quoted). */
  static from(
    text: string,
    capacity: number = DEFAULT_CMDLINE_CAPACITY,
  ): Result<Cmdline, ConfigError> {
    const c = new Cmdline(capacity);
    const r = c.insertStr(text);
    return r.ok ? ok(c) : r;
  }

  get length(): number {
    return this.text.length;
  }

  /** Append `key=value`; the value is double-quoted when it contains a space. */
  insert(key: string, value: string): Result<void, ConfigError> {
    if (key.length === 0) return bad('empty cmdline key');
    if (/[\s="]/.test(key)) return bad(`bad cmdline key ${JSON.stringify(key)}`);
    const k = checkChars(key);
    if (!k.ok) return k;
    const v = checkChars(value);
    if (!v.ok) return v;
    if (value.includes('"')) return bad(`cmdline value for ${key} contains a double quote`);
    const quoted = value.includes(' ') ? `"${value}"` : value;
    return this.append(`${key}=${quoted}`);
  }

  /** Append a raw fragment (a flag like `quiet`, or several `a=b c=d` already formed). */
  insertStr(fragment: string): Result<void, ConfigError> {
    const c = checkChars(fragment);
    if (!c.ok) return c;
    const t = fragment.trim();
    return t.length === 0 ? ok(undefined) : this.append(t);
  }

  /** True when the command line already has `key` or `key=...` as one of its words. */
  has(key: string): boolean {
    return this.text.split(' ').some((w) => w === key || w.startsWith(`${key}=`));
  }

  toString(): string {
    return this.text;
  }

  /** The NUL-terminated bytes to place in guest memory. */
  toBytes(): Uint8Array {
    const out = new Uint8Array(this.text.length + 1);
    for (let i = 0; i < this.text.length; i++) out[i] = this.text.charCodeAt(i);
    return out;
  }

  private append(piece: string): Result<void, ConfigError> {
    const next = this.text.length === 0 ? piece : `${this.text} ${piece}`;
    if (next.length > this.capacity - 1) {
      return bad(
        `kernel command line too long (${next.length} bytes, at most ${this.capacity - 1})`,
      );
    }
    this.text = next;
    return ok(undefined);
  }
}

function checkChars(s: string): Result<void, ConfigError> {
  for (let i = 0; i < s.length; i++) {
    const c = s.charCodeAt(i);
    if (c === 0) return bad('kernel command line contains a NUL byte');
    if (c < 0x20 || c > 0x7e) {
      return bad(`kernel command line contains a non-printable or non-ASCII character (code ${c})`);
    }
  }
  return ok(undefined);
}

const bad = (m: string) => err(new ConfigError(m));

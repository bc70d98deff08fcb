/**
 * `--seccomp-filter FILE`: a user's allow-lists, as JSON (docs/security.md has the format).
 *
 *   { "main":   { "default_action": "kill_process", "filter_action": "allow",
 *                 "filter": [ { "syscall": "read" },
 *                             { "syscall": "ioctl", "args": [ { "index": 1, "type": "dword",
 *                                 "op": "eq", "val": 44672, "comment": "KVM_RUN" } ] } ] },
 *     "vcpu":   { "filter": [ ... ] },
 *     "device": { "filter": [ ... ] } }
 *
 * Firecracker's seccompiler JSON per thread, with our three roles as keys. Every role must be
 * present (a missing one would silently mean "no filter"). The file is hostile input: its size,
 * rules, arguments and strings are bounded, unknown keys refused, and every value checked; the
 * first problem is reported by its JSON path and nothing is installed.
 */
import { closeSync, constants, fstatSync, openSync, readSync } from 'node:fs';
import {
  compilePolicy,
  SECCOMP_RET_KILL_PROCESS,
  SECCOMP_RET_LOG,
  SECCOMP_RET_TRAP,
  syscallNumber,
  type ArgCondition,
  type Policy,
  type SyscallRule,
} from './filter.js';
import { processPolicy, ROLES, type Role } from './roles.js';

export const MAX_FILTER_FILE_BYTES = 1 << 20;
export const MAX_RULES_PER_ROLE = 1024;
const MAX_ARGS = 6;
const MAX_COMMENT = 256;
const ENOSYS = 38;

export const DEFAULT_ACTIONS: Record<string, number> = {
  kill_process: SECCOMP_RET_KILL_PROCESS,
  trap: SECCOMP_RET_TRAP,
  log: SECCOMP_RET_LOG,
};

export interface UserFilter {
  policies: Record<Role, Policy>;
  defaultActions: Record<Role, number>;
}

export class FilterFileError extends Error {}

const isObject = (v: unknown): v is Record<string, unknown> =>
  typeof v === 'object' && v !== null && !Array.isArray(v);

function onlyKeys(v: Record<string, unknown>, allowed: string[], where: string): void {
  for (const k of Object.keys(v))
    if (!allowed.includes(k))
      throw new FilterFileError(
        `${where}: unknown key "${k.slice(0, 40)}" (expected ${allowed.join(', ')})`,
      );
}

/** A JSON number (safe integer) or a decimal/0x-hex string (for 64-bit values), >= 0. */
function parseValue(v: unknown, where: string): bigint {
  if (typeof v === 'number' && Number.isSafeInteger(v) && v >= 0) return BigInt(v);
  if (typeof v === 'string' && /^(0x[0-9a-fA-F]{1,16}|[0-9]{1,20})$/.test(v)) return BigInt(v);
  throw new FilterFileError(`${where}: must be a non-negative integer (or a decimal or 0x string)`);
}

function parseArg(v: unknown, where: string): ArgCondition {
  if (!isObject(v)) throw new FilterFileError(`${where}: must be an object`);
  onlyKeys(v, ['index', 'type', 'op', 'val', 'mask', 'comment'], where);
  const { index, type, op } = v;
  if (typeof index !== 'number' || !Number.isInteger(index) || index < 0 || index > 5)
    throw new FilterFileError(`${where}.index: must be 0 to 5`);
  if (type !== 'dword' && type !== 'qword')
    throw new FilterFileError(`${where}.type: must be "dword" or "qword"`);
  if (op !== 'eq' && op !== 'ne' && op !== 'masked_eq')
    throw new FilterFileError(`${where}.op: must be "eq", "ne" or "masked_eq"`);
  const val = parseValue(v.val, `${where}.val`);
  const mask = v.mask === undefined ? undefined : parseValue(v.mask, `${where}.mask`);
  if (op === 'masked_eq' && mask === undefined)
    throw new FilterFileError(`${where}: "masked_eq" needs a "mask"`);
  if (op !== 'masked_eq' && mask !== undefined)
    throw new FilterFileError(`${where}: "mask" is only for "masked_eq"`);
  const max = type === 'dword' ? 0xffffffffn : 0xffffffffffffffffn;
  if (val > max || (mask !== undefined && mask > max))
    throw new FilterFileError(`${where}: value does not fit a ${type}`);
  if (v.comment !== undefined && (typeof v.comment !== 'string' || v.comment.length > MAX_COMMENT))
    throw new FilterFileError(
      `${where}.comment: must be a string of at most ${MAX_COMMENT} characters`,
    );
  return { index, type, op, val, ...(mask !== undefined && { mask }) };
}

function parseRule(v: unknown, where: string): SyscallRule {
  if (!isObject(v)) throw new FilterFileError(`${where}: must be an object`);
  onlyKeys(v, ['syscall', 'args', 'comment'], where);
  if (
    typeof v.syscall !== 'string' ||
    v.syscall.length > 64 ||
    syscallNumber(v.syscall) === undefined
  )
    throw new FilterFileError(
      `${where}.syscall: ${typeof v.syscall === 'string' ? `"${v.syscall.slice(0, 64)}" is not an x86_64 system call` : 'must be a system call name'}`,
    );
  if (v.comment !== undefined && (typeof v.comment !== 'string' || v.comment.length > MAX_COMMENT))
    throw new FilterFileError(
      `${where}.comment: must be a string of at most ${MAX_COMMENT} characters`,
    );
  if (v.args === undefined) return { syscall: v.syscall };
  if (!Array.isArray(v.args) || v.args.length > MAX_ARGS)
    throw new FilterFileError(`${where}.args: must be an array of at most ${MAX_ARGS} conditions`);
  return { syscall: v.syscall, args: v.args.map((a, i) => parseArg(a, `${where}.args[${i}]`)) };
}

function parseRole(v: unknown, role: Role): { policy: Policy; defaultAction: number } {
  if (!isObject(v)) throw new FilterFileError(`${role}: must be an object with a "filter" array`);
  onlyKeys(v, ['default_action', 'filter_action', 'filter'], role);
  const da = v.default_action ?? 'kill_process';
  if (typeof da !== 'string' || !Object.hasOwn(DEFAULT_ACTIONS, da))
    throw new FilterFileError(
      `${role}.default_action: must be one of ${Object.keys(DEFAULT_ACTIONS).join(', ')}`,
    );
  if (v.filter_action !== undefined && v.filter_action !== 'allow')
    throw new FilterFileError(`${role}.filter_action: only "allow" (these are allow-lists)`);
  if (!Array.isArray(v.filter) || v.filter.length > MAX_RULES_PER_ROLE)
    throw new FilterFileError(
      `${role}.filter: must be an array of at most ${MAX_RULES_PER_ROLE} rules`,
    );
  const rules = v.filter.map((r, i) => parseRule(r, `${role}.filter[${i}]`));
  // As in the defaults: glibc's pthread_create tries clone3 and falls back to clone on ENOSYS
  // (a filter cannot read clone3's flags); a file that does not name clone3 gets that answer.
  if (!rules.some((r) => r.syscall === 'clone3'))
    rules.push({ syscall: 'clone3', action: { kind: 'errno', errno: ENOSYS } });
  return { policy: { rules }, defaultAction: DEFAULT_ACTIONS[da]! };
}

/** Parses and checks a filter file's text; every program must also compile (<= 4096 insns). */
export function parseUserFilter(text: string): UserFilter {
  if (text.length > MAX_FILTER_FILE_BYTES)
    throw new FilterFileError(`the file is larger than ${MAX_FILTER_FILE_BYTES} bytes`);
  let doc: unknown;
  try {
    doc = JSON.parse(text);
  } catch (e) {
    throw new FilterFileError(`not JSON: ${(e as Error).message.slice(0, 120)}`);
  }
  if (!isObject(doc))
    throw new FilterFileError('must be a JSON object with keys main, vcpu, device');
  onlyKeys(doc, [...ROLES], 'top level');
  const out = { policies: {}, defaultActions: {} } as UserFilter;
  for (const role of ROLES) {
    if (!(role in doc)) throw new FilterFileError(`no "${role}" filter (every role needs one)`);
    const r = parseRole(doc[role], role);
    out.policies[role] = r.policy;
    out.defaultActions[role] = r.defaultAction;
  }
  for (const role of ROLES) {
    try {
      compilePolicy(role === 'main' ? processPolicy(out.policies) : out.policies[role]);
    } catch (e) {
      throw new FilterFileError(`${role}: ${(e as Error).message}`);
    }
  }
  return out;
}

/** Reads FILE (a regular file of at most 1 MiB, checked on the opened descriptor) and parses it. */
export function loadUserFilter(path: string): UserFilter {
  let text: string;
  let fd: number | undefined;
  try {
    // O_NONBLOCK: a FIFO named here must not hang the VMM (it is refused as not a file).
    fd = openSync(path, constants.O_RDONLY | constants.O_NONBLOCK);
    const st = fstatSync(fd);
    if (!st.isFile()) throw new FilterFileError('not a regular file');
    if (st.size > MAX_FILTER_FILE_BYTES)
      throw new FilterFileError(`larger than ${MAX_FILTER_FILE_BYTES} bytes`);
    const buf = Buffer.alloc(MAX_FILTER_FILE_BYTES + 1);
    let n = 0;
    for (let r = 1; r > 0 && n < buf.length; n += r) r = readSync(fd, buf, n, buf.length - n, null);
    if (n > MAX_FILTER_FILE_BYTES)
      throw new FilterFileError(`larger than ${MAX_FILTER_FILE_BYTES} bytes`);
    text = buf.subarray(0, n).toString('utf8');
  } catch (e) {
    if (e instanceof FilterFileError)
      throw new FilterFileError(`--seccomp-filter ${path}: ${e.message}`);
    throw new FilterFileError(
      `--seccomp-filter ${path}: cannot read: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`,
    );
  } finally {
    if (fd !== undefined) closeSync(fd);
  }
  try {
    return parseUserFilter(text);
  } catch (e) {
    throw new FilterFileError(`--seccomp-filter ${path}: ${(e as Error).message}`);
  }
}

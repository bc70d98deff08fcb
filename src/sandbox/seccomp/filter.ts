/**
 * Seccomp allow-lists and their compilation to classic BPF.
 *
 * A policy is a list of rules, each naming a system call and, optionally, conditions on its
 * arguments (the shape of Firecracker's seccompiler JSON, docs/seccompiler.md, reduced to what
 * we use). Rules naming the same call are alternatives: the first whose conditions all hold
 * decides. A call no rule allows gets the default action, SECCOMP_RET_KILL_PROCESS.
 *
 * The program: check the architecture first (AUDIT_ARCH_X86_64; an x32 or i386 entry would
 * reuse our numbers for other calls), refuse x32 numbers (>= 0x40000000), then one comparison
 * per allowed call in the order given (so the hot calls go first), each followed by its
 * argument checks.
 */
import { BpfAssembler, encodeProgram, type Insn } from './bpf.js';
import { SYSCALLS_X86_64 } from './syscalls-x86_64.js';

export const AUDIT_ARCH_X86_64 = 0xc000003e;
export const X32_SYSCALL_BIT = 0x40000000;

// Actions (linux/seccomp.h).
export const SECCOMP_RET_KILL_PROCESS = 0x80000000;
export const SECCOMP_RET_KILL_THREAD = 0x00000000;
export const SECCOMP_RET_TRAP = 0x00030000;
export const SECCOMP_RET_ERRNO = 0x00050000;
export const SECCOMP_RET_LOG = 0x7ffc0000;
export const SECCOMP_RET_ALLOW = 0x7fff0000;
export const SECCOMP_FILTER_FLAG_TSYNC = 1;

// struct seccomp_data: int nr; u32 arch; u64 instruction_pointer; u64 args[6].
export const SECCOMP_DATA_NR = 0;
export const SECCOMP_DATA_ARCH = 4;
export const seccompDataArgLow = (i: number) => 16 + 8 * i;
export const seccompDataArgHigh = (i: number) => 16 + 8 * i + 4;

/** One condition on an argument: `dword` compares its low 32 bits, `qword` all 64. */
export interface ArgCondition {
  index: number;
  type: 'dword' | 'qword';
  op: 'eq' | 'ne' | 'masked_eq';
  val: bigint;
  /** masked_eq only: the condition is (arg & mask) == val. */
  mask?: bigint;
  comment?: string;
}

export type RuleAction = { kind: 'allow' } | { kind: 'errno'; errno: number };

export interface SyscallRule {
  syscall: string;
  /** All must hold (AND); no conditions: the call is allowed whatever its arguments. */
  args?: ArgCondition[];
  /** What a matching call gets (default: allow). */
  action?: RuleAction;
}

export interface Policy {
  rules: SyscallRule[];
}

export function syscallNumber(name: string): number | undefined {
  return Object.hasOwn(SYSCALLS_X86_64, name) ? SYSCALLS_X86_64[name] : undefined;
}

/** The distinct system calls a policy lets through (for counting beside Firecracker's). */
export function allowedSyscalls(p: Policy): string[] {
  return [
    ...new Set(
      p.rules.filter((r) => (r.action?.kind ?? 'allow') === 'allow').map((r) => r.syscall),
    ),
  ];
}

const actionValue = (a: RuleAction | undefined): number =>
  a === undefined || a.kind === 'allow'
    ? SECCOMP_RET_ALLOW
    : SECCOMP_RET_ERRNO | (a.errno & 0xffff);

const lo32 = (v: bigint) => Number(v & 0xffffffffn);
const hi32 = (v: bigint) => Number((v >> 32n) & 0xffffffffn);

/** Emits one condition: falls through when it holds, jumps to `fail` when it does not. */
function emitCondition(a: BpfAssembler, c: ArgCondition, fail: string): void {
  const mask = c.op === 'masked_eq' ? (c.mask ?? 0xffffffffffffffffn) : 0xffffffffffffffffn;
  const words: Array<{ off: number; val: number; mask: number }> = [
    { off: seccompDataArgLow(c.index), val: lo32(c.val), mask: lo32(mask) },
  ];
  if (c.type === 'qword')
    words.unshift({ off: seccompDataArgHigh(c.index), val: hi32(c.val), mask: hi32(mask) });
  if (c.op === 'ne') {
    // Holds when any word differs.
    const holds = a.newLabel('ne');
    words.forEach((w, i) => {
      a.loadWord(w.off);
      a.jeq(w.val, i === words.length - 1 ? fail : 0, holds);
    });
    a.label(holds);
    return;
  }
  for (const w of words) {
    a.loadWord(w.off);
    if (w.mask !== 0xffffffff) a.and(w.mask);
    a.jeq(w.val, 0, fail);
  }
}

/** The instructions checking one call's alternatives (entered when the number matched). */
function emitBody(a: BpfAssembler, rules: SyscallRule[], defaultAction: number): void {
  for (let i = 0; i < rules.length; i++) {
    const r = rules[i]!;
    const next = a.newLabel('alt');
    for (const c of r.args ?? []) emitCondition(a, c, next);
    a.ret(actionValue(r.action));
    a.label(next);
  }
  a.ret(defaultAction);
}

/** Checks a policy's shape (names, indexes, values); returns the problems found. */
export function policyProblems(p: Policy): string[] {
  const out: string[] = [];
  for (const r of p.rules) {
    if (syscallNumber(r.syscall) === undefined) out.push(`unknown system call "${r.syscall}"`);
    for (const c of r.args ?? []) {
      if (!Number.isInteger(c.index) || c.index < 0 || c.index > 5)
        out.push(`${r.syscall}: argument index ${c.index} (0 to 5)`);
      const max = c.type === 'dword' ? 0xffffffffn : 0xffffffffffffffffn;
      if (c.val < 0n || c.val > max)
        out.push(`${r.syscall}: value ${c.val} does not fit a ${c.type}`);
      if (c.mask !== undefined && (c.mask < 0n || c.mask > max))
        out.push(`${r.syscall}: mask ${c.mask} does not fit a ${c.type}`);
    }
  }
  return out;
}

/** Compiles a policy to BPF instructions; throws on a policy policyProblems() rejects. */
export function compilePolicy(p: Policy, defaultAction = SECCOMP_RET_KILL_PROCESS): Insn[] {
  const problems = policyProblems(p);
  if (problems.length > 0) throw new Error(`bad seccomp policy: ${problems.join('; ')}`);
  // Group the alternatives of each call, keeping the order of first appearance.
  const byCall = new Map<number, SyscallRule[]>();
  for (const r of p.rules) {
    const nr = syscallNumber(r.syscall)!;
    const list = byCall.get(nr) ?? [];
    // Once a call is allowed whatever its arguments, later alternatives never decide.
    if (!list.some((x) => (x.args ?? []).length === 0)) list.push(r);
    byCall.set(nr, list);
  }
  const a = new BpfAssembler();
  // Another ABI, or x32 numbers, kill whatever the default action (even in audit mode).
  a.loadWord(SECCOMP_DATA_ARCH);
  a.jeq(AUDIT_ARCH_X86_64, 'arch-ok', 0);
  a.ret(SECCOMP_RET_KILL_PROCESS);
  a.label('arch-ok');
  a.loadWord(SECCOMP_DATA_NR);
  a.jge(X32_SYSCALL_BIT, 0, 'native-abi');
  a.ret(SECCOMP_RET_KILL_PROCESS);
  a.label('native-abi');
  for (const [nr, rules] of byCall) {
    const plain = rules.length === 1 && (rules[0]!.args ?? []).length === 0;
    if (plain) {
      // The common case: one comparison and a return.
      const next = a.newLabel('nr');
      a.jeq(nr, 0, next);
      a.ret(actionValue(rules[0]!.action));
      a.label(next);
      continue;
    }
    // Argument checks load other words into A: each miss reloads the number after them.
    const probe = new BpfAssembler();
    emitBody(probe, rules, defaultAction);
    const next = a.newLabel('nr');
    if (probe.length <= 255) {
      a.jeq(nr, 0, next);
    } else {
      const body = a.newLabel('body');
      a.jeq(nr, body, 0);
      a.ja(next);
      a.label(body);
    }
    emitBody(a, rules, defaultAction);
    a.label(next);
    a.loadWord(SECCOMP_DATA_NR);
  }
  a.ret(defaultAction);
  return a.assemble();
}

/** compilePolicy, encoded for the kernel (array of struct sock_filter). */
export function compilePolicyBytes(p: Policy, defaultAction?: number): Uint8Array {
  return encodeProgram(compilePolicy(p, defaultAction));
}

/**
 * CPU templates (Firecracker's CustomCpuTemplate, x86_64): modifiers applied to the CPUID the
 * VMM gives its vCPUs and to MSRs it writes at boot, so that a guest sees a chosen feature set.
 *
 * A modifier's bitmap is a string of '0', '1' and 'x' (keep), most significant bit first,
 * optionally prefixed with "0b" and grouped with '_'; a shorter string leaves the high bits
 * alone. It becomes a filter (the bits it sets) and a value: reg = (reg & ~filter) | value.
 *
 * Order, as Firecracker's: the CPUID modifiers are applied to KVM's supported CPUID before the
 * per-vCPU normalization (cpuid.ts: APIC ids, topology); the MSR modifiers to the values vCPU 0
 * reads once its CPUID is set, and the result is written to every vCPU. A modifier for a leaf
 * or MSR the host does not have is an error, not a silent no-op.
 *
 * Everything parsed here comes from an API client or a file: bounded (counts, string lengths)
 * and checked, each fault naming the field.
 */
import { ConfigError } from '../../util/errors.js';
import type { CpuidEntry } from '../../kvm/types.js';

export type CpuidRegister = 'eax' | 'ebx' | 'ecx' | 'edx';
export const CPUID_REGISTERS: readonly CpuidRegister[] = ['eax', 'ebx', 'ecx', 'edx'];

/** reg = (reg & ~filter) | value; value only has bits that filter has. */
export interface BitFilter {
  filter: bigint;
  value: bigint;
}

export interface CpuidRegisterModifier {
  register: CpuidRegister;
  bitmap: BitFilter;
}

export interface CpuidLeafModifier {
  leaf: number;
  subleaf: number;
  /** KVM_CPUID_FLAG_* for the entry (1: the subleaf is significant). */
  flags: number;
  modifiers: CpuidRegisterModifier[];
}

export interface MsrModifier {
  addr: number;
  bitmap: BitFilter;
}

/** "121" (require KVM capability 121) or "!121" (do not require it). */
export interface KvmCapabilityChange {
  cap: number;
  remove: boolean;
}

export interface CpuTemplate {
  kvm_capabilities: KvmCapabilityChange[];
  cpuid_modifiers: CpuidLeafModifier[];
  msr_modifiers: MsrModifier[];
}

/** Caps on what a client may send (Firecracker's own templates use at most a dozen of each). */
export const MAX_CPUID_MODIFIERS = 256;
export const MAX_REGISTER_MODIFIERS = 16;
export const MAX_MSR_MODIFIERS = 256;
export const MAX_KVM_CAPABILITIES = 64;
/** "0b" + 64 digits + 63 separators, with room to spare. */
const MAX_STRING = 256;

/** KVM_CPUID_FLAG_SIGNIFCANT_INDEX | STATEFUL_FUNC | STATE_READ_NEXT: the flags KVM defines. */
const KNOWN_CPUID_FLAGS = 0x7;

export function emptyCpuTemplate(): CpuTemplate {
  return { kvm_capabilities: [], cpuid_modifiers: [], msr_modifiers: [] };
}

function describe(v: unknown): string {
  if (typeof v === 'string') return JSON.stringify(v.length > 80 ? `${v.slice(0, 80)}...` : v);
  if (Array.isArray(v)) return 'an array';
  if (v === null) return 'null';
  return typeof v === 'object' ? 'an object' : String(v);
}

/**
 * A bitmap string -> its filter and value. `bits` is the register's width (32 for CPUID, 64 for
 * MSRs). Throws ConfigError naming `what` for an unknown character, too many digits, or no
 * digit at all.
 */
export function parseBitmap(s: unknown, bits: 32 | 64, what = 'bitmap'): BitFilter {
  if (typeof s !== 'string')
    throw new ConfigError(`${what}: expected a string, got ${describe(s)}`);
  if (s.length > MAX_STRING) throw new ConfigError(`${what}: too long (${s.length} characters)`);
  const body = s.startsWith('0b') ? s.slice(2) : s;
  let filter = 0n;
  let value = 0n;
  let i = 0;
  for (let k = body.length - 1; k >= 0; k--) {
    const c = body[k]!;
    if (c === '_') continue;
    if (c !== 'x' && c !== '0' && c !== '1')
      throw new ConfigError(
        `${what}: ${describe(s)} has ${JSON.stringify(c)}; a bitmap has only 0, 1, x (keep) and _`,
      );
    if (i === bits) throw new ConfigError(`${what}: ${describe(s)} has more than ${bits} bits`);
    const bit = 1n << BigInt(i);
    if (c !== 'x') filter |= bit;
    if (c === '1') value |= bit;
    i++;
  }
  if (i === 0) throw new ConfigError(`${what}: ${describe(s)} has no bits`);
  return { filter, value };
}

/** The bitmap as Firecracker writes it: "0b" and every bit, 'x' where the filter is clear. */
export function formatBitmap(f: BitFilter, bits: 32 | 64): string {
  let s = '0b';
  for (let i = bits - 1; i >= 0; i--) {
    const bit = 1n << BigInt(i);
    s += (f.filter & bit) === 0n ? 'x' : (f.value & bit) !== 0n ? '1' : '0';
  }
  return s;
}

/** reg with the bitmap applied. */
export function applyBitmap(reg: bigint, f: BitFilter): bigint {
  return (reg & ~f.filter) | f.value;
}

/** "0x1f", "0b101" or "31" -> a number below 2^32 (Firecracker's docs allow all three). */
export function parseIndex(v: unknown, what: string): number {
  if (typeof v !== 'string')
    throw new ConfigError(`${what}: expected a string such as "0x1", got ${describe(v)}`);
  const s = v.replaceAll('_', '');
  const re = s.startsWith('0x')
    ? /^0x[0-9a-fA-F]{1,8}$/
    : s.startsWith('0b')
      ? /^0b[01]{1,32}$/
      : /^[0-9]{1,10}$/;
  if (!re.test(s))
    throw new ConfigError(
      `${what}: ${describe(v)} is not a number (write it as hex "0x...", binary "0b..." or decimal)`,
    );
  const n = s.startsWith('0b') ? parseInt(s.slice(2), 2) : Number(s);
  if (!Number.isSafeInteger(n) || n > 0xffff_ffff)
    throw new ConfigError(`${what}: ${describe(v)} does not fit in 32 bits`);
  return n;
}

function obj(v: unknown, what: string, allowed: readonly string[]): Record<string, unknown> {
  if (typeof v !== 'object' || v === null || Array.isArray(v))
    throw new ConfigError(`${what}: expected an object, got ${describe(v)}`);
  const o = v as Record<string, unknown>;
  for (const k of Object.keys(o)) {
    if (!allowed.includes(k))
      throw new ConfigError(
        `${what}: unknown field \`${k.slice(0, 64)}\`, expected one of ${allowed.map((a) => `\`${a}\``).join(', ')}`,
      );
  }
  return o;
}

function arr(v: unknown, what: string, max: number): unknown[] {
  if (v === undefined || v === null) return [];
  if (!Array.isArray(v)) throw new ConfigError(`${what}: expected an array, got ${describe(v)}`);
  if (v.length > max) throw new ConfigError(`${what}: ${v.length} entries; at most ${max}`);
  return v;
}

function required(o: Record<string, unknown>, k: string, what: string): unknown {
  if (o[k] === undefined || o[k] === null) throw new ConfigError(`${what}: missing field \`${k}\``);
  return o[k];
}

/**
 * The body of PUT /cpu-config (or the config file's "cpu-config" object) -> a CpuTemplate.
 * x86_64 fields only: reg_modifiers and vcpu_features (aarch64) are accepted only empty.
 * Throws ConfigError naming the field at fault.
 */
export function parseCpuTemplate(json: unknown): CpuTemplate {
  const o = obj(json, 'cpu-config', [
    'kvm_capabilities',
    'cpuid_modifiers',
    'msr_modifiers',
    'reg_modifiers',
    'vcpu_features',
  ]);
  for (const k of ['reg_modifiers', 'vcpu_features']) {
    if (arr(o[k], `cpu-config.${k}`, 0x7fff_ffff).length > 0)
      throw new ConfigError(`cpu-config.${k}: aarch64 only; this is an x86_64 host`);
  }
  const kvm_capabilities = arr(o.kvm_capabilities, 'kvm_capabilities', MAX_KVM_CAPABILITIES).map(
    (v, i) => {
      const what = `kvm_capabilities[${i}]`;
      if (
        typeof v !== 'string' ||
        !/^!?[0-9]{1,10}$/.test(v) ||
        Number(v.replace('!', '')) > 0xffff_ffff
      )
        throw new ConfigError(
          `${what}: ${describe(v)} is not a capability ("121" to require it, "!121" to remove it)`,
        );
      return { cap: Number(v.replace('!', '')), remove: v.startsWith('!') };
    },
  );
  const cpuid_modifiers = arr(o.cpuid_modifiers, 'cpuid_modifiers', MAX_CPUID_MODIFIERS).map(
    (v, i): CpuidLeafModifier => {
      const what = `cpuid_modifiers[${i}]`;
      const m = obj(v, what, ['leaf', 'subleaf', 'flags', 'modifiers']);
      const flags = required(m, 'flags', what);
      if (
        !Number.isInteger(flags) ||
        (flags as number) < 0 ||
        ((flags as number) & ~KNOWN_CPUID_FLAGS) !== 0
      )
        throw new ConfigError(
          `${what}.flags: ${describe(flags)} is not a set of KVM CPUID flags (an integer from 0 to 7)`,
        );
      const regs = arr(required(m, 'modifiers', what), `${what}.modifiers`, MAX_REGISTER_MODIFIERS);
      return {
        leaf: parseIndex(required(m, 'leaf', what), `${what}.leaf`),
        subleaf: parseIndex(required(m, 'subleaf', what), `${what}.subleaf`),
        flags: flags as number,
        modifiers: regs.map((r, j) => {
          const w = `${what}.modifiers[${j}]`;
          const rm = obj(r, w, ['register', 'bitmap']);
          const register = required(rm, 'register', w);
          if (!CPUID_REGISTERS.includes(register as CpuidRegister))
            throw new ConfigError(
              `${w}.register: ${describe(register)} is not a CPUID register (one of eax, ebx, ecx, edx)`,
            );
          return {
            register: register as CpuidRegister,
            bitmap: parseBitmap(required(rm, 'bitmap', w), 32, `${w}.bitmap`),
          };
        }),
      };
    },
  );
  const msr_modifiers = arr(o.msr_modifiers, 'msr_modifiers', MAX_MSR_MODIFIERS).map(
    (v, i): MsrModifier => {
      const what = `msr_modifiers[${i}]`;
      const m = obj(v, what, ['addr', 'bitmap']);
      return {
        addr: parseIndex(required(m, 'addr', what), `${what}.addr`),
        bitmap: parseBitmap(required(m, 'bitmap', what), 64, `${what}.bitmap`),
      };
    },
  );
  return { kvm_capabilities, cpuid_modifiers, msr_modifiers };
}

const hex = (n: number) => `0x${n.toString(16)}`;

/** The template in Firecracker's JSON shape (what it serializes): it parses back to itself. */
export function wireCpuTemplate(t: CpuTemplate): Record<string, unknown> {
  return {
    kvm_capabilities: t.kvm_capabilities.map((c) => `${c.remove ? '!' : ''}${c.cap}`),
    cpuid_modifiers: t.cpuid_modifiers.map((m) => ({
      leaf: hex(m.leaf),
      subleaf: hex(m.subleaf),
      flags: m.flags,
      modifiers: m.modifiers.map((r) => ({
        register: r.register,
        bitmap: formatBitmap(r.bitmap, 32),
      })),
    })),
    msr_modifiers: t.msr_modifiers.map((m) => ({
      addr: hex(m.addr),
      bitmap: formatBitmap(m.bitmap, 64),
    })),
  };
}

/**
 * The CPUID with the template's modifiers applied (a new array; the input is not changed). A
 * modifier's entry takes the modifier's flags, as Firecracker does. Throws ConfigError when a
 * modifier names a leaf/subleaf the table does not have.
 */
export function applyTemplateToCpuid(entries: readonly CpuidEntry[], t: CpuTemplate): CpuidEntry[] {
  const out = entries.map((e) => ({ ...e }));
  for (const m of t.cpuid_modifiers) {
    const e = out.find((x) => x.function === m.leaf && x.index === m.subleaf);
    if (!e)
      throw new ConfigError(
        `the CPU template changes CPUID leaf ${hex(m.leaf)} subleaf ${hex(m.subleaf)}, which this host's KVM does not support`,
      );
    e.flags = m.flags;
    for (const r of m.modifiers) {
      e[r.register] = Number(applyBitmap(BigInt(e[r.register] >>> 0), r.bitmap) & 0xffff_ffffn);
    }
  }
  return out;
}

/** The MSR addresses the template changes, each once, in template order. */
export function templateMsrAddrs(t: CpuTemplate): number[] {
  return [...new Set(t.msr_modifiers.map((m) => m.addr))];
}

/**
 * The MSR values with the template's modifiers applied to `current` (what vCPU 0 read). Throws
 * ConfigError when an address is missing from `current` (KVM would not give it).
 */
export function applyTemplateToMsrs(
  current: ReadonlyMap<number, bigint>,
  t: CpuTemplate,
): Map<number, bigint> {
  const out = new Map(current);
  for (const m of t.msr_modifiers) {
    const v = out.get(m.addr);
    if (v === undefined)
      throw new ConfigError(
        `the CPU template changes MSR ${hex(m.addr)}, which this host's KVM does not support`,
      );
    out.set(m.addr, applyBitmap(v, m.bitmap));
  }
  return out;
}

/** The KVM capabilities a template requires (its "121" entries less its "!121" ones). */
export function requiredKvmCapabilities(t: CpuTemplate): number[] {
  const removed = new Set(t.kvm_capabilities.filter((c) => c.remove).map((c) => c.cap));
  return [
    ...new Set(
      t.kvm_capabilities.filter((c) => !c.remove && !removed.has(c.cap)).map((c) => c.cap),
    ),
  ];
}

/**
 * The template's bits that KVM did not keep: for each modified register, the bits the template
 * names (its filter) as set on the vCPU (`set`, after normalization) against what KVM_GET_CPUID2
 * gives back (`got`). Some hosts rewrite feature leaves on KVM_SET_CPUID2 (PVM passes the host's
 * leaf 1 ECX/EDX and leaf 7 through): the guest then does not see the template there.
 */
export function cpuidTemplateNotApplied(
  set: readonly CpuidEntry[],
  got: readonly CpuidEntry[],
  t: CpuTemplate,
): string[] {
  const out: string[] = [];
  const at = (es: readonly CpuidEntry[], m: CpuidLeafModifier) =>
    es.find((e) => e.function === m.leaf && e.index === m.subleaf);
  for (const m of t.cpuid_modifiers) {
    const s = at(set, m);
    const g = at(got, m);
    if (!s) continue; // replaced by the normalization (topology leaves)
    for (const r of m.modifiers) {
      const mask = Number(r.bitmap.filter);
      const want = (s[r.register] & mask) >>> 0;
      const have = g === undefined ? undefined : (g[r.register] & mask) >>> 0;
      if (have !== want)
        out.push(
          `CPUID leaf ${hex(m.leaf)} subleaf ${hex(m.subleaf)} ${r.register}: the template's bits are ${hex(want)} but this host's KVM keeps ${have === undefined ? 'no such leaf' : hex(have)}`,
        );
    }
  }
  return out;
}

/**
 * A small classic-BPF assembler for seccomp programs (linux/filter.h, linux/bpf_common.h).
 *
 * Only what a seccomp filter needs: load a 32-bit word of struct seccomp_data, AND it with a
 * constant, compare it with conditional jumps, and return an action. Jumps go to named labels
 * and only forward (classic BPF has no backward jumps, which is why every program ends); a
 * label too far for a conditional jump's 8-bit offset is an error, not a silent wrap.
 */

// Instruction classes and modes (linux/bpf_common.h).
export const BPF_LD = 0x00;
export const BPF_ALU = 0x04;
export const BPF_JMP = 0x05;
export const BPF_RET = 0x06;
export const BPF_W = 0x00;
export const BPF_ABS = 0x20;
export const BPF_K = 0x00;
export const BPF_AND = 0x50;
export const BPF_JA = 0x00;
export const BPF_JEQ = 0x10;
export const BPF_JGT = 0x20;
export const BPF_JGE = 0x30;
export const BPF_JSET = 0x40;

/** The kernel's bound on a program (BPF_MAXINSNS). */
export const BPF_MAX_INSNS = 4096;

/** One struct sock_filter. */
export interface Insn {
  code: number;
  jt: number;
  jf: number;
  k: number;
}

/** A jump target: a label name, or 0 for "the next instruction". */
export type Target = string | 0;

type Pending =
  | { kind: 'insn'; insn: Insn }
  | { kind: 'jump'; code: number; k: number; jt: Target; jf: Target }
  | { kind: 'ja'; to: string };

export class BpfAssembler {
  private readonly items: Pending[] = [];
  private readonly labels = new Map<string, number>();
  private nextLabel = 0;

  /** A fresh label name (unique in this program). */
  newLabel(hint = 'L'): string {
    return `${hint}#${this.nextLabel++}`;
  }

  /** Binds `name` to the next instruction. */
  label(name: string): this {
    if (this.labels.has(name)) throw new Error(`BPF label ${name} defined twice`);
    this.labels.set(name, this.items.length);
    return this;
  }

  /** A = the 32-bit word at byte `offset` of the input (struct seccomp_data). */
  loadWord(offset: number): this {
    return this.push({ code: BPF_LD | BPF_W | BPF_ABS, jt: 0, jf: 0, k: offset });
  }

  /** A &= k */
  and(k: number): this {
    return this.push({ code: BPF_ALU | BPF_AND | BPF_K, jt: 0, jf: 0, k });
  }

  /** if (A == k) goto jt else goto jf */
  jeq(k: number, jt: Target, jf: Target): this {
    return this.jump(BPF_JEQ, k, jt, jf);
  }

  /** if (A >= k) goto jt else goto jf (unsigned) */
  jge(k: number, jt: Target, jf: Target): this {
    return this.jump(BPF_JGE, k, jt, jf);
  }

  /** if (A > k) goto jt else goto jf (unsigned) */
  jgt(k: number, jt: Target, jf: Target): this {
    return this.jump(BPF_JGT, k, jt, jf);
  }

  /** if (A & k) goto jt else goto jf */
  jset(k: number, jt: Target, jf: Target): this {
    return this.jump(BPF_JSET, k, jt, jf);
  }

  /** goto label (32-bit offset) */
  ja(to: string): this {
    this.items.push({ kind: 'ja', to });
    return this;
  }

  /** return k (a SECCOMP_RET_* action) */
  ret(k: number): this {
    return this.push({ code: BPF_RET | BPF_K, jt: 0, jf: 0, k });
  }

  get length(): number {
    return this.items.length;
  }

  /** The resolved instructions. Throws on an unknown label, a backward or too-long jump. */
  assemble(): Insn[] {
    if (this.items.length === 0 || this.items.length > BPF_MAX_INSNS)
      throw new Error(`BPF program of ${this.items.length} instructions (1 to ${BPF_MAX_INSNS})`);
    const offset = (at: number, t: Target, wide: boolean): number => {
      if (t === 0) return 0;
      const dest = this.labels.get(t);
      if (dest === undefined) throw new Error(`BPF label ${t} is not defined`);
      const off = dest - at - 1;
      if (off < 0) throw new Error(`BPF jump to ${t} goes backward`);
      if (!wide && off > 255) throw new Error(`BPF jump to ${t} is ${off} instructions (max 255)`);
      return off;
    };
    return this.items.map((it, i) => {
      switch (it.kind) {
        case 'insn':
          return it.insn;
        case 'jump':
          return {
            code: BPF_JMP | it.code | BPF_K,
            jt: offset(i, it.jt, false),
            jf: offset(i, it.jf, false),
            k: it.k >>> 0,
          };
        case 'ja':
          return { code: BPF_JMP | BPF_JA, jt: 0, jf: 0, k: offset(i, it.to, true) };
      }
    });
  }

  private push(insn: Insn): this {
    this.items.push({ kind: 'insn', insn: { ...insn, k: insn.k >>> 0 } });
    return this;
  }

  private jump(code: number, k: number, jt: Target, jf: Target): this {
    this.items.push({ kind: 'jump', code, k, jt, jf });
    return this;
  }
}

/** The program as the kernel takes it: struct sock_filter { u16 code; u8 jt; u8 jf; u32 k; }. */
export function encodeProgram(insns: readonly Insn[]): Uint8Array {
  const out = new Uint8Array(insns.length * 8);
  const v = new DataView(out.buffer);
  insns.forEach((x, i) => {
    v.setUint16(i * 8, x.code, true);
    v.setUint8(i * 8 + 2, x.jt);
    v.setUint8(i * 8 + 3, x.jf);
    v.setUint32(i * 8 + 4, x.k >>> 0, true);
  });
  return out;
}

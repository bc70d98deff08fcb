/**
 * The boot GDT (at GDT_ADDR) and a null IDT (at IDT_ADDR), plus the KVM segment registers that
 * match them. The vCPU starts with these loaded through KVM_SET_SREGS, so the descriptors in
 * memory matter only when the guest reloads a selector before installing its own GDT (Linux
 * does, which is why the in-memory copy must agree with the registers).
 *
 * Layout: 0 null, 1 (0x08) code, 2 (0x10) data, 3 (0x18) TSS.
 */
import type { GuestMemory } from '../../memory/guest-memory.js';
import type { DTable, Segment } from '../../kvm/types.js';
import type { Result } from '../../util/result.js';
import { writeChecked } from './boot-params.js';
import { GDT_ADDR, IDT_ADDR } from './layout.js';

/** The entry mode decides the code segment: 64-bit (L=1) or flat 32-bit (D=1) for PVH. */
export type CpuMode = 'long64' | 'pvh32';

export const CODE_SELECTOR = 0x08;
export const DATA_SELECTOR = 0x10;
export const TSS_SELECTOR = 0x18;

/**
 * Descriptor flags as a 16-bit value: bits 0-7 the access byte (P, DPL, S, type), bits 12-15 the
 * G, D/B, L, AVL nibble. 0xa09b: present ring-0 execute/read code, G and L set.
 */
const FLAGS = {
  long64: { code: 0xa09b, data: 0xc093, tss: 0x808b, tssLimit: 0xfffff },
  // PVH ABI: CS/DS flat 32-bit with limit 4 GiB, TR a busy 32-bit TSS (0x8b) of any base/limit.
  pvh32: { code: 0xc09b, data: 0xc093, tss: 0x008b, tssLimit: 0x67 },
} as const;

export interface BootGdt {
  /** The four 8-byte descriptors, in order. */
  entries: bigint[];
  code: Segment;
  data: Segment;
  tss: Segment;
  gdt: DTable;
  idt: DTable;
}

/** Encode a descriptor from its flags, 32-bit base and 20-bit limit (Intel SDM 3.4.5). */
export function gdtEntry(flags: number, base: number, limit: number): bigint {
  const b = BigInt(base >>> 0);
  const l = BigInt(limit & 0xfffff);
  const f = BigInt(flags & 0xf0ff);
  return (
    ((b & 0xff00_0000n) << 32n) |
    (f << 40n) |
    ((l & 0xf_0000n) << 32n) |
    ((b & 0x00ff_ffffn) << 16n) |
    (l & 0xffffn)
  );
}

/** The KVM view of a descriptor: the limit is byte-granular, so G=1 scales it by 4 KiB. */
export function segmentFromEntry(entry: bigint, index: number): Segment {
  const n = (shift: bigint, mask: bigint) => Number((entry >> shift) & mask);
  const base = n(16n, 0xff_ffffn) + n(56n, 0xffn) * 0x100_0000;
  const rawLimit = n(0n, 0xffffn) | (n(48n, 0xfn) << 16);
  const access = n(40n, 0xffn);
  const g = n(55n, 1n);
  const present = access >> 7;
  return {
    base: BigInt(base),
    limit: g ? (rawLimit * 0x1000 + 0xfff) >>> 0 : rawLimit,
    selector: index * 8,
    type: access & 0xf,
    present,
    dpl: (access >> 5) & 3,
    db: n(54n, 1n),
    s: (access >> 4) & 1,
    l: n(53n, 1n),
    g,
    avl: n(52n, 1n),
    unusable: present ? 0 : 1,
  };
}

export function bootGdt(mode: CpuMode): BootGdt {
  const f = FLAGS[mode];
  const entries = [
    0n,
    gdtEntry(f.code, 0, 0xfffff),
    gdtEntry(f.data, 0, 0xfffff),
    gdtEntry(f.tss, 0, f.tssLimit),
  ];
  return {
    entries,
    code: segmentFromEntry(entries[1]!, 1),
    data: segmentFromEntry(entries[2]!, 2),
    tss: segmentFromEntry(entries[3]!, 3),
    gdt: { base: BigInt(GDT_ADDR), limit: entries.length * 8 - 1 },
    // A null IDT: any exception before the guest loads its own IDT is a triple fault (a clean,
    // visible KVM_EXIT_SHUTDOWN) rather than a jump through garbage.
    idt: { base: BigInt(IDT_ADDR), limit: 7 },
  };
}

/** Write the descriptors at GDT_ADDR and one zero IDT entry at IDT_ADDR. */
export function writeGdt(mem: GuestMemory, g: BootGdt): Result<void, Error> {
  const bytes = new Uint8Array(g.entries.length * 8);
  const dv = new DataView(bytes.buffer);
  g.entries.forEach((e, i) => dv.setBigUint64(i * 8, e, true));
  const r = writeChecked(mem, GDT_ADDR, bytes, 'GDT');
  if (!r.ok) return r;
  return writeChecked(mem, IDT_ADDR, new Uint8Array(8), 'IDT');
}

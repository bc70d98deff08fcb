import { test } from 'node:test';
import assert from 'node:assert/strict';
import type { Segment, Sregs } from '../../kvm/types.js';
import { bootGdt } from './gdt.js';
import { BOOT_STACK_POINTER, PML4_ADDR, PVH_START_INFO_ADDR, ZERO_PAGE_ADDR } from './layout.js';
import {
  CR0_PE,
  CR0_PG,
  CR4_PAE,
  EFER_LMA,
  EFER_LME,
  longModeRegs,
  longModeSregs,
  pvhRegs,
  pvhSregs,
} from './regs.js';

const seg = (selector: number): Segment => ({
  base: 0n,
  limit: 0xffff,
  selector,
  type: 3,
  present: 1,
  dpl: 0,
  db: 0,
  s: 1,
  l: 0,
  g: 0,
  avl: 0,
  unusable: 0,
});
/** Roughly what KVM_GET_SREGS returns after reset. */
const reset = (): Sregs => ({
  cs: { ...seg(0xf000), base: 0xffff0000n, type: 0xb },
  ds: seg(0),
  es: seg(0),
  fs: seg(0),
  gs: seg(0),
  ss: seg(0),
  tr: { ...seg(0), type: 0xb, s: 0 },
  ldt: { ...seg(0), type: 2, s: 0 },
  gdt: { base: 0n, limit: 0xffff },
  idt: { base: 0n, limit: 0xffff },
  cr0: 0x60000010n,
  cr2: 0n,
  cr3: 0n,
  cr4: 0n,
  cr8: 0n,
  efer: 0n,
  apicBase: 0xfee00900n,
});

test('64-bit entry registers', () => {
  const r = longModeRegs(0x100200);
  assert.equal(r.rip, 0x100200n);
  assert.equal(r.rsi, BigInt(ZERO_PAGE_ADDR));
  assert.equal(r.rsp, BigInt(BOOT_STACK_POINTER));
  assert.equal(r.rbp, BigInt(BOOT_STACK_POINTER));
  assert.equal(r.rflags, 2n);
});

test('64-bit sregs: long mode, paging, flat segments; other fields kept', () => {
  const g = bootGdt('long64');
  const base = reset();
  const s = longModeSregs(base, g);
  assert.equal(s.cr0 & (CR0_PE | CR0_PG), CR0_PE | CR0_PG);
  assert.equal(s.cr0 & (3n << 29n), 0n); // CD/NW cleared
  assert.equal(s.cr3, BigInt(PML4_ADDR));
  assert.equal(s.cr4 & CR4_PAE, CR4_PAE);
  assert.equal(s.efer, EFER_LME | EFER_LMA);
  assert.equal(s.cs.l, 1);
  assert.equal(s.cs.selector, 0x08);
  for (const k of ['ds', 'es', 'fs', 'gs', 'ss'] as const) assert.equal(s[k].selector, 0x10);
  assert.equal(s.tr.selector, 0x18);
  assert.equal(s.apicBase, 0xfee00900n);
  assert.deepEqual(s.ldt, base.ldt);
  assert.equal(base.cr0, 0x60000010n); // the input is not mutated
  s.cs.base = 5n;
  assert.equal(g.code.base, 0n); // nor shared with the GDT description
});

test('PVH registers and sregs: protected mode without paging', () => {
  const r = pvhRegs(0x1000123);
  assert.equal(r.rip, 0x1000123n);
  assert.equal(r.rbx, BigInt(PVH_START_INFO_ADDR));
  assert.equal(r.rflags, 2n);
  const s = pvhSregs(reset(), bootGdt('pvh32'));
  assert.equal(s.cr0, 0x11n);
  assert.equal(s.cr4, 0n);
  assert.equal(s.efer, 0n);
  assert.equal(s.cs.db, 1);
  assert.equal(s.cs.l, 0);
  assert.equal(s.ss.limit, 0xffffffff);
});

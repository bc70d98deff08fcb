/**
 * Everything the x86_64 boot needs in guest memory, in one call: kernel, initrd, command line,
 * e820, GDT/IDT, identity page tables and zero page (64-bit entry) or PVH start_info (32-bit
 * entry), MP table, and a hook for the ACPI builder. Returns what the vCPU setup applies with
 * KVM: registers, an sregs patch over KVM_GET_SREGS, and the boot MSRs.
 */
import type { GuestMemory } from '../../memory/guest-memory.js';
import type { Regs, Sregs } from '../../kvm/types.js';
import { type BzImageInfo, isBzImage, parseBzImage } from '../../loader/bzimage.js';
import { Cmdline } from '../../loader/cmdline.js';
import { isElf, parseElf } from '../../loader/elf.js';
import { ConfigError, GuestMemoryError, ImageError } from '../../util/errors.js';
import { type Result, err, ok } from '../../util/result.js';
import { writeChecked, writePvhStartInfo, writeZeroPage } from './boot-params.js';
import { type E820Entry, e820Entries } from './e820.js';
import { type CpuMode, bootGdt, writeGdt } from './gdt.js';
import { CMDLINE_ADDR, CMDLINE_MAX_SIZE, HIGH_MEMORY_START } from './layout.js';
import { type BootMsr, bootMsrs } from './msrs.js';
import { writeMptable } from './mptable.js';
import { writeIdentityPageTables } from './paging.js';
import { longModeRegs, longModeSregs, pvhRegs, pvhSregs } from './regs.js';

export type KernelKind = 'bzimage' | 'elf-pvh' | 'elf64';

export interface KernelLoad {
  kind: KernelKind;
  entry: number;
  /** [kernelStart, kernelEnd): all memory the kernel claims (a bzImage's init_size included). */
  kernelStart: number;
  kernelEnd: number;
  /** For a bzImage: the parsed header (setupHeader goes into the zero page). */
  bzImage?: BzImageInfo;
}

const MiB = 1024 * 1024;
const PAGE = 4096;
const hex = (n: number) => `0x${n.toString(16)}`;

/** Detect the format and copy the kernel into guest RAM above the low boot area (>= 1 MiB). */
export function loadKernel(mem: GuestMemory, image: Uint8Array): Result<KernelLoad, Error> {
  const pieces: Array<{ addr: number; bytes: Uint8Array; memsz: number }> = [];
  let load: KernelLoad;
  if (isBzImage(image)) {
    const r = parseBzImage(image);
    if (!r.ok) return r;
    const bz = r.value;
    const payload = image.subarray(bz.payloadOffset);
    // The kernel decompresses itself in place and needs init_size bytes from its load address.
    const memsz = Math.max(payload.length, bz.initSize);
    pieces.push({ addr: bz.loadAddress, bytes: payload, memsz: payload.length });
    load = {
      kind: 'bzimage',
      entry: bz.entry,
      kernelStart: bz.loadAddress,
      kernelEnd: bz.loadAddress + memsz,
      bzImage: bz,
    };
  } else if (isElf(image)) {
    const r = parseElf(image);
    if (!r.ok) return r;
    const elf = r.value;
    let start = Number.MAX_SAFE_INTEGER;
    let end = 0;
    for (const s of elf.segments) {
      pieces.push({
        addr: s.paddr,
        bytes: image.subarray(s.offset, s.offset + s.filesz),
        memsz: s.memsz,
      });
      start = Math.min(start, s.paddr);
      end = Math.max(end, s.paddr + s.memsz);
    }
    const pvh = elf.pvhEntry !== undefined;
    load = {
      kind: pvh ? 'elf-pvh' : 'elf64',
      entry: elf.pvhEntry ?? elf.entry,
      kernelStart: start,
      kernelEnd: end,
    };
  } else {
    return err(new ImageError('kernel image is neither a bzImage nor an ELF64 file'));
  }
  // Check everything before writing anything.
  const ram = `${Math.floor(mem.totalSize / MiB)} MiB`;
  for (const p of [
    ...pieces,
    { addr: load.kernelStart, bytes: new Uint8Array(0), memsz: load.kernelEnd - load.kernelStart },
  ]) {
    if (p.addr < HIGH_MEMORY_START) {
      return err(
        new ImageError(`kernel segment at ${hex(p.addr)} overlaps the boot area below 1 MiB`),
      );
    }
    if (!mem.isValidRange(p.addr, p.memsz)) {
      return err(
        new GuestMemoryError(
          `kernel needs [${hex(p.addr)}, +${p.memsz}), outside guest RAM (${ram})`,
        ),
      );
    }
  }
  for (const p of pieces) {
    mem.write(p.addr, p.bytes);
    if (p.memsz > p.bytes.length) mem.fill(p.addr + p.bytes.length, p.memsz - p.bytes.length);
  }
  return ok(load);
}

/**
 * Where the initrd goes: page-aligned at the top of the RAM region that starts at 0 (below the
 * MMIO hole), under the kernel's initrd_addr_max, above the kernel.
 */
export function placeInitrd(
  mem: GuestMemory,
  size: number,
  kernel: KernelLoad,
): Result<number, Error> {
  if (size <= 0) return err(new ConfigError('initrd is empty'));
  const low = mem.regions.find((r) => r.base === 0);
  // boot.rst: initrd_addr_max is the highest address the initrd's last byte may use.
  const addrMax = kernel.bzImage?.initrdAddrMax || 0xffff_ffff;
  const top = Math.min(low ? low.size : 0, addrMax + 1);
  const addr = Math.floor((top - size) / PAGE) * PAGE;
  if (addr < kernel.kernelEnd) {
    return err(
      new ConfigError(
        `initrd (${Math.ceil(size / MiB)} MiB) does not fit in guest memory (${Math.floor(mem.totalSize / MiB)} MiB) ` +
          `between the kernel end ${hex(kernel.kernelEnd)} and ${hex(top)}`,
      ),
    );
  }
  return ok(addr);
}

export interface BootOptions {
  kernel: Uint8Array;
  initrd?: Uint8Array;
  cmdline: string | Cmdline;
  vcpus: number;
  /** Write the MP table (for kernels without ACPI). Default true. */
  mptable?: boolean;
  /** GiB identity-mapped for the 64-bit entry (1..4). Default 1. */
  identityMapGiB?: number;
  /** The ACPI builder: writes its tables (0xe0000..1 MiB) and returns the RSDP address. */
  acpi?: (mem: GuestMemory, e820: readonly E820Entry[]) => Result<{ rsdpAddr: number }, Error>;
}

export interface BootSetup {
  kernel: KernelLoad;
  mode: CpuMode;
  /** For the boot vCPU (APs wait for INIT/SIPI with the in-kernel irqchip). */
  regs: Regs;
  /** Apply to KVM_GET_SREGS's result, then KVM_SET_SREGS. */
  sregs: (base: Sregs) => Sregs;
  msrs: BootMsr[];
  e820: E820Entry[];
  initrd?: { addr: number; size: number };
  rsdpAddr?: number;
}

export function setupBoot(mem: GuestMemory, o: BootOptions): Result<BootSetup, Error> {
  if (!mem.isValidRange(0, HIGH_MEMORY_START)) {
    return err(new ConfigError('guest RAM must start at 0 and cover the first 1 MiB'));
  }
  let cmdline: Cmdline;
  if (typeof o.cmdline === 'string') {
    const c = Cmdline.from(o.cmdline, CMDLINE_MAX_SIZE);
    if (!c.ok) return c;
    cmdline = c.value;
  } else cmdline = o.cmdline;
  if (cmdline.length > CMDLINE_MAX_SIZE - 1)
    return err(new ConfigError('kernel command line too long'));

  const k = loadKernel(mem, o.kernel);
  if (!k.ok) return k;
  const kernel = k.value;
  const maxCmd = kernel.bzImage?.cmdlineSize;
  if (maxCmd !== undefined && cmdline.length > maxCmd) {
    return err(
      new ConfigError(
        `kernel command line is ${cmdline.length} bytes; this kernel accepts ${maxCmd}`,
      ),
    );
  }
  const e820 = e820Entries(mem.regions);

  let initrd: { addr: number; size: number } | undefined;
  if (o.initrd) {
    const a = placeInitrd(mem, o.initrd.length, kernel);
    if (!a.ok) return a;
    initrd = { addr: a.value, size: o.initrd.length };
    mem.write(initrd.addr, o.initrd);
  }
  const steps: Array<() => Result<unknown, Error>> = [
    () => writeChecked(mem, CMDLINE_ADDR, cmdline.toBytes(), 'command line'),
    () => (o.mptable === false ? ok(undefined) : writeMptable(mem, o.vcpus)),
  ];
  for (const s of steps) {
    const r = s();
    if (!r.ok) return r;
  }
  let rsdpAddr: number | undefined;
  if (o.acpi) {
    const a = o.acpi(mem, e820);
    if (!a.ok) return a;
    rsdpAddr = a.value.rsdpAddr;
  }
  const info = { cmdlineAddr: CMDLINE_ADDR, e820, initrd, rsdpAddr };

  const mode: CpuMode = kernel.kind === 'elf-pvh' ? 'pvh32' : 'long64';
  const gdt = bootGdt(mode);
  const g = writeGdt(mem, gdt);
  if (!g.ok) return g;
  let regs: Regs;
  let sregs: (base: Sregs) => Sregs;
  if (mode === 'pvh32') {
    const w = writePvhStartInfo(mem, info);
    if (!w.ok) return w;
    regs = pvhRegs(kernel.entry);
    sregs = (base) => pvhSregs(base, gdt);
  } else {
    const pt = writeIdentityPageTables(mem, o.identityMapGiB ?? 1);
    if (!pt.ok) return pt;
    const cr3 = pt.value.cr3;
    const zp = writeZeroPage(mem, { ...info, setupHeader: kernel.bzImage?.setupHeader });
    if (!zp.ok) return zp;
    regs = longModeRegs(kernel.entry);
    sregs = (base) => longModeSregs(base, gdt, cr3);
  }
  const out: BootSetup = { kernel, mode, regs, sregs, msrs: bootMsrs(), e820 };
  if (initrd) out.initrd = initrd;
  if (rsdpAddr !== undefined) out.rsdpAddr = rsdpAddr;
  return ok(out);
}

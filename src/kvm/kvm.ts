/**
 * Typed wrappers over the KVM API: the system (/dev/kvm), a VM and a vCPU.
 * File descriptors are process-wide, so a Vcpu can be rebuilt from its fd in the worker thread
 * that runs it (each thread maps kvm_run itself).
 */
import { HostError } from '../util/errors.js';
import * as C from './constants.js';
import { MAP_SHARED, O_RDWR, PROT_READ, PROT_WRITE, isSyscallError, native } from './native.js';
import * as S from './structs.js';
import type { CpuidEntry, MsrEntry, Regs, Sregs } from './types.js';

/** Capabilities without which we refuse to start, with why we need each. */
export const REQUIRED_CAPS: Array<[number, string]> = [
  [C.KVM_CAP_IRQCHIP, 'in-kernel irqchip (KVM_CAP_IRQCHIP)'],
  [C.KVM_CAP_HLT, 'HLT handling (KVM_CAP_HLT)'],
  [C.KVM_CAP_USER_MEMORY, 'user memory regions (KVM_CAP_USER_MEMORY)'],
  [C.KVM_CAP_SET_TSS_ADDR, 'TSS address (KVM_CAP_SET_TSS_ADDR)'],
  [C.KVM_CAP_EXT_CPUID, 'extended CPUID (KVM_CAP_EXT_CPUID)'],
  [C.KVM_CAP_IRQFD, 'interrupts through eventfds (KVM_CAP_IRQFD)'],
  [C.KVM_CAP_IOEVENTFD, 'doorbells through eventfds (KVM_CAP_IOEVENTFD)'],
  [C.KVM_CAP_PIT2, 'in-kernel PIT (KVM_CAP_PIT2)'],
  [C.KVM_CAP_IMMEDIATE_EXIT, 'immediate exit for vCPU kicks (KVM_CAP_IMMEDIATE_EXIT)'],
];

export class Kvm {
  private constructor(readonly fd: number) {}

  /** Opens /dev/kvm and checks the API version and every capability we rely on. */
  static open(path = '/dev/kvm'): Kvm {
    const n = native();
    let fd: number;
    try {
      fd = n.open(path, O_RDWR, 0);
    } catch (e) {
      const code = isSyscallError(e) ? e.code : String(e);
      const why =
        code === 'ENOENT'
          ? 'does not exist (is the kvm module loaded? is this a VM without nested virtualization?)'
          : code === 'EACCES' || code === 'EPERM'
            ? 'is not accessible (run as root or join the kvm group)'
            : `cannot be opened (${code})`;
      throw new HostError(`${path} ${why}`);
    }
    const kvm = new Kvm(fd);
    const version = n.ioctl(fd, C.KVM_GET_API_VERSION, 0);
    if (version !== C.KVM_API_VERSION) {
      n.close(fd);
      throw new HostError(
        `KVM API version ${version} is not supported (need ${C.KVM_API_VERSION})`,
      );
    }
    for (const [cap, what] of REQUIRED_CAPS) {
      if (kvm.checkExtension(cap) <= 0) {
        n.close(fd);
        throw new HostError(`this host's KVM lacks ${what}`);
      }
    }
    return kvm;
  }

  checkExtension(cap: number): number {
    return native().ioctl(this.fd, C.KVM_CHECK_EXTENSION, cap);
  }

  vcpuMmapSize(): number {
    return native().ioctl(this.fd, C.KVM_GET_VCPU_MMAP_SIZE, 0);
  }

  supportedCpuid(): CpuidEntry[] {
    for (let cap = 128; cap <= 4096; cap *= 2) {
      const b = S.allocCpuid2(cap);
      try {
        native().ioctl(this.fd, C.KVM_GET_SUPPORTED_CPUID, b);
        return S.decodeCpuid2(b);
      } catch (e) {
        if (!isSyscallError(e, 'E2BIG')) throw e;
      }
    }
    throw new HostError('KVM_GET_SUPPORTED_CPUID: too many entries');
  }

  /** MSR indices KVM saves/restores and accepts. */
  msrIndexList(): number[] {
    const b = new Uint8Array(4 + 4 * 1024);
    new DataView(b.buffer).setUint32(0, 1024, true);
    native().ioctl(this.fd, C.KVM_GET_MSR_INDEX_LIST, b);
    const v = new DataView(b.buffer);
    const n = v.getUint32(0, true);
    return Array.from({ length: n }, (_, i) => v.getUint32(4 + 4 * i, true));
  }

  createVm(): Vm {
    const fd = native().ioctl(this.fd, C.KVM_CREATE_VM, 0);
    return new Vm(this, fd);
  }

  close(): void {
    native().close(this.fd);
  }
}

export class Vm {
  private nextSlot = 0;
  constructor(
    readonly kvm: Kvm,
    readonly fd: number,
  ) {}

  /** Maps [guestPhys, +size) to the buffer's memory. The buffer must stay mapped while the VM lives. */
  setUserMemoryRegion(guestPhys: number, memory: ArrayBuffer | Uint8Array, flags = 0): number {
    const slot = this.nextSlot++;
    const addr = native().bufferAddress(memory);
    native().ioctl(
      this.fd,
      C.KVM_SET_USER_MEMORY_REGION,
      S.encodeMemoryRegion(slot, flags, guestPhys, memory.byteLength, addr),
    );
    return slot;
  }

  setTssAddr(addr: number): void {
    native().ioctl(this.fd, C.KVM_SET_TSS_ADDR, addr);
  }

  setIdentityMapAddr(addr: number): void {
    const b = new Uint8Array(8);
    new DataView(b.buffer).setBigUint64(0, BigInt(addr), true);
    native().ioctl(this.fd, C.KVM_SET_IDENTITY_MAP_ADDR, b);
  }

  createIrqchip(): void {
    native().ioctl(this.fd, C.KVM_CREATE_IRQCHIP, 0);
  }

  createPit2(): void {
    const b = new Uint8Array(64);
    new DataView(b.buffer).setUint32(0, C.KVM_PIT_SPEAKER_DUMMY, true);
    native().ioctl(this.fd, C.KVM_CREATE_PIT2, b);
  }

  irqLine(irq: number, level: boolean): void {
    native().ioctl(this.fd, C.KVM_IRQ_LINE, S.encodeIrqLevel(irq, level ? 1 : 0));
  }

  /** Writes to eventfd `fd` raise GSI `gsi` (edge). */
  registerIrqfd(fd: number, gsi: number): void {
    native().ioctl(this.fd, C.KVM_IRQFD, S.encodeIrqfd(fd, gsi, 0));
  }

  /** Guest writes of `datamatch` (len bytes) to `addr` signal eventfd `fd` without an exit. */
  registerIoeventfd(
    fd: number,
    addr: number,
    len: number,
    opts: { pio?: boolean; datamatch?: bigint } = {},
  ): void {
    let flags = opts.pio ? C.KVM_IOEVENTFD_FLAG_PIO : 0;
    if (opts.datamatch !== undefined) flags |= C.KVM_IOEVENTFD_FLAG_DATAMATCH;
    native().ioctl(
      this.fd,
      C.KVM_IOEVENTFD,
      S.encodeIoeventfd(addr, len, fd, flags, opts.datamatch ?? 0n),
    );
  }

  createVcpu(id: number): number {
    return native().ioctl(this.fd, C.KVM_CREATE_VCPU, id);
  }

  close(): void {
    native().close(this.fd);
  }
}

/** One vCPU, usable from the thread that runs it. */
export class Vcpu {
  readonly run: DataView;
  private readonly runBuffer: ArrayBuffer;

  constructor(
    readonly fd: number,
    mmapSize: number,
  ) {
    this.runBuffer = native().mmap(mmapSize, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    this.run = new DataView(this.runBuffer);
  }

  getRegs(): Regs {
    const b = new Uint8Array(S.REGS_SIZE);
    native().ioctl(this.fd, C.KVM_GET_REGS, b);
    return S.decodeRegs(b);
  }
  setRegs(r: Regs): void {
    native().ioctl(this.fd, C.KVM_SET_REGS, S.encodeRegs(r));
  }
  getSregs(): Sregs {
    const b = new Uint8Array(S.SREGS_SIZE);
    native().ioctl(this.fd, C.KVM_GET_SREGS, b);
    return S.decodeSregs(b);
  }
  setSregs(s: Sregs): void {
    native().ioctl(this.fd, C.KVM_SET_SREGS, S.encodeSregs(s));
  }
  /** x87 control word 0x37f and MXCSR 0x1f80, as after a CPU reset (Linux expects them). */
  setDefaultFpu(): void {
    const b = new Uint8Array(S.FPU_SIZE);
    const v = new DataView(b.buffer);
    v.setUint16(128, 0x37f, true);
    v.setUint32(408, 0x1f80, true);
    native().ioctl(this.fd, C.KVM_SET_FPU, b);
  }
  setCpuid(entries: CpuidEntry[]): void {
    native().ioctl(this.fd, C.KVM_SET_CPUID2, S.encodeCpuid2(entries));
  }
  /** Sets the MSRs; returns how many KVM accepted (it stops at the first it refuses). */
  setMsrs(entries: MsrEntry[]): number {
    return native().ioctl(this.fd, C.KVM_SET_MSRS, S.encodeMsrs(entries));
  }
  getMsrs(indices: number[]): MsrEntry[] {
    const b = S.encodeMsrs(indices.map((index) => ({ index, data: 0n })));
    const n = native().ioctl(this.fd, C.KVM_GET_MSRS, b);
    return S.decodeMsrs(b).slice(0, n);
  }
  tscKhz(): number {
    return native().ioctl(this.fd, C.KVM_GET_TSC_KHZ, 0);
  }

  /** Enters the guest. Returns false when interrupted (EINTR: a kick), true on a normal exit. */
  runOnce(): boolean {
    try {
      native().ioctl(this.fd, C.KVM_RUN, 0);
      return true;
    } catch (e) {
      if (isSyscallError(e, 'EINTR') || isSyscallError(e, 'EAGAIN')) return false;
      throw e;
    }
  }

  get exitReason(): number {
    return this.run.getUint32(S.RUN.exitReason, true);
  }
  set immediateExit(v: boolean) {
    this.run.setUint8(S.RUN.immediateExit, v ? 1 : 0);
  }

  close(): void {
    native().munmap(this.runBuffer);
    native().close(this.fd);
  }
}

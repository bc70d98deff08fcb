/**
 * The rehearsal guest (src/cli/api-rehearsal.ts: `typervisor --api-sock SOCK --rehearse`, what
 * the daemon's process pool starts): fourteen bytes of code in an ELF file that write the boot
 * marker and end the VM with the i8042 reset.
 */
import { native } from '../kvm/native.js';
import type { BuildOptions } from './builder.js';
import type { VcpuWorkerSource } from './vmm.js';

/** Where the guest's code is loaded and entered (PVH: 32-bit protected mode, paging off). */
const LOAD_ADDR = 0x10_0000;
/**
 * mov $0x3f0,%dx; mov $1,%al; out %al,(%dx)   the boot marker (Firecracker's boot timer port)
 * mov $0xfe,%al; out %al,$0x64                the i8042 reset: the VM ends
 * 1: hlt; jmp 1b
 */
const CODE = [0x66, 0xba, 0xf0, 0x03, 0xb0, 0x01, 0xee, 0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd];

/**
 * The guest: an ELF64 executable with one PT_LOAD segment and a PT_NOTE with the PVH entry
 * (XEN_ELFNOTE_PHYS32_ENTRY), the form of bench/guests/micro.S. `code` (32-bit, loaded and
 * entered at LOAD_ADDR) is the rehearsal's unless given (scripts/bundle.mjs's training guest).
 */
export function rehearsalImage(code: readonly number[] = CODE): Uint8Array {
  const EHDR = 64;
  const PHDR = 56;
  const noteOff = EHDR + 2 * PHDR;
  const noteSize = 12 + 4 + 4; // namesz, descsz, type; "Xen\0"; a 32-bit entry
  const codeOff = noteOff + noteSize;
  const img = new Uint8Array(codeOff + code.length);
  const dv = new DataView(img.buffer);
  img.set([0x7f, 0x45, 0x4c, 0x46, 2, 1, 1], 0); // ELF, 64-bit, little-endian, version 1
  dv.setUint16(16, 2, true); // ET_EXEC
  dv.setUint16(18, 62, true); // EM_X86_64
  dv.setUint32(20, 1, true);
  dv.setBigUint64(24, BigInt(LOAD_ADDR), true); // e_entry
  dv.setBigUint64(32, BigInt(EHDR), true); // e_phoff
  dv.setUint16(52, EHDR, true);
  dv.setUint16(54, PHDR, true);
  dv.setUint16(56, 2, true); // e_phnum
  // PT_NOTE
  dv.setUint32(EHDR, 4, true);
  dv.setBigUint64(EHDR + 8, BigInt(noteOff), true);
  dv.setBigUint64(EHDR + 32, BigInt(noteSize), true);
  dv.setBigUint64(EHDR + 40, BigInt(noteSize), true);
  dv.setUint32(noteOff, 4, true);
  dv.setUint32(noteOff + 4, 4, true);
  dv.setUint32(noteOff + 8, 18, true);
  img.set([0x58, 0x65, 0x6e, 0], noteOff + 12); // "Xen"
  dv.setUint32(noteOff + 16, LOAD_ADDR, true);
  // PT_LOAD, read + execute
  const ph = EHDR + PHDR;
  dv.setUint32(ph, 1, true);
  dv.setUint32(ph + 4, 5, true);
  dv.setBigUint64(ph + 8, BigInt(codeOff), true);
  dv.setBigUint64(ph + 16, BigInt(LOAD_ADDR), true);
  dv.setBigUint64(ph + 24, BigInt(LOAD_ADDR), true);
  dv.setBigUint64(ph + 32, BigInt(code.length), true);
  dv.setBigUint64(ph + 40, BigInt(0x1000), true);
  dv.setBigUint64(ph + 48, BigInt(0x1000), true);
  img.set(code, codeOff);
  return img;
}

/**
 * buildVm options for the rehearsal VM: its vCPU on `workers` (a worker the next VM gets back),
 * and its descriptors closed as it ends, on this thread: the process is idle then, and the next
 * VM must not meet the kernel's teardown of this one (releaseVmsAtExit would leave it for later).
 */
export function rehearsalBuildOptions(workers: VcpuWorkerSource): BuildOptions {
  return {
    vcpuWorkers: workers,
    vcpuThreads: 'worker',
    closeFds: (fds) => {
      const n = native();
      for (const fd of fds) {
        try {
          n.close(fd);
        } catch {
          // already closed
        }
      }
    },
  };
}

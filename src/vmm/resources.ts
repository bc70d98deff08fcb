/**
 * VmResources: the validated description of a VM, before it is built. The CLI and (later) the
 * REST API both fill this same structure, in Firecracker's field names, and buildVm() builds
 * from it: one path, not two.
 */
import { accessSync, constants, statSync } from 'node:fs';
import { CMDLINE_MAX_SIZE, MAX_VCPUS } from '../arch/x86_64/layout.js';
import { ConfigError } from '../util/errors.js';

export interface MachineConfig {
  vcpu_count: number;
  mem_size_mib: number;
}

export interface BootSource {
  kernel_image_path: string;
  initrd_path?: string;
  boot_args?: string;
}

export interface VmResources {
  machine: MachineConfig;
  boot: BootSource;
}

export const MIN_MEM_MIB = 16;
export const MAX_MEM_MIB = 1024 * 1024; // 1 TiB: far beyond any host we run on, still a sane cap
export const DEFAULT_BOOT_ARGS = 'console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux';

export function validateMachineConfig(m: MachineConfig): MachineConfig {
  if (!Number.isInteger(m.vcpu_count) || m.vcpu_count < 1 || m.vcpu_count > MAX_VCPUS) {
    throw new ConfigError(`vcpu_count must be an integer from 1 to ${MAX_VCPUS} (got ${m.vcpu_count})`);
  }
  if (!Number.isInteger(m.mem_size_mib) || m.mem_size_mib < MIN_MEM_MIB || m.mem_size_mib > MAX_MEM_MIB) {
    throw new ConfigError(`mem_size_mib must be an integer from ${MIN_MEM_MIB} to ${MAX_MEM_MIB} (got ${m.mem_size_mib})`);
  }
  return m;
}

/** A regular, readable, non-empty file, or a ConfigError naming what is wrong with it. */
export function checkReadableFile(what: string, path: string): void {
  let st;
  try {
    st = statSync(path);
  } catch {
    throw new ConfigError(`${what} ${path} does not exist`);
  }
  if (st.isDirectory()) throw new ConfigError(`${what} ${path} is a directory, not a file`);
  if (!st.isFile()) throw new ConfigError(`${what} ${path} is not a regular file`);
  try {
    accessSync(path, constants.R_OK);
  } catch {
    throw new ConfigError(`${what} ${path} is not readable`);
  }
  if (st.size === 0) throw new ConfigError(`${what} ${path} is empty`);
}

export function validateBootSource(b: BootSource): BootSource {
  checkReadableFile('kernel', b.kernel_image_path);
  if (b.initrd_path !== undefined) checkReadableFile('initrd', b.initrd_path);
  if (b.boot_args !== undefined) {
    if (b.boot_args.length >= CMDLINE_MAX_SIZE) {
      throw new ConfigError(`kernel command line is ${b.boot_args.length} bytes; the limit is ${CMDLINE_MAX_SIZE - 1}`);
    }
    if (b.boot_args.includes('\0')) throw new ConfigError('kernel command line contains a NUL byte');
  }
  return b;
}

export function validateResources(r: VmResources): VmResources {
  validateMachineConfig(r.machine);
  validateBootSource(r.boot);
  return r;
}

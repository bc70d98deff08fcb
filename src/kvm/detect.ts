/**
 * Can this host's KVM run stock guest kernels? Hardware VT-x/AMD-V can; a PVM-only KVM
 * (kvm_pvm, no vmx/svm in cpuinfo) runs only PVM-aware kernels and tiny guests (emulated).
 */
import { accessSync, constants, existsSync, readFileSync } from 'node:fs';

export type KvmKind = 'hardware' | 'pvm' | 'none';

export interface KvmDetection {
  usable: boolean;
  kind: KvmKind;
  canRunStockGuests: boolean;
  reason: string;
}

export interface DetectInputs {
  devKvm?: string;
  sysModule?: string;
  cpuinfo?: string;
}

export function detectKvm(inputs: DetectInputs = {}): KvmDetection {
  const dev = inputs.devKvm ?? '/dev/kvm';
  const mod = inputs.sysModule ?? '/sys/module';
  if (!existsSync(dev)) {
    return {
      usable: false,
      kind: 'none',
      canRunStockGuests: false,
      reason: `${dev} does not exist (no KVM on this host)`,
    };
  }
  try {
    accessSync(dev, constants.R_OK | constants.W_OK);
  } catch {
    return {
      usable: false,
      kind: 'none',
      canRunStockGuests: false,
      reason: `${dev} is not accessible (run as root or join the kvm group)`,
    };
  }
  let cpuinfo = '';
  try {
    cpuinfo = readFileSync(inputs.cpuinfo ?? '/proc/cpuinfo', 'utf8');
  } catch {
    // unreadable: decide from the modules alone
  }
  const flags = /^flags\s*:(.*)$/m.exec(cpuinfo)?.[1]?.split(/\s+/) ?? [];
  const hw = flags.includes('vmx') ? 'vmx' : flags.includes('svm') ? 'svm' : undefined;
  const pvm = existsSync(`${mod}/kvm_pvm`);
  if (hw && (existsSync(`${mod}/kvm_intel`) || existsSync(`${mod}/kvm_amd`) || !pvm)) {
    return {
      usable: true,
      kind: 'hardware',
      canRunStockGuests: true,
      reason: `hardware virtualization (${hw})`,
    };
  }
  if (pvm) {
    return {
      usable: true,
      kind: 'pvm',
      canRunStockGuests: false,
      reason: 'KVM is PVM (kvm_pvm loaded, no vmx/svm): only PVM-aware kernels and tiny guests run',
    };
  }
  return {
    usable: true,
    kind: 'pvm',
    canRunStockGuests: false,
    reason: 'the CPU shows no vmx/svm flag: KVM cannot run stock kernels at hardware speed',
  };
}

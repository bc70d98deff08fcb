/**
 * Whether this host's KVM can run a given kernel: the one check the CLI (`typervisor run`) and
 * the API (InstanceStart) both make before buildVm(), so both refuse with the same line.
 */
import { detectKvm, type KvmDetection } from '../kvm/detect.js';
import { isBzImage } from '../loader/bzimage.js';
import { readBootImage } from '../loader/image-file.js';
import { HostError } from '../util/errors.js';

let usable: KvmDetection | undefined;

/** Refuses, in one line, to run a stock kernel where KVM cannot run one (PVM-only hosts). */
export function checkHostCanRun(kernelPath: string, allowPvm: boolean): void {
  // Once found usable, the host's KVM is not looked at again (it reads /proc/cpuinfo: ~1 ms,
  // paid per VM by a process that starts many, src/lib/).
  const kvm = (usable ??= detectKvm());
  if (!kvm.usable) {
    usable = undefined;
    throw new HostError(kvm.reason);
  }
  if (kvm.canRunStockGuests || allowPvm) return;
  let head: Uint8Array;
  try {
    // A regular file only (a character device such as /dev/zero would never end).
    head = readBootImage('kernel_image_path', kernelPath, undefined, 4096);
  } catch {
    return; // reported later, by validation
  }
  if (isBzImage(head)) {
    throw new HostError(
      `this host's KVM cannot run stock Linux kernels (${kvm.reason}); run it in the lab: npm run lab -- ./bin/typervisor run ...`,
    );
  }
}

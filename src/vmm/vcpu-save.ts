/**
 * Save requests for a parked vCPU (snapshots), served by the thread that runs it: a vCPU worker
 * (vcpu-worker.ts) or the hub of native runner threads (vcpu-threads.ts, a worker or the main
 * thread). Its own module so that the main thread can load it without a worker's entry point.
 */
import type { Kvm, Vcpu } from '../kvm/kvm.js';
import type { ParkedRequestHandlers } from './vcpu-loop.js';
import { saveVcpu, vcpuSaveConfig, VcpuStateV1, type VcpuSaveConfig } from './vcpu-state.js';
import type { VcpuWorkerMessage } from './vcpu-worker.js';

/**
 * Save requests, served in the parked loop of this thread (the thread that runs the vCPU): the
 * state is read with the vCPU outside KVM_RUN, encoded, and its buffer transferred to the main
 * thread. What to save (KVM's MSR list, the XSAVE size) comes from /dev/kvm (opened at start-up,
 * before the filter), read on first use.
 */
export function saveHandlers(
  id: number,
  vcpu: Vcpu,
  kvm: Kvm,
  post: (m: VcpuWorkerMessage, transfer: ArrayBuffer[]) => void,
  extraMsrs: readonly number[] = [],
): ParkedRequestHandlers {
  let config: VcpuSaveConfig | undefined;
  return {
    save() {
      try {
        config ??= vcpuSaveConfig(kvm, extraMsrs);
        const state = VcpuStateV1.encode(saveVcpu(vcpu, config.msrIndices, config));
        post({ type: 'saved', id, state }, [state.buffer as ArrayBuffer]);
      } catch (e) {
        post({ type: 'save-failed', id, message: (e as Error).message }, []);
      }
    },
    dropped() {
      post({ type: 'save-failed', id, message: 'the pause ended before the save' }, []);
    },
  };
}

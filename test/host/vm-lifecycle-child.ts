/**
 * Child process for kvm-vmm-lifecycle.test.ts: builds a VM in-process on the spin guest,
 * pauses, resumes and stops it, prints one JSON line, and then must exit BY ITSELF (no
 * process.exit): a handle the VMM leaves open (a worker, a timer, an fd watcher) would keep
 * this process alive and the parent test would see it hang.
 * Usage: node vm-lifecycle-child.js GUEST.elf VCPUS CONSOLE_FILE
 */
import { closeSync, openSync, readFileSync } from 'node:fs';
import { buildVm } from '../../src/vmm/builder.js';
import { validateResources } from '../../src/vmm/resources.js';
import { VcpuState } from '../../src/vmm/vcpu-control.js';

const [kernel, vcpus, consoleFile] = process.argv.slice(2);
const fd = openSync(consoleFile!, 'w');
const { vmm } = buildVm(
  validateResources({
    machine: { vcpu_count: Number(vcpus), mem_size_mib: 32 },
    boot: { kernel_image_path: kernel! },
  }),
  { consoleFd: fd },
);
// Let the guest come up (its workers load, it prints its line) and every vCPU reach its loop
// before pausing it: a vCPU worker still loading counts as paused at once (vmm.ts pause()),
// and its state would read Starting here, not Paused. Up to 30 s: seconds in the lab.
const allRunning = () =>
  Array.from({ length: vmm.vcpuCount }, (_, i) => vmm.control.state(i)).every(
    (s) => s === VcpuState.Running,
  );
for (
  let i = 0;
  i < 3000 && (readFileSync(consoleFile!, 'utf8') !== 'tiny guest up\n' || !allRunning());
  i++
) {
  await new Promise((r) => setTimeout(r, 10));
}
await vmm.pause();
const pausedStates = Array.from({ length: vmm.vcpuCount }, (_, i) => vmm.control.state(i));
vmm.resume();
vmm.requestStop();
const event = await vmm.exited;
closeSync(fd);
process.stdout.write(JSON.stringify({ event, pausedStates }) + '\n');

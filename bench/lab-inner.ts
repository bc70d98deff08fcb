/**
 * The lab suite's measurement loop, run INSIDE the lab (bench/lab.ts starts it with runInLab so
 * the lab boots once): Debian's cloud kernel + the project's initramfs under Typervisor and
 * QEMU microvm, 1 and 2 vCPUs, alternately. Prints its samples as one JSON line between
 * BENCH-JSON-BEGIN and BENCH-JSON-END.
 *
 *   node dist/bench/lab-inner.js [--runs N]
 */
import { parseArgs } from 'node:util';
import { imagePaths } from '../src/lab/guest.js';
import { detectKvm } from '../src/kvm/detect.js';
import { TYPERVISOR, qemuCpu, runOnce, type RunResult, type Vmm } from './common.js';

const MEM_MIB = 256;
const MARKER = 'TYPERVISOR-BOOT-OK';
/** The same command line for both VMMs (Typervisor's default adds more, e.g. 8250.nr_uarts). */
const CMDLINE = 'console=ttyS0 reboot=k panic=1 pci=off quiet';

export interface LabSample {
  vmm: 'typervisor' | 'qemu';
  vcpus: number;
  markerMs: number;
  exitMs: number;
  code: number | null;
  bootTimerMs?: number;
  peakRssKiB?: number;
  nonGuestRssKiB?: number;
  guestRssKiB?: number;
  error?: string;
}

function vmmFor(
  name: 'typervisor' | 'qemu',
  vcpus: number,
  kernel: string,
  initrd: string,
  kvmKind: string,
): Vmm {
  if (name === 'typervisor') {
    return {
      name,
      memMiB: MEM_MIB,
      cmd: process.execPath,
      args: [
        TYPERVISOR,
        'run',
        '--kernel',
        kernel,
        '--initrd',
        initrd,
        '--cmdline',
        CMDLINE,
        '--vcpus',
        String(vcpus),
        '--memory',
        String(MEM_MIB),
        '--boot-timer',
      ],
    };
  }
  return {
    name,
    memMiB: MEM_MIB,
    cmd: 'qemu-system-x86_64',
    args: [
      '-M',
      'microvm,acpi=on',
      '-enable-kvm',
      '-cpu',
      qemuCpu(kvmKind),
      '-m',
      String(MEM_MIB),
      '-smp',
      String(vcpus),
      '-nodefaults',
      '-no-user-config',
      '-display',
      'none',
      '-serial',
      'stdio',
      '-kernel',
      kernel,
      '-initrd',
      initrd,
      '-append',
      CMDLINE,
    ],
  };
}

async function main() {
  const { values } = parseArgs({ options: { runs: { type: 'string' } } });
  const runs = Number(values.runs ?? 3);
  const kernel = imagePaths('kernel').KERNEL!;
  const initrd = imagePaths('initramfs').INITRAMFS!;
  const kvm = detectKvm();
  const samples: LabSample[] = [];
  const names = ['typervisor', 'qemu'] as const;
  for (let r = 0; r < runs; r++) {
    for (const vcpus of [1, 2]) {
      const order = r % 2 ? [names[1], names[0]] : [names[0], names[1]];
      for (const name of order) {
        const res: RunResult = await runOnce(vmmFor(name, vcpus, kernel, initrd, kvm.kind), {
          marker: MARKER,
          inputAfterMarker: 'poweroff -f\n',
          sampleSmaps: true,
          peakRss: true,
          timeoutMs: 180_000,
        });
        const ok = res.code === 0 && res.markerMs >= 0 && !res.timedOut;
        samples.push({
          vmm: name,
          vcpus,
          markerMs: res.markerMs,
          exitMs: res.exitMs,
          code: res.code,
          bootTimerMs: res.bootTimerMs,
          peakRssKiB: res.peakRssKiB,
          nonGuestRssKiB: res.smaps?.nonGuestRssKiB,
          guestRssKiB: res.smaps?.guestRssKiB,
          error: ok
            ? undefined
            : `exit ${res.code}${res.timedOut ? ' (timed out)' : ''}; stderr: ${res.stderr.slice(-500)}; stdout: ${res.stdout.slice(-500)}`,
        });
        process.stderr.write(
          `lab-inner: run ${r + 1} ${name} ${vcpus} vCPU: marker ${res.markerMs.toFixed(0)} ms, exit ${res.exitMs.toFixed(0)} ms, code ${res.code}\n`,
        );
      }
    }
  }
  const cpu = /model name\s*:\s*(.*)/.exec(
    (await import('node:fs')).readFileSync('/proc/cpuinfo', 'utf8'),
  )?.[1];
  const qv = (await import('node:child_process'))
    .spawnSync('qemu-system-x86_64', ['--version'], { encoding: 'utf8' })
    .stdout.split('\n')[0];
  const out = {
    kvm: kvm.reason,
    kvmKind: kvm.kind,
    cpu,
    kernel: (await import('node:os')).release(),
    qemu: qv,
    samples,
  };
  process.stdout.write(`\nBENCH-JSON-BEGIN\n${JSON.stringify(out)}\nBENCH-JSON-END\n`);
}

main().catch((e) => {
  process.stderr.write(`lab-inner: ${(e as Error).stack ?? e}\n`);
  process.exit(1);
});

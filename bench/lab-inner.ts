/**
 * The lab's `boot` sub-suite, run INSIDE the lab (bench/lab.ts starts it with runInLab):
 * Debian's cloud kernel + the project's initramfs under Typervisor and QEMU microvm, 1 and 2
 * vCPUs, the VMM order alternating per round. Speaks the sub-suite contract of bench/common.ts:
 * a checkpoint line per sample, the rows between BENCH-JSON-BEGIN and BENCH-JSON-END.
 *
 *   node dist/bench/lab-inner.js [--runs N] [--resume FILE]
 */
import { parseArgs } from 'node:util';
import { imagePaths } from '../src/lab/guest.js';
import { detectKvm } from '../src/kvm/detect.js';
import {
  TYPERVISOR,
  isMainModule,
  labHostInfo,
  printSubSuiteOutput,
  qemuCpu,
  readResume,
  runOnce,
  runPlan,
  stat,
  type Row,
  type SubSuiteOutput,
  type Vmm,
} from './common.js';

const MEM_MIB = 256;
const MARKER = 'TYPERVISOR-BOOT-OK';
/** The same command line for both VMMs (Typervisor's default adds more, e.g. 8250.nr_uarts). */
const CMDLINE = 'console=ttyS0 reboot=k panic=1 pci=off quiet';
const VMMS = ['typervisor', 'qemu'] as const;
type VmmName = (typeof VMMS)[number];
const VCPUS = [1, 2] as const;

export interface BootSample {
  /** "r<round>/<vcpus>/<vmm>" */
  key: string;
  vmm: VmmName;
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

/** Rounds of (1 vCPU, 2 vCPUs) x both VMMs; the VMM order flips every round. */
export function bootPlan(runs: number): string[] {
  const keys: string[] = [];
  for (let r = 0; r < runs; r++) {
    for (const vcpus of VCPUS) {
      for (const vmm of r % 2 ? [...VMMS].reverse() : VMMS) keys.push(`r${r}/${vcpus}/${vmm}`);
    }
  }
  return keys;
}

function vmmFor(
  name: VmmName,
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
        ...['--kernel', kernel, '--initrd', initrd, '--cmdline', CMDLINE],
        ...['--vcpus', String(vcpus), '--memory', String(MEM_MIB), '--boot-timer'],
      ],
    };
  }
  return {
    name,
    memMiB: MEM_MIB,
    cmd: 'qemu-system-x86_64',
    args: [
      ...['-M', 'microvm,acpi=on', '-enable-kvm', '-cpu', qemuCpu(kvmKind)],
      ...['-m', String(MEM_MIB), '-smp', String(vcpus), '-nodefaults', '-no-user-config'],
      ...['-display', 'none', '-serial', 'stdio'],
      ...['-kernel', kernel, '-initrd', initrd, '-append', CMDLINE],
    ],
  };
}

async function measure(key: string, kernel: string, initrd: string, kvmKind: string) {
  const [, vcpusText, vmm] = key.split('/') as [string, string, VmmName];
  const vcpus = Number(vcpusText);
  const res = await runOnce(vmmFor(vmm, vcpus, kernel, initrd, kvmKind), {
    marker: MARKER,
    inputAfterMarker: 'poweroff -f\n',
    sampleSmaps: true,
    peakRss: true,
    timeoutMs: 180_000,
  });
  const ok = res.code === 0 && res.markerMs >= 0 && !res.timedOut;
  process.stderr.write(
    `lab-inner: ${key}: marker ${res.markerMs.toFixed(0)} ms, exit ${res.exitMs.toFixed(0)} ms, code ${res.code}\n`,
  );
  const sample: BootSample = {
    key,
    vmm,
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
      : `exit ${res.code}${res.timedOut ? ' (timed out)' : ''}; stderr: ${res.stderr.slice(-300)}; stdout: ${res.stdout.slice(-300)}`,
  };
  return sample;
}

/** Rows from the samples (also used by bench/lab.ts on the host to salvage a dead lab's samples). */
export function summariseBoot(samples: BootSample[], runs: number): SubSuiteOutput {
  const ok = samples.filter((s) => !s.error);
  const pick = (vmm: VmmName, vcpus: number, f: (s: BootSample) => number | undefined) =>
    stat(
      ok
        .filter((s) => s.vmm === vmm && s.vcpus === vcpus)
        .map(f)
        .filter((x): x is number => x !== undefined && x >= 0),
    );
  const kib = (x: number | undefined) => (x === undefined ? undefined : x / 1024);
  const rows: Row[] = [];
  for (const vcpus of VCPUS) {
    const row = (
      metric: string,
      unit: string,
      f: (s: BootSample) => number | undefined,
      note?: string,
    ): Row => ({
      suite: 'lab',
      metric: `${metric}, ${vcpus} vCPU`,
      unit,
      note,
      typervisor: pick('typervisor', vcpus, f),
      qemu: pick('qemu', vcpus, f),
    });
    rows.push(
      row('Linux: start → TYPERVISOR-BOOT-OK on stdout', 'ms', (s) => s.markerMs),
      row('Linux: start → exit after `poweroff -f`', 'ms', (s) => s.exitMs),
      row(
        'Linux: Typervisor --boot-timer (start → MMIO marker)',
        'ms',
        (s) => s.bootTimerMs,
        'measured inside Typervisor',
      ),
      row('Linux: peak RSS (ru_maxrss)', 'MiB', (s) => kib(s.peakRssKiB)),
      row(
        'Linux: RSS outside guest memory (smaps at the marker)',
        'MiB',
        (s) => kib(s.nonGuestRssKiB),
        'Firecracker: < 5 MiB',
      ),
      row('Linux: guest memory RSS (smaps at the marker)', 'MiB', (s) => kib(s.guestRssKiB)),
    );
  }
  const missing = bootPlan(runs).length - samples.length;
  return {
    rows,
    notes: [
      `${runs} run(s) per VMM and vCPU count, alternating.`,
      `Guest: the project's default kernel (Debian linux-image-cloud-amd64) and busybox initramfs, ${MEM_MIB} MiB; both VMMs get the command line "${CMDLINE}"; QEMU: -M microvm,acpi=on. \`poweroff -f\` is sent on stdin only after the marker appeared.`,
      ...(missing > 0 ? [`${missing} sample(s) missing (not measured).`] : []),
      ...samples.filter((s) => s.error).map((s) => `${s.key} failed: ${s.error}`),
    ],
  };
}

async function main() {
  const { values } = parseArgs({
    options: { runs: { type: 'string' }, resume: { type: 'string' } },
  });
  const runs = Number(values.runs ?? 2);
  const kernel = imagePaths('kernel').KERNEL!;
  const initrd = imagePaths('initramfs').INITRAMFS!;
  const kvmKind = detectKvm().kind;
  const samples = await runPlan(bootPlan(runs), readResume<BootSample>(values.resume), (key) =>
    measure(key, kernel, initrd, kvmKind),
  );
  printSubSuiteOutput({ ...summariseBoot(samples, runs), labHost: labHostInfo() });
}

if (isMainModule(import.meta.url)) {
  main().catch((e) => {
    process.stderr.write(`lab-inner: ${(e as Error).stack ?? e}\n`);
    process.exit(1);
  });
}

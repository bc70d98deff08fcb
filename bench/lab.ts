/**
 * The lab suite: boots the lab once (runInLab) and runs bench/lab-inner.ts inside it, where
 * /dev/kvm is real (emulated) AMD-V and Debian's cloud kernel can run. Turns its samples into rows.
 */
import { runInLab } from '../src/lab/lab.js';
import { REPO, stat, type Row } from './common.js';
import type { LabSample } from './lab-inner.js';

export interface LabSuiteResult {
  rows: Row[];
  notes: string[];
  labHost?: { kvm: string; kvmKind: string; cpu?: string; kernel: string; qemu: string };
  labBootMs: number;
  errors: string[];
}

export async function labSuite(o: {
  runs: number;
  log: (s: string) => void;
}): Promise<LabSuiteResult> {
  const r = await runInLab({
    command: [process.execPath, 'dist/bench/lab-inner.js', '--runs', String(o.runs)],
    cwd: REPO,
    timeoutSec: 900,
    onOutput: (b) => {
      for (const line of b.toString().split('\n'))
        if (line.startsWith('lab-inner:')) o.log(line.trim());
    },
  });
  const m = /BENCH-JSON-BEGIN\r?\n(.*)\r?\nBENCH-JSON-END/.exec(r.output);
  if (r.code !== 0 || !m) {
    throw new Error(
      `lab suite failed (code ${r.code}): ${r.error ?? ''}\n${r.output.slice(-3000)}`,
    );
  }
  const data = JSON.parse(m[1]!) as { samples: LabSample[] } & NonNullable<
    LabSuiteResult['labHost']
  >;
  const ok = data.samples.filter((s) => !s.error);
  const errors = data.samples
    .filter((s) => s.error)
    .map((s) => `${s.vmm} ${s.vcpus} vCPU: ${s.error}`);
  const rows: Row[] = [];
  const pick = (vmm: string, vcpus: number, f: (s: LabSample) => number | undefined) =>
    stat(
      ok
        .filter((s) => s.vmm === vmm && s.vcpus === vcpus)
        .map(f)
        .filter((x): x is number => x !== undefined && x >= 0),
    );
  for (const vcpus of [1, 2]) {
    const row = (
      metric: string,
      unit: string,
      f: (s: LabSample) => number | undefined,
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
      row('Linux: peak RSS (ru_maxrss)', 'MiB', (s) =>
        s.peakRssKiB === undefined ? undefined : s.peakRssKiB / 1024,
      ),
      row(
        'Linux: RSS outside guest memory (smaps at the marker)',
        'MiB',
        (s) => (s.nonGuestRssKiB === undefined ? undefined : s.nonGuestRssKiB / 1024),
        'Firecracker: < 5 MiB',
      ),
      row('Linux: guest memory RSS (smaps at the marker)', 'MiB', (s) =>
        s.guestRssKiB === undefined ? undefined : s.guestRssKiB / 1024,
      ),
    );
  }
  o.log(`lab: booted in ${r.bootMs} ms, whole run ${(r.totalMs / 1000).toFixed(0)} s`);
  return {
    rows,
    errors,
    labBootMs: r.bootMs,
    labHost: {
      kvm: data.kvm,
      kvmKind: data.kvmKind,
      cpu: data.cpu,
      kernel: data.kernel,
      qemu: data.qemu,
    },
    notes: [
      `lab: ${o.runs} runs per configuration (the lab is TCG-emulated: every figure there is slow and noisy; compare the columns, not the absolute values with the host).`,
      'Linux guest: the project\'s default kernel (Debian linux-image-cloud-amd64) and busybox initramfs, 256 MiB; QEMU: -M microvm,acpi=on, append "console=ttyS0 reboot=k panic=1 pci=off".',
      '`poweroff -f` is sent on stdin only after the marker appeared.',
      'fio and iperf3: not measured here (separate issues).',
    ],
  };
}

/**
 * The lab's `ratelimit` sub-suite (issue 16), run INSIDE the lab (bench/lab.ts starts it with
 * runInLab): how close a rate-limited virtio-blk drive reads to its configured rate, Typervisor
 * (the drive's Firecracker rate_limiter, a bandwidth bucket refilled every 125 ms) beside QEMU
 * microvm (block throttling, `-drive ...,throttling.bps-total=`), same kernel, same images,
 * alternately. Speaks the sub-suite contract of bench/common.ts.
 *
 *   node dist/bench/lab-ratelimit.js [--runs N] [--resume FILE]
 *
 * In each VM the Debian rootfs (on /dev/vda) reads the limited scratch disk /dev/vdb with
 * `dd bs=64k iflag=direct` at each of the rates, one after another, through one limited drive
 * per rate (/dev/vdb, /dev/vdc, ...). The figure is the rate dd saw, and its error against the
 * configured rate; a bucket starts full (Typervisor: size bytes; QEMU: its burst allowance), so
 * each read is long enough (8 s at the rate) for that to stay small.
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { detectKvm } from '../src/kvm/detect.js';
import { imagePaths } from '../src/lab/guest.js';
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
const CMDLINE = 'console=ttyS0 reboot=k panic=1 pci=off quiet';
const VMMS = ['typervisor', 'qemu'] as const;
type VmmName = (typeof VMMS)[number];
/** Configured rates, bytes/s. */
const RATES = [512 * 1024, 2 * 1024 * 1024];
const READ_SECONDS = 8;
const BS = 64 * 1024;

export interface RateSample {
  /** "r<round>/<vmm>" */
  key: string;
  vmm: VmmName;
  /** Bytes/s dd saw, per rate (null: no result). */
  values: (number | null)[];
  code: number | null;
  error?: string;
}

export function ratePlan(runs: number): string[] {
  const keys: string[] = [];
  for (let r = 0; r < runs; r++)
    for (const vmm of r % 2 ? [...VMMS].reverse() : VMMS) keys.push(`r${r}/${vmm}`);
  return keys;
}

const dev = (i: number) => `/dev/vd${String.fromCharCode(98 + i)}`; // vdb, vdc, ...
const count = (rate: number) => Math.round((rate * READ_SECONDS) / BS);

function script(): string {
  const lines = RATES.map(
    (r, i) =>
      `dd if=${dev(i)} of=/dev/null bs=${BS} count=${count(r)} iflag=direct 2>&1 | tail -1 | sed 's/^/RATE${i} /'`,
  );
  return [...lines, 'poweroff -f', ''].join('\n');
}

function parse(stdout: string): (number | null)[] {
  const values: (number | null)[] = RATES.map(() => null);
  for (const m of stdout.matchAll(/RATE(\d) (\d+) bytes .*copied, ([\d.]+) s/g)) {
    const i = Number(m[1]);
    const v = Number(m[2]) / Number(m[3]);
    if (i < RATES.length && Number.isFinite(v) && v > 0) values[i] = v;
  }
  return values;
}

function vmm(name: VmmName, root: string, disks: string[], dir: string, kvmKind: string): Vmm {
  const kernel = imagePaths('kernel').KERNEL!;
  const initrd = imagePaths('initramfs').INITRAMFS!;
  if (name === 'typervisor') {
    const cfg = join(dir, 'vm.json');
    writeFileSync(
      cfg,
      JSON.stringify({
        'boot-source': { kernel_image_path: kernel, initrd_path: initrd, boot_args: CMDLINE },
        'machine-config': { vcpu_count: 1, mem_size_mib: MEM_MIB },
        drives: [
          { drive_id: 'root', path_on_host: root, is_root_device: true, is_read_only: false },
          ...disks.map((d, i) => ({
            drive_id: `d${i}`,
            path_on_host: d,
            is_root_device: false,
            is_read_only: true,
            rate_limiter: { bandwidth: { size: RATES[i]! / 8, refill_time: 125 } },
          })),
        ],
      }),
    );
    return {
      name,
      memMiB: MEM_MIB,
      cmd: process.execPath,
      args: [TYPERVISOR, '--no-api', '--config-file', cfg],
    };
  }
  return {
    name,
    memMiB: MEM_MIB,
    cmd: 'qemu-system-x86_64',
    args: [
      ...['-M', 'microvm,acpi=on', '-enable-kvm', '-cpu', qemuCpu(kvmKind)],
      ...['-m', String(MEM_MIB), '-smp', '1', '-nodefaults', '-no-user-config'],
      ...['-display', 'none', '-serial', 'stdio'],
      ...['-kernel', kernel, '-initrd', initrd, '-append', `${CMDLINE} root=/dev/vda rw`],
      ...['-drive', `id=root,file=${root},format=raw,if=none`],
      ...['-device', 'virtio-blk-device,drive=root'],
      ...disks.flatMap((d, i) => [
        '-drive',
        `id=d${i},file=${d},format=raw,if=none,readonly=on,throttling.bps-total=${RATES[i]}`,
        '-device',
        `virtio-blk-device,drive=d${i}`,
      ]),
    ],
  };
}

async function measure(key: string, root: string, disks: string[], dir: string, kvm: string) {
  const name = key.split('/')[1] as VmmName;
  const res = await runOnce(vmm(name, root, disks, dir, kvm), {
    marker: 'TYPERVISOR-BOOT-OK',
    inputAfterMarker: script(),
    timeoutMs: 300_000,
  });
  const values = parse(res.stdout);
  process.stderr.write(
    `lab-ratelimit: ${key}: ${values.map((v) => (v === null ? '-' : (v / 1024).toFixed(0))).join(' / ')} KiB/s (exit ${res.code})\n`,
  );
  const complete = values.every((v) => v !== null);
  const sample: RateSample = {
    key,
    vmm: name,
    values,
    code: res.code,
    error:
      complete && res.code === 0 && !res.timedOut
        ? undefined
        : `exit ${res.code}${res.timedOut ? ' (timed out)' : ''}; stderr: ${res.stderr.slice(-300)}; stdout: ${res.stdout.slice(-300)}`,
  };
  return sample;
}

export function summariseRates(samples: RateSample[], runs: number): SubSuiteOutput {
  const pick = (vmm: VmmName, i: number, f: (v: number) => number) =>
    stat(
      samples
        .filter((s) => s.vmm === vmm)
        .map((s) => s.values[i])
        .filter((x): x is number => typeof x === 'number')
        .map(f),
    );
  const rows: Row[] = RATES.flatMap((rate, i): Row[] => {
    const label = `${rate / 1024} KiB/s`;
    return [
      {
        suite: 'lab',
        metric: `rate-limited drive at ${label}: dd 64 KiB direct reads`,
        unit: 'KiB/s',
        typervisor: pick('typervisor', i, (v) => v / 1024),
        qemu: pick('qemu', i, (v) => v / 1024),
      },
      {
        suite: 'lab',
        metric: `rate-limited drive at ${label}: error against the configured rate`,
        unit: '%',
        typervisor: pick('typervisor', i, (v) => (v / rate - 1) * 100),
        qemu: pick('qemu', i, (v) => (v / rate - 1) * 100),
      },
    ];
  });
  const missing = ratePlan(runs).length - samples.length;
  return {
    rows,
    notes: [
      `${runs} run(s) per VMM, alternating; each run is one VM reading ${READ_SECONDS} s worth of each limited drive (dd bs=64k iflag=direct, rates ${RATES.map((r) => `${r / 1024} KiB/s`).join(', ')}).`,
      'Typervisor: the drive rate_limiter (bandwidth bucket of rate/8 bytes refilled every 125 ms; it starts full). QEMU: -drive throttling.bps-total=rate (its default burst). dd counts its own seconds in the guest; the error includes the initial bucket.',
      ...(missing > 0 ? [`${missing} VM run(s) missing (not measured).`] : []),
      ...samples.filter((s) => s.error).map((s) => `${s.key} failed: ${s.error}`),
    ],
  };
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: { runs: { type: 'string' }, resume: { type: 'string' } },
  });
  const runs = Number(values.runs ?? 1);
  const kvmKind = detectKvm().kind;
  const dir = mkdtempSync('/dev/shm/tv-rate-');
  try {
    const root = join(dir, 'rootfs.ext4');
    const disks = RATES.map((_r, i) => join(dir, `d${i}.img`));
    const cmds: string[][] = [
      ['cp', '--sparse=always', imagePaths('rootfs').ROOTFS!, root],
      ...disks.map((d) => ['truncate', '-s', '64M', d]),
    ];
    for (const [cmd, ...args] of cmds) {
      const r = spawnSync(cmd!, args, { encoding: 'utf8' });
      if (r.status !== 0) throw new Error(`${cmd} failed: ${r.error?.message ?? r.stderr}`);
    }
    const samples = await runPlan(ratePlan(runs), readResume<RateSample>(values.resume), (key) =>
      measure(key, root, disks, dir, kvmKind),
    );
    printSubSuiteOutput({ ...summariseRates(samples, runs), labHost: labHostInfo() });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

if (isMainModule(import.meta.url)) {
  main().catch((e) => {
    process.stderr.write(`lab-ratelimit: ${(e as Error).stack ?? e}\n`);
    process.exit(1);
  });
}

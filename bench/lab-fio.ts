/**
 * The lab's `fio` sub-suite (virtio-blk), run INSIDE the lab (bench/lab.ts starts it with
 * runInLab): fio in the Debian root disk under Typervisor and QEMU microvm, same kernel, same
 * images, alternately. Speaks the sub-suite contract of bench/common.ts (a checkpoint line per
 * VM run, the rows between BENCH-JSON-BEGIN and BENCH-JSON-END).
 *
 *   node dist/bench/lab-fio.js [--runs N] [--resume FILE]
 *
 * Each VMM boots the project's rootfs from virtio-blk (root=/dev/vda) with a 256 MiB scratch disk
 * as /dev/vdb; both images live on the lab's tmpfs (/dev/shm) so the host side is the same for
 * both. fio runs 4 KiB random reads (libaio, iodepth 32, direct) and 1 MiB sequential reads and
 * writes, 5 s each.
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { detectKvm } from '../src/kvm/detect.js';
import { imagePaths } from '../src/lab/guest.js';
import {
  TYPERVISOR,
  freshImage,
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

const MEM_MIB = 512;
const CMDLINE = 'console=ttyS0 reboot=k panic=1 pci=off quiet';
/**
 * The data disk's engine: typervisor has io_engine "Sync" (,sync on --drive: the unlabelled rows
 * measure Sync, no longer the default), typervisor-async "Async" (io_uring; ,async). Both keep
 * the root disk on the default engine (Async since issue 17), as a user's VM has it.
 */
const VMMS = ['typervisor', 'typervisor-async', 'qemu'] as const;
type VmmName = (typeof VMMS)[number];

/** The fio jobs, in the order the guest runs them; `value` picks the figure from terse v3. */
const JOBS = [
  {
    metric: 'fio: random read 4 KiB, iodepth 32',
    unit: 'IOPS',
    args: '--rw=randread --bs=4k --iodepth=32',
    // terse v3 after our "FIO<i>;" prefix: [0]=version [1]=fio [2]=jobname [3]=groupid
    // [4]=error; read: [5]=io KiB [6]=bw KiB/s [7]=IOPS; write (41 fields later): [46]=io KiB
    // [47]=bw KiB/s
    value: (f: string[]) => Number(f[7]),
    ioKiB: (f: string[]) => Number(f[5]),
  },
  {
    metric: 'fio: sequential read 1 MiB, iodepth 4',
    unit: 'MB/s',
    args: '--rw=read --bs=1M --iodepth=4',
    value: (f: string[]) => (Number(f[6]) * 1024) / 1e6,
    ioKiB: (f: string[]) => Number(f[5]),
  },
  {
    metric: 'fio: sequential write 1 MiB, iodepth 4',
    unit: 'MB/s',
    args: '--rw=write --bs=1M --iodepth=4',
    value: (f: string[]) => (Number(f[47]) * 1024) / 1e6,
    ioKiB: (f: string[]) => Number(f[46]),
  },
];

export interface FioSample {
  /** "r<round>/<vmm>" */
  key: string;
  vmm: VmmName;
  /** Per job (index into JOBS); null when that job gave no result. */
  values: (number | null)[];
  /**
   * Per job: the guest's interrupts of the data disk's device per MB the job moved (its
   * /proc/interrupts line, before and after the job); null when not measured. Absent in
   * samples of older runs (resume files).
   */
  irqPerMB?: (number | null)[];
  /** Start of the VMM to the marker of the rootfs boot, ms; -1 if never seen. */
  markerMs: number;
  code: number | null;
  error?: string;
}

export function fioPlan(runs: number): string[] {
  const keys: string[] = [];
  for (let r = 0; r < runs; r++) {
    for (const vmm of r % 2 ? [...VMMS].reverse() : VMMS) keys.push(`r${r}/${vmm}`);
  }
  return keys;
}

/**
 * The guest's commands. `irqs` prints the interrupts of /dev/vdb's virtio device so far (its
 * /proc/interrupts line, named by the device, e.g. virtio1: the per-CPU counts summed); each
 * job is bracketed by `IRQ<i>A <n>` and `IRQ<i>B <n>` lines.
 */
function fioScript(): string {
  const common =
    '--filename=/dev/vdb --direct=1 --ioengine=libaio --size=128M --runtime=5 --time_based --group_reporting';
  const irqs = [
    'D=$(basename "$(readlink -f /sys/block/vdb/device)")',
    `irqs() { awk -v d="$D" '$NF == d { s = 0; for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) s += $i; print s }' /proc/interrupts; }`,
  ];
  const lines = JOBS.map(
    (j, i) =>
      `echo IRQ${i}A $(irqs); fio --name=j${i} ${common} ${j.args} --output-format=terse --terse-version=3 | sed 's/^/FIO${i};/'; echo IRQ${i}B $(irqs)`,
  );
  return [...irqs, ...lines, 'poweroff -f', ''].join('\n');
}

/** Keyed on the terse version so the shell's echo of the command line never matches; not
 *  anchored, as a result line may follow the shell's prompt. */
export function parse(stdout: string): { values: (number | null)[]; irqPerMB: (number | null)[] } {
  const values: (number | null)[] = JOBS.map(() => null);
  const ioKiB: (number | null)[] = JOBS.map(() => null);
  const irqA: (number | null)[] = JOBS.map(() => null);
  const irqB: (number | null)[] = JOBS.map(() => null);
  for (const line of stdout.split(/\r?\n/)) {
    // The shell's echo of the command (`echo IRQ0A $(irqs)`) has no number there.
    const q = /IRQ(\d)([AB]) (\d+)\s*$/.exec(line);
    if (q && Number(q[1]) < JOBS.length) {
      (q[2] === 'A' ? irqA : irqB)[Number(q[1])] = Number(q[3]);
      continue;
    }
    const m = /FIO(\d);(3;.*)$/.exec(line);
    const job = m ? JOBS[Number(m[1])] : undefined;
    if (!m || !job) continue;
    const f = m[2]!.split(';');
    const v = job.value(f);
    if (Number.isFinite(v) && v > 0) values[Number(m[1])] = v;
    const kib = job.ioKiB(f);
    if (Number.isFinite(kib) && kib > 0) ioKiB[Number(m[1])] = kib;
  }
  const irqPerMB = JOBS.map((_j, i) => {
    const a = irqA[i];
    const b = irqB[i];
    const kib = ioKiB[i];
    return a == null || b == null || kib == null || b < a ? null : (b - a) / ((kib * 1024) / 1e6);
  });
  return { values, irqPerMB };
}

function vmm(name: VmmName, root: string, data: string, kvmKind: string): Vmm {
  const kernel = imagePaths('kernel').KERNEL!;
  const initrd = imagePaths('initramfs').INITRAMFS!;
  if (name !== 'qemu') {
    const engine = name === 'typervisor-async' ? ',async' : ',sync';
    return {
      name: 'typervisor',
      memMiB: MEM_MIB,
      cmd: process.execPath,
      args: [
        TYPERVISOR,
        'run',
        ...['--kernel', kernel, '--initrd', initrd, '--cmdline', CMDLINE],
        ...['--vcpus', '1', '--memory', String(MEM_MIB)],
        ...['--drive', `path=${root},root`, '--drive', `path=${data}${engine}`],
      ],
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
      ...['-drive', `id=data,file=${data},format=raw,if=none`],
      ...['-device', 'virtio-blk-device,drive=data'],
    ],
  };
}

async function measure(key: string, root: string, data: string, kvmKind: string) {
  const name = key.split('/')[1] as VmmName;
  // Each VM boots its own fresh copy of the root disk (common.ts freshImage).
  freshImage(imagePaths('rootfs').ROOTFS!, root);
  const res = await runOnce(vmm(name, root, data, kvmKind), {
    marker: 'TYPERVISOR-BOOT-OK',
    inputAfterMarker: fioScript(),
    timeoutMs: 300_000,
  });
  const { values, irqPerMB } = parse(res.stdout);
  const fmt = (xs: (number | null)[], d: number) => xs.map((v) => v?.toFixed(d) ?? '-').join(' / ');
  process.stderr.write(
    `lab-fio: ${key}: ${fmt(values, 1)} (exit ${res.code}); interrupts per MB ${fmt(irqPerMB, 2)}\n`,
  );
  const complete = values.every((v) => v !== null);
  const sample: FioSample = {
    key,
    vmm: name,
    values,
    irqPerMB,
    markerMs: res.markerMs,
    code: res.code,
    error:
      complete && res.code === 0 && !res.timedOut
        ? undefined
        : `exit ${res.code}${res.timedOut ? ' (timed out)' : ''}, ${values.filter((v) => v !== null).length}/${JOBS.length} fio results; stderr: ${res.stderr.slice(-300)}; stdout: ${res.stdout.slice(-300)}`,
  };
  return sample;
}

/** Rows from the samples (also used by bench/lab.ts on the host to salvage a dead lab's samples). */
export function summariseFio(samples: FioSample[], runs: number): SubSuiteOutput {
  // A job's figure counts even if a later job or the exit failed: it was measured in full.
  const pick = (vmm: VmmName, f: (s: FioSample) => number | null) =>
    stat(
      samples
        .filter((s) => s.vmm === vmm)
        .map(f)
        .filter((x): x is number => x !== null && x >= 0),
    );
  const rows: Row[] = JOBS.map((j, i) => ({
    suite: 'lab',
    metric: j.metric,
    unit: j.unit,
    higherIsBetter: true,
    typervisor: pick('typervisor', (s) => s.values[i] ?? null),
    qemu: pick('qemu', (s) => s.values[i] ?? null),
  }));
  // The same jobs with the data disk on io_uring, beside the same QEMU runs.
  rows.push(
    ...JOBS.map((j, i): Row => ({
      suite: 'lab',
      metric: `${j.metric} (io_engine Async)`,
      unit: j.unit,
      higherIsBetter: true,
      typervisor: pick('typervisor-async', (s) => s.values[i] ?? null),
      qemu: pick('qemu', (s) => s.values[i] ?? null),
    })),
  );
  // The guest's interrupts per MB of each job, Sync and Async beside the same QEMU runs.
  for (const [vmm, label] of [
    ['typervisor', ''],
    ['typervisor-async', ' (io_engine Async)'],
  ] as const) {
    rows.push(
      ...JOBS.map((j, i): Row => ({
        suite: 'lab',
        metric: `${j.metric}: virtio-blk interrupts per MB${label}`,
        unit: 'irq/MB',
        higherIsBetter: false,
        typervisor: pick(vmm, (s) => s.irqPerMB?.[i] ?? null),
        qemu: pick('qemu', (s) => s.irqPerMB?.[i] ?? null),
        ...(i === 0 && !label
          ? {
              note: "the guest's /proc/interrupts line of /dev/vdb's device, over the MB the job moved",
            }
          : {}),
      })),
    );
  }
  rows.push({
    suite: 'lab',
    metric: 'fio guest: start → TYPERVISOR-BOOT-OK (rootfs on virtio-blk)',
    unit: 'ms',
    typervisor: pick('typervisor', (s) => (s.markerMs >= 0 ? s.markerMs : null)),
    qemu: pick('qemu', (s) => (s.markerMs >= 0 ? s.markerMs : null)),
  });
  const missing = fioPlan(runs).length - samples.length;
  return {
    rows,
    notes: [
      `${runs} run(s) per VMM, alternating; each run is one VM running the three jobs one after another (5 s each, libaio, --direct=1) on a 256 MiB scratch disk /dev/vdb.`,
      `Guest: the default kernel and initramfs switching to the Debian rootfs on /dev/vda, ${MEM_MIB} MiB, 1 vCPU; images on the lab's tmpfs. Both VMMs use the host page cache: QEMU virtio-blk-device with its default cache=writeback and thread pool, Typervisor's data disk with synchronous I/O in its device worker (io_engine Sync, asked for with ,sync) in the unlabelled rows, or io_uring (io_engine Async) in the (io_engine Async) rows; its root disk on the default engine (Async; Sync before issue 17 made Async the default).`,
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
  const dir = mkdtempSync('/dev/shm/tv-fio-');
  try {
    const root = join(dir, 'rootfs.ext4');
    const data = join(dir, 'data.img');
    // The root disk is copied for each VM (measure); the data disk once, here.
    const dd = spawnSync(
      'dd',
      ['if=/dev/urandom', `of=${data}`, 'bs=1M', 'count=256', 'status=none'],
      { encoding: 'utf8' },
    );
    if (dd.status !== 0) throw new Error(`dd failed: ${dd.error?.message ?? dd.stderr}`);
    const samples = await runPlan(fioPlan(runs), readResume<FioSample>(values.resume), (key) =>
      measure(key, root, data, kvmKind),
    );
    printSubSuiteOutput({ ...summariseFio(samples, runs), labHost: labHostInfo() });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

if (isMainModule(import.meta.url)) {
  main().catch((e) => {
    process.stderr.write(`lab-fio: ${(e as Error).stack ?? e}\n`);
    process.exit(1);
  });
}

/**
 * fio in the Debian root disk under Typervisor and QEMU microvm, same kernel, same images, same
 * lab, alternately (issue 4's block benchmark). Run INSIDE the lab:
 *
 *   npm run lab -- node dist/bench/lab-fio.js [--runs N]
 *
 * Each VMM boots the project's rootfs from virtio-blk (root=/dev/vda) with a 256 MiB scratch disk
 * as /dev/vdb; both images live on the lab's tmpfs (/dev/shm) so the host side is the same for
 * both. fio runs 4 KiB random reads (libaio, iodepth 32, direct) and 1 MiB sequential reads and
 * writes, 5 s each. Prints a Markdown table (median over runs, ratio Typervisor/QEMU).
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { detectKvm } from '../src/kvm/detect.js';
import { imagePaths } from '../src/lab/guest.js';
import { TYPERVISOR, qemuCpu, runOnce, stat, type Vmm } from './common.js';

const CMDLINE = 'console=ttyS0 reboot=k panic=1 pci=off quiet root=/dev/vda rw';
const JOBS = {
  'randread 4k qd32 (IOPS)': '--rw=randread --bs=4k --iodepth=32',
  'seq read 1M (MB/s)': '--rw=read --bs=1M --iodepth=4',
  'seq write 1M (MB/s)': '--rw=write --bs=1M --iodepth=4',
} as const;
type Job = keyof typeof JOBS;

function fioScript(): string {
  const common =
    '--filename=/dev/vdb --direct=1 --ioengine=libaio --size=128M --runtime=5 --time_based --group_reporting';
  const lines = Object.entries(JOBS).map(
    ([name, args], i) =>
      `fio --name=j${i} ${common} ${args} --output-format=terse --terse-version=3 | sed 's/^/FIO${i};/'`,
  );
  return [...lines, 'poweroff -f', ''].join('\n');
}

/** terse v3: field 8 read IOPS? We take read/write bandwidth (KiB/s) and IOPS by index. */
function parse(stdout: string): Partial<Record<Job, number>> {
  const out: Partial<Record<Job, number>> = {};
  const names = Object.keys(JOBS) as Job[];
  for (const line of stdout.split(/\r?\n/)) {
    const m = /FIO(\d);(.*)$/.exec(line);
    if (!m) continue;
    const f = m[2]!.split(';');
    // terse v3 (after our prefix): [0]=version [1]=fio [2]=jobname [3]=groupid [4]=error,
    // read: [5]=io KiB [6]=bw KiB/s [7]=iops; write: [46]=io [47]=bw KiB/s [48]=iops
    const i = Number(m[1]);
    const name = names[i]!;
    const readBw = Number(f[6]),
      readIops = Number(f[7]),
      writeBw = Number(f[47]);
    out[name] = i === 0 ? readIops : i === 1 ? (readBw * 1024) / 1e6 : (writeBw * 1024) / 1e6;
  }
  return out;
}

function vmm(name: 'typervisor' | 'qemu', root: string, data: string, kvmKind: string): Vmm {
  if (name === 'typervisor') {
    return {
      name,
      memMiB: 512,
      cmd: process.execPath,
      args: [
        TYPERVISOR,
        'run',
        '--kernel',
        imagePaths('kernel').KERNEL!,
        '--initrd',
        imagePaths('initramfs').INITRAMFS!,
        '--memory',
        '512',
        '--cmdline',
        CMDLINE.replace(' root=/dev/vda rw', ''),
        '--drive',
        `path=${root},root`,
        '--drive',
        `path=${data}`,
      ],
    };
  }
  return {
    name,
    memMiB: 512,
    cmd: 'qemu-system-x86_64',
    args: [
      '-M',
      'microvm,acpi=on',
      '-enable-kvm',
      '-cpu',
      qemuCpu(kvmKind),
      '-m',
      '512',
      '-nodefaults',
      '-no-user-config',
      '-display',
      'none',
      '-serial',
      'stdio',
      '-kernel',
      imagePaths('kernel').KERNEL!,
      '-initrd',
      imagePaths('initramfs').INITRAMFS!,
      '-append',
      CMDLINE,
      '-drive',
      `id=root,file=${root},format=raw,if=none`,
      '-device',
      'virtio-blk-device,drive=root',
      '-drive',
      `id=data,file=${data},format=raw,if=none`,
      '-device',
      'virtio-blk-device,drive=data',
    ],
  };
}

async function main(): Promise<void> {
  const runs = Number(parseArgs({ options: { runs: { type: 'string' } } }).values.runs ?? 1);
  const kvm = detectKvm();
  const dir = mkdtempSync('/dev/shm/tv-fio-');
  try {
    const root = join(dir, 'rootfs.ext4');
    const data = join(dir, 'data.img');
    spawnSync('cp', ['--sparse=always', imagePaths('rootfs').ROOTFS!, root]);
    spawnSync('dd', ['if=/dev/urandom', `of=${data}`, 'bs=1M', 'count=256', 'status=none']);
    const results: Record<string, Partial<Record<Job, number>>[]> = { typervisor: [], qemu: [] };
    for (let r = 0; r < runs; r++) {
      for (const name of (r % 2 ? ['qemu', 'typervisor'] : ['typervisor', 'qemu']) as Array<
        'typervisor' | 'qemu'
      >) {
        const res = await runOnce(vmm(name, root, data, kvm.kind), {
          marker: 'TYPERVISOR-BOOT-OK',
          inputAfterMarker: fioScript(),
          timeoutMs: 300_000,
        });
        const p = parse(res.stdout);
        process.stderr.write(
          `lab-fio: run ${r + 1} ${name}: ${JSON.stringify(p)} (exit ${res.code})\n`,
        );
        if (Object.keys(p).length === 0)
          process.stderr.write(res.stdout.slice(-2000) + '\n' + res.stderr.slice(-1000) + '\n');
        results[name]!.push(p);
      }
    }
    const lines = ['| fio in the lab | Typervisor | QEMU microvm | T/QEMU |', '|---|---|---|---|'];
    for (const job of Object.keys(JOBS) as Job[]) {
      const t = stat(
        results.typervisor!.map((x) => x[job]).filter((x): x is number => x !== undefined),
      );
      const q = stat(results.qemu!.map((x) => x[job]).filter((x): x is number => x !== undefined));
      const fmt = (s: typeof t) => (s ? s.median.toFixed(job.includes('IOPS') ? 0 : 1) : 'n/a');
      lines.push(
        `| ${job} | ${fmt(t)} | ${fmt(q)} | ${t && q ? (t.median / q.median).toFixed(2) + 'x' : 'n/a'} |`,
      );
    }
    process.stdout.write(
      `\n${lines.join('\n')}\n(median of ${runs} run(s); both VMMs use the host page cache: QEMU's default cache=writeback with its thread pool, Typervisor synchronous I/O in its device worker)\n`,
    );
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

main().catch((e) => {
  process.stderr.write(`lab-fio: ${(e as Error).stack ?? e}\n`);
  process.exit(1);
});

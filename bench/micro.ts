/**
 * The micro suite: VMM overhead on the host's own KVM with the tiny guests of
 * bench/guests/micro.S, Typervisor vs QEMU microvm vs the C floor (bench/floor.c), run
 * alternately (round-robin, the order rotating every round) so that noise on a shared host
 * hits all three alike.
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  REPO,
  TYPERVISOR,
  qemuCpu,
  runOnce,
  stat,
  type Row,
  type RunResult,
  type Vmm,
} from './common.js';

const MEM_MIB = 64;
const LOOP_SMALL = 1000;
const LOOP_BIG = 200_000;
/** Sequential starts per starts/s sample (and per loop in the 2-parallel sample). */
const STARTS_PER_SAMPLE = 4;
/** Requests per virtio-blk read loop (bench/guests/blkloop.S); the small counts are build.sh's. */
const BLK_4K_SMALL = 500;
const BLK_4K_BIG = 30_000;
const BLK_64K_SMALL = 200;
const BLK_64K_BIG = 25_000;
/** The disk both VMMs read, in sectors of 512 bytes (32 MiB). */
const DISK_SECTORS = 65536;

type Name = Vmm['name'];
const NAMES: Name[] = ['typervisor', 'qemu', 'floor'];

/** `disk`: a raw image attached read-only as a virtio-blk device (virtio-mmio, modern). */
export function vmmFor(
  name: Name,
  dir: string,
  guest: string,
  kvmKind: string,
  disk?: string,
): Vmm {
  const elf = join(dir, `${guest}.elf`);
  switch (name) {
    case 'typervisor':
      return {
        name,
        cmd: process.execPath,
        args: [
          TYPERVISOR,
          'run',
          '--kernel',
          elf,
          '--memory',
          String(MEM_MIB),
          '--boot-timer',
          ...(disk ? ['--drive', `path=${disk},ro`] : []),
        ],
        memMiB: MEM_MIB,
      };
    case 'qemu':
      return {
        name,
        cmd: 'qemu-system-x86_64',
        args: [
          '-M',
          'microvm',
          '-enable-kvm',
          '-cpu',
          qemuCpu(kvmKind),
          '-m',
          String(MEM_MIB),
          '-nodefaults',
          '-no-user-config',
          '-display',
          'none',
          '-serial',
          'stdio',
          '-device',
          'i8042',
          '-no-reboot',
          '-kernel',
          elf,
          ...(disk
            ? [
                '-global',
                'virtio-mmio.force-legacy=false',
                '-drive',
                `id=d,file=${disk},format=raw,if=none,readonly=on`,
                '-device',
                'virtio-blk-device,drive=d',
              ]
            : []),
        ],
        memMiB: MEM_MIB,
      };
    case 'floor':
      return { name, cmd: join(dir, 'floor'), args: [elf, String(MEM_MIB)], memMiB: MEM_MIB };
  }
}

function check(r: RunResult, what: string): RunResult {
  if (r.timedOut || r.code !== 0 || r.markerMs < 0) {
    throw new Error(
      `${what}: exit ${r.code}${r.timedOut ? ' (timed out)' : ''}, marker ${r.markerMs >= 0 ? 'seen' : 'not seen'}\n${r.stderr.slice(-2000)}`,
    );
  }
  return r;
}

/** The blk-loop guest's verdict: "D" when every read was right, "E<reason>" otherwise. */
function checkBlk(r: RunResult, what: string): RunResult {
  check(r, what);
  const e = /E(.)/.exec(r.stdout);
  if (e || !r.stdout.includes('D\n')) {
    throw new Error(
      `${what}: the guest ${e ? `failed (E${e[1]}: see bench/guests/blkloop.S)` : 'did not finish (no "D")'}; stdout ${JSON.stringify(r.stdout.slice(-200))}\n${r.stderr.slice(-2000)}`,
    );
  }
  return r;
}

/** A raw disk of `sectors` sectors, each starting with its own number (u32 LE), as blkloop.S expects. */
function writeDisk(path: string, sectors: number): void {
  const b = Buffer.alloc(sectors * 512);
  for (let i = 0; i < sectors; i++) b.writeUInt32LE(i, i * 512);
  writeFileSync(path, b);
}

/** Starts per second: `loops` loops in parallel, each starting the VM `n` times in a row. */
async function startsPerSecond(vmm: Vmm, loops: number, n: number): Promise<number> {
  const t0 = performance.now();
  await Promise.all(
    Array.from({ length: loops }, async () => {
      for (let i = 0; i < n; i++)
        check(await runOnce(vmm, { timeoutMs: 30_000 }), `${vmm.name} start`);
    }),
  );
  return (loops * n) / ((performance.now() - t0) / 1000);
}

export interface MicroOptions {
  runs: number;
  kvmKind: string;
  log: (s: string) => void;
}

export async function microSuite(o: MicroOptions): Promise<{ rows: Row[]; notes: string[] }> {
  const dir = mkdtempSync(join(tmpdir(), 'typervisor-bench-guests-'));
  try {
    const b = spawnSync(
      'sh',
      [
        join(REPO, 'bench', 'guests', 'build.sh'),
        dir,
        String(LOOP_BIG),
        String(BLK_4K_BIG),
        String(BLK_64K_BIG),
      ],
      { encoding: 'utf8' },
    );
    if (b.status !== 0) throw new Error(`bench/guests/build.sh failed: ${b.stderr}`);
    const disk = join(dir, 'disk.img');
    writeDisk(disk, DISK_SECTORS);
    const samples: Record<string, Record<Name, number[]>> = {};
    const add = (metric: string, name: Name, v: number | undefined) => {
      if (v === undefined) return;
      (samples[metric] ??= { typervisor: [], qemu: [], floor: [] })[name].push(v);
    };
    for (let r = 0; r < o.runs; r++) {
      const order = NAMES.map((_, i) => NAMES[(i + r) % NAMES.length]!);
      for (const name of order) {
        const mark = check(
          await runOnce(vmmFor(name, dir, 'mark', o.kvmKind), { peakRss: true, timeoutMs: 30_000 }),
          `${name} mark`,
        );
        add('marker', name, mark.markerMs);
        add('exit', name, mark.exitMs);
        add('peak', name, mark.peakRssKiB !== undefined ? mark.peakRssKiB / 1024 : undefined);
        if (name === 'typervisor') add('boottimer', name, mark.bootTimerMs);
      }
      for (const name of order) {
        const spin = await runOnce(vmmFor(name, dir, 'spin', o.kvmKind), {
          sampleSmaps: true,
          sampleDelayMs: 200,
          killAfterSample: true,
          timeoutMs: 30_000,
        });
        if (!spin.smaps)
          throw new Error(`${name} spin: no smaps sample (exit ${spin.code})\n${spin.stderr}`);
        add('nonguest', name, spin.smaps.nonGuestRssKiB / 1024);
        add('guestrss', name, spin.smaps.guestRssKiB / 1024);
      }
      for (const name of order) {
        const small = check(
          await runOnce(vmmFor(name, dir, 'pioloop-small', o.kvmKind), { timeoutMs: 60_000 }),
          `${name} pioloop`,
        );
        const big = check(
          await runOnce(vmmFor(name, dir, 'pioloop-big', o.kvmKind), { timeoutMs: 120_000 }),
          `${name} pioloop`,
        );
        const dt = (big.exitMs - big.markerMs - (small.exitMs - small.markerMs)) / 1000;
        add('exits', name, (LOOP_BIG - LOOP_SMALL) / dt);
      }
      for (const name of order) {
        if (name === 'floor') continue; // no virtio in the floor
        for (const [guest, small, big, bytes] of [
          ['blk4k', BLK_4K_SMALL, BLK_4K_BIG, 4096],
          ['blk4k-isr', BLK_4K_SMALL, BLK_4K_BIG, 4096],
          ['blk64k', BLK_64K_SMALL, BLK_64K_BIG, 65536],
        ] as const) {
          const run = async (size: 'small' | 'big') =>
            checkBlk(
              await runOnce(vmmFor(name, dir, `${guest}-${size}`, o.kvmKind, disk), {
                timeoutMs: 120_000,
              }),
              `${name} ${guest}-${size}`,
            );
          const s = await run('small');
          const l = await run('big');
          const dt = (l.exitMs - l.markerMs - (s.exitMs - s.markerMs)) / 1000;
          if (dt <= 0) {
            // The small run took longer than the big one: host noise swamped it; no sample.
            o.log(`micro: ${name} ${guest}: small run not shorter than the big one, dropped`);
            continue;
          }
          const perS = (big - small) / dt;
          add(guest, name, guest === 'blk64k' ? (perS * bytes) / 1e6 : perS);
        }
      }
      for (const name of order) {
        add(
          'seq',
          name,
          await startsPerSecond(vmmFor(name, dir, 'mark', o.kvmKind), 1, STARTS_PER_SAMPLE),
        );
        add(
          'par',
          name,
          await startsPerSecond(vmmFor(name, dir, 'mark', o.kvmKind), 2, STARTS_PER_SAMPLE),
        );
      }
      o.log(`micro: round ${r + 1}/${o.runs} done`);
    }
    const row = (
      metric: string,
      key: string,
      unit: string,
      higherIsBetter = false,
      note?: string,
    ): Row => ({
      suite: 'micro',
      metric,
      unit,
      higherIsBetter,
      note,
      typervisor: stat(samples[key]?.typervisor ?? []),
      qemu: stat(samples[key]?.qemu ?? []),
      floor: stat(samples[key]?.floor ?? []),
    });
    const rows = [
      row('start → marker (first serial byte on stdout)', 'marker', 'ms'),
      row('start → exit (i8042 reset)', 'exit', 'ms'),
      row(
        'Typervisor --boot-timer (start → port 0x3f0)',
        'boottimer',
        'ms',
        false,
        'measured inside Typervisor; not comparable column-wise',
      ),
      row('peak RSS (ru_maxrss)', 'peak', 'MiB'),
      row(
        'RSS outside guest memory (smaps, spin guest)',
        'nonguest',
        'MiB',
        false,
        'Firecracker: < 5 MiB',
      ),
      row('guest memory RSS (smaps, spin guest)', 'guestrss', 'MiB'),
      row(`port-I/O exits/s (${LOOP_BIG} - ${LOOP_SMALL} outs)`, 'exits', '1/s', true),
      row(
        `virtio-blk 4 KiB reads/s, queue depth 1 (${BLK_4K_BIG} - ${BLK_4K_SMALL} requests)`,
        'blk4k',
        '1/s',
        true,
        'polled; the floor has no virtio',
      ),
      row(
        `virtio-blk 4 KiB reads/s, queue depth 1, each followed by an interrupt handler's InterruptStatus read and ACK`,
        'blk4k-isr',
        '1/s',
        true,
        'polled; the device interrupts (the guest keeps them off) and the guest reads InterruptStatus and acknowledges it per request, as Linux vm_interrupt does (register pages and the ACK eventfd: neither exits)',
      ),
      row(
        `virtio-blk 64 KiB reads, queue depth 1 (${BLK_64K_BIG} - ${BLK_64K_SMALL} requests)`,
        'blk64k',
        'MB/s',
        true,
        'polled; the floor has no virtio',
      ),
      row(`VM starts/s, sequential (${STARTS_PER_SAMPLE} per sample)`, 'seq', '1/s', true),
      row(`VM starts/s, 2 in parallel (2 x ${STARTS_PER_SAMPLE} per sample)`, 'par', '1/s', true),
    ];
    const notes = [
      `micro guest: bench/guests/micro.S (PVH ELF, ${MEM_MIB} MiB), prints "M\\n" on COM1, writes port 0x3f0, ends with the i8042 reset (QEMU: -device i8042 -no-reboot).`,
      `virtio-blk rows: bench/guests/blkloop.S, a polled virtio-mmio (version 2) driver in the micro guest, reads a ${(DISK_SECTORS * 512) / 2 ** 20} MiB raw image (in the page cache) read-only, one request in flight, cycling over it, and checks each request; QEMU: -global virtio-mmio.force-legacy=false -device virtio-blk-device. MB/s = 10^6 bytes/s.`,
    ];
    return { rows, notes };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * The micro suite: VMM overhead on the host's own KVM with the tiny guests of
 * bench/guests/micro.S, Typervisor vs QEMU microvm vs the C floor (bench/floor.c), run
 * alternately (round-robin, the order rotating every round) so that noise on a shared host
 * hits all three alike.
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
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

type Name = Vmm['name'];
const NAMES: Name[] = ['typervisor', 'qemu', 'floor'];

function vmmFor(name: Name, dir: string, guest: string, kvmKind: string): Vmm {
  const elf = join(dir, `${guest}.elf`);
  switch (name) {
    case 'typervisor':
      return {
        name,
        cmd: process.execPath,
        args: [TYPERVISOR, 'run', '--kernel', elf, '--memory', String(MEM_MIB), '--boot-timer'],
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
    const b = spawnSync('sh', [join(REPO, 'bench', 'guests', 'build.sh'), dir, String(LOOP_BIG)], {
      encoding: 'utf8',
    });
    if (b.status !== 0) throw new Error(`bench/guests/build.sh failed: ${b.stderr}`);
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
      row(`VM starts/s, sequential (${STARTS_PER_SAMPLE} per sample)`, 'seq', '1/s', true),
      row(`VM starts/s, 2 in parallel (2 x ${STARTS_PER_SAMPLE} per sample)`, 'par', '1/s', true),
    ];
    const notes = [
      `micro guest: bench/guests/micro.S (PVH ELF, ${MEM_MIB} MiB), prints "M\\n" on COM1, writes port 0x3f0, ends with the i8042 reset (QEMU: -device i8042 -no-reboot).`,
      'virtio-blk read loop in the micro guest: not done (needs a virtio-blk driver in assembly; out of this time box).',
    ];
    return { rows, notes };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * The vCPU-count suite (issue 18 part B): what a vCPU costs, per-vCPU Node workers
 * (TYPERVISOR_VCPU_THREADS=worker) vs native runner threads served by one worker (=native) vs
 * vCPU 0 on a worker and the others native (=hybrid) vs
 * QEMU microvm (-smp N), on the host's KVM with the micro guests (bench/guests/micro.S), run
 * interleaved (the order rotating every round):
 *  - start: exec -> marker and exec -> exit of the MARK guest (vCPU 0 prints and resets; the
 *    other vCPUs are created, started and stopped), and the peak RSS of that run;
 *  - RSS: the SPIN guest sampled (smaps, guest RAM left out) once every vCPU thread is up;
 *  - exits/s: (PIOLOOP 100000 - PIOLOOP 1000 exits) / time difference, 1 vCPU and 8 vCPUs;
 *  - pause/resume latency: in this process (buildVm), Vmm.pause() until every vCPU is parked,
 *    and resume(), on the SPIN guest.
 * `node dist/bench/vcpus.js [--runs N] [--counts 1,8,32,64] [--variants LIST] [--out FILE]` prints
 * Markdown (and writes it to FILE). Figures are medians (min–max) of the runs.
 */
import { spawnSync } from 'node:child_process';
import {
  mkdirSync,
  mkdtempSync,
  openSync,
  closeSync,
  readFileSync,
  rmSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { parseArgs } from 'node:util';
import { detectKvm } from '../src/kvm/detect.js';
import {
  REPO,
  TYPERVISOR,
  isMainModule,
  qemuCpu,
  runOnce,
  stat,
  trainBundleCaches,
  type Stat,
  type Vmm,
} from './common.js';

const MEM_MIB = 64;
const LOOP_BIG = 100_000;
const LOOP_SMALL = 1000;
/**
 * native: the hub on the main thread; native-hubw: the hub on a worker of its own; loop: vCPU 0
 * on the main thread's loop, the others native (what `run` picks by default, vcpu-mode.ts).
 */
type Variant = 'worker' | 'native' | 'native-hubw' | 'hybrid' | 'loop' | 'qemu';
const ALL_VARIANTS: Variant[] = ['worker', 'native', 'native-hubw', 'hybrid', 'loop', 'qemu'];
const LABELS: Record<Variant, string> = {
  worker: 'worker',
  native: 'native (hub: main thread)',
  'native-hubw': 'native (hub: a worker)',
  hybrid: 'hybrid (hub: main thread)',
  loop: 'loop (the default of run)',
  qemu: 'QEMU microvm',
};
let VARIANTS: Variant[] = ALL_VARIANTS;
const threadsOf = (v: Exclude<Variant, 'qemu'>) => (v === 'native-hubw' ? 'native' : v);
const hubOf = (v: Variant) => (v === 'native-hubw' ? 'worker' : 'main');

function vmm(v: Variant, dir: string, guest: string, vcpus: number, kvmKind: string): Vmm {
  const elf = join(dir, `${guest}.elf`);
  if (v === 'qemu')
    return {
      name: 'qemu',
      cmd: 'qemu-system-x86_64',
      args: [
        ...['-M', 'microvm', '-enable-kvm', '-cpu', qemuCpu(kvmKind), '-m', String(MEM_MIB)],
        ...['-smp', String(vcpus), '-nodefaults', '-no-user-config', '-display', 'none'],
        ...['-serial', 'stdio', '-device', 'i8042', '-no-reboot', '-kernel', elf],
      ],
      memMiB: MEM_MIB,
    };
  return {
    name: 'typervisor',
    // The launcher exec'd as a user runs it (its shell line: the CA variable dropped, the stack
    // limit set), as the start-up and density suites do.
    cmd: TYPERVISOR,
    args: ['run', '--kernel', elf, '--memory', String(MEM_MIB), '--vcpus', String(vcpus)],
    memMiB: MEM_MIB,
  };
}

async function run(v: Variant, m: Vmm, o: Parameters<typeof runOnce>[1]) {
  if (v !== 'qemu') {
    process.env.TYPERVISOR_VCPU_THREADS = threadsOf(v);
    process.env.TYPERVISOR_VCPU_HUB = hubOf(v);
  }
  const r = await runOnce(m, { timeoutMs: 60_000, ...o });
  delete process.env.TYPERVISOR_VCPU_THREADS;
  delete process.env.TYPERVISOR_VCPU_HUB;
  if (r.timedOut || r.markerMs < 0)
    throw new Error(
      `${v} ${m.args.join(' ')}: ${r.timedOut ? 'timed out' : 'no marker'}: ${r.stderr.slice(0, 400)}`,
    );
  return r;
}

const notes: string[] = [];
type Samples = Record<string, Record<Variant, number[]>>;
const samples: Samples = {};
function add(metric: string, v: Variant, x: number | undefined): void {
  if (x === undefined || !Number.isFinite(x)) return;
  samples[metric] ??= Object.fromEntries(ALL_VARIANTS.map((v) => [v, [] as number[]])) as Record<
    Variant,
    number[]
  >;
  samples[metric][v].push(x);
}

/** Pause and resume latency, in this process (dist/src/vmm/builder.js on the SPIN guest). */
async function pauseLatency(
  dir: string,
  vcpus: number,
  mode: Exclude<Variant, 'qemu'>,
  rounds: number,
) {
  const { buildVm } = await import('../src/vmm/builder.js');
  const { validateResources } = await import('../src/vmm/resources.js');
  process.env.TYPERVISOR_VCPU_THREADS = threadsOf(mode);
  process.env.TYPERVISOR_VCPU_HUB = hubOf(mode);
  const out = join(mkdtempSync(join(tmpdir(), 'tv-vcpus-')), 'console');
  const fd = openSync(out, 'w');
  const vm = buildVm(
    validateResources({
      machine: { vcpu_count: vcpus, mem_size_mib: MEM_MIB },
      boot: { kernel_image_path: join(dir, 'spin.elf') },
    }),
    { consoleFd: fd },
  );
  delete process.env.TYPERVISOR_VCPU_THREADS;
  delete process.env.TYPERVISOR_VCPU_HUB;
  let ended: string | undefined;
  void vm.vmm.exited.then((e) => (ended = JSON.stringify(e)));
  try {
    const t0 = performance.now();
    while (!readFileSync(out, 'latin1').includes('M')) {
      if (performance.now() - t0 > 30_000) throw new Error('the spin guest printed nothing');
      await new Promise((r) => setTimeout(r, 5));
    }
    for (let i = 0; i < rounds; i++) {
      const a = performance.now();
      try {
        await vm.vmm.pause();
      } catch (e) {
        await new Promise((r) => setTimeout(r, 100));
        notes.push(
          `${mode}, ${vcpus} vCPU(s): pause ${i} failed: ${(e as Error).message} (VM: ${ended ?? vm.vmm.state})`,
        );
        break;
      }
      const b = performance.now();
      vm.vmm.resume();
      // resume latency: until every vCPU is running again (its state slot says so)
      while (![...Array(vcpus).keys()].every((id) => vm.vmm.control.state(id) === 1))
        await new Promise((r) => setImmediate(r));
      const c = performance.now();
      add(`pause, ${vcpus} vCPU(s) (ms)`, mode, b - a);
      add(`resume, ${vcpus} vCPU(s) (ms)`, mode, c - b);
      await new Promise((r) => setTimeout(r, 20));
    }
  } finally {
    vm.vmm.requestStop();
    await vm.vmm.exited;
    closeSync(fd);
    rmSync(dirname(out), { recursive: true, force: true });
  }
}

function cell(s: Stat | undefined, digits = 1): string {
  if (!s) return '–';
  const f = (x: number) => x.toFixed(digits);
  return `${f(s.median)} (${f(s.min)}–${f(s.max)})`;
}

export interface VcpusOptions {
  runs: number;
  counts: number[];
  /** Which variants, in this order (default all). */
  variants?: Variant[];
  kvmKind: string;
  log: (s: string) => void;
}

/** Runs the suite; returns its Markdown section (a table and notes). */
export async function vcpusSuite(o: VcpusOptions): Promise<string> {
  const { runs, counts, kvmKind, log } = o;
  VARIANTS = o.variants ?? ALL_VARIANTS;
  for (const k of Object.keys(samples)) delete samples[k];
  notes.length = 0;
  notes.push(trainBundleCaches());
  const dir = mkdtempSync(join(tmpdir(), 'tv-vcpus-guests-'));
  const b = spawnSync('sh', [join(REPO, 'bench', 'guests', 'build.sh'), dir, String(LOOP_BIG)], {
    encoding: 'utf8',
  });
  if (b.status !== 0) throw new Error(`bench/guests/build.sh failed: ${b.stderr}`);
  const started = Date.now();
  try {
    for (let round = 0; round < runs; round++) {
      const order = VARIANTS.map((_, i) => VARIANTS[(i + round) % VARIANTS.length]!);
      for (const n of counts) {
        log(`round ${round + 1}/${runs}, ${n} vCPU(s)`);
        for (const v of order) {
          const s = await run(v, vmm(v, dir, 'mark', n, kvmKind), { peakRss: true, marker: 'M' });
          add(`start -> marker, ${n} vCPU(s) (ms)`, v, s.markerMs);
          add(`start -> exit, ${n} vCPU(s) (ms)`, v, s.exitMs);
          add(`peak RSS, ${n} vCPU(s) (MiB)`, v, (s.peakRssKiB ?? NaN) / 1024 - 0);
          // RSS of a running guest, sampled once every vCPU is up (worker mode: ~50 ms each)
          const r = await run(v, vmm(v, dir, 'spin', n, kvmKind), {
            marker: 'M',
            sampleSmaps: true,
            sampleDelayMs: 500 + 60 * n,
            killAfterSample: true,
          });
          add(
            `RSS without guest RAM, ${n} vCPU(s) (MiB)`,
            v,
            (r.smaps?.nonGuestRssKiB ?? NaN) / 1024,
          );
        }
      }
      for (const n of counts.filter((c) => c <= 8)) {
        for (const v of order) {
          const big = await run(v, vmm(v, dir, 'pioloop-big', n, kvmKind), { marker: 'M' });
          const small = await run(v, vmm(v, dir, 'pioloop-small', n, kvmKind), { marker: 'M' });
          const dt = big.exitMs - big.markerMs - (small.exitMs - small.markerMs);
          add(`port-I/O exits/s, ${n} vCPU(s) (k/s, ↑)`, v, (LOOP_BIG - LOOP_SMALL) / dt);
        }
      }
      for (const n of counts) {
        for (const v of order) if (v !== 'qemu') await pauseLatency(dir, n, v, 3);
      }
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  return [
    `${new Date().toISOString()}, ${((Date.now() - started) / 1000).toFixed(0)} s, ${runs} interleaved round(s); KVM ${kvmKind}. Cells: median (min–max); lower is better unless ↑.`,
    '',
    `| metric | ${VARIANTS.map((v) => LABELS[v]).join(' | ')} |`,
    `|---|${VARIANTS.map(() => '---').join('|')}|`,
    ...Object.entries(samples).map(
      ([metric, s]) => `| ${metric} | ${VARIANTS.map((v) => cell(stat(s[v]))).join(' | ')} |`,
    ),
    '',
    ...notes.map((n) => `- ${n}`),
    '',
  ].join('\n');
}

async function main() {
  const { values } = parseArgs({
    options: {
      runs: { type: 'string' },
      counts: { type: 'string' },
      variants: { type: 'string' },
      out: { type: 'string' },
    },
  });
  const variants = (values.variants ?? ALL_VARIANTS.join(',')).split(',') as Variant[];
  const runs = Number(values.runs ?? 3);
  const counts = (values.counts ?? '1,8,32,64').split(',').map(Number);
  if (
    !Number.isInteger(runs) ||
    runs < 1 ||
    counts.some((n) => !Number.isInteger(n) || n < 1 || n > 64) ||
    variants.some((v) => !ALL_VARIANTS.includes(v))
  )
    throw new Error(
      `usage: vcpus.js [--runs N] [--counts 1,8,32,64] [--variants ${ALL_VARIANTS.join(',')}] [--out FILE] (1 to 64 vCPUs)`,
    );
  const body = await vcpusSuite({
    runs,
    counts,
    variants,
    kvmKind: detectKvm().kind,
    log: (s) => process.stderr.write(`vcpus: ${s}\n`),
  });
  const lines = `# vCPU threads: per-vCPU workers vs native runner threads vs QEMU\n\n${body}`;
  process.stdout.write(lines);
  // Only where asked: a run by hand must not leave a results file in the checkout.
  if (values.out) {
    mkdirSync(dirname(values.out), { recursive: true });
    writeFileSync(values.out, lines);
  }
  process.exit(0);
}

if (isMainModule(import.meta.url)) await main();

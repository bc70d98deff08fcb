/**
 * The warm suite (issue 19): VMs started by the library (src/lib/) in a process that is already
 * running, beside QEMU microvm and the C floor (bench/floor.c) started cold, on the micro guest
 * (bench/guests/micro.S `mark`: prints, writes the boot marker, resets).
 *  - warm start -> marker: createVm() called -> the guest's write of the boot marker port, ms
 *    (the library's VmExit.bootMarkerMs); QEMU and the floor: exec -> first stdout byte.
 *  - VMs/s sequential: create, run to its end, next, in one process (the library), against one
 *    process per VM (QEMU, the floor).
 *  - churn: descriptors and RSS of the process before and after WARM_CHURN create/run/destroy
 *    cycles (after a warm-up), once per suite run.
 * Each library sample runs in a fresh Node process (`node dist/bench/warm.js --child ...`), so
 * nothing of the bench runner's own state is measured; the samples interleave with QEMU's and the
 * floor's, the order rotating every run.
 */
import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { REPO, isMainModule, runOnce, stat, type Row } from './common.js';
import { vmmFor } from './micro.js';

const MEM_MIB = 64;
/** Marker samples per child (after WARMUP VMs), and VMs per rate sample. */
const MARKS = 30;
const RATE_VMS = 100;
const WARMUP = 5;
/** VMs in the churn measurement (the figure). */
export const WARM_CHURN = 1000;
/** Sequential cold starts per QEMU / floor rate sample. */
const COLD_STARTS = 6;

interface ChildResult {
  markerMs: number[];
  vmsPerS: number;
  churn?: { vms: number; fds0: number; fds1: number; rss0KiB: number; rss1KiB: number; s: number };
  stats: unknown;
}

const fdCount = () => readdirSync('/proc/self/fd').length;
const rssKiB = () => Number(/VmRSS:\s+(\d+)/.exec(readFileSync('/proc/self/status', 'utf8'))![1]);

/** In the child: one host, WARMUP VMs, MARKS timed starts, RATE_VMS back to back, the churn. */
async function child(elf: string, churn: number): Promise<void> {
  const { createVmHost } = await import('../src/lib/index.js');
  const h = createVmHost();
  if (!h.ok) throw h.error;
  const host = h.value;
  await host.ready();
  const res = {
    machine: { vcpu_count: 1, mem_size_mib: MEM_MIB },
    boot: { kernel_image_path: elf },
  };
  const one = async () => {
    const r = await host.createVm(res, { console: 'none', start: true });
    if (!r.ok) throw r.error;
    const e = await r.value.wait();
    if (e.reason !== 'reset' || e.bootMarkerMs === undefined)
      throw new Error(`the micro guest ended with ${JSON.stringify(e)}`);
    return e.bootMarkerMs;
  };
  for (let i = 0; i < WARMUP; i++) await one();
  const markerMs: number[] = [];
  for (let i = 0; i < MARKS; i++) markerMs.push(await one());
  const t0 = performance.now();
  for (let i = 0; i < RATE_VMS; i++) await one();
  const vmsPerS = RATE_VMS / ((performance.now() - t0) / 1000);
  const out: ChildResult = { markerMs, vmsPerS, stats: undefined };
  if (churn > 0) {
    await host.drain();
    (globalThis as { gc?: () => void }).gc?.();
    const fds0 = fdCount();
    const rss0KiB = rssKiB();
    const c0 = performance.now();
    for (let i = 0; i < churn; i++) await one();
    const s = (performance.now() - c0) / 1000;
    await host.drain();
    (globalThis as { gc?: () => void }).gc?.();
    out.churn = { vms: churn, fds0, fds1: fdCount(), rss0KiB, rss1KiB: rssKiB(), s };
  }
  out.stats = host.stats();
  await host.close();
  process.stdout.write(`WARM-RESULT ${JSON.stringify(out)}\n`);
}

function runChild(elf: string, churn: number): Promise<ChildResult> {
  return new Promise((resolve, reject) => {
    const c = spawn(
      process.execPath,
      ['--expose-gc', fileURLToPath(import.meta.url), '--child', elf, String(churn)],
      { stdio: ['ignore', 'pipe', 'pipe'] },
    );
    let out = '';
    let err = '';
    c.stdout.on('data', (d) => (out += d));
    c.stderr.on('data', (d) => (err += d));
    const timer = setTimeout(() => c.kill('SIGKILL'), 600_000);
    c.once('exit', (code) => {
      clearTimeout(timer);
      const line = /^WARM-RESULT (.*)$/m.exec(out);
      if (code !== 0 || !line)
        return reject(new Error(`warm child: exit ${code}: ${err.slice(-1500)}`));
      resolve(JSON.parse(line[1]!) as ChildResult);
    });
  });
}

export interface WarmOptions {
  runs: number;
  kvmKind: string;
  log: (s: string) => void;
}

export async function warmSuite(o: WarmOptions): Promise<{ rows: Row[]; notes: string[] }> {
  const dir = mkdtempSync(join(tmpdir(), 'typervisor-bench-warm-'));
  try {
    const b = spawnSync(
      'sh',
      [join(REPO, 'bench', 'guests', 'build.sh'), dir, '1000', '10', '10'],
      {
        encoding: 'utf8',
      },
    );
    if (b.status !== 0) throw new Error(`bench/guests/build.sh failed: ${b.stderr}`);
    const elf = join(dir, 'mark.elf');
    const s = {
      marker: { typervisor: [] as number[], qemu: [] as number[], floor: [] as number[] },
      rate: { typervisor: [] as number[], qemu: [] as number[], floor: [] as number[] },
    };
    let churn: ChildResult['churn'];
    const names = ['typervisor', 'qemu', 'floor'] as const;
    for (let r = 0; r < o.runs; r++) {
      const order = names.map((_, i) => names[(i + r) % names.length]!);
      for (const name of order) {
        if (name === 'typervisor') {
          const c = await runChild(elf, r === 0 ? WARM_CHURN : 0);
          const m = stat(c.markerMs)!;
          s.marker.typervisor.push(m.median);
          s.rate.typervisor.push(c.vmsPerS);
          churn ??= c.churn;
          o.log(
            `warm run ${r + 1}: marker median ${m.median.toFixed(2)} ms, ${c.vmsPerS.toFixed(0)} VMs/s`,
          );
          continue;
        }
        const vmm = vmmFor(name, dir, 'mark', o.kvmKind);
        const marks: number[] = [];
        const t0 = performance.now();
        for (let i = 0; i < COLD_STARTS; i++) {
          const x = await runOnce(vmm, { timeoutMs: 30_000 });
          if (x.code !== 0 || x.markerMs < 0)
            throw new Error(
              `${name}: exit ${x.code}, marker ${x.markerMs}: ${x.stderr.slice(-500)}`,
            );
          marks.push(x.markerMs);
        }
        s.rate[name].push(COLD_STARTS / ((performance.now() - t0) / 1000));
        s.marker[name].push(stat(marks)!.median);
      }
    }
    const row = (metric: string, unit: string, k: 'marker' | 'rate', note: string): Row => ({
      suite: 'micro',
      metric,
      unit,
      ...(k === 'rate' ? { higherIsBetter: true } : {}),
      typervisor: stat(s[k].typervisor),
      qemu: stat(s[k].qemu),
      floor: stat(s[k].floor),
      note,
    });
    const rows: Row[] = [
      row(
        'warm start -> marker',
        'ms',
        'marker',
        `library: createVm() -> boot marker, median of ${MARKS} per run in a warm process; QEMU and the floor: exec -> marker (cold, a process per VM)`,
      ),
      row(
        'VMs/s sequential',
        '1/s',
        'rate',
        `library: ${RATE_VMS} create/run/destroy back to back in one process; QEMU and the floor: ${COLD_STARTS} processes one after another`,
      ),
    ];
    const notes: string[] = [];
    if (churn) {
      rows.push({
        suite: 'micro',
        metric: `churn ${churn.vms} VMs: descriptors after - before`,
        unit: 'fds',
        typervisor: stat([churn.fds1 - churn.fds0]),
        note: `${churn.fds0} -> ${churn.fds1}`,
      });
      rows.push({
        suite: 'micro',
        metric: `churn ${churn.vms} VMs: RSS after - before`,
        unit: 'MiB',
        typervisor: stat([(churn.rss1KiB - churn.rss0KiB) / 1024]),
        note: `${(churn.rss0KiB / 1024).toFixed(1)} -> ${(churn.rss1KiB / 1024).toFixed(1)} MiB, ${(churn.vms / churn.s).toFixed(0)} VMs/s during the churn`,
      });
    }
    notes.push(
      `Warm suite: ${o.runs} runs, interleaved (library, QEMU, floor; the order rotating). The library's figures are in-process starts on a warm VmHost (default options: 1 warm vCPU worker, 4 closer threads, kept guest RAM); QEMU's and the floor's are cold process starts, the only kind they have.`,
    );
    return { rows, notes };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

if (isMainModule(import.meta.url) && process.argv[2] === '--child') {
  child(process.argv[3]!, Number(process.argv[4] ?? 0)).catch((e) => {
    process.stderr.write(`${(e as Error).stack}\n`);
    process.exit(1);
  });
} else if (isMainModule(import.meta.url)) {
  const { detectKvm } = await import('../src/kvm/detect.js');
  const runs = Number(process.argv[2] ?? 3);
  const r = await warmSuite({
    runs,
    kvmKind: detectKvm().kind,
    log: (s) => process.stderr.write(`warm: ${s}\n`),
  });
  for (const row of r.rows) process.stdout.write(`${JSON.stringify(row)}\n`);
  for (const n of r.notes) process.stdout.write(`${n}\n`);
}

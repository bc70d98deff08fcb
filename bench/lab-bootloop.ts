/**
 * Boot loop, run INSIDE the lab (one lab boot): boots the default guest (Debian's cloud kernel +
 * the busybox initramfs) many times under Typervisor and/or QEMU, K VMs at a time, sends
 * `poweroff -f` as soon as TYPERVISOR-BOOT-OK shows, and counts ok / triple fault / other per
 * variant, to compare failure rates of VMMs (and of Typervisor's vCPU modes, or other trees)
 * in the same lab boot. Failures keep their console and stderr in the output directory.
 *
 *   npm run lab --silent -- --timeout 4000 -- node dist/bench/lab-bootloop.js \
 *     --runs 100 --concurrency 2 --variants typervisor:worker,qemu --budget 3600
 *
 * Variants (comma-separated, run round-robin so they share the lab's conditions):
 *   typervisor[:worker|native|hybrid|loop|auto][@TREE]  TREE: another checkout's root (bisecting)
 *   qemu[:microvm|pc][+memfd]                       -enable-kvm -cpu host -no-reboot
 *     (+memfd: guest RAM from a shared memfd, as Typervisor's, instead of anonymous memory)
 * --shmem-thp never|advise|always|force|within_size: set the lab kernel's
 *   /sys/kernel/mm/transparent_hugepage/shmem_enabled first (all VMMs; THP for memfd RAM)
 * --pin: each lane's VMM confined to one lab CPU (taskset -c lane % CPUs: all its threads on it)
 * --ktrace: keep the lab kernel's KVM trace (kvm_exit, kvm_inj_exception, ...) in an overwrite
 *   ring; on a failure its tail goes to the output directory (on AMD, KVM resets the vCPU at a
 *   shutdown, so the VMM cannot read the registers at a triple fault; the trace has the exits).
 */
import { spawn } from 'node:child_process';
import { appendFileSync, existsSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import { availableParallelism } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { imagePaths } from '../src/lab/guest.js';
import { REPO, TRACEFS, isMainModule, tracefsWriter } from './common.js';

const MARKER = 'TYPERVISOR-BOOT-OK';
/** The same command line for both VMMs (as bench/lab-inner.ts). */
const CMDLINE = 'console=ttyS0 reboot=k panic=1 pci=off quiet';
const TRACING = TRACEFS;

type Outcome = 'ok' | 'triple' | 'other';

interface Variant {
  name: string;
  cmd: string;
  args: string[];
  env?: NodeJS.ProcessEnv;
  qemu: boolean;
}

export function parseVariant(
  spec: string,
  o: {
    kernel: string;
    initrd: string;
    cmdline: string;
    vcpus: number;
    memMiB: number;
    logLevel: string;
  },
): Variant {
  const [head, tree] = spec.split('@') as [string, string | undefined];
  const [vmm, mode] = head.split(':') as [string, string | undefined];
  if (vmm === 'typervisor' || vmm === 'tv') {
    const bin = join(tree ?? REPO, 'bin', 'typervisor');
    return {
      name: spec,
      cmd: process.execPath,
      args: [
        bin,
        'run',
        ...['--kernel', o.kernel, '--initrd', o.initrd, '--cmdline', o.cmdline],
        ...['--vcpus', String(o.vcpus), '--memory', String(o.memMiB), '--log-level', o.logLevel],
        ...(mode ? ['--vcpu-threads', mode] : []),
      ],
      qemu: false,
    };
  }
  if (vmm === 'qemu') {
    // +memfd: guest RAM in a shared memfd as Typervisor's (QEMU's default is anonymous memory,
    // which the lab's kernel backs with transparent huge pages; shmem gets 4 KiB pages).
    const [kind, extra] = (mode ?? 'microvm').split('+') as [string, string | undefined];
    const memfd = extra === 'memfd';
    const machine = `${kind === 'pc' ? 'pc' : 'microvm,acpi=on'}${memfd ? ',memory-backend=mem' : ''}`;
    return {
      name: spec,
      cmd: 'qemu-system-x86_64',
      args: [
        ...(memfd ? ['-object', `memory-backend-memfd,id=mem,size=${o.memMiB}M,share=on`] : []),
        ...['-M', machine, '-enable-kvm', '-cpu', 'host', '-smp', String(o.vcpus)],
        ...['-m', String(o.memMiB), '-nodefaults', '-no-user-config', '-display', 'none'],
        ...['-no-reboot', '-serial', 'stdio'],
        ...['-kernel', o.kernel, '-initrd', o.initrd, '-append', o.cmdline],
      ],
      qemu: true,
    };
  }
  throw new Error(`unknown variant ${spec}`);
}

export interface BootResult {
  variant: string;
  index: number;
  outcome: Outcome;
  why: string;
  markerMs: number;
  exitMs: number;
  code: number | null;
  signal: string | null;
}

/** What one finished boot was: from its console, stderr and exit. */
export function classify(
  qemu: boolean,
  r: {
    stdout: string;
    stderr: string;
    code: number | null;
    markerSeen: boolean;
    timedOut: boolean;
  },
): { outcome: Outcome; why: string } {
  if (r.timedOut) return { outcome: 'other', why: 'timed out' };
  if (!qemu) {
    if (r.stderr.includes('triple-faulted')) return { outcome: 'triple', why: 'KVM_EXIT_SHUTDOWN' };
    if (r.code === 0 && r.markerSeen) return { outcome: 'ok', why: '' };
    return { outcome: 'other', why: `exit ${r.code}: ${lastLine(r.stderr) || lastLine(r.stdout)}` };
  }
  // QEMU with -no-reboot exits (code 0) at any reset, a triple fault included: it is a triple
  // fault when the kernel said neither that it powers off/restarts nor that it panicked.
  const kernelSaid = /reboot: (Power down|Restarting system)|Kernel panic/.exec(r.stdout);
  if (r.markerSeen && r.code === 0 && kernelSaid?.[1] === 'Power down')
    return { outcome: 'ok', why: '' };
  if (r.code === 0 && !kernelSaid)
    return { outcome: 'triple', why: 'reset with no kernel message' };
  return {
    outcome: 'other',
    why: `exit ${r.code}${kernelSaid ? `, ${kernelSaid[0]}` : ''}: ${lastLine(r.stderr)}`,
  };
}

function lastLine(s: string): string {
  const lines = s.trim().split('\n');
  return (lines[lines.length - 1] ?? '').slice(0, 200);
}

function bootOnce(v: Variant, index: number, timeoutMs: number, cpu?: number) {
  return new Promise<BootResult & { stdout: string; stderr: string }>((resolve) => {
    const t0 = performance.now();
    const [cmd, args] =
      cpu === undefined ? [v.cmd, v.args] : ['taskset', ['-c', String(cpu), v.cmd, ...v.args]];
    const child = spawn(cmd, args, { stdio: ['pipe', 'pipe', 'pipe'], env: v.env });
    let stdout = '';
    let stderr = '';
    let markerMs = -1;
    let timedOut = false;
    child.stdin.on('error', () => undefined);
    child.stdout.on('data', (b: Buffer) => {
      stdout += b.toString('latin1');
      if (markerMs < 0 && stdout.includes(MARKER)) {
        markerMs = performance.now() - t0;
        // QEMU drops bytes sent while the 8250 driver starts (docs/lab.md): a moment for the shell.
        setTimeout(() => child.stdin.write('poweroff -f\n'), v.qemu ? 300 : 0);
      }
    });
    child.stderr.on('data', (b: Buffer) => (stderr += b.toString('latin1')));
    const timer = setTimeout(() => {
      timedOut = true;
      child.kill('SIGKILL');
    }, timeoutMs);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      const exitMs = performance.now() - t0;
      const c = classify(v.qemu, { stdout, stderr, code, markerSeen: markerMs >= 0, timedOut });
      resolve({ variant: v.name, index, ...c, markerMs, exitMs, code, signal, stdout, stderr });
    });
    child.on('error', (e) => (stderr += `spawn: ${e.message}\n`));
  });
}

/** The lab kernel's KVM events in an overwrite ring (root only; false if unavailable). */
function startKtrace(): boolean {
  try {
    const w = tracefsWriter();
    w('tracing_on', '0');
    w('trace', '');
    w('buffer_size_kb', '2048');
    w('options/overwrite', '1');
    for (const e of [
      'kvm/kvm_exit',
      'kvm/kvm_inj_exception',
      'kvm/kvm_inj_virq',
      'kvm/kvm_msr',
      'kvm/kvm_cpuid',
      'kvm/kvm_userspace_exit',
      // The lab kernel moving or unmapping guest memory under KVM (MMU notifiers, migration,
      // compaction, THP collapse): rare events, to see whether one precedes a fault.
      'kvm/kvm_unmap_hva_range',
      'kvm/kvm_set_spte_hva',
      'kvm/kvm_age_hva',
      'migrate/mm_migrate_pages',
      'compaction/mm_compaction_begin',
      'huge_memory/mm_collapse_huge_page',
    ]) {
      if (existsSync(join(TRACING, 'events', e))) w(`events/${e}/enable`, '1');
    }
    w('tracing_on', '1');
    return true;
  } catch (e) {
    process.stderr.write(`lab-bootloop: no ktrace: ${(e as Error).message}\n`);
    return false;
  }
}

/**
 * The trace around the last shutdown exit: up to `lines` lines before it and 200 after (a VM
 * booting beside it fills the ring with its own exits within a fraction of a second, so a
 * plain tail can miss the shutdown), or the tail when there is none.
 */
function ktraceAroundShutdown(lines: number): string {
  try {
    const all = readFileSync(join(TRACING, 'trace'), 'latin1').split('\n');
    let last = all.length - 1;
    while (last >= 0 && !/ kvm_exit: .*reason shutdown /.test(all[last]!)) last--;
    if (last < 0) return all.slice(-lines).join('\n');
    return all.slice(Math.max(0, last - lines), last + 200).join('\n');
  } catch (e) {
    return `(no trace: ${(e as Error).message})`;
  }
}

/**
 * The exits of the thread that took the last shutdown in a KVM trace, runs of equal
 * (reason, rip) counted, last `groups` runs: e.g. a storm of vintr exits at one rip before the
 * shutdown (seen with QEMU's guests in the lab) or a varied exit history.
 */
export function shutdownSummary(trace: string, groups = 12): string {
  const lines = trace.split('\n');
  let last = lines.length - 1;
  while (last >= 0 && !/ kvm_exit: .*reason shutdown /.test(lines[last]!)) last--;
  if (last < 0) return '(no shutdown exit in the trace)';
  const thread = lines[last]!.trim().split(/\s+/)[0]!;
  const runs: { key: string; n: number }[] = [];
  for (const l of lines.slice(0, last + 1)) {
    if (l.trim().split(/\s+/)[0] !== thread) continue;
    const m = / kvm_exit: vcpu \d+ reason (\S+) rip (0x[0-9a-f]+)/.exec(l);
    if (!m) continue;
    const key = `${m[1]} ${m[2]}`;
    const top = runs[runs.length - 1];
    if (top?.key === key) top.n++;
    else runs.push({ key, n: 1 });
  }
  const tail = / kvm_exit: (.*)$/.exec(lines[last]!)?.[1] ?? '';
  return (
    `${thread}: ${runs
      .slice(-groups)
      .map((r) => `${r.n}x ${r.key}`)
      .join(', ')}\n` + `  shutdown exit: ${tail}`
  );
}

async function main() {
  const { values } = parseArgs({
    options: {
      runs: { type: 'string', default: '20' },
      concurrency: { type: 'string', default: '2' },
      variants: { type: 'string', default: 'typervisor,qemu' },
      vcpus: { type: 'string', default: '1' },
      memory: { type: 'string', default: '256' },
      cmdline: { type: 'string', default: CMDLINE },
      'log-level': { type: 'string', default: 'info' },
      out: { type: 'string', default: `/tmp/bootloop-${Date.now()}` },
      budget: { type: 'string', default: '3000' },
      timeout: { type: 'string', default: '150' },
      ktrace: { type: 'boolean', default: false },
      'shmem-thp': { type: 'string' },
      pin: { type: 'boolean', default: false },
    },
  });
  const kernel = imagePaths('kernel').KERNEL!;
  const initrd = imagePaths('initramfs').INITRAMFS!;
  const runs = Number(values.runs);
  const k = Number(values.concurrency);
  const budgetMs = Number(values.budget) * 1000;
  const out = values.out!;
  mkdirSync(out, { recursive: true });
  const opts = {
    kernel,
    initrd,
    cmdline: values.cmdline!,
    vcpus: Number(values.vcpus),
    memMiB: Number(values.memory),
    logLevel: values['log-level']!,
  };
  const variants = values.variants!.split(',').map((s) => parseVariant(s, opts));
  const ktrace = values.ktrace && startKtrace();
  const thp = '/sys/kernel/mm/transparent_hugepage/shmem_enabled';
  if (values['shmem-thp']) writeFileSync(thp, values['shmem-thp']);
  const thpNow = existsSync(thp) ? readFileSync(thp, 'utf8').trim() : '?';
  const queue: { v: Variant; i: number }[] = [];
  for (let i = 0; i < runs; i++) for (const v of variants) queue.push({ v, i });
  const counts = new Map(variants.map((v) => [v.name, { ok: 0, triple: 0, other: 0 }]));
  const t0 = Date.now();
  process.stdout.write(
    `lab-bootloop: ${variants.map((v) => v.name).join(', ')} x ${runs}, ${k} at a time, ` +
      `${opts.vcpus} vCPU, budget ${values.budget} s, out ${out}, kernel ${kernel}, ktrace ${ktrace}, pinned ${values.pin}, shmem THP ${thpNow}\n`,
  );
  let next = 0;
  const cpus = availableParallelism();
  const lane = async (_: unknown, laneIndex: number) => {
    while (next < queue.length && Date.now() - t0 < budgetMs) {
      const { v, i } = queue[next++]!;
      const cpu = values.pin ? laneIndex % cpus : undefined;
      const r = await bootOnce(v, i, Number(values.timeout) * 1000, cpu);
      counts.get(v.name)![r.outcome]++;
      const { stdout, stderr, ...row } = r;
      appendFileSync(
        join(out, 'results.jsonl'),
        JSON.stringify({ ...row, t: Date.now() - t0 }) + '\n',
      );
      process.stdout.write(
        `BOOT ${v.name} #${i} ${r.outcome} marker ${r.markerMs.toFixed(0)} ms exit ${r.exitMs.toFixed(0)} ms` +
          `${r.why ? ` (${r.why})` : ''} [${((Date.now() - t0) / 1000).toFixed(0)} s]\n`,
      );
      if (r.outcome !== 'ok') {
        const base = join(out, `${v.name.replace(/[^\w.-]+/g, '_')}-${i}-${r.outcome}`);
        writeFileSync(`${base}.console`, stdout);
        writeFileSync(`${base}.stderr`, stderr);
        if (ktrace) {
          const trace = ktraceAroundShutdown(20000);
          writeFileSync(`${base}.ktrace`, trace);
          process.stdout.write(`  ktrace: ${shutdownSummary(trace)}\n`);
        }
        process.stdout.write(`  console tail: ${JSON.stringify(stdout.slice(-300))}\n`);
        process.stdout.write(`  stderr tail: ${JSON.stringify(stderr.slice(-300))}\n`);
      }
    }
  };
  await Promise.all(Array.from({ length: k }, lane));
  const summary = [...counts].map(([name, c]) => {
    const n = c.ok + c.triple + c.other;
    return `${name}: ${n} boots, ok ${c.ok}, triple ${c.triple}, other ${c.other}`;
  });
  const text = `lab-bootloop summary (${((Date.now() - t0) / 1000).toFixed(0)} s):\n${summary.join('\n')}\n`;
  writeFileSync(join(out, 'summary.txt'), text);
  process.stdout.write(text);
}

if (isMainModule(import.meta.url)) {
  main().catch((e) => {
    process.stderr.write(`lab-bootloop: ${(e as Error).stack ?? e}\n`);
    process.exit(1);
  });
}

/**
 * Shared pieces of the benchmark harness: run one VMM process and time it from the outside
 * (process start -> a marker on its stdout -> process exit), sample its memory from /proc, and
 * summarise runs. Used on the host (bench/micro.ts) and inside the lab (bench/lab-inner.ts).
 */
import { spawn, spawnSync } from 'node:child_process';
import {
  existsSync,
  mkdtempSync,
  readFileSync,
  realpathSync,
  rmSync,
  writeFileSync,
} from 'node:fs';
import { release, tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { PerformanceObserver, constants as perfConstants } from 'node:perf_hooks';
import { detectKvm } from '../src/kvm/detect.js';

/** The repository root (this file runs as dist/bench/common.js). */
export const REPO = fileURLToPath(new URL('../../', import.meta.url));
export const TYPERVISOR = join(REPO, 'bin', 'typervisor');
export const TIME_BIN = '/usr/bin/time';

/** One VMM under test: how to start it, and which of its mappings is guest RAM. */
export interface Vmm {
  name: 'typervisor' | 'qemu' | 'floor';
  cmd: string;
  args: string[];
  /** Guest memory in MiB (to recognise QEMU's anonymous guest RAM mapping by its size). */
  memMiB: number;
}

/** QEMU on this host: PVM refuses MSR 0x10a (IA32_ARCH_CAPABILITIES), which `-cpu host` sets. */
export function qemuCpu(kvmKind: string): string {
  return kvmKind === 'pvm' ? 'host,-arch-capabilities' : 'host';
}

export interface RunOptions {
  /** Text on stdout that counts as the marker (default: the first byte). */
  marker?: string;
  /** Written to stdin once the marker appeared (stdin is a pipe, kept open until then). */
  inputAfterMarker?: string;
  /** Sample /proc/PID/smaps once the marker appeared (before inputAfterMarker is sent). */
  sampleSmaps?: boolean;
  /** Wait this long after the marker before sampling (ms). */
  sampleDelayMs?: number;
  /** SIGTERM the VMM after the sample (for guests that never exit). */
  killAfterSample?: boolean;
  /** Run under /usr/bin/time -f %M (peak RSS of the VMM). */
  peakRss?: boolean;
  timeoutMs?: number;
}

export interface RunResult {
  /** Process start (just before spawn) to the marker on stdout, ms; -1 if never seen. */
  markerMs: number;
  /** Process start to the process's exit, ms. */
  exitMs: number;
  code: number | null;
  /** Peak RSS (getrusage ru_maxrss through /usr/bin/time), KiB. */
  peakRssKiB?: number;
  smaps?: SmapsSummary;
  /** Typervisor's own boot timer (--boot-timer), ms after its process start. */
  bootTimerMs?: number;
  stdout: string;
  stderr: string;
  timedOut: boolean;
}

export interface SmapsSummary {
  /** Sum of Rss over every mapping that is not guest RAM, KiB. */
  nonGuestRssKiB: number;
  /** Sum of Rss over the guest RAM mappings, KiB. */
  guestRssKiB: number;
  totalRssKiB: number;
  /** Mappings recognised as guest RAM. */
  guestMappings: number;
}

/**
 * Firecracker's memory monitor rule: sum the Rss of every mapping that is not guest memory.
 * QEMU's (and the floor's) guest RAM is an anonymous rw mapping exactly the guest's size.
 * Typervisor's is anonymous rw memory advised MADV_DONTFORK and MADV_HUGEPAGE (`dc` and `hg` in
 * VmFlags; its first 2 MiB are a mapping of their own, advised MADV_NOHUGEPAGE: `nh`; the other
 * threads wrap the main thread's mapping; a kernel without THP leaves one mapping of the guest's
 * size), or its memfd (`/memfd:typervisor-guest-ram`, huge_pages "2M").
 */
export function summariseSmaps(text: string, vmm: Vmm): SmapsSummary {
  const guestKiB = vmm.memMiB * 1024;
  let nonGuest = 0;
  let guest = 0;
  let guestMappings = 0;
  // The block being read: its header's verdict, its Size and Rss (VmFlags ends a block).
  let block:
    { named: boolean; anon: boolean; size: number; rss: number; flags: string } | undefined;
  const close = () => {
    if (!block) return;
    const isGuest =
      block.named ||
      (block.anon &&
        (block.size === guestKiB ||
          // V8's heap is MADV_DONTFORK too, but never THP-advised (either way)
          (vmm.name === 'typervisor' &&
            /\bdc\b/.test(block.flags) &&
            /\b(hg|nh)\b/.test(block.flags))));
    if (isGuest) {
      guestMappings++;
      guest += block.rss;
    } else nonGuest += block.rss;
    block = undefined;
  };
  for (const line of text.split('\n')) {
    const hdr = /^[0-9a-f]+-[0-9a-f]+ (\S+) \S+ \S+ \S+\s*(.*)$/.exec(line);
    if (hdr) {
      close();
      const path = hdr[2]!.trim();
      block = {
        named: path.includes('typervisor-guest-ram'),
        anon: path === '' && hdr[1]!.startsWith('rw'),
        size: 0,
        rss: 0,
        flags: '',
      };
      continue;
    }
    if (!block) continue;
    const field = /^(Size|Rss|VmFlags):\s+(.*)$/.exec(line);
    if (field?.[1] === 'Size') block.size = Number.parseInt(field[2]!, 10);
    else if (field?.[1] === 'Rss') block.rss = Number.parseInt(field[2]!, 10);
    else if (field?.[1] === 'VmFlags') block.flags = field[2]!;
  }
  close();
  return {
    nonGuestRssKiB: nonGuest,
    guestRssKiB: guest,
    totalRssKiB: nonGuest + guest,
    guestMappings,
  };
}

/** The VMM's own pid: the child of /usr/bin/time when wrapped, else pid itself. */
function vmmPid(pid: number, wrapped: boolean): number | undefined {
  if (!wrapped) return pid;
  try {
    const kids = readFileSync(`/proc/${pid}/task/${pid}/children`, 'utf8').trim().split(/\s+/);
    return kids[0] ? Number(kids[0]) : undefined;
  } catch {
    return undefined;
  }
}

/** Runs a VMM once and times it from the outside. */
export async function runOnce(vmm: Vmm, o: RunOptions = {}): Promise<RunResult> {
  const wrapped = !!o.peakRss && existsSync(TIME_BIN);
  const dir = wrapped ? mkdtempSync(join(tmpdir(), 'typervisor-bench-')) : undefined;
  const rssFile = dir ? join(dir, 'rss') : '';
  const [file, args] = wrapped
    ? [TIME_BIN, ['-f', '%M', '-o', rssFile, vmm.cmd, ...vmm.args]]
    : [vmm.cmd, vmm.args];
  const marker = o.marker ?? '';
  const t0 = performance.now();
  const child = spawn(file, args, { stdio: ['pipe', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  let markerMs = -1;
  let smaps: SmapsSummary | undefined;
  let timedOut = false;
  child.stdin.on('error', () => undefined);
  const onMarker = () => {
    const after = () => {
      if (o.sampleSmaps) {
        const pid = vmmPid(child.pid!, wrapped);
        try {
          if (pid) smaps = summariseSmaps(readFileSync(`/proc/${pid}/smaps`, 'utf8'), vmm);
        } catch {
          // exited meanwhile
        }
      }
      if (o.killAfterSample) {
        const pid = vmmPid(child.pid!, wrapped);
        if (pid) process.kill(pid, 'SIGTERM');
      }
      if (o.inputAfterMarker !== undefined) child.stdin.write(o.inputAfterMarker);
    };
    if (o.sampleDelayMs) setTimeout(after, o.sampleDelayMs);
    else after();
  };
  child.stdout.on('data', (b: Buffer) => {
    stdout += b.toString('latin1');
    if (markerMs < 0 && stdout.includes(marker)) {
      markerMs = performance.now() - t0;
      onMarker();
    }
  });
  child.stderr.on('data', (b: Buffer) => (stderr += b.toString()));
  const timer = setTimeout(() => {
    timedOut = true;
    const pid = vmmPid(child.pid!, wrapped);
    if (pid) process.kill(pid, 'SIGKILL');
    child.kill('SIGKILL');
  }, o.timeoutMs ?? 60_000);
  const { code, exitMs } = await new Promise<{ code: number | null; exitMs: number }>((res) => {
    child.on('exit', (c) => res({ code: c, exitMs: performance.now() - t0 }));
    child.on('error', (e) => {
      stderr += e.message;
      res({ code: null, exitMs: performance.now() - t0 });
    });
  });
  clearTimeout(timer);
  await new Promise<void>((r) =>
    child.stdout.readableEnded ? r() : child.stdout.on('close', () => r()),
  );
  let peakRssKiB: number | undefined;
  if (dir) {
    try {
      const lines = readFileSync(rssFile, 'utf8').trim().split('\n');
      const n = Number(lines[lines.length - 1]);
      if (Number.isFinite(n)) peakRssKiB = n;
    } catch {
      // time did not write it
    }
    rmSync(dir, { recursive: true, force: true });
  }
  const bt = /boot marker at ([\d.]+) ms after process start/.exec(stderr);
  return {
    markerMs,
    exitMs,
    code,
    peakRssKiB,
    smaps,
    bootTimerMs: bt ? Number(bt[1]) : undefined,
    stdout,
    stderr,
    timedOut,
  };
}

export interface Stat {
  median: number;
  min: number;
  max: number;
  n: number;
}

export function stat(xs: number[]): Stat | undefined {
  const v = xs.filter((x) => Number.isFinite(x)).sort((a, b) => a - b);
  if (v.length === 0) return undefined;
  const m = v.length >> 1;
  const median = v.length % 2 ? v[m]! : (v[m - 1]! + v[m]!) / 2;
  return { median, min: v[0]!, max: v[v.length - 1]!, n: v.length };
}

/** One row of the results: a metric measured for each VMM. */
export interface Row {
  suite: 'micro' | 'lab';
  metric: string;
  unit: string;
  /** true when bigger is better (rates). */
  higherIsBetter?: boolean;
  typervisor?: Stat;
  qemu?: Stat;
  floor?: Stat;
  note?: string;
}

/*
 * The lab sub-suite contract (docs/bench.md). A sub-suite is a script run INSIDE the lab
 * (bench/lab.ts boots one lab per sub-suite and copies the script's stdout to a file on the
 * shared filesystem, as the lab's console can lose bytes); everything travels as text lines:
 *   BENCH-SAMPLE-START <key>      (optional) a sample is about to be measured
 *   BENCH-SAMPLE <json>           (optional) a finished sample, printed at once: a checkpoint
 *   BENCH-JSON-BEGIN / one JSON line of SubSuiteOutput / BENCH-JSON-END   the result
 * A sub-suite that checkpoints also accepts `--resume FILE` (a ResumeState as JSON): it keeps
 * those samples, measures only the missing ones and runs the keys in `defer` last (they were
 * being measured when the lab died).
 */
export const BENCH_JSON_BEGIN = 'BENCH-JSON-BEGIN';
export const BENCH_JSON_END = 'BENCH-JSON-END';
export const BENCH_SAMPLE = 'BENCH-SAMPLE';
export const BENCH_SAMPLE_START = 'BENCH-SAMPLE-START';
/** The machine inside the lab, as a sub-suite reports it. */
export interface LabHost {
  kvm: string;
  kvmKind: string;
  cpu?: string;
  kernel: string;
  qemu: string;
}

/** What a lab sub-suite prints between BENCH-JSON-BEGIN and BENCH-JSON-END. */
export interface SubSuiteOutput {
  rows: Row[];
  notes: string[];
  labHost?: LabHost;
}

/** One checkpointed sample; `key` names its place in the sub-suite's plan (e.g. "r0/2/qemu"). */
export interface KeyedSample {
  key: string;
}

export interface ResumeState<S extends KeyedSample> {
  samples: S[];
  defer: string[];
}

export function labHostInfo(): LabHost {
  const kvm = detectKvm();
  const qemu = spawnSync('qemu-system-x86_64', ['--version'], { encoding: 'utf8' });
  return {
    kvm: kvm.reason,
    kvmKind: kvm.kind,
    cpu: /model name\s*:\s*(.*)/.exec(readFileSync('/proc/cpuinfo', 'utf8'))?.[1],
    kernel: release(),
    qemu: qemu.stdout?.split('\n')[0] || 'qemu-system-x86_64 not found',
  };
}

export function printSubSuiteOutput(o: SubSuiteOutput): void {
  process.stdout.write(`\n${BENCH_JSON_BEGIN}\n${JSON.stringify(o)}\n${BENCH_JSON_END}\n`);
}

/** The result block of a sub-suite's output, or undefined if there is none (or it is cut). */
export function parseSubSuiteOutput(text: string): SubSuiteOutput | undefined {
  const m = new RegExp(`${BENCH_JSON_BEGIN}\\r?\\n(.*)\\r?\\n${BENCH_JSON_END}`).exec(text);
  if (!m) return undefined;
  try {
    const o = JSON.parse(m[1]!) as SubSuiteOutput;
    return Array.isArray(o.rows) && Array.isArray(o.notes) ? o : undefined;
  } catch {
    return undefined;
  }
}

/** The checkpoints in a sub-suite's output: finished samples, and keys that were started. */
export function parseSamples<S extends KeyedSample>(
  text: string,
): { samples: S[]; started: string[] } {
  const samples: S[] = [];
  const started: string[] = [];
  for (const line of text.split('\n')) {
    const s = /^BENCH-SAMPLE-START (\S+)\s*$/.exec(line);
    if (s) {
      started.push(s[1]!);
      continue;
    }
    const m = /^BENCH-SAMPLE (\{.*\})\s*$/.exec(line);
    if (!m) continue;
    try {
      const o = JSON.parse(m[1]!) as S;
      if (typeof o.key === 'string') samples.push(o);
    } catch {
      // a line cut by a dying lab: that sample is measured again
    }
  }
  return { samples, started };
}

export function readResume<S extends KeyedSample>(file: string | undefined): ResumeState<S> {
  if (file === undefined) return { samples: [], defer: [] };
  const o = JSON.parse(readFileSync(file, 'utf8')) as Partial<ResumeState<S>>;
  return { samples: o.samples ?? [], defer: o.defer ?? [] };
}

/**
 * Measures every key of `plan` not already in `resume`, keys in `resume.defer` last, printing
 * a checkpoint before and after each; returns the samples in plan order.
 */
export async function runPlan<S extends KeyedSample>(
  plan: string[],
  resume: ResumeState<S>,
  measure: (key: string) => Promise<S>,
): Promise<S[]> {
  const done = new Map<string, S>();
  for (const s of resume.samples) if (plan.includes(s.key)) done.set(s.key, s);
  const todo = plan.filter((k) => !done.has(k));
  const order = [
    ...todo.filter((k) => !resume.defer.includes(k)),
    ...todo.filter((k) => resume.defer.includes(k)),
  ];
  for (const key of order) {
    process.stdout.write(`${BENCH_SAMPLE_START} ${key}\n`);
    const s = await measure(key);
    process.stdout.write(`${BENCH_SAMPLE} ${JSON.stringify(s)}\n`);
    done.set(key, s);
  }
  return plan.flatMap((k) => {
    const s = done.get(k);
    return s ? [s] : [];
  });
}

/** True when the module with this import.meta.url is the script node was started with. */
export function isMainModule(metaUrl: string): boolean {
  const main = process.argv[1];
  if (main === undefined) return false;
  try {
    return metaUrl === pathToFileURL(realpathSync(main)).href;
  } catch {
    return false;
  }
}

/**
 * Counts the young-generation collections (scavenges) from now on: a proxy for what a hot path
 * allocates. The observer hears of collections from the event loop, so `stop()` lets it run
 * first, then returns the count.
 */
export function countMinorGcs(): { stop(): Promise<number> } {
  let minor = 0;
  const obs = new PerformanceObserver((list) => {
    for (const e of list.getEntries())
      if (
        (e as unknown as { detail?: { kind?: number } }).detail?.kind ===
        perfConstants.NODE_PERFORMANCE_GC_MINOR
      )
        minor++;
  });
  obs.observe({ entryTypes: ['gc'] });
  return {
    async stop() {
      await new Promise((r) => setTimeout(r, 50));
      obs.disconnect();
      return minor;
    },
  };
}

let trainedNote: string | undefined;
/**
 * Remakes the main and api bundles' code caches by training runs (`node scripts/bundle.mjs
 * --train`) where /dev/kvm is usable, once per process, so that a benchmark of our start-up
 * measures what `npm run build` leaves on a KVM host. A build made without /dev/kvm (this
 * project's development hosts, whose bundles the lab runs over its share) has eager caches:
 * every function, +1.1 MiB of peak RSS on the micro guest in the lab. Returns a line for the
 * results' notes.
 */
export function trainBundleCaches(): string {
  if (trainedNote !== undefined) return trainedNote;
  if (!existsSync(join(REPO, 'dist', 'bundle', 'main.cjs'))) {
    trainedNote = 'code caches: no bundle (dist/ ran un-bundled)';
    return trainedNote;
  }
  const r = spawnSync(process.execPath, [join(REPO, 'scripts', 'bundle.mjs'), '--train'], {
    encoding: 'utf8',
    timeout: 300_000,
  });
  const lines = `${r.stderr ?? ''}`.trim().split('\n').filter(Boolean);
  for (const l of lines) process.stderr.write(`${l}\n`);
  trainedNote =
    r.status === 0
      ? `code caches: ${lines.map((l) => l.replace(/^bundle: /, '')).join('; ') || 'trained'}`
      : `code caches: the training failed (${lines.pop() ?? `exit ${r.status}`})`;
  return trainedNote;
}

/**
 * What `DIR/bin/typervisor` runs: its bundle, or dist/ when the bundle is missing or older than
 * dist/ (the launcher falls back without a word, and in the lab that start is seconds slower:
 * a benchmark run must say which it ran). `scripts/bundle.mjs --check` decides.
 */
export function whatRuns(dir: string = REPO): string {
  if (process.env.TYPERVISOR_NO_BUNDLE) return 'dist/ (TYPERVISOR_NO_BUNDLE is set)';
  const r = spawnSync(process.execPath, [join(dir, 'scripts', 'bundle.mjs'), '--check'], {
    encoding: 'utf8',
    timeout: 60_000,
  });
  if (r.status === 0) return 'its bundle';
  const why = `${r.stderr ?? ''}`.trim().split('\n').filter(Boolean).join('; ');
  return `dist/, not its bundle (${why || `bundle.mjs --check: exit ${r.status}`})`;
}

/** The lab kernel's tracefs. */
export const TRACEFS = '/sys/kernel/tracing';

/**
 * Mounts the lab kernel's tracefs if it is not (root only) and returns a writer of its files:
 * `w('tracing_on', '1')`, `w('events/kvm/kvm_exit/enable', '1')`.
 */
export function tracefsWriter(): (file: string, value: string) => void {
  if (!existsSync(join(TRACEFS, 'events')))
    spawnSync('mount', ['-t', 'tracefs', 'nodev', TRACEFS], { stdio: 'ignore' });
  return (file, value) => writeFileSync(join(TRACEFS, file), value);
}

/**
 * A fresh sparse copy of a disk image at `dst` (replacing what is there), for each VM of a
 * bench: a guest's boot writes its root disk (and a killed VM leaves a journal to replay), so
 * with one shared copy each boot started from what the VMs before it left. In an A/A run of
 * lab-net (2026-12-07, one build as both "typervisor" and "baseline", the image shared) the
 * same build booted to its shell in 9.2-12.6 s in the first and third places and 12.7-13.6 s
 * in the second.
 */
export function freshImage(src: string, dst: string): void {
  rmSync(dst, { force: true });
  const r = spawnSync('cp', ['--sparse=always', src, dst], { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`cp ${src} ${dst}: ${r.error?.message ?? r.stderr}`);
}

/**
 * The lab suite: a list of sub-suites, each a script run INSIDE the lab (where /dev/kvm is real,
 * emulated AMD-V and Debian's cloud kernel can run) in a lab of its own (one runInLab each), so a
 * lab that dies takes only that sub-suite's current attempt with it. A sub-suite whose lab dies,
 * times out or ends without a result is run once more; one that checkpoints (BENCH-SAMPLE lines,
 * `--resume`) keeps the samples of the dead attempt and measures only the rest. Every failure
 * ends as a note. The contract a sub-suite speaks is described in bench/common.ts.
 */
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { StringDecoder } from 'node:string_decoder';
import { ensureImage, imagePaths } from '../src/lab/guest.js';
import { runInLab } from '../src/lab/lab.js';
import {
  BENCH_JSON_BEGIN,
  BENCH_JSON_END,
  BENCH_SAMPLE,
  BENCH_SAMPLE_START,
  REPO,
  parseSamples,
  parseSubSuiteOutput,
  type KeyedSample,
  type LabHost,
  type Row,
  type SubSuiteOutput,
} from './common.js';
import { fioPlan, summariseFio, type FioSample } from './lab-fio.js';
import { ratePlan, summariseRates, type RateSample } from './lab-ratelimit.js';
import { balloonPlan, summariseBalloon, type BalloonSample } from './lab-balloon.js';
import { bootPlan, summariseBoot, type BootSample } from './lab-inner.js';
import { snapshotPlan, summariseSnapshot, type SnapSample } from './snapshot.js';

/** sh -c TEE <file> <command...>: the command with its stdout appended to <file> as well, then
 *  `BENCH-EXIT <its exit code>` (dash has no pipefail). */
const TEE = '{ "$@"; echo "BENCH-EXIT $?"; } | tee -a "$0"';

export const LAB_SUB_SUITE_NAMES = [
  'boot',
  'fio',
  'net',
  'snapshot',
  'ratelimit',
  'balloon',
] as const;
export type LabSubSuiteName = (typeof LAB_SUB_SUITE_NAMES)[number];

interface SubSuiteDef {
  name: LabSubSuiteName;
  title: string;
  /** The script, relative to the repository root. */
  script: string;
  defaultRuns: number;
  /** Wall-clock limit of one attempt, lab boot included (s). */
  timeoutSec: (runs: number) => number;
  /** The lab counts as hung after this long without a byte of output (s): longer than the
   *  script's own limit for one VM run. A hung lab kernel (soft lockups in KVM_RUN) is common. */
  idleSec: number;
  /** Why it cannot run here (it is then skipped with a note); checked on the host. */
  unavailable?: () => string | undefined;
  /** For a sub-suite that checkpoints (its script accepts --resume): the keys of its samples,
   *  and its rows from the samples, computed on the host when no attempt printed a result. */
  plan?: (runs: number) => string[];
  salvage?: (samples: KeyedSample[], runs: number) => SubSuiteOutput;
}

function missingImages(names: Array<'kernel' | 'initramfs' | 'rootfs'>): string | undefined {
  const gone = names.filter((n) => !Object.values(imagePaths(n)).every((f) => existsSync(f)));
  return gone.length
    ? `guest image(s) ${gone.join(', ')} not built (npm run guest${gone.includes('rootfs') ? ' -- build rootfs' : ''})`
    : undefined;
}

/** kernel and initramfs take ~15 s to build, so they are built when missing; rootfs (~6 min) is not. */
function ensureDefaultGuest(): string | undefined {
  try {
    ensureImage('kernel');
    ensureImage('initramfs');
    return undefined;
  } catch (e) {
    return `cannot build the default guest: ${(e as Error).message.split('\n')[0]}`;
  }
}

/*
 * Default runs, chosen so that `npm run bench` (micro included) stays under 15 minutes on the
 * 2-CPU development host (docs/bench.md has the measured times); limits with room for a busy
 * host, where everything in the lab takes about twice as long.
 */
export const LAB_SUB_SUITES: readonly SubSuiteDef[] = [
  {
    name: 'boot',
    title: 'Linux boot and memory',
    script: 'dist/bench/lab-inner.js',
    defaultRuns: 2,
    timeoutSec: (runs) => 300 + 300 * runs,
    idleSec: 300,
    unavailable: ensureDefaultGuest,
    plan: bootPlan,
    salvage: (s, runs) => summariseBoot(s as BootSample[], runs),
  },
  {
    name: 'fio',
    title: 'fio on virtio-blk',
    script: 'dist/bench/lab-fio.js',
    defaultRuns: 1,
    timeoutSec: (runs) => 300 + 600 * runs,
    idleSec: 420,
    unavailable: () => ensureDefaultGuest() ?? missingImages(['rootfs']),
    plan: fioPlan,
    salvage: (s, runs) => summariseFio(s as FioSample[], runs),
  },
  {
    name: 'net',
    title: 'virtio-net and vsock',
    script: 'dist/bench/lab-net.js',
    defaultRuns: 1,
    timeoutSec: (runs) => 300 + 600 * runs,
    idleSec: 600,
    unavailable: () =>
      existsSync(join(REPO, 'dist/bench/lab-net.js'))
        ? (ensureDefaultGuest() ?? missingImages(['rootfs']))
        : 'dist/bench/lab-net.js does not exist (bench/lab-net.ts not written or not built)',
  },
  {
    name: 'snapshot',
    title: 'snapshots, restore and clones',
    script: 'dist/bench/snapshot.js',
    defaultRuns: 1,
    timeoutSec: (runs) => 300 + 900 * runs,
    idleSec: 420,
    unavailable: ensureDefaultGuest,
    plan: snapshotPlan,
    salvage: (s, runs) => summariseSnapshot(s as SnapSample[], runs),
  },
  {
    name: 'ratelimit',
    title: 'rate-limited virtio-blk (issue 16)',
    script: 'dist/bench/lab-ratelimit.js',
    defaultRuns: 1,
    timeoutSec: (runs) => 300 + 300 * runs,
    idleSec: 300,
    unavailable: () => ensureDefaultGuest() ?? missingImages(['rootfs']),
    plan: ratePlan,
    salvage: (s, runs) => summariseRates(s as RateSample[], runs),
  },
  {
    name: 'balloon',
    title: 'virtio-balloon: memory returned to the host (issue 16)',
    script: 'dist/bench/lab-balloon.js',
    defaultRuns: 1,
    timeoutSec: (runs) => 300 + 300 * runs,
    idleSec: 300,
    unavailable: ensureDefaultGuest,
    plan: balloonPlan,
    salvage: (s, runs) => summariseBalloon(s as BalloonSample[], runs),
  },
];

export interface SubSuiteResult {
  name: LabSubSuiteName;
  title: string;
  runs: number;
  status: 'ok' | 'partial' | 'failed' | 'skipped';
  /** Labs booted for it. */
  attempts: number;
  seconds: number;
  /** Lab boot time of each attempt, ms (-1: did not come up). */
  labBootMs: number[];
  rows: Row[];
  notes: string[];
  labHost?: LabHost;
}

/** The first line of a lab failure, plus the kernel's complaint if its console shows one. */
function failureReason(error: string | undefined, exit: string | undefined): string {
  if (!error) return `the script ended (exit ${exit ?? '?'}) without a readable result`;
  const [first] = error.split('\n');
  const kernel = error
    .split('\n')
    .find((l) => /Kernel panic|BUG:|Oops|general protection|watchdog|RIP:/.test(l));
  return `${first}${kernel ? ` (lab kernel: ${kernel.trim().slice(0, 160)})` : ''}`;
}

/**
 * TYPERVISOR_BENCH_LAB_KILL_AFTER=N[,M] (a test of the retry path, docs/bench.md): the first
 * attempt of every sub-suite has its lab killed while it measures its sample N+1 (after N
 * checkpoints; a sub-suite that does not checkpoint: at its first line of output), the second
 * attempt after M checkpoints of its own if M is given. Unset: nothing is killed.
 */
function killAfter(attempt: number): number | undefined {
  const v = process.env.TYPERVISOR_BENCH_LAB_KILL_AFTER?.split(',')[attempt - 1];
  return v !== undefined && v.trim() !== '' && Number(v) >= 0 ? Number(v) : undefined;
}

async function runSubSuite(
  def: SubSuiteDef,
  runs: number,
  log: (s: string) => void,
): Promise<SubSuiteResult> {
  const started = Date.now();
  const result: SubSuiteResult = {
    name: def.name,
    title: def.title,
    runs,
    status: 'failed',
    attempts: 0,
    seconds: 0,
    labBootMs: [],
    rows: [],
    notes: [],
  };
  const finish = () => ({ ...result, seconds: (Date.now() - started) / 1000 });
  const why = def.unavailable?.();
  if (why) {
    result.status = 'skipped';
    result.notes.push(`skipped: ${why}.`);
    return finish();
  }
  const resumeDir = mkdtempSync(join(tmpdir(), 'typervisor-bench-resume-'));
  const samples = new Map<string, KeyedSample>();
  const defer = new Set<string>();
  try {
    for (let attempt = 1; attempt <= 2; attempt++) {
      result.attempts = attempt;
      const args = [def.script, '--runs', String(runs)];
      if (def.plan && samples.size + defer.size > 0) {
        const file = join(resumeDir, `resume-${attempt}.json`);
        writeFileSync(file, JSON.stringify({ samples: [...samples.values()], defer: [...defer] }));
        args.push('--resume', file);
        log(`${def.name}: attempt ${attempt}, keeping ${samples.size} sample(s)`);
      } else if (attempt > 1) log(`${def.name}: attempt ${attempt}`);
      const abort = new AbortController();
      let lastOutput = Date.now();
      let hung = false;
      const watchdog = setInterval(() => {
        if (Date.now() - lastOutput < def.idleSec * 1000 || abort.signal.aborted) return;
        hung = true;
        log(`${def.name}: no output for ${def.idleSec} s: stopping the lab`);
        abort.abort();
      }, 1000);
      const limit = killAfter(attempt);
      let checkpoints = 0;
      let partial = '';
      const utf8 = new StringDecoder('utf8');
      let inResult = false;
      const onLine = (line: string) => {
        if (line.startsWith(BENCH_JSON_BEGIN)) inResult = true;
        else if (line.startsWith(BENCH_JSON_END)) inResult = false;
        else if (line.startsWith(`${BENCH_SAMPLE} `)) checkpoints++;
        else if (!inResult && !line.startsWith('BENCH-') && line.trim())
          log(`${def.name}: ${line.trim()}`);
        const kill = def.plan
          ? checkpoints >= (limit ?? Infinity) && line.startsWith(`${BENCH_SAMPLE_START} `)
          : limit !== undefined;
        if (kill && !abort.signal.aborted) {
          log(`${def.name}: killing the lab (TYPERVISOR_BENCH_LAB_KILL_AFTER=${limit})`);
          abort.abort();
        }
      };
      // The script's stdout also goes to a file in the host's /tmp (which the lab shares): the
      // lab's console (a serial port) loses bytes now and then when the machine is busy.
      const outFile = join(resumeDir, `out-${attempt}.txt`);
      const r = await runInLab({
        command: ['sh', '-c', TEE, outFile, process.execPath, ...args],
        cwd: REPO,
        timeoutSec: def.timeoutSec(runs),
        signal: abort.signal,
        onOutput: (b) => {
          lastOutput = Date.now();
          const lines = (partial + utf8.write(b)).split('\n');
          partial = lines.pop()!;
          lines.forEach(onLine);
        },
      }).finally(() => clearInterval(watchdog));
      result.labBootMs.push(r.bootMs);
      log(
        `${def.name}: lab ${r.bootMs >= 0 ? `up in ${(r.bootMs / 1000).toFixed(1)} s` : 'never came up'}, attempt took ${(r.totalMs / 1000).toFixed(0)} s, code ${r.code}`,
      );
      const copy = existsSync(outFile) ? readFileSync(outFile, 'utf8') : '';
      const exit = /^BENCH-EXIT (\d+)$/m.exec(copy)?.[1];
      const got = parseSamples(`${r.output}\n${copy}`);
      for (const s of got.samples) samples.set(s.key, s);
      const out = parseSubSuiteOutput(copy) ?? parseSubSuiteOutput(r.output);
      const all = def.plan?.(runs).every((k) => samples.has(k));
      if (!out && all && def.salvage) {
        // Every sample arrived but the result block did not (cut or garbled on the way out).
        const rows = def.salvage([...samples.values()], runs);
        result.status = 'ok';
        result.rows = rows.rows;
        result.notes.push(
          ...rows.notes,
          `no readable result from the lab (code ${r.code}): rows computed on the host from the ${samples.size} checkpointed samples.`,
        );
        return finish();
      }
      if (out) {
        result.status = 'ok';
        result.rows = out.rows;
        result.labHost = out.labHost;
        result.notes.push(...out.notes);
        if (r.code !== 0 || (exit !== undefined && exit !== '0'))
          result.notes.push(
            `the script (exit ${exit ?? '?'}) or the lab (code ${r.code}) failed after the result.`,
          );
        return finish();
      }
      const reason = hung
        ? `no output for ${def.idleSec} s, the lab was stopped (a hung lab kernel, usually)`
        : failureReason(r.error, exit);
      result.notes.push(
        `attempt ${attempt} failed after ${(r.totalMs / 1000).toFixed(0)} s: ${reason}${def.salvage ? ` (${samples.size} sample(s) checkpointed so far)` : ''}.`,
      );
      const saved = join(tmpdir(), `typervisor-bench-${def.name}-${started}-${attempt}.log`);
      writeFileSync(saved, `${r.error ?? reason}\n--- output ---\n${r.output}`);
      log(`${def.name}: attempt ${attempt} failed: ${r.error ?? reason}\n(whole output: ${saved})`);
      // A sample that was started but never finished was running when the lab died: last next time.
      for (const k of got.started) if (!samples.has(k)) defer.add(k);
    }
    if (def.salvage && samples.size > 0) {
      const out = def.salvage([...samples.values()], runs);
      result.status = 'partial';
      result.rows = out.rows;
      result.notes.push(
        `no attempt finished: rows from the ${samples.size} checkpointed sample(s); never finished: ${[...defer].filter((k) => !samples.has(k)).join(', ') || 'none'}.`,
        ...out.notes,
      );
    }
    return finish();
  } finally {
    rmSync(resumeDir, { recursive: true, force: true });
  }
}

/** Runs the chosen sub-suites one after another, each in its own lab. Never throws for a lab. */
export async function labSuite(o: {
  suites: Array<{ name: LabSubSuiteName; runs: number }>;
  log: (s: string) => void;
}): Promise<SubSuiteResult[]> {
  const results: SubSuiteResult[] = [];
  for (const { name, runs } of o.suites) {
    const def = LAB_SUB_SUITES.find((d) => d.name === name)!;
    o.log(`lab sub-suite ${name}: ${runs} run(s)`);
    let res: SubSuiteResult;
    try {
      res = await runSubSuite(def, runs, o.log);
    } catch (e) {
      // A harness bug or a host failure (e.g. the lab image cannot be built): note it, go on.
      const msg = (e as Error).message.split('\n').slice(0, 3).join(' ');
      res = {
        name,
        title: def.title,
        runs,
        status: 'failed',
        attempts: 0,
        seconds: 0,
        labBootMs: [],
        rows: [],
        notes: [`failed: ${msg}`],
      };
    }
    o.log(`lab sub-suite ${name}: ${res.status} in ${res.seconds.toFixed(0)} s`);
    results.push(res);
  }
  return results;
}

/**
 * The lab's `snapshot` sub-suite, run INSIDE the lab (bench/lab.ts starts it with runInLab):
 * snapshot and restore of a 256 MiB Debian guest (the default kernel + busybox initramfs, booted
 * to its shell) under Typervisor and QEMU microvm, the VMM order alternating per round. Speaks
 * the sub-suite contract of bench/common.ts.
 *
 * Per round and VMM, one sample:
 *   create     the VM paused, the snapshot call alone: Typervisor PUT /snapshot/create (Full);
 *              QEMU `migrate "exec:cat > FILE"` polled with query-migrate until completed
 *              (Debian 12's QEMU 7.2 has no file: URI). The Typervisor VM runs with
 *              track_dirty_pages; after the Full it is resumed, answers an echo, runs 1 s more
 *              and is paused again: create Diff, the call alone, and the Diff memory file's
 *              allocated size (QEMU: n/a, its migration to a file has no incremental form)
 *   load       the load call alone, in a fresh process whose API/QMP socket is up: Typervisor
 *              PUT /snapshot/load with resume_vm; QEMU (started with -incoming defer -S)
 *              `migrate-incoming "exec:cat FILE"` polled until the guest is loaded, then `cont`
 *   restore -> output   from the load call to the guest's shell answering an echo
 *   process -> output   from spawning the VMM process to that answer (end to end)
 *   non-guest RSS       Rss outside guest RAM at that answer (Typervisor's guest RAM is the
 *              memory file's mapping, QEMU's its anonymous RAM block)
 *   clones     10 VMs restored from the one snapshot, all left running and each answering an
 *              echo; then per clone: owned memory (Private_Dirty over every mapping: what no
 *              other clone shares) and Pss (src/vmm/clone-memory.ts)
 *
 *   node dist/bench/snapshot.js [--runs N] [--resume FILE] [--clones N]
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { connect, type Socket } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { imagePaths } from '../src/lab/guest.js';
import { detectKvm } from '../src/kvm/detect.js';
import { apiCall } from '../src/cli/snapshot.js';
import { cloneMemory } from '../src/vmm/clone-memory.js';
import {
  TYPERVISOR,
  isMainModule,
  labHostInfo,
  printSubSuiteOutput,
  qemuCpu,
  readResume,
  runPlan,
  stat,
  summariseSmaps,
  type Row,
  type SubSuiteOutput,
} from './common.js';

const MEM_MIB = 256;
const MARKER = 'TYPERVISOR-BOOT-OK';
const CMDLINE = 'console=ttyS0 reboot=k panic=1 pci=off quiet';
/** The shell computes the answer, so the echoed command line itself never matches it. */
const READY_CMD = 'echo READY-$((20+1))\n';
const READY = 'READY-21';
const PROBE_CMD = 'echo SNAP-$((6*7))-OK\n';
const PROBE = 'SNAP-42-OK';
const VMMS = ['typervisor', 'qemu'] as const;
type VmmName = (typeof VMMS)[number];
const DEFAULT_CLONES = 10;
const BOOT_TIMEOUT_MS = 240_000;
const STEP_TIMEOUT_MS = 120_000;

export interface SnapSample {
  /** "r<round>/<vmm>" */
  key: string;
  vmm: VmmName;
  createMs?: number;
  /** Bytes the memory file takes on disk (allocated blocks). */
  memFileDiskKiB?: number;
  /** Typervisor: a Diff snapshot on top of the Full, ~1 s of an idle shell later. */
  diffMs?: number;
  diffFileDiskKiB?: number;
  loadMs?: number;
  restoreToOutputMs?: number;
  processToOutputMs?: number;
  nonGuestRssKiB?: number;
  /** Typervisor's log line: the load's phases in ms. */
  loadPhases?: string;
  clones?: number;
  cloneOwnedKiB?: number[];
  clonePssKiB?: number[];
  cloneLoadMs?: number[];
  error?: string;
}

export function snapshotPlan(runs: number): string[] {
  const keys: string[] = [];
  for (let r = 0; r < runs; r++)
    for (const vmm of r % 2 ? [...VMMS].reverse() : VMMS) keys.push(`r${r}/${vmm}`);
  return keys;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** A VMM process: its console (stdout) collected, waited on for text. */
class Proc {
  out = '';
  err = '';
  readonly child: ChildProcess;
  readonly exited: Promise<void>;
  constructor(cmd: string, args: string[]) {
    this.child = spawn(cmd, args, { stdio: ['pipe', 'pipe', 'pipe'] });
    this.child.stdin!.on('error', () => undefined);
    this.child.stdout!.on('data', (b: Buffer) => (this.out += b.toString('latin1')));
    this.child.stderr!.on('data', (b: Buffer) => (this.err += b.toString('latin1')));
    this.exited = new Promise((r) => this.child.on('exit', () => r()));
  }
  get pid(): number {
    return this.child.pid!;
  }
  get alive(): boolean {
    return this.child.exitCode === null && this.child.signalCode === null;
  }
  write(s: string): void {
    this.child.stdin!.write(s);
  }
  /** Waits for `text` on the console after offset `from`. */
  async waitFor(text: string, ms: number, from = 0): Promise<void> {
    const end = Date.now() + ms;
    while (!this.out.includes(text, from)) {
      if (!this.alive) throw new Error(`exited before "${text}": ${this.tail()}`);
      if (Date.now() > end) throw new Error(`no "${text}" in ${ms / 1000} s: ${this.tail()}`);
      await sleep(2);
    }
  }
  tail(): string {
    return `stderr: ${this.err.slice(-300)}; console: ${this.out.slice(-300)}`;
  }
  async kill(): Promise<void> {
    if (this.alive) this.child.kill('SIGKILL');
    await this.exited;
  }
}

function canConnect(sock: string): Promise<boolean> {
  return new Promise((res) => {
    const s = connect(sock);
    s.once('connect', () => {
      s.destroy();
      res(true);
    });
    s.once('error', () => res(false));
  });
}

async function waitSocket(p: Proc, sock: string): Promise<void> {
  const end = Date.now() + STEP_TIMEOUT_MS;
  while (!(await canConnect(sock))) {
    if (!p.alive) throw new Error(`exited before opening ${sock}: ${p.tail()}`);
    if (Date.now() > end) throw new Error(`no socket ${sock}: ${p.tail()}`);
    await sleep(2);
  }
}

/** A minimal QMP client: one command at a time, events skipped. */
class Qmp {
  private buf = '';
  private waiters: Array<(o: Record<string, unknown>) => void> = [];
  private constructor(private readonly s: Socket) {
    s.setEncoding('utf8').on('data', (d: string) => {
      this.buf += d;
      let i;
      while ((i = this.buf.indexOf('\n')) >= 0) {
        const line = this.buf.slice(0, i).trim();
        this.buf = this.buf.slice(i + 1);
        if (!line) continue;
        const o = JSON.parse(line) as Record<string, unknown>;
        if ('event' in o) continue;
        this.waiters.shift()?.(o);
      }
    });
  }
  static async open(sock: string): Promise<Qmp> {
    const s = connect(sock);
    await new Promise<void>((res, rej) => {
      s.once('connect', () => res());
      s.once('error', rej);
    });
    const q = new Qmp(s);
    await q.next(); // the greeting
    await q.cmd('qmp_capabilities');
    return q;
  }
  private next(): Promise<Record<string, unknown>> {
    return new Promise((res, rej) => {
      const t = setTimeout(() => rej(new Error('QMP: no answer in 120 s')), STEP_TIMEOUT_MS);
      this.waiters.push((o) => {
        clearTimeout(t);
        res(o);
      });
    });
  }
  async cmd(execute: string, args?: object): Promise<Record<string, unknown>> {
    const p = this.next();
    this.s.write(JSON.stringify(args ? { execute, arguments: args } : { execute }) + '\n');
    const o = await p;
    if ('error' in o) throw new Error(`QMP ${execute}: ${JSON.stringify(o.error)}`);
    return (o.return ?? {}) as Record<string, unknown>;
  }
  /** Polls until `done` says so (every 2 ms). */
  async until(execute: string, done: (r: Record<string, unknown>) => boolean): Promise<void> {
    const end = Date.now() + STEP_TIMEOUT_MS;
    for (;;) {
      const r = await this.cmd(execute);
      if (r.status === 'failed') throw new Error(`QMP ${execute}: ${JSON.stringify(r)}`);
      if (done(r)) return;
      if (Date.now() > end) throw new Error(`QMP ${execute}: not done in 120 s`);
      await sleep(2);
    }
  }
  close(): void {
    this.s.destroy();
  }
}

interface Env {
  kernel: string;
  initrd: string;
  kvmKind: string;
  dir: string;
  clones: number;
}

function qemuArgs(env: Env, qmpSock: string, incoming: boolean): string[] {
  return [
    ...['-M', 'microvm,acpi=on', '-enable-kvm', '-cpu', qemuCpu(env.kvmKind)],
    ...['-m', String(MEM_MIB), '-smp', '1', '-nodefaults', '-no-user-config'],
    ...['-display', 'none', '-serial', 'stdio'],
    ...['-kernel', env.kernel, '-initrd', env.initrd, '-append', CMDLINE],
    ...['-qmp', `unix:${qmpSock},server=on,wait=off`],
    ...(incoming ? ['-incoming', 'defer', '-S'] : []),
  ];
}

async function api(sock: string, method: string, path: string, body: unknown): Promise<void> {
  const r = await apiCall(sock, method, path, body, STEP_TIMEOUT_MS);
  if (r.status !== 204) throw new Error(`${method} ${path}: ${r.status} ${r.fault ?? ''}`);
}

/** A booted VM at its shell, then snapshotted; returns the create time. */
async function bootAndSnapshot(vmm: VmmName, env: Env, files: { state: string; mem: string }) {
  const sock = join(env.dir, `boot-${vmm}.sock`);
  const p =
    vmm === 'typervisor'
      ? new Proc(process.execPath, [TYPERVISOR, '--api-sock', sock])
      : new Proc('qemu-system-x86_64', qemuArgs(env, sock, false));
  try {
    await waitSocket(p, sock);
    if (vmm === 'typervisor') {
      await api(sock, 'PUT', '/machine-config', {
        vcpu_count: 1,
        mem_size_mib: MEM_MIB,
        track_dirty_pages: true,
      });
      await api(sock, 'PUT', '/boot-source', {
        kernel_image_path: env.kernel,
        initrd_path: env.initrd,
        boot_args: CMDLINE,
      });
      await api(sock, 'PUT', '/actions', { action_type: 'InstanceStart' });
    }
    await p.waitFor(MARKER, BOOT_TIMEOUT_MS);
    const from = p.out.length;
    p.write(READY_CMD);
    await p.waitFor(READY, STEP_TIMEOUT_MS, from);
    await sleep(300); // the shell's prompt
    let createMs: number;
    if (vmm === 'typervisor') {
      await api(sock, 'PATCH', '/vm', { state: 'Paused' });
      const t = performance.now();
      await api(sock, 'PUT', '/snapshot/create', {
        snapshot_type: 'Full',
        snapshot_path: files.state,
        mem_file_path: files.mem,
      });
      createMs = performance.now() - t;
      // A Diff on top of it: what the guest wrote since (an echo answered, 1 s of its shell).
      await api(sock, 'PATCH', '/vm', { state: 'Resumed' });
      const from2 = p.out.length;
      p.write(PROBE_CMD);
      await p.waitFor(PROBE, STEP_TIMEOUT_MS, from2);
      await sleep(1000);
      await api(sock, 'PATCH', '/vm', { state: 'Paused' });
      const t2 = performance.now();
      await api(sock, 'PUT', '/snapshot/create', {
        snapshot_type: 'Diff',
        snapshot_path: `${files.state}.diff`,
        mem_file_path: `${files.mem}.diff`,
      });
      const diffMs = performance.now() - t2;
      const diffFileDiskKiB = (statSync(`${files.mem}.diff`).blocks * 512) / 1024;
      rmSync(`${files.state}.diff`, { force: true });
      rmSync(`${files.mem}.diff`, { force: true });
      return {
        createMs,
        memFileDiskKiB: (statSync(files.mem).blocks * 512) / 1024,
        diffMs,
        diffFileDiskKiB,
      };
    } else {
      const q = await Qmp.open(sock);
      await q.cmd('stop');
      const t = performance.now();
      await q.cmd('migrate', { uri: `exec:cat > ${files.mem}` });
      await q.until('query-migrate', (r) => r.status === 'completed');
      createMs = performance.now() - t;
      q.close();
    }
    return {
      createMs,
      memFileDiskKiB: (statSync(files.mem).blocks * 512) / 1024,
      diffMs: undefined,
      diffFileDiskKiB: undefined,
    };
  } finally {
    await p.kill();
  }
}

interface Restored {
  proc: Proc;
  loadMs: number;
  restoreToOutputMs: number;
  processToOutputMs: number;
  phases?: string;
}

/** A fresh process, the load call, the echo answered. */
async function restore(
  vmm: VmmName,
  env: Env,
  files: { state: string; mem: string },
  name: string,
): Promise<Restored> {
  const sock = join(env.dir, `${name}.sock`);
  const t0 = performance.now();
  const p =
    vmm === 'typervisor'
      ? new Proc(process.execPath, [TYPERVISOR, '--api-sock', sock, '--level', 'Info'])
      : new Proc('qemu-system-x86_64', qemuArgs(env, sock, true));
  try {
    await waitSocket(p, sock);
    let t1: number;
    if (vmm === 'typervisor') {
      t1 = performance.now();
      await api(sock, 'PUT', '/snapshot/load', {
        snapshot_path: files.state,
        mem_backend: { backend_type: 'File', backend_path: files.mem },
        resume_vm: true,
      });
    } else {
      const q = await Qmp.open(sock);
      t1 = performance.now();
      await q.cmd('migrate-incoming', { uri: `exec:cat ${files.mem}` });
      await q.until('query-status', (r) => r.status !== 'inmigrate');
      await q.cmd('cont');
      q.close();
    }
    const loadMs = performance.now() - t1;
    const from = p.out.length;
    p.write(PROBE_CMD);
    await p.waitFor(PROBE, STEP_TIMEOUT_MS, from);
    const now = performance.now();
    return {
      proc: p,
      loadMs,
      restoreToOutputMs: now - t1,
      processToOutputMs: now - t0,
      // Typervisor's own account of the load (src/vmm/snapshot.ts logs its phases).
      phases: /loaded in ([^\n]*)/.exec(p.err)?.[1],
    };
  } catch (e) {
    await p.kill();
    throw e;
  }
}

function nonGuestRss(vmm: VmmName, pid: number, mem: string): number {
  if (vmm === 'typervisor') return cloneMemory(pid, mem).nonGuestRssKiB;
  return summariseSmaps(readFileSync(`/proc/${pid}/smaps`, 'utf8'), {
    name: 'qemu',
    cmd: '',
    args: [],
    memMiB: MEM_MIB,
  }).nonGuestRssKiB;
}

async function measure(key: string, env: Env): Promise<SnapSample> {
  const vmm = key.split('/')[1] as VmmName;
  const sample: SnapSample = { key, vmm };
  const files = { state: join(env.dir, `${vmm}.snap`), mem: join(env.dir, `${vmm}.mem`) };
  const running: Proc[] = [];
  try {
    const c = await bootAndSnapshot(vmm, env, files);
    sample.createMs = c.createMs;
    sample.memFileDiskKiB = c.memFileDiskKiB;
    sample.diffMs = c.diffMs;
    sample.diffFileDiskKiB = c.diffFileDiskKiB;
    process.stderr.write(
      `snapshot: ${key}: create ${c.createMs.toFixed(0)} ms` +
        (c.diffMs === undefined
          ? '\n'
          : `, Diff ${c.diffMs.toFixed(0)} ms (${(c.diffFileDiskKiB! / 1024).toFixed(1)} MiB)\n`),
    );

    const one = await restore(vmm, env, files, 'restore');
    running.push(one.proc);
    sample.loadMs = one.loadMs;
    sample.restoreToOutputMs = one.restoreToOutputMs;
    sample.processToOutputMs = one.processToOutputMs;
    sample.nonGuestRssKiB = nonGuestRss(vmm, one.proc.pid, files.mem);
    if (one.phases) sample.loadPhases = one.phases.slice(0, 300);
    process.stderr.write(
      `snapshot: ${key}: load ${one.loadMs.toFixed(0)} ms, to output ${one.restoreToOutputMs.toFixed(0)} ms\n`,
    );
    await one.proc.kill();
    running.length = 0;

    // Clones: all running at once, each having answered an echo.
    const loads: number[] = [];
    for (let i = 0; i < env.clones; i++) {
      const r = await restore(vmm, env, files, `clone${i}`);
      running.push(r.proc);
      loads.push(r.loadMs);
    }
    await sleep(1000);
    const owned: number[] = [];
    const pss: number[] = [];
    for (const p of running) {
      const m = cloneMemory(p.pid, vmm === 'typervisor' ? files.mem : undefined);
      owned.push(m.ownedKiB);
      pss.push(m.pssKiB);
    }
    sample.clones = running.length;
    sample.cloneOwnedKiB = owned;
    sample.clonePssKiB = pss;
    sample.cloneLoadMs = loads;
    process.stderr.write(
      `snapshot: ${key}: ${running.length} clones, owned ${owned.map((k) => (k / 1024).toFixed(1)).join('/')} MiB\n`,
    );
  } catch (e) {
    sample.error = (e as Error).message.slice(0, 600);
    process.stderr.write(`snapshot: ${key}: failed: ${sample.error}\n`);
  } finally {
    await Promise.all(running.map((p) => p.kill()));
    rmSync(files.state, { force: true });
    rmSync(files.mem, { force: true });
  }
  return sample;
}

export function summariseSnapshot(samples: SnapSample[], runs: number): SubSuiteOutput {
  const ok = samples.filter((s) => !s.error);
  const pick = (vmm: VmmName, f: (s: SnapSample) => number | number[] | undefined) =>
    stat(
      ok
        .filter((s) => s.vmm === vmm)
        .flatMap((s) => {
          const v = f(s);
          return v === undefined ? [] : Array.isArray(v) ? v : [v];
        }),
    );
  const mib = (k: number[] | number | undefined) =>
    k === undefined ? undefined : Array.isArray(k) ? k.map((x) => x / 1024) : k / 1024;
  const row = (
    metric: string,
    unit: string,
    f: (s: SnapSample) => number | number[] | undefined,
    note?: string,
  ): Row => ({
    suite: 'lab',
    metric,
    unit,
    note,
    typervisor: pick('typervisor', f),
    qemu: pick('qemu', f),
  });
  const clones = ok.find((s) => s.clones)?.clones ?? DEFAULT_CLONES;
  const rows: Row[] = [
    row(
      'Snapshot: create Full (VM paused)',
      'ms',
      (s) => s.createMs,
      'QEMU: migrate "exec:cat > f"',
    ),
    row(
      'Snapshot: create Diff (VM paused)',
      'ms',
      (s) => s.diffMs,
      'after the Full: resumed, an echo answered, 1 s of the idle shell, paused; QEMU: n/a (no incremental migration to a file)',
    ),
    row('Snapshot: memory file on disk', 'MiB', (s) => mib(s.memFileDiskKiB)),
    row('Snapshot: Diff memory file on disk', 'MiB', (s) => mib(s.diffFileDiskKiB)),
    row(
      'Snapshot: the load call alone',
      'ms',
      (s) => s.loadMs,
      'PUT /snapshot/load (resumed); QEMU migrate-incoming "exec:cat f" + cont. Firecracker: 3-10 ms',
    ),
    row('Snapshot: load call → guest shell answers an echo', 'ms', (s) => s.restoreToOutputMs),
    row('Snapshot: process start → guest shell answers an echo', 'ms', (s) => s.processToOutputMs),
    row('Snapshot: RSS outside guest memory after restore', 'MiB', (s) => mib(s.nonGuestRssKiB)),
    row(
      `Snapshot: memory owned per clone (${clones} clones)`,
      'MiB',
      (s) => mib(s.cloneOwnedKiB),
      'Private_Dirty over all mappings, each clone after an echo',
    ),
    row(`Snapshot: Pss per clone (${clones} clones)`, 'MiB', (s) => mib(s.clonePssKiB)),
    row(`Snapshot: load call per clone (${clones} clones)`, 'ms', (s) => s.cloneLoadMs),
  ];
  const missing = snapshotPlan(runs).length - samples.length;
  return {
    rows,
    notes: [
      `${runs} round(s), the VMM order alternating. Guest: the project's default kernel and busybox initramfs, ${MEM_MIB} MiB, 1 vCPU, booted to its shell ("${CMDLINE}"); QEMU: -M microvm,acpi=on. The state and memory files are on /dev/shm (tmpfs; the lab's /tmp is 9p), so loads read memory, not a disk.`,
      'Typervisor: API mode, PUT /snapshot/create (Full) then PUT /snapshot/load in a fresh process; QEMU 7.2: stop + migrate "exec:cat > f", then a fresh process with -incoming defer -S: migrate-incoming "exec:cat f", polled with query-status, then cont.',
      `Clones: ${clones} processes restored from the one snapshot, all running at once; Typervisor maps the memory file privately (the pages no clone writes are the page cache's), QEMU copies it into each clone's RAM.`,
      ...ok
        .filter((s) => s.loadPhases)
        .map((s) => `${s.key}: Typervisor's load, as it logs it: ${s.loadPhases}.`),
      ...(missing > 0 ? [`${missing} sample(s) missing (not measured).`] : []),
      ...samples.filter((s) => s.error).map((s) => `${s.key} failed: ${s.error}`),
    ],
  };
}

async function main() {
  const { values } = parseArgs({
    options: {
      runs: { type: 'string' },
      resume: { type: 'string' },
      clones: { type: 'string' },
    },
  });
  const runs = Number(values.runs ?? 1);
  // Unix sockets cannot live on the lab's /tmp (9p): sockets and snapshot files go to /dev/shm.
  const dir = mkdtempSync(
    join(existsSync('/dev/shm') ? '/dev/shm' : tmpdir(), 'typervisor-bench-snap-'),
  );
  const env: Env = {
    kernel: imagePaths('kernel').KERNEL!,
    initrd: imagePaths('initramfs').INITRAMFS!,
    kvmKind: detectKvm().kind,
    dir,
    clones: Number(values.clones ?? DEFAULT_CLONES),
  };
  try {
    const samples = await runPlan(
      snapshotPlan(runs),
      readResume<SnapSample>(values.resume),
      (key) => measure(key, env),
    );
    printSubSuiteOutput({ ...summariseSnapshot(samples, runs), labHost: labHostInfo() });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

if (isMainModule(import.meta.url)) {
  main().catch((e) => {
    process.stderr.write(`snapshot: ${(e as Error).stack ?? e}\n`);
    process.exit(1);
  });
}

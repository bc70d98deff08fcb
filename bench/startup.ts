/**
 * The start-up suite (issue 18): a cold VMM process on the micro guest, Typervisor (its
 * launcher exec'd as a user would: its shell line, the bundle) beside QEMU microvm, interleaved
 * (the order rotating every round) so that noise on a shared host hits both alike.
 *  - exec -> first serial byte, exec -> exit, peak RSS (ru_maxrss through /usr/bin/time);
 *  - an idle VM (spin guest, 200 ms after its marker): RSS, PSS and USS from smaps_rollup
 *    (USS = Private_Clean + Private_Dirty: what this VM alone costs the host);
 *  - the API mode: exec -> API socket accepting connections, wall ms and the process's CPU ms
 *    by then (every thread's, from /proc/PID/task/N/schedstat), and InstanceStart -> marker
 *    for a client that configures the VM (boot source, machine config) first. QEMU's
 *    counterparts: `-S -qmp unix:SOCK` (exec -> QMP socket accepting; `cont` -> marker after
 *    the capabilities handshake).
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { connect } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import {
  REPO,
  TYPERVISOR,
  qemuCpu,
  runOnce,
  stat,
  trainBundleCaches,
  type Row,
  type Vmm,
} from './common.js';

const MEM_MIB = 64;
const SAMPLE_DELAY_MS = 200;
type Name = 'typervisor' | 'qemu';
/**
 * What runs in the cold and idle rounds: Typervisor as a user runs it, Typervisor with
 * `--vcpu-threads native` (its vCPU on a runner thread served by the main thread: no worker,
 * one isolate; docs/architecture.md "vCPU threads"), with `--vcpu-threads loop` (the vCPU run
 * by the main thread itself while its loop is idle), and QEMU.
 */
type Variant = Name | 'native' | 'loop';
const VARIANTS: Variant[] = ['typervisor', 'native', 'loop', 'qemu'];
const NAMES: Name[] = ['typervisor', 'qemu'];

function qemuArgs(kvmKind: string, elf: string): string[] {
  return [
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
  ];
}

function vmmFor(v: Variant, elf: string, kvmKind: string): Vmm {
  return v === 'qemu'
    ? { name: v, cmd: 'qemu-system-x86_64', args: qemuArgs(kvmKind, elf), memMiB: MEM_MIB }
    : {
        name: 'typervisor',
        cmd: TYPERVISOR,
        args: [
          'run',
          '--kernel',
          elf,
          '--memory',
          String(MEM_MIB),
          ...(v === 'native' || v === 'loop' ? ['--vcpu-threads', v] : []),
        ],
        memMiB: MEM_MIB,
      };
}

/** smaps_rollup of a process, KiB. */
export function rollup(pid: number): { rss: number; pss: number; uss: number } {
  const t = readFileSync(`/proc/${pid}/smaps_rollup`, 'utf8');
  const f = (k: string) => Number(new RegExp(`^${k}:\\s+(\\d+) kB`, 'm').exec(t)?.[1] ?? NaN);
  return { rss: f('Rss'), pss: f('Pss'), uss: f('Private_Clean') + f('Private_Dirty') };
}

/** CPU time of every live thread of `pid`, ms (schedstat: ns on a CPU). */
export function cpuMs(pid: number): number {
  let ns = 0;
  for (const tid of readdirSync(`/proc/${pid}/task`)) {
    try {
      ns += Number(readFileSync(`/proc/${pid}/task/${tid}/schedstat`, 'utf8').split(' ')[0]);
    } catch {
      // the thread ended meanwhile
    }
  }
  return ns / 1e6;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function canConnect(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect(path);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

/** Polls until `path` accepts a connection: the ms since t0. */
async function waitAccepting(path: string, t0: number, child: ChildProcess): Promise<number> {
  for (;;) {
    if (existsSync(path) && (await canConnect(path))) return performance.now() - t0;
    if (child.exitCode !== null) throw new Error(`exited (${child.exitCode}) before its socket`);
    if (performance.now() - t0 > 20_000) throw new Error(`no socket at ${path} after 20 s`);
    await sleep(0.2);
  }
}

/** One HTTP request over the API socket: the status. */
function api(sock: string, method: string, path: string, body?: unknown): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = connect(sock);
    const data = body === undefined ? '' : JSON.stringify(body);
    let got = '';
    s.on('connect', () =>
      s.write(
        `${method} ${path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: ${Buffer.byteLength(data)}\r\n\r\n${data}`,
      ),
    );
    s.on('data', (b) => {
      got += b.toString();
      const m = /^HTTP\/1\.1 (\d+)/.exec(got);
      if (m && got.includes('\r\n\r\n')) {
        s.destroy();
        resolve(Number(m[1]));
      }
    });
    s.on('error', reject);
  });
}

/** QMP: one command after the greeting and the capabilities handshake; resolves on its reply. */
function qmp(sock: string, command: string): Promise<void> {
  return new Promise((resolve, reject) => {
    const s = connect(sock);
    let got = '';
    let stage = 0;
    s.on('data', (b) => {
      got += b.toString();
      const lines = got.split('\n');
      got = lines.pop()!;
      for (const l of lines) {
        if (stage === 0 && l.includes('"QMP"')) {
          stage = 1;
          s.write('{"execute":"qmp_capabilities"}\n');
        } else if (stage === 1 && l.includes('"return"')) {
          stage = 2;
          s.write(`{"execute":"${command}"}\n`);
        } else if (stage === 2 && l.includes('"return"')) {
          s.destroy();
          resolve();
        }
      }
    });
    s.on('error', reject);
  });
}

interface ApiSample {
  socketMs: number;
  socketCpuMs: number;
  startToMarkerMs: number;
  execToMarkerMs: number;
}

/** exec -> control socket; then configure and start the VM over it; -> marker on stdout. */
export async function apiOnce(
  name: Name,
  elf: string,
  kvmKind: string,
  dir: string,
  launcher: string[] = [TYPERVISOR],
): Promise<ApiSample> {
  const sock = join(dir, `${name}.sock`);
  rmSync(sock, { force: true });
  const [cmd, args] =
    name === 'typervisor'
      ? [launcher[0]!, [...launcher.slice(1), '--api-sock', sock]]
      : [
          'qemu-system-x86_64',
          [...qemuArgs(kvmKind, elf), '-S', '-qmp', `unix:${sock},server=on,wait=off`],
        ];
  const t0 = performance.now();
  const child = spawn(cmd, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let markerAt = -1;
  let stderr = '';
  child.stderr!.on('data', (b: Buffer) => (stderr += b.toString()));
  const marker = new Promise<void>((resolve) =>
    child.stdout!.on('data', () => {
      if (markerAt < 0) {
        markerAt = performance.now();
        resolve();
      }
    }),
  );
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  try {
    const socketMs = await waitAccepting(sock, t0, child);
    const socketCpuMs = cpuMs(child.pid!);
    let startAt: number;
    if (name === 'typervisor') {
      const boot = await api(sock, 'PUT', '/boot-source', { kernel_image_path: elf });
      const mc = await api(sock, 'PUT', '/machine-config', {
        vcpu_count: 1,
        mem_size_mib: MEM_MIB,
      });
      if (boot !== 204 || mc !== 204) throw new Error(`configuration: ${boot}, ${mc}`);
      startAt = performance.now();
      const st = await api(sock, 'PUT', '/actions', { action_type: 'InstanceStart' });
      if (st !== 204) throw new Error(`InstanceStart: ${st}`);
    } else {
      startAt = performance.now();
      await qmp(sock, 'cont');
    }
    await Promise.race([
      marker,
      sleep(20_000).then(() => Promise.reject(new Error('no marker within 20 s'))),
    ]);
    return {
      socketMs,
      socketCpuMs,
      startToMarkerMs: markerAt - startAt,
      execToMarkerMs: markerAt - t0,
    };
  } catch (e) {
    throw new Error(`${name} API mode: ${(e as Error).message}\n${stderr.slice(-1000)}`);
  } finally {
    child.kill('SIGKILL');
    await exited;
    rmSync(sock, { force: true });
  }
}

/** The idle VM's memory: smaps_rollup SAMPLE_DELAY_MS after the spin guest's marker. */
async function idleMemory(vmm: Vmm): Promise<{ rss: number; pss: number; uss: number }> {
  const child = spawn(vmm.cmd, vmm.args, { stdio: ['ignore', 'pipe', 'pipe'] });
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  try {
    await Promise.race([
      new Promise<void>((r) => child.stdout!.once('data', () => r())),
      sleep(20_000).then(() => Promise.reject(new Error(`${vmm.name} spin: no marker`))),
    ]);
    await sleep(SAMPLE_DELAY_MS);
    return rollup(child.pid!);
  } finally {
    child.kill('SIGKILL');
    await exited;
  }
}

export interface StartupOptions {
  runs: number;
  kvmKind: string;
  log: (s: string) => void;
}

export async function startupSuite(o: StartupOptions): Promise<{ rows: Row[]; notes: string[] }> {
  const caches = trainBundleCaches();
  const dir = mkdtempSync(join(tmpdir(), 'typervisor-bench-startup-'));
  try {
    const b = spawn('sh', [join(REPO, 'bench', 'guests', 'build.sh'), dir, '1000'], {
      stdio: 'ignore',
    });
    const code = await new Promise<number | null>((r) => b.once('exit', r));
    if (code !== 0) throw new Error('bench/guests/build.sh failed');
    const mark = join(dir, 'mark.elf');
    const spin = join(dir, 'spin.elf');
    const samples: Record<string, Record<Variant, number[]>> = {};
    const add = (k: string, n: Variant, v: number | undefined) => {
      if (v !== undefined && Number.isFinite(v))
        ((samples[k] ??= { typervisor: [], native: [], loop: [], qemu: [] })[n] ??= []).push(v);
    };
    for (let r = 0; r < o.runs; r++) {
      const vorder = VARIANTS.map((_, i) => VARIANTS[(i + r) % VARIANTS.length]!);
      const order = NAMES.map((_, i) => NAMES[(i + r) % NAMES.length]!);
      for (const name of vorder) {
        const m = await runOnce(vmmFor(name, mark, o.kvmKind), {
          peakRss: true,
          timeoutMs: 30_000,
        });
        if (m.code !== 0 || m.markerMs < 0)
          throw new Error(`${name} mark: exit ${m.code}\n${m.stderr.slice(-1000)}`);
        add('marker', name, m.markerMs);
        add('exit', name, m.exitMs);
        add('tail', name, m.exitMs - m.markerMs);
        add('peak', name, m.peakRssKiB !== undefined ? m.peakRssKiB / 1024 : undefined);
      }
      for (const name of vorder) {
        const mem = await idleMemory(vmmFor(name, spin, o.kvmKind));
        add('rss', name, mem.rss / 1024);
        add('pss', name, mem.pss / 1024);
        add('uss', name, mem.uss / 1024);
      }
      for (const name of order) {
        const a = await apiOnce(name, mark, o.kvmKind, dir);
        add('sock', name, a.socketMs);
        add('sockcpu', name, a.socketCpuMs);
        add('start', name, a.startToMarkerMs);
        add('apimarker', name, a.execToMarkerMs);
      }
      o.log(`startup: round ${r + 1}/${o.runs} done`);
    }
    const row = (
      metric: string,
      key: string,
      unit: string,
      note?: string,
      v: 'typervisor' | 'native' | 'loop' = 'typervisor',
    ): Row => ({
      suite: 'micro',
      metric,
      unit,
      note,
      typervisor: stat(samples[key]?.[v] ?? []),
      qemu: stat(samples[key]?.qemu ?? []),
    });
    const NATIVE = '--vcpu-threads native: the vCPU on a runner thread, no worker';
    const LOOP = '--vcpu-threads loop: the vCPU run by the main thread, no worker, no hand-off';
    return {
      rows: [
        row('cold: exec → marker (bin/typervisor exec’d)', 'marker', 'ms', 'issue 18: ≤ 1.2x QEMU'),
        row('cold: exec → exit', 'exit', 'ms'),
        row('cold: marker → exit', 'tail', 'ms'),
        row('cold: peak RSS (ru_maxrss)', 'peak', 'MiB', 'issue 18: ≤ 1.2x QEMU'),
        row('idle VM: RSS (smaps_rollup, spin guest)', 'rss', 'MiB', 'guest pages included'),
        row('idle VM: PSS', 'pss', 'MiB'),
        row('idle VM: USS (Private_Clean + Private_Dirty)', 'uss', 'MiB', 'issue 18: ≤ QEMU'),
        row('cold: exec → marker, native vCPU thread', 'marker', 'ms', NATIVE, 'native'),
        row('cold: exec → exit, native vCPU thread', 'exit', 'ms', NATIVE, 'native'),
        row('cold: peak RSS, native vCPU thread', 'peak', 'MiB', NATIVE, 'native'),
        row('idle VM: RSS, native vCPU thread', 'rss', 'MiB', NATIVE, 'native'),
        row('idle VM: USS, native vCPU thread', 'uss', 'MiB', NATIVE, 'native'),
        row('cold: exec → marker, vCPU on the main loop', 'marker', 'ms', LOOP, 'loop'),
        row('cold: exec → exit, vCPU on the main loop', 'exit', 'ms', LOOP, 'loop'),
        row('cold: peak RSS, vCPU on the main loop', 'peak', 'MiB', LOOP, 'loop'),
        row('idle VM: RSS, vCPU on the main loop', 'rss', 'MiB', LOOP, 'loop'),
        row('idle VM: USS, vCPU on the main loop', 'uss', 'MiB', LOOP, 'loop'),
        row(
          'API: exec → control socket accepting',
          'sock',
          'ms',
          'QEMU: -S -qmp unix:SOCK (QMP socket)',
        ),
        row('API: CPU time by then (all threads)', 'sockcpu', 'ms', 'Firecracker: ≤ 8 CPU ms'),
        row(
          'API: InstanceStart → marker',
          'start',
          'ms',
          'QEMU: QMP cont (after qmp_capabilities) → marker',
        ),
        row('API: exec → marker (socket, config, start)', 'apimarker', 'ms'),
      ],
      notes: [
        `start-up rows: bench/startup.ts, micro guest (${MEM_MIB} MiB), Typervisor's launcher exec'd directly (its shell line drops NODE_EXTRA_CA_CERTS and sets the soft stack limit to 1792 KiB; it runs dist/bundle when current), ${o.runs} interleaved rounds. USS from /proc/PID/smaps_rollup ${SAMPLE_DELAY_MS} ms after the spin guest's marker; CPU ms from every thread's schedstat when the socket first accepts.`,
        caches,
      ],
    };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

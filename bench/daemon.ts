/**
 * The daemon suite (issue 19): `typervisor serve` on the micro guest (mark.elf: marker, then
 * reset), beside QEMU microvm's cold start.
 *  - warm create -> guest marker: POST /vms with a warm pool, the daemon's own boot_marker_ms
 *    (request taken -> the VM's boot marker seen by the daemon), per mode; one VM at a time,
 *    the pool refilled between creates;
 *  - sustained VMs/s: back-to-back create -> VM ended (GET /vms/{id}/wait) -> DELETE, with
 *    the pool as it is (a process-mode create finds the pool empty once its refill cannot keep
 *    up); `runs` interleaved rounds of it per mode, the median reported;
 *  - churn: CHURN VMs created and deleted one after another; the daemon's open descriptors and
 *    RSS before (after a warm-up VM) and after;
 *  - QEMU: exec -> first serial byte, cold (the same guest).
 * Interleaved: the rounds alternate between the modes and QEMU.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync } from 'node:fs';
import { Agent, request } from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { REPO, TYPERVISOR, qemuCpu, runOnce, stat, type Row } from './common.js';

export interface DaemonBenchOptions {
  runs: number;
  kvmKind: string;
  log: (s: string) => void;
  /** VMs in each churn (default 200 in shared mode, 20 in process mode; 0: none). */
  churnShared?: number;
  churnProcess?: number;
  /**
   * VMs run before each churn's first sample (default 0; both modes). The daemon's RSS grows
   * over its first few hundred VMs without a leak (V8 sizes its heap by the allocation rate and
   * compiles its hot code, malloc keeps freed arenas) and then stays flat: a warm-up measures the
   * steady state (process mode, 1,000 VMs from a fresh daemon: +13.9 MiB, flat from ~700 on).
   */
  churnWarmup?: number;
  /** VMs in a sustained-rate round (default 50 in shared mode, 10 in process mode). */
  sustained?: number;
  sustainedProcess?: number;
  /**
   * The daemons' `--heap-cap` (default: serve's own, `small`: fixed V8 heap limits, src/daemon/
   * heap.ts); `none` runs them with V8's own sizing, as before the cap.
   */
  heapCap?: string;
}

type Mode = 'process' | 'shared';
const POOL = 2;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
/** The pause before each warm measurement, once every pool is full. */
const SETTLE_MS = 500;

/**
 * One keep-alive connection pool per daemon socket, as a client that drives a daemon would
 * keep (a new connection per request costs the daemon an accept and the client a connect).
 */
const agents = new Map<string, Agent>();
const agentFor = (sock: string) => {
  let a = agents.get(sock);
  if (!a) agents.set(sock, (a = new Agent({ keepAlive: true, maxSockets: 4 })));
  return a;
};

function call(
  sock: string,
  method: string,
  path: string,
  body?: unknown,
): Promise<{ status: number; json: any }> {
  // eslint-disable-line @typescript-eslint/no-explicit-any
  const data = body === undefined ? undefined : JSON.stringify(body);
  return new Promise((resolve, reject) => {
    const req = request(
      {
        socketPath: sock,
        method,
        path,
        agent: agentFor(sock),
        headers: data
          ? { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(data) }
          : {},
      },
      (res) => {
        let t = '';
        res.setEncoding('utf8').on('data', (c: string) => (t += c));
        res.on('end', () =>
          resolve({ status: res.statusCode ?? 0, json: t ? JSON.parse(t) : undefined }),
        );
      },
    );
    req.setTimeout(30_000, () => req.destroy(new Error(`${method} ${path}: timeout`)));
    req.on('error', reject);
    req.end(data);
  });
}

interface Daemon {
  child: ChildProcess;
  sock: string;
  state: string;
}

async function startDaemon(dir: string, mode: Mode, heapCap?: string): Promise<Daemon> {
  const sock = join(dir, `${mode}.sock`);
  const state = join(dir, `${mode}-state`);
  const child = spawn(
    TYPERVISOR,
    [
      'serve',
      '--socket',
      sock,
      '--state-dir',
      state,
      '--mode',
      mode,
      '--pool',
      String(POOL),
      ...(heapCap === undefined ? [] : ['--heap-cap', heapCap]),
    ],
    {
      stdio: ['ignore', 'ignore', 'inherit'],
    },
  );
  for (let i = 0; i < 600; i++) {
    if (existsSync(sock) && (await call(sock, 'GET', '/').catch(() => undefined)))
      return { child, sock, state };
    await sleep(50);
  }
  throw new Error(`daemon (${mode}): no socket after 30 s`);
}

async function stopDaemon(d: Daemon): Promise<void> {
  const exited = new Promise((r) => d.child.once('exit', r));
  d.child.kill('SIGTERM');
  await exited;
}

async function waitPool(sock: string): Promise<void> {
  for (let i = 0; i < 600; i++) {
    const p = await call(sock, 'GET', '/pool');
    if (p.json.ready >= Math.min(p.json.size, POOL)) return;
    await sleep(50);
  }
  throw new Error('pool not ready after 30 s');
}

/**
 * One VM: create, wait until it ended (GET /vms/{id}/wait: answered when it ends, or with the
 * VM as it is after 20 s), delete. Returns its record.
 */
async function oneVm(sock: string, elf: string): Promise<any> {
  // eslint-disable-line @typescript-eslint/no-explicit-any
  const r = await call(sock, 'POST', '/vms', {
    'boot-source': { kernel_image_path: elf },
    'machine-config': { vcpu_count: 1, mem_size_mib: 64 },
  });
  if (r.status !== 200) throw new Error(`create: ${JSON.stringify(r.json)}`);
  let vm = r.json;
  for (let i = 0; vm.state === 'running' || vm.state === 'starting'; i++) {
    if (i > 0) throw new Error(`VM ${vm.id} still running after 20 s`);
    vm = (await call(sock, 'GET', `/vms/${r.json.id}/wait`)).json;
  }
  await call(sock, 'DELETE', `/vms/${r.json.id}`);
  if (vm.state !== 'exited') throw new Error(`VM ${vm.id}: ${vm.state}: ${vm.exit?.reason}`);
  return vm;
}

/**
 * The daemon's open descriptors, the least of 10 samples over 2.5 s: a prewarmed worker that is
 * loading its modules holds each module file open for a moment (shared mode: ~40 at once).
 */
async function fdCount(pid: number): Promise<number> {
  let n = Infinity;
  for (let i = 0; i < 10; i++) {
    n = Math.min(n, readdirSync(`/proc/${pid}/fd`).length);
    await sleep(250);
  }
  return n;
}
/**
 * The least-squares slope of RSS samples (VM number, MiB), in MiB per 1,000 VMs: a leak shows
 * as a steady climb, which the two end points alone (each one sample of a noisy RSS) hide or fake.
 */
function trendPer1000(points: ReadonlyArray<readonly [number, number]>): number {
  const n = points.length;
  if (n < 2) return 0;
  const mx = points.reduce((a, [x]) => a + x, 0) / n;
  const my = points.reduce((a, [, y]) => a + y, 0) / n;
  let sxy = 0;
  let sxx = 0;
  for (const [x, y] of points) {
    sxy += (x - mx) * (y - my);
    sxx += (x - mx) ** 2;
  }
  return sxx === 0 ? 0 : (sxy / sxx) * 1000;
}

/** The daemon's main-thread V8 heap spaces (GET /), MiB reserved, the ones over 1 MiB. */
async function heapMiB(sock: string): Promise<Record<string, string>> {
  const heap = (await call(sock, 'GET', '/')).json.memory.heap as Record<string, { size: number }>;
  const out: Record<string, string> = {};
  for (const [k, v] of Object.entries(heap))
    if (v.size >= 1 << 20) out[k] = (v.size / (1 << 20)).toFixed(1);
  return out;
}

/** The node options the daemon runs with (its heap flags once it has re-executed itself). */
function nodeOptionsOf(pid: number): string {
  const argv = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
  const script = argv.findIndex((a, i) => i > 0 && !a.startsWith('-'));
  return argv.slice(1, script).join(' ') || 'none';
}

function rssKiB(pid: number): number {
  return Number(/^VmRSS:\s+(\d+)/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'))?.[1] ?? NaN);
}

/** RSS of the daemon's brk heap (glibc's main arena), KiB: the [heap] mapping in smaps. */
function brkKiB(pid: number): number {
  const m = /\[heap\]\n(?:.*\n)*?Rss:\s+(\d+)/.exec(readFileSync(`/proc/${pid}/smaps`, 'utf8'));
  return Number(m?.[1] ?? NaN);
}

/** The daemon's idle collections and malloc_trim calls so far (GET /), when it makes any. */
async function trimStats(sock: string): Promise<string> {
  const t = (await call(sock, 'GET', '/')).json.memory.malloc_trim;
  if (!t) return 'none';
  const gc = t.gc_runs
    ? `; before them ${t.gc_runs} garbage collections (main thread ${t.gc_ms.toFixed(1)} ms in all, ${t.gc_max_ms.toFixed(1)} at most; ${t.gc_workers} idle vCPU workers in the last)`
    : '';
  return `${t.runs} runs (${t.released} released), ${t.ms.toFixed(1)} ms${gc}`;
}

export async function daemonSuite(
  o: DaemonBenchOptions,
): Promise<{ rows: Row[]; notes: string[] }> {
  const dir = mkdtempSync(join(tmpdir(), 'tvd-'));
  const notes: string[] = [];
  const rows: Row[] = [];
  try {
    const b = spawn('sh', [join(REPO, 'bench', 'guests', 'build.sh'), dir, '1000'], {
      stdio: 'ignore',
    });
    if ((await new Promise((r) => b.once('exit', r))) !== 0)
      throw new Error('bench/guests/build.sh failed');
    const mark = join(dir, 'mark.elf');
    const modes: Mode[] = ['process', 'shared'];
    const daemons = {} as Record<Mode, Daemon>;
    for (const m of modes) daemons[m] = await startDaemon(dir, m, o.heapCap);
    const warm: Record<Mode, number[]> = { process: [], shared: [] };
    const create: Record<Mode, number[]> = { process: [], shared: [] };
    const qemu: number[] = [];
    // Warm-up: one VM each (first use of the guest file, the page cache).
    for (const m of modes) await oneVm(daemons[m].sock, mark);
    for (let i = 0; i < o.runs; i++) {
      for (const m of modes) {
        // Every daemon's pool full: a process-mode refill (a VMM process starting) would
        // otherwise take the CPUs from the next measurement, whichever mode it is.
        for (const x of modes) await waitPool(daemons[x].sock);
        // A refilled process-mode pool counts as ready once its new VMM answers, while that
        // process still compiles and collects on its threads for a while: a shared-mode VM
        // measured right then read ~10 ms instead of ~5 (2026-12-01, quiet host).
        await sleep(SETTLE_MS);
        const vm = await oneVm(daemons[m].sock, mark);
        if (vm.boot_marker_ms !== null) warm[m].push(vm.boot_marker_ms);
        create[m].push(vm.create_ms);
      }
      const q = await runOnce(
        {
          name: 'qemu',
          cmd: 'qemu-system-x86_64',
          args: [
            '-M',
            'microvm',
            '-enable-kvm',
            '-cpu',
            qemuCpu(o.kvmKind),
            '-m',
            '64',
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
            mark,
          ],
          memMiB: 64,
        },
        {},
      ).catch(() => undefined);
      if (q && q.markerMs >= 0) qemu.push(q.markerMs);
      o.log(`daemon round ${i + 1}/${o.runs}`);
    }
    const qs = stat(qemu);
    for (const m of modes) {
      rows.push({
        suite: 'micro',
        metric: `daemon ${m}: warm create → guest marker`,
        unit: 'ms',
        typervisor: stat(warm[m]),
        qemu: qs,
        note: 'QEMU: cold exec → first byte; issue 19: ≤ 10 ms',
      });
      rows.push({
        suite: 'micro',
        metric: `daemon ${m}: create request → VM started (answer)`,
        unit: 'ms',
        typervisor: stat(create[m]),
      });
    }
    // Sustained rate (interleaved rounds), then churn with descriptors and RSS.
    const sustained: Record<Mode, number> = {
      shared: o.sustained ?? 50,
      process: o.sustainedProcess ?? 10,
    };
    const rates: Record<Mode, number[]> = { process: [], shared: [] };
    for (let i = 0; i < o.runs; i++) {
      for (const m of modes) {
        for (const x of modes) await waitPool(daemons[x].sock);
        const t0 = performance.now();
        for (let j = 0; j < sustained[m]; j++) await oneVm(daemons[m].sock, mark);
        rates[m].push((sustained[m] * 1000) / (performance.now() - t0));
      }
      o.log(`daemon sustained round ${i + 1}/${o.runs}`);
    }
    for (const m of modes) {
      const pool = (await call(daemons[m].sock, 'GET', '/pool')).json;
      rows.push({
        suite: 'micro',
        metric: `daemon ${m}: sustained create → end → delete (pool ${POOL})`,
        unit: 'VMs/s',
        higherIsBetter: true,
        typervisor: stat(rates[m]),
        note: `${o.runs} rounds of ${sustained[m]} VMs back to back; cold starts so far: ${pool.cold_starts}; issue 19: ≥ 100/s in shared mode`,
      });
    }
    for (const m of modes) {
      const n = m === 'shared' ? (o.churnShared ?? 200) : (o.churnProcess ?? 20);
      if (n <= 0) continue;
      const pid = daemons[m].child.pid!;
      const warmup = o.churnWarmup ?? 0;
      for (let i = 0; i < warmup; i++) await oneVm(daemons[m].sock, mark);
      await waitPool(daemons[m].sock);
      await sleep(3000); // as after the churn: deferred teardown steps, GC
      const fd0 = await fdCount(pid);
      const rss0 = rssKiB(pid);
      const brk0 = brkKiB(pid);
      const heap0 = await heapMiB(daemons[m].sock);
      // RSS every tenth of the churn: a leak climbs steadily, a heap sizing itself levels off.
      const samples: string[] = [];
      const points: Array<[number, number]> = [];
      const every = Math.max(1, Math.floor(n / 10));
      const t0 = performance.now();
      for (let i = 1; i <= n; i++) {
        await oneVm(daemons[m].sock, mark);
        if (i % every === 0) {
          const mib = rssKiB(pid) / 1024;
          samples.push(mib.toFixed(1));
          points.push([i, mib]);
        }
      }
      const secs = (performance.now() - t0) / 1000;
      await waitPool(daemons[m].sock);
      await sleep(3000); // deferred teardown steps, GC
      const fd1 = await fdCount(pid);
      const rss1 = rssKiB(pid);
      const brk1 = brkKiB(pid);
      const trims = await trimStats(daemons[m].sock);
      const heap1 = await heapMiB(daemons[m].sock);
      const heap = Object.keys(heap1)
        .map((k) => `${k} ${heap0[k] ?? 0} → ${heap1[k]}`)
        .join(', ');
      notes.push(
        `daemon ${m} churn (node options: ${nodeOptionsOf(pid)}): ${n} VMs in ${secs.toFixed(1)} s (${(n / secs).toFixed(1)} VMs/s)${warmup ? ` after a ${warmup}-VM warm-up` : ''}; the daemon's descriptors ${fd0} → ${fd1}, RSS ${(rss0 / 1024).toFixed(1)} → ${(rss1 / 1024).toFixed(1)} MiB (every ${every} VMs: ${samples.join(', ')}; least-squares trend ${trendPer1000(points).toFixed(2)} MiB per 1,000 VMs); the daemon's main-thread V8 heap, MiB reserved: ${heap}; brk heap RSS ${(brk0 / 1024).toFixed(1)} → ${(brk1 / 1024).toFixed(1)} MiB; malloc_trim: ${trims}`,
      );
    }
    for (const m of modes) await stopDaemon(daemons[m]);
    for (const a of agents.values()) a.destroy();
    agents.clear();
    notes.push(
      `daemon rows: bench/daemon.ts, micro guest mark.elf (64 MiB), pool ${POOL}, ${o.runs} interleaved rounds (process, shared, QEMU); boot_marker_ms is the daemon's own measure (create request taken → the VM's boot marker seen by the daemon: the VMM's --boot-timer line in process mode, the vCPU thread's own time stamp of the marker write in shared mode).`,
    );
    return { rows, notes };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

/**
 * `node dist/bench/daemon.js [--runs N] [--churn N] [--churn-process N] [--sustained N]
 * [--sustained-process N] [--churn-warmup N] [--heap-cap small|none]`: the suite alone, as
 * Markdown (`--churn 1000`: the issue's 1,000-VM churn in shared mode; `--churn-warmup 500`
 * first runs 500 VMs unmeasured; `--heap-cap none`: the daemons with V8's own heap sizing).
 */
if (process.argv[1]?.endsWith('daemon.js')) {
  const { parseArgs } = await import('node:util');
  const { detectKvm } = await import('../src/kvm/detect.js');
  const { values: v } = parseArgs({
    options: {
      runs: { type: 'string' },
      churn: { type: 'string' },
      'churn-process': { type: 'string' },
      'churn-warmup': { type: 'string' },
      sustained: { type: 'string' },
      'sustained-process': { type: 'string' },
      'heap-cap': { type: 'string' },
    },
  });
  const n = (x: string | undefined) => (x === undefined ? undefined : Number(x));
  const kind = (detectKvm() as { kind?: string }).kind ?? 'kvm';
  const r = await daemonSuite({
    runs: n(v.runs) ?? 5,
    kvmKind: kind,
    log: (s) => process.stderr.write(`bench: ${s}\n`),
    churnShared: n(v.churn),
    churnProcess: n(v['churn-process']),
    churnWarmup: n(v['churn-warmup']),
    sustained: n(v.sustained),
    sustainedProcess: n(v['sustained-process']),
    heapCap: v['heap-cap'],
  });
  const f = (s?: { median: number; min: number; max: number }) =>
    s ? `${s.median.toFixed(2)} (${s.min.toFixed(2)}–${s.max.toFixed(2)})` : '–';
  for (const row of r.rows)
    process.stdout.write(
      `| ${row.metric} | ${row.unit} | ${f(row.typervisor)} | ${f(row.qemu)} | ${row.note ?? ''} |\n`,
    );
  for (const n of r.notes) process.stdout.write(`- ${n}\n`);
}

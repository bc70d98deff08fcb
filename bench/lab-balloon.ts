/**
 * The lab's `balloon` sub-suite (issue 16), run INSIDE the lab (bench/lab.ts starts it with
 * runInLab): how much memory a virtio-balloon gives back to the host and how fast, Typervisor
 * (Firecracker's `PATCH /balloon` on its API socket) beside QEMU microvm (`virtio-balloon-device`
 * driven through QMP's `balloon` command), same kernel, same initramfs, alternately. Speaks the
 * sub-suite contract of bench/common.ts.
 *
 *   node dist/bench/lab-balloon.js [--runs N] [--resume FILE]
 *
 * In each VM (MEM_MIB, 1 vCPU, the initramfs shell) the guest first dirties all but a few MiB of
 * its free memory in a tmpfs and frees it again, so the host holds those pages; then:
 *   - inflate by INFLATE_MIB: the time from the request to the balloon's `actual` size reaching it
 *     (Typervisor: GET /balloon/statistics `actual_mib`; QEMU: `query-balloon`), and the VMM
 *     process's RSS before and after (VmRSS: QEMU's anonymous guest RAM, our shared memfd);
 *   - deflate to 0: the time until `actual` is 0 again;
 *   - the guest fills INFLATE_MIB again and the RSS grows back (reported, not a row).
 * The balloon device: Typervisor `deflate_on_oom: false`, statistics every 60 s; QEMU's defaults
 * (no deflate-on-oom, no free page reporting): the same work on both sides.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { request } from 'node:http';
import { connect } from 'node:net';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { setTimeout as sleep } from 'node:timers/promises';
import { detectKvm } from '../src/kvm/detect.js';
import { imagePaths } from '../src/lab/guest.js';
import {
  TYPERVISOR,
  isMainModule,
  labHostInfo,
  printSubSuiteOutput,
  qemuCpu,
  readResume,
  runPlan,
  stat,
  type Row,
  type SubSuiteOutput,
} from './common.js';

const MEM_MIB = 256;
const INFLATE_MIB = 160;
/** Guest memory the first fill leaves free (so the balloon's pages are ones the host holds). */
const LEAVE_FREE_MIB = 12;
const CMDLINE = 'console=ttyS0 reboot=k panic=1 pci=off quiet';
const VMMS = ['typervisor', 'qemu'] as const;
type VmmName = (typeof VMMS)[number];
const log = (s: string) => process.stderr.write(`lab-balloon: ${s}\n`);

export interface BalloonSample {
  /** "r<round>/<vmm>" */
  key: string;
  vmm: VmmName;
  /** VmRSS (MiB) after the fill, after inflating, after deflating and refilling. */
  rssBefore?: number;
  rssInflated?: number;
  rssRefilled?: number;
  inflateMs?: number;
  deflateMs?: number;
  error?: string;
}

export function balloonPlan(runs: number): string[] {
  const keys: string[] = [];
  for (let r = 0; r < runs; r++)
    for (const vmm of r % 2 ? [...VMMS].reverse() : VMMS) keys.push(`r${r}/${vmm}`);
  return keys;
}

function rssMib(pid: number): number {
  const m = /^VmRSS:\s+(\d+) kB/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  if (!m) throw new Error(`no VmRSS for ${pid}`);
  return Number(m[1]) / 1024;
}

/** One HTTP request on Typervisor's API socket: status and body. */
function api(
  sock: string,
  method: string,
  path: string,
  body?: unknown,
): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const data = body === undefined ? undefined : JSON.stringify(body);
    const req = request(
      {
        socketPath: sock,
        method,
        path,
        headers: data ? { 'Content-Type': 'application/json' } : {},
        timeout: 30_000,
      },
      (res) => {
        let text = '';
        res.on('data', (d: Buffer) => (text += d.toString()));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body: text }));
      },
    );
    req.on('error', reject);
    req.on('timeout', () => req.destroy(new Error(`${method} ${path}: timed out`)));
    req.end(data);
  });
}

/** A QMP connection: one command at a time, events skipped. */
class Qmp {
  private buf = '';
  private waiter: (() => void) | undefined;
  private constructor(private readonly sock: ReturnType<typeof connect>) {
    sock.on('data', (d: Buffer) => {
      this.buf += d.toString();
      this.waiter?.();
    });
  }

  static async open(path: string): Promise<Qmp> {
    const end = Date.now() + 30_000;
    for (;;) {
      try {
        const s = await new Promise<ReturnType<typeof connect>>((res, rej) => {
          const c = connect(path, () => res(c));
          c.on('error', rej);
        });
        const q = new Qmp(s);
        await q.next(); // the greeting
        await q.cmd('qmp_capabilities');
        return q;
      } catch (e) {
        if (Date.now() > end) throw new Error(`QMP ${path}: ${(e as Error).message}`);
        await sleep(100);
      }
    }
  }

  private async next(): Promise<Record<string, unknown>> {
    for (;;) {
      const nl = this.buf.indexOf('\n');
      if (nl >= 0) {
        const line = this.buf.slice(0, nl);
        this.buf = this.buf.slice(nl + 1);
        if (line.trim()) return JSON.parse(line) as Record<string, unknown>;
        continue;
      }
      await new Promise<void>((res, rej) => {
        const t = setTimeout(() => rej(new Error('QMP: no answer in 30 s')), 30_000);
        this.waiter = () => {
          clearTimeout(t);
          this.waiter = undefined;
          res();
        };
      });
    }
  }

  async cmd(execute: string, args?: Record<string, unknown>): Promise<unknown> {
    this.sock.write(JSON.stringify({ execute, ...(args ? { arguments: args } : {}) }) + '\n');
    for (;;) {
      const m = await this.next();
      if ('return' in m) return m.return;
      if ('error' in m) throw new Error(`QMP ${execute}: ${JSON.stringify(m.error)}`);
    }
  }

  close(): void {
    this.sock.destroy();
  }
}

/** How each VMM is asked for a balloon size and tells the current one (MiB). */
interface BalloonControl {
  set(mib: number): Promise<void>;
  actual(): Promise<number>;
  close(): void;
}

function startVmm(name: VmmName, dir: string, kvmKind: string) {
  const kernel = imagePaths('kernel').KERNEL!;
  const initrd = imagePaths('initramfs').INITRAMFS!;
  const sock = join(dir, `${name}.sock`);
  rmSync(sock, { force: true });
  let argv: string[];
  if (name === 'typervisor') {
    const cfg = join(dir, 'vm.json');
    writeFileSync(
      cfg,
      JSON.stringify({
        'boot-source': { kernel_image_path: kernel, initrd_path: initrd, boot_args: CMDLINE },
        'machine-config': { vcpu_count: 1, mem_size_mib: MEM_MIB },
        // Statistics on (GET /balloon/statistics answers only then), polled rarely.
        balloon: { amount_mib: 0, deflate_on_oom: false, stats_polling_interval_s: 60 },
      }),
    );
    argv = [process.execPath, TYPERVISOR, '--api-sock', sock, '--config-file', cfg];
  } else {
    argv = [
      'qemu-system-x86_64',
      ...['-M', 'microvm,acpi=on', '-enable-kvm', '-cpu', qemuCpu(kvmKind)],
      ...['-m', String(MEM_MIB), '-smp', '1', '-nodefaults', '-no-user-config'],
      ...['-display', 'none', '-serial', 'stdio', '-no-reboot'],
      ...['-global', 'virtio-mmio.force-legacy=false'],
      ...['-kernel', kernel, '-initrd', initrd, '-append', CMDLINE],
      ...['-device', 'virtio-balloon-device'],
      ...['-qmp', `unix:${sock},server=on,wait=off`],
    ];
  }
  const child = spawn(argv[0]!, argv.slice(1), { stdio: ['pipe', 'pipe', 'pipe'] });
  const control = async (): Promise<BalloonControl> => {
    if (name === 'typervisor') {
      return {
        async set(mib) {
          const r = await api(sock, 'PATCH', '/balloon', { amount_mib: mib });
          if (r.status !== 204) throw new Error(`PATCH /balloon: ${r.status} ${r.body}`);
        },
        async actual() {
          const r = await api(sock, 'GET', '/balloon/statistics');
          const mib = (JSON.parse(r.body) as { actual_mib?: number }).actual_mib;
          if (r.status !== 200 || typeof mib !== 'number')
            throw new Error(`GET /balloon/statistics: ${r.status} ${r.body}`);
          return mib;
        },
        close() {},
      };
    }
    const q = await Qmp.open(sock);
    return {
      // QMP's `balloon` takes the guest's target size in bytes, not the balloon's.
      async set(mib) {
        await q.cmd('balloon', { value: (MEM_MIB - mib) * 1024 * 1024 });
      },
      async actual() {
        const r = (await q.cmd('query-balloon')) as { actual: number };
        return MEM_MIB - r.actual / (1024 * 1024);
      },
      close: () => q.close(),
    };
  };
  return { child, control };
}

/** The guest console: send lines, wait for a tag. */
function consoleOf(child: ChildProcess) {
  let out = '';
  let err = '';
  child.stdout!.on('data', (d: Buffer) => (out += d.toString('latin1')));
  child.stderr!.on('data', (d: Buffer) => (err += d.toString()));
  child.stdin!.on('error', () => undefined);
  const tail = () => `--- stdout ---\n${out.slice(-1500)}\n--- stderr ---\n${err.slice(-1500)}`;
  const waitFor = async (re: RegExp, ms: number, from = 0) => {
    const end = Date.now() + ms;
    for (;;) {
      const m = out.slice(from).match(re);
      if (m) return m;
      if (child.exitCode !== null || child.signalCode !== null)
        throw new Error(`the VMM exited before ${re}\n${tail()}`);
      if (Date.now() > end) throw new Error(`no ${re} within ${ms} ms\n${tail()}`);
      await sleep(50);
    }
  };
  let seq = 0;
  /** Runs a guest shell command; resolves with what it printed. */
  const run = async (cmd: string, ms: number) => {
    const tag = `T${++seq}X`;
    const from = out.length;
    child.stdin!.write(`${cmd}; echo "${tag}""-DONE"\n`);
    await waitFor(new RegExp(`${tag}-DONE`), ms, from);
    return out.slice(from);
  };
  return { waitFor, run, tail };
}

async function until(what: string, ok: () => Promise<boolean>, ms: number): Promise<number> {
  const t0 = performance.now();
  for (;;) {
    if (await ok()) return performance.now() - t0;
    if (performance.now() - t0 > ms) throw new Error(`timed out waiting for ${what}`);
    await sleep(20);
  }
}

async function measure(key: string, dir: string, kvmKind: string): Promise<BalloonSample> {
  const name = key.split('/')[1] as VmmName;
  const s: BalloonSample = { key, vmm: name };
  const { child, control } = startVmm(name, dir, kvmKind);
  const con = consoleOf(child);
  let ctl: BalloonControl | undefined;
  try {
    await con.waitFor(/TYPERVISOR-BOOT-OK/, 240_000);
    ctl = await control();
    const pid = child.pid!;
    const fill = await con.run(
      `mkdir -p /mnt/fill; mount -t tmpfs -o size=${MEM_MIB}m fill /mnt/fill; n=$(awk '/MemFree/{print int($2/1024)-${LEAVE_FREE_MIB}}' /proc/meminfo); dd if=/dev/zero of=/mnt/fill/x bs=1M count=$n 2>/dev/null; echo FILL=$n:$?; rm /mnt/fill/x`,
      120_000,
    );
    if (!/FILL=\d+:0/.test(fill)) throw new Error(`the guest could not fill its memory: ${fill}`);
    await sleep(1000);
    s.rssBefore = rssMib(pid);
    const c = ctl;
    const t0 = performance.now();
    await c.set(INFLATE_MIB);
    await until('the balloon to inflate', async () => (await c.actual()) >= INFLATE_MIB, 120_000);
    s.inflateMs = performance.now() - t0;
    await sleep(300);
    s.rssInflated = rssMib(pid);
    const t1 = performance.now();
    await c.set(0);
    await until('the balloon to deflate', async () => (await c.actual()) <= 0, 120_000);
    s.deflateMs = performance.now() - t1;
    const refill = await con.run(
      `dd if=/dev/zero of=/mnt/fill/x bs=1M count=${INFLATE_MIB} 2>/dev/null; echo REFILL=$?`,
      120_000,
    );
    if (!/REFILL=0/.test(refill)) throw new Error(`the guest could not refill: ${refill}`);
    await sleep(300);
    s.rssRefilled = rssMib(pid);
    child.stdin!.write('poweroff -f\n');
    await new Promise((r) => {
      const t = setTimeout(r, 30_000);
      child.on('close', () => {
        clearTimeout(t);
        r(undefined);
      });
    });
  } catch (e) {
    s.error = (e as Error).message.slice(0, 2000);
    log(`${key}: ${s.error}`);
  } finally {
    ctl?.close();
    child.kill('SIGKILL');
  }
  log(
    `${key}: RSS ${s.rssBefore?.toFixed(0)} -> ${s.rssInflated?.toFixed(0)} -> ${s.rssRefilled?.toFixed(0)} MiB; inflate ${s.inflateMs?.toFixed(0)} ms, deflate ${s.deflateMs?.toFixed(0)} ms`,
  );
  return s;
}

export function summariseBalloon(samples: BalloonSample[], runs: number): SubSuiteOutput {
  const pick = (vmm: VmmName, f: (s: BalloonSample) => number | undefined) =>
    stat(
      samples
        .filter((s) => s.vmm === vmm && !s.error)
        .map(f)
        .filter((x): x is number => typeof x === 'number'),
    );
  const row = (
    metric: string,
    unit: string,
    f: (s: BalloonSample) => number | undefined,
    higherIsBetter: boolean,
    note?: string,
  ): Row => ({
    suite: 'lab',
    metric,
    unit,
    higherIsBetter,
    note,
    typervisor: pick('typervisor', f),
    qemu: pick('qemu', f),
  });
  const returned = (s: BalloonSample) =>
    s.rssBefore !== undefined && s.rssInflated !== undefined
      ? s.rssBefore - s.rssInflated
      : undefined;
  const rows: Row[] = [
    row(
      `balloon inflate by ${INFLATE_MIB} MiB: VMM RSS returned`,
      'MiB',
      returned,
      true,
      'QEMU: virtio-balloon-device through QMP',
    ),
    row(
      `balloon inflate by ${INFLATE_MIB} MiB: RSS returned, share of the balloon`,
      '%',
      (s) => {
        const r = returned(s);
        return r === undefined ? undefined : (r / INFLATE_MIB) * 100;
      },
      true,
    ),
    row(`balloon inflate by ${INFLATE_MIB} MiB: time`, 'ms', (s) => s.inflateMs, false),
    row(`balloon deflate from ${INFLATE_MIB} MiB: time`, 'ms', (s) => s.deflateMs, false),
  ];
  const missing = balloonPlan(runs).length - samples.length;
  return {
    rows,
    notes: [
      `balloon: ${runs} run(s) per VMM, alternating; ${MEM_MIB} MiB guest, 1 vCPU, initramfs shell; the guest dirties and frees all but ${LEAVE_FREE_MIB} MiB of its free memory first. Times run from the request to the balloon's actual size reaching the target (polled every ~20 ms: Typervisor GET /balloon/statistics, QEMU query-balloon). RSS is the VMM's VmRSS.`,
      'balloon: Typervisor PATCH /balloon (deflate_on_oom false, statistics every 60 s: the actual size is read from them); QEMU virtio-balloon-device with its defaults, QMP balloon (target guest size).',
      ...samples
        .filter((s) => s.rssRefilled !== undefined)
        .map(
          (s) =>
            `balloon ${s.key}: RSS ${s.rssBefore!.toFixed(0)} -> ${s.rssInflated!.toFixed(0)} MiB inflated -> ${s.rssRefilled!.toFixed(0)} MiB after deflating and refilling ${INFLATE_MIB} MiB.`,
        ),
      ...(missing > 0 ? [`${missing} VM run(s) missing (not measured).`] : []),
      ...samples.filter((s) => s.error).map((s) => `${s.key} failed: ${s.error}`),
    ],
  };
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: { runs: { type: 'string' }, resume: { type: 'string' } },
  });
  const runs = Number(values.runs ?? 1);
  const kvmKind = detectKvm().kind;
  // Unix sockets cannot live on the lab's /tmp (9p).
  const dir = mkdtempSync(existsSync('/dev/shm') ? '/dev/shm/tv-balloon-' : '/run/tv-balloon-');
  try {
    const samples = await runPlan(
      balloonPlan(runs),
      readResume<BalloonSample>(values.resume),
      (key) => measure(key, dir, kvmKind),
    );
    printSubSuiteOutput({ ...summariseBalloon(samples, runs), labHost: labHostInfo() });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

if (isMainModule(import.meta.url)) {
  main().catch((e) => {
    process.stderr.write(`lab-balloon: ${(e as Error).stack ?? e}\n`);
    process.exit(1);
  });
}

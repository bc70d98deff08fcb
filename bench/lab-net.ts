/**
 * Network and vsock in the lab (issue 5's benchmark), Typervisor vs QEMU microvm, same kernel,
 * same root disk, same lab, alternately. Run INSIDE the lab (bench/lab.ts does, or by hand):
 *
 *   npm run lab -- node dist/bench/lab-net.js [--runs N]
 *
 * Each VMM boots the project's Debian root disk (iperf3, socat, busybox ping) with one
 * virtio-net on a TAP in a network namespace of our own (bridge 169.254.10.1/16, the guest
 * 169.254.10.2; link-local only) and one vsock device:
 *   - Typervisor: `--net tap=tvtap0 --vsock cid=3,uds=...` (Firecracker's host side);
 *   - QEMU: `-netdev tap,vhost=off` + `virtio-net-device` (the same design: a userspace device
 *     on a TAP) and `vhost-vsock-device` (QEMU has no userspace vsock: the lab kernel's
 *     vhost_vsock does the work, so that row compares against an in-kernel data path).
 * Measured: iperf3 TCP guest->host and host->guest (Mbit/s, receiver side), ping guest->host
 * (busybox, average RTT) and a vsock stream of VSOCK_MIB MiB each way through socat (MB/s,
 * timed on the host from the start of the transfer to the last byte). Issue 17's notification
 * figures: the guest's virtio-net interrupts per MB iperf3 moved (its /proc/interrupts, both
 * VMMs), and for Typervisor the frames per kick of each direction's data queue, from the
 * device's metrics (Firecracker's net_eth0 group, flushed through the API before and after
 * each iperf3 run): Typervisor runs in its Firecracker-style mode (`--api-sock --config-file
 * --metrics-path`, the same VM as `typervisor run` would build), QEMU has no such counters.
 *
 * Prints one JSON line `{ rows, notes }` between BENCH-JSON-BEGIN and BENCH-JSON-END, and a
 * Markdown table on stderr.
 */
import { spawn, spawnSync, type ChildProcess } from 'node:child_process';
import { existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { request } from 'node:http';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { detectKvm } from '../src/kvm/detect.js';
import { imagePaths } from '../src/lab/guest.js';
import { createNetFixture, type NetFixture } from '../src/lab/net-fixture.js';
import { iperfMBytes, iperfMbit } from '../src/lab/iperf.js';
import {
  TRACEFS,
  TYPERVISOR,
  freshImage,
  qemuCpu,
  stat,
  tracefsWriter,
  whatRuns,
  type Row,
} from './common.js';

/**
 * 'baseline': another build of Typervisor (--baseline DIR: a checkout with its dist/ built, e.g.
 * main), run like 'typervisor' in the same rotation, so a change is measured against its base
 * and QEMU in one lab run (its samples are in the JSON and the log, not in the rows).
 */
type Name = 'typervisor' | 'qemu' | 'baseline';
const isOurs = (n: Name) => n !== 'qemu';
const MEM_MIB = 512;
const CMDLINE = 'console=ttyS0 reboot=k panic=1 pci=off quiet';
const GUEST_ADDR = '169.254.10.2';
const GUEST_MAC = '06:00:a9:fe:0a:02';
const GUEST_CID = 3;
/** The interface's iface_id: its metrics group is net_<id>. */
const IFACE = 'eth0';
const IPERF_SECONDS = 4;
const PINGS = 10;
/** Pings of `--only ping`. */
const PINGS_ONLY = 30;
/**
 * TYPERVISOR_BENCH_NODE_FLAGS="--trace-gc ...": Node/V8 flags for our VMM's process (a
 * diagnosis: V8 flags change the code caches' key, so those runs take dist/ un-bundled,
 * TYPERVISOR_NO_BUNDLE, and leave dist/bundle alone). With --trace-gc, the ping and the vsock
 * host -> guest transfer log each isolate's collections during them (V8 prints them on stdout,
 * the console's stream).
 */
const NODE_FLAGS = (process.env.TYPERVISOR_BENCH_NODE_FLAGS ?? '').split(' ').filter(Boolean);
/**
 * TYPERVISOR_BENCH_VSOCK_BACKEND=vhost: our VMM's vsock on the vhost backend (the lab kernel's
 * vhost-vsock, as QEMU's; host side AF_VSOCK for both) instead of the default unix backend
 * (Firecracker's Unix socket).
 */
const VSOCK_BACKEND = process.env.TYPERVISOR_BENCH_VSOCK_BACKEND ?? 'unix';
if (VSOCK_BACKEND !== 'unix' && VSOCK_BACKEND !== 'vhost')
  throw new Error(`TYPERVISOR_BENCH_VSOCK_BACKEND: unix or vhost (got ${VSOCK_BACKEND})`);
/** Whether VMM `name`'s vsock is on the vhost backend (ours, not a --baseline checkout's). */
const vhostVsock = (name: Name) => name === 'typervisor' && VSOCK_BACKEND === 'vhost';
/** Whether VMM `name`'s vsock host side is Firecracker's Unix socket (else AF_VSOCK). */
const unixVsock = (name: Name) => isOurs(name) && !vhostVsock(name);
if (NODE_FLAGS.length > 0) process.env.TYPERVISOR_NO_BUNDLE = '1';
const GC_LINE =
  /^\[\d+:(0x[0-9a-f]+)\]\s+[\d.]+ ms: (Scavenge|Mark-Compact|Mark-sweep|Minor)[^\n]*/gm;
/**
 * With --trace-gc in TYPERVISOR_BENCH_NODE_FLAGS: the collections V8 printed in `out` from `from`
 * on (our VMM's stdout, the console's stream), counted per isolate and kind, then the first 60
 * lines. Without the flag, nothing (not even the slice).
 */
function logGcs(what: string, out: string, from: number): void {
  if (!NODE_FLAGS.includes('--trace-gc')) return;
  const gcs = [...out.slice(from).matchAll(GC_LINE)];
  const per = new Map<string, number>();
  for (const g of gcs) per.set(`${g[1]} ${g[2]}`, (per.get(`${g[1]} ${g[2]}`) ?? 0) + 1);
  log(`${what}, per isolate: ${[...per].map(([k, v]) => `${k} x${v}`).join(', ') || 'none'}`);
  log(
    gcs
      .slice(0, 60)
      .map((g) => g[0])
      .join('\n'),
  );
}

/** KiB the guest prints on its console for the console row. */
const CONSOLE_KIB = 64;
const VSOCK_MIB = 32;
/** iperf3 streams per run (--parallel). */
let PARALLEL = 1;
const log = (s: string) => process.stderr.write(`lab-net: ${s}\n`);

/** A VMM process whose console we drive: send lines, wait for output. */
class Session {
  readonly child: ChildProcess;
  out = '';
  err = '';
  readonly exited: Promise<number | null>;
  private waiters: Array<() => void> = [];

  constructor(argv: string[]) {
    this.child = spawn(argv[0]!, argv.slice(1), { stdio: ['pipe', 'pipe', 'pipe'] });
    this.child.stdout!.on('data', (d: Buffer) => {
      this.out += d.toString('latin1');
      for (const w of [...this.waiters]) w();
    });
    this.child.stderr!.on('data', (d: Buffer) => (this.err += d.toString()));
    this.child.stdin!.on('error', () => undefined);
    this.exited = new Promise((resolve) =>
      this.child.on('close', (code, signal) => {
        // A VMM killed by a signal (a seccomp kill is SIGSYS) says so in the failures.
        if (signal) this.err += `\n[lab-net: the VMM was killed by ${signal}]\n`;
        resolve(code);
      }),
    );
  }

  send(text: string): void {
    this.child.stdin!.write(text);
  }

  /** The first match of `re` in the output after offset `from`. */
  waitFor(re: RegExp, timeoutMs: number, from = 0): Promise<RegExpMatchArray> {
    return new Promise((resolve, reject) => {
      let done = false;
      const check = () => {
        if (done) return true;
        const m = this.out.slice(from).match(re);
        if (!m) return false;
        done = true;
        clearTimeout(timer);
        this.waiters = this.waiters.filter((w) => w !== check);
        resolve(m);
        return true;
      };
      const timer = setTimeout(() => {
        done = true;
        this.waiters = this.waiters.filter((w) => w !== check);
        reject(new Error(`no ${re} within ${timeoutMs} ms\n${this.tail()}`));
      }, timeoutMs);
      if (check()) return;
      this.waiters.push(check);
      void this.exited.then(() => {
        if (!check()) {
          done = true;
          clearTimeout(timer);
          reject(new Error(`VMM exited before ${re}\n${this.tail()}`));
        }
      });
    });
  }

  /** Runs a shell line in the guest and returns the text it printed between two markers. */
  async run(cmd: string, timeoutMs: number): Promise<string> {
    const id = Math.random().toString(36).slice(2, 8);
    const from = this.out.length;
    // The markers are split in the command so that the echoed command line does not match.
    this.send(`echo "B-${id}""-B"; ${cmd}; echo "E-${id}""-E"\n`);
    const re = new RegExp(`B-${id}-B\\r?\\n([\\s\\S]*?)E-${id}-E`);
    return (await this.waitFor(re, timeoutMs, from))[1]!;
  }

  tail(): string {
    return `--- stdout ---\n${this.out.slice(-3000)}\n--- stderr ---\n${this.err.slice(-2000)}`;
  }
}

/** Host-side helper (runs in the namespace / next to the VMM): counts bytes. */
const HELPER = `
const [mode] = process.argv.slice(2);
if (mode === 'count') {
  // Reads stdin to EOF: prints bytes and ms from the first byte to EOF.
  let n = 0, t0 = 0;
  process.stdin.on('data', (d) => { if (!n) t0 = performance.now(); n += d.length; });
  process.stdin.on('end', () => console.log('COUNT ' + n + ' ' + (performance.now() - t0).toFixed(1)));
}
`;

interface Sample {
  vmm: Name;
  bootMs?: number;
  g2hMbit?: number;
  h2gMbit?: number;
  /** virtio-net interrupts the guest took per MB iperf3 moved (its /proc/interrupts line). */
  g2hIrqPerMB?: number;
  h2gIrqPerMB?: number;
  /** Typervisor's metrics over one iperf3 run: TX frames per TX kick (guest -> host). */
  g2hTxFramesPerKick?: number;
  /** TX frames per batched TAP write (io_uring_enter; undefined: batching off or absent). */
  g2hTxFramesPerBatch?: number;
  /** RX frames per RX kick (host -> guest: the driver kicks RX only when we ran out). */
  h2gRxFramesPerKick?: number;
  /**
   * Typervisor's per-queue counters over each iperf3 run, per MB moved (the `typervisor` metrics
   * group): where a direction's interrupts come from (RX = queue 0, TX = queue 1).
   */
  g2hQueues?: QueueFigures;
  h2gQueues?: QueueFigures;
  pingMs?: number;
  /** Guest -> host through the 16550 console (a shell's output), KB/s, and our exits per KB. */
  consoleKBs?: number;
  consoleExitsPerKB?: number;
  vsockG2hMBs?: number;
  vsockH2gMBs?: number;
  errors: string[];
}

interface QueueFigures {
  rxFramesPerMB: number;
  txFramesPerMB: number;
  rxIrqsPerMB: number;
  txIrqsPerMB: number;
  rxIrqsSuppressedPerMB: number;
  txIrqsSuppressedPerMB: number;
  rxKicksPerMB: number;
  txKicksPerMB: number;
  /** TX turns per MB and their mean time (VirtioDevice's queue1_turns / queue1_turn_us). */
  txTurnsPerMB: number;
  txTurnMs: number;
}

/** The net device's per-queue counters (the metrics' `typervisor` group) per MB moved. */
function queueFigures(
  lines: string[],
  group: string,
  mb: number | undefined,
): QueueFigures | undefined {
  if (!mb) return undefined;
  const extra = (field: string) => sumMetric(lines, 'typervisor', `${group}.${field}`) / mb;
  return {
    rxFramesPerMB: sumMetric(lines, group, 'rx_packets_count') / mb,
    txFramesPerMB: sumMetric(lines, group, 'tx_packets_count') / mb,
    rxIrqsPerMB: extra('queue0_irqs'),
    txIrqsPerMB: extra('queue1_irqs'),
    rxIrqsSuppressedPerMB: extra('queue0_irqs_suppressed'),
    txIrqsSuppressedPerMB: extra('queue1_irqs_suppressed'),
    rxKicksPerMB: extra('queue0_kicks'),
    txKicksPerMB: extra('queue1_kicks'),
    txTurnsPerMB: extra('queue1_turns'),
    txTurnMs:
      sumMetric(lines, 'typervisor', `${group}.queue1_turn_us`) /
      1000 /
      Math.max(1, sumMetric(lines, 'typervisor', `${group}.queue1_turns`)),
  };
}

function vmmArgv(
  name: Name,
  net: NetFixture,
  root: string,
  uds: string,
  kvmKind: string,
  baseline: string | undefined,
) {
  const g = imagePaths('kernel').KERNEL!;
  const initrd = imagePaths('initramfs').INITRAMFS!;
  if (isOurs(name)) {
    // TYPERVISOR_BENCH_CPU_PROF=DIR: V8 CPU profiles of every thread of ours (the device worker's
    // included) written to DIR at exit, for finding where a transfer's time goes (seccomp off:
    // the profile is written by the exiting threads).
    const prof = process.env.TYPERVISOR_BENCH_CPU_PROF;
    // The VM `typervisor run --kernel --initrd --cmdline --memory --drive path=ROOT,root --net
    // tap=TAP,mac=MAC --vsock cid=3,uds=UDS` builds, from a config file, with the API socket
    // (FlushMetrics) and a metrics file: the device counters of each iperf3 run.
    const cfg = {
      'boot-source': { kernel_image_path: g, initrd_path: initrd, boot_args: CMDLINE },
      'machine-config': { vcpu_count: 1, mem_size_mib: MEM_MIB },
      drives: [
        { drive_id: 'rootfs', path_on_host: root, is_root_device: true, is_read_only: false },
      ],
      'network-interfaces': [{ iface_id: IFACE, host_dev_name: net.taps[0], guest_mac: GUEST_MAC }],
      vsock: vhostVsock(name)
        ? { guest_cid: GUEST_CID, backend: 'vhost' }
        : { guest_cid: GUEST_CID, uds_path: uds },
    };
    const f = fcFiles(uds);
    writeFileSync(f.config, JSON.stringify(cfg));
    rmSync(f.metrics, { force: true });
    rmSync(f.api, { force: true });
    return net.exec([
      process.execPath,
      ...(prof ? ['--cpu-prof', '--cpu-prof-dir', prof] : []),
      ...NODE_FLAGS,
      name === 'baseline' ? join(baseline!, 'bin', 'typervisor') : TYPERVISOR,
      '--api-sock',
      f.api,
      '--config-file',
      f.config,
      '--metrics-path',
      f.metrics,
      // TYPERVISOR_BENCH_NO_SECCOMP=1: without the filters (to tell a seccomp kill from a crash).
      ...(prof || process.env.TYPERVISOR_BENCH_NO_SECCOMP === '1' ? ['--no-seccomp'] : []),
    ]);
  }
  return net.exec([
    'qemu-system-x86_64',
    '-M',
    'microvm,acpi=on',
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
    '-no-reboot',
    '-global',
    'virtio-mmio.force-legacy=false',
    '-kernel',
    g,
    '-initrd',
    initrd,
    '-append',
    `${CMDLINE} root=/dev/vda rw`,
    '-drive',
    `id=root,file=${root},format=raw,if=none`,
    '-device',
    'virtio-blk-device,drive=root',
    '-netdev',
    `tap,id=n0,ifname=${net.taps[0]},script=no,downscript=no,vhost=off`,
    '-device',
    // TYPERVISOR_BENCH_QEMU_NET_OPTS: more properties for QEMU's virtio-net-device, to ask what
    // one of its features is worth (e.g. "mrg_rxbuf=off").
    `virtio-net-device,netdev=n0,mac=${GUEST_MAC}${process.env.TYPERVISOR_BENCH_QEMU_NET_OPTS ? `,${process.env.TYPERVISOR_BENCH_QEMU_NET_OPTS}` : ''}`,
    '-device',
    `vhost-vsock-device,guest-cid=${GUEST_CID}`,
    // TYPERVISOR_BENCH_QEMU_TRACE=1: QEMU's virtio kicks and notifications to a log (qemuQueues).
    ...(process.env.TYPERVISOR_BENCH_QEMU_TRACE
      ? [
          '-trace',
          'enable=virtio_notify',
          '-trace',
          'enable=virtio_queue_notify',
          '-D',
          qemuTrace(uds),
        ]
      : []),
  ]);
}

/** QEMU's trace log (TYPERVISOR_BENCH_QEMU_TRACE), next to the vsock socket. */
const qemuTrace = (uds: string) => `${uds}.qemu-trace.log`;

/** The trace log's lines so far (none without tracing). */
function traceLines(uds: string): string[] {
  try {
    return readFileSync(qemuTrace(uds), 'utf8').split('\n');
  } catch {
    return [];
  }
}

/**
 * QEMU's kicks (virtio_queue_notify) and notifications it asked for (virtio_notify: an
 * interrupt unless EVENT_IDX or NO_INTERRUPT says no, which the trace does not show) per MB,
 * by device and queue, over the trace lines of one iperf3 run.
 */
function qemuQueues(lines: string[], mb: number | undefined): string | undefined {
  if (!mb) return undefined;
  const queueOf = new Map<string, string>();
  const kicks = new Map<string, number>();
  const notifies = new Map<string, number>();
  for (const l of lines) {
    const k = /virtio_queue_notify vdev (0x[0-9a-f]+) n (\d+) vq (0x[0-9a-f]+)/.exec(l);
    if (k) {
      const q = `${k[1]}/${k[2]}`;
      queueOf.set(k[3]!, q);
      kicks.set(q, (kicks.get(q) ?? 0) + 1);
      continue;
    }
    const n = /virtio_notify vdev (0x[0-9a-f]+) vq (0x[0-9a-f]+)/.exec(l);
    if (n) {
      const q = queueOf.get(n[2]!) ?? `${n[1]}/vq ${n[2]}`;
      notifies.set(q, (notifies.get(q) ?? 0) + 1);
    }
  }
  const qs = [...new Set([...kicks.keys(), ...notifies.keys()])].sort();
  return qs
    .map(
      (q) =>
        `${q}: kicks ${((kicks.get(q) ?? 0) / mb).toFixed(2)}, notifications ${((notifies.get(q) ?? 0) / mb).toFixed(2)}`,
    )
    .join('; ');
}

/** The Firecracker-style mode's files, next to the vsock socket. */
function fcFiles(uds: string): { config: string; metrics: string; api: string } {
  return { config: `${uds}.config.json`, metrics: `${uds}.metrics.json`, api: `${uds}.api` };
}

/** PUT on the API socket: resolves with the status (Firecracker answers 204). */
function apiPut(sock: string, path: string, body: unknown): Promise<number> {
  const data = JSON.stringify(body);
  return new Promise((resolve, reject) => {
    const req = request(
      {
        socketPath: sock,
        method: 'PUT',
        path,
        headers: { 'Content-Type': 'application/json', 'Content-Length': Buffer.byteLength(data) },
        timeout: 30_000,
      },
      (res) => {
        res.resume();
        res.on('end', () => resolve(res.statusCode ?? 0));
      },
    );
    req.on('timeout', () => req.destroy(new Error(`PUT ${path}: no answer in 30 s`)));
    req.on('error', reject);
    req.end(data);
  });
}

/**
 * The metrics file's lines (one JSON object each, counters as deltas since the line before)
 * after a FlushMetrics: an iperf3 run's counters are the sum of the lines it added (the 60 s
 * periodic line may fall inside it).
 */
async function flushedLines(sock: string, file: string): Promise<string[]> {
  const st = await apiPut(sock, '/actions', { action_type: 'FlushMetrics' });
  if (st !== 204) throw new Error(`FlushMetrics answered ${st}`);
  return readFileSync(file, 'utf8').trim().split('\n');
}

/** Sum of `group`.`field` over metrics lines. */
function sumMetric(lines: string[], group: string, field: string): number {
  let n = 0;
  for (const l of lines) {
    const v = (JSON.parse(l) as Record<string, Record<string, unknown>>)[group]?.[field];
    if (typeof v === 'number') n += v;
  }
  return n;
}

/** a / b, or undefined without kicks. */
const ratio = (a: number, b: number) => (b > 0 ? a / b : undefined);

function background(argv: string[], stdin = false): { proc: ChildProcess; out: () => string } {
  const proc = spawn(argv[0]!, argv.slice(1), {
    stdio: [stdin ? 'pipe' : 'ignore', 'pipe', 'pipe'],
  });
  let out = '';
  proc.stdout!.on('data', (d: Buffer) => (out += d.toString()));
  proc.stderr!.on('data', (d: Buffer) => (out += d.toString()));
  return { proc, out: () => out };
}

async function waitOut(
  b: { proc: ChildProcess; out: () => string },
  re: RegExp,
  ms: number,
): Promise<RegExpMatchArray> {
  const t0 = Date.now();
  for (;;) {
    const m = b.out().match(re);
    if (m) return m;
    if (Date.now() - t0 > ms) throw new Error(`no ${re} within ${ms} ms: ${b.out().slice(-500)}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** The guest's interrupt line of its vsock device (as NET_IRQ_CMD for eth0's). */
const VSOCK_IRQ_CMD =
  'd=$(basename $(ls -d /sys/bus/virtio/drivers/vmw_vsock_virtio_transport/virtio* | head -1)); grep -w "$d" /proc/interrupts';

/**
 * The guest's interrupt count for eth0's virtio device (both VMMs use virtio-mmio: one line per
 * device in /proc/interrupts, named virtioN, the per-CPU columns summed). Issue 17: interrupts
 * per MB, measured the same way beside QEMU.
 */
const NET_IRQ_CMD =
  'd=$(basename $(readlink /sys/class/net/eth0/device)); grep -w "$d" /proc/interrupts';
function netIrqs(text: string): number | undefined {
  const line = text.split('\n').find((l) => /^\s*\d+:/.test(l) && /virtio\d+\s*$/.test(l));
  if (!line) return undefined;
  let sum = 0;
  for (const t of line.trim().split(/\s+/).slice(1)) {
    if (!/^\d+$/.test(t)) break;
    sum += Number(t);
  }
  return sum;
}

async function measure(
  iperfOut: () => string,
  name: Name,
  net: NetFixture,
  dir: string,
  root: string,
  kvmKind: string,
  only: 'vsock' | 'ping' | 'console' | undefined,
  baseline: string | undefined,
): Promise<Sample> {
  const vsockOnly = only === 'vsock';
  const s: Sample = { vmm: name, errors: [] };
  const uds = join(dir, 'v.sock');
  rmSync(uds, { force: true });
  const helper = join(dir, 'helper.mjs');
  const bytes = VSOCK_MIB * 1024 * 1024;
  const t0 = Date.now();
  const vm = new Session(vmmArgv(name, net, root, uds, kvmKind, baseline));
  const attempt = async (what: string, f: () => Promise<void>) => {
    try {
      await f();
    } catch (e) {
      s.errors.push(`${what}: ${(e as Error).message.split('\n')[0]}`);
      log(`${name} ${what} failed: ${(e as Error).message.slice(0, 4000)}`);
      log(`iperf3 server: ${iperfOut().slice(-1500)}`);
    }
  };
  try {
    await vm.waitFor(/TYPERVISOR-BOOT-OK/, 300_000);
    s.bootMs = Date.now() - t0;
    if (!vsockOnly) {
      await vm.run(
        `ip addr add ${GUEST_ADDR}/16 dev eth0; ip link set eth0 up; ` +
          `i=0; until busybox ping -c 1 -W 1 ${net.hostAddr} >/dev/null 2>&1; do i=$((i+1)); [ $i -gt 30 ] && break; done`,
        120_000,
      );
      // The console: CONSOLE_KIB of text printed by the guest's shell through its tty and the
      // 16550 (Linux's 8250 driver, interrupt-driven), timed on the host from the command to
      // the end marker; our vCPU exits for it from the metrics.
      if (only === undefined || only === 'console')
        await attempt('console', async () => {
          const fcm = fcFiles(uds);
          const ours = isOurs(name);
          const from = ours ? (await flushedLines(fcm.api, fcm.metrics)).length : -1;
          const t = performance.now();
          const out = await vm.run(
            `head -c ${CONSOLE_KIB * 1024} /dev/zero | tr '\\0' x; echo`,
            300_000,
          );
          const ms = performance.now() - t;
          const got = (out.match(/x/g) ?? []).length;
          if (got < CONSOLE_KIB * 1024)
            throw new Error(`console: ${got} of ${CONSOLE_KIB * 1024} bytes arrived`);
          s.consoleKBs = (CONSOLE_KIB * 1024) / ms;
          if (ours) {
            const m = (await flushedLines(fcm.api, fcm.metrics)).slice(from);
            const exits = sumMetric(m, 'vcpu', 'exit_io_in') + sumMetric(m, 'vcpu', 'exit_io_out');
            s.consoleExitsPerKB = exits / CONSOLE_KIB;
            const x = (f: string) => sumMetric(m, 'typervisor', `uart.${f}`);
            log(
              `${name}: console UART: interrupts ${x('interrupts')}, hold timer runs ${x('holdTimerRuns')}, holds it ended ${x('holdsEndedByTimer')}`,
            );
          }
          log(
            `${name}: console ${CONSOLE_KIB} KiB in ${ms.toFixed(0)} ms (${s.consoleKBs.toFixed(1)} KB/s)` +
              (s.consoleExitsPerKB === undefined
                ? ''
                : `, port-I/O exits per KiB ${s.consoleExitsPerKB.toFixed(0)}`),
          );
        });
      if (only !== 'console')
        await attempt('ping', async () => {
          const pings = only === 'ping' ? PINGS_ONLY : PINGS;
          // TYPERVISOR_BENCH_PING_WARM=N: N pings back to back first (each VMM's code warm).
          const warm = Number(process.env.TYPERVISOR_BENCH_PING_WARM ?? 0);
          if (warm > 0) await vm.run(`busybox ping -q -c ${warm} -i 0.02 ${net.hostAddr}`, 300_000);
          const sched = process.env.TYPERVISOR_BENCH_PING_SCHED === '1';
          const guestSide = 'cat /proc/interrupts; cat /proc/tty/driver/serial | head -3';
          if (sched) log(`${name}: guest before the ping:\n${await vm.run(guestSide, 30_000)}`);
          const before = sched ? schedSnapshot(vm.child.pid!) : undefined;
          const fcm = fcFiles(uds);
          const from =
            sched && isOurs(name) ? (await flushedLines(fcm.api, fcm.metrics)).length : -1;
          const q = process.env.TYPERVISOR_BENCH_PING_QUIET === '1' ? '-q ' : '';
          // TYPERVISOR_BENCH_PING_STRACE=1: the system calls of the VMM's main thread during the
          // pings (strace -p: that thread only), with times, in the log: what wakes it.
          const tracer =
            process.env.TYPERVISOR_BENCH_PING_STRACE === '1'
              ? background(['strace', '-tt', '-T', '-p', String(vm.child.pid!)])
              : undefined;
          if (tracer) await waitOut(tracer, /attached/, 10_000);
          // TYPERVISOR_BENCH_PING_PERF=1: where the VMM's main thread spends its CPU during the
          // pings (perf record -t: that thread only; the report by DSO and symbol, in the log).
          const perf =
            process.env.TYPERVISOR_BENCH_PING_PERF === '1'
              ? await perfProbe(['-t', String(vm.child.pid!)], [['--sort', 'dso,sym']])
              : undefined;
          const outFrom = vm.out.length;
          // TYPERVISOR_BENCH_PING_FTRACE=DIR: the lab kernel's trace of the pings (KVM's MMIO
          // and interrupt events, the scheduler's wake-ups and switches, the TAPs' frames; clock
          // CLOCK_MONOTONIC) into DIR/<vm>.trace, for bench/ping-timeline.py.
          const ftrace = process.env.TYPERVISOR_BENCH_PING_FTRACE;
          if (ftrace) ftraceStart(vm.child.pid!);
          const out = await vm.run(`busybox ping ${q}-c ${pings} -i 0.2 ${net.hostAddr}`, 120_000);
          if (ftrace) ftraceStop(join(ftrace, `${name}.trace`), vm.child.pid!);
          if (isOurs(name))
            logGcs(`${name}: V8 collections during ${pings} pings`, vm.out, outFrom);
          if (NODE_FLAGS.some((f) => f === '--trace-opt' || f === '--trace-deopt'))
            log(
              `${name}: V8 tier changes during the pings:\n${tierChanges(vm.out.slice(outFrom))}`,
            );
          if (tracer) {
            tracer.proc.kill('SIGINT');
            await new Promise((r) => tracer.proc.once('exit', r));
            const lines = tracer.out().split('\n');
            log(`${name}: main thread's system calls during the pings (${lines.length} lines):`);
            log(lines.slice(0, 400).join('\n'));
          }
          if (perf) log(`${name}: main thread's CPU during the pings (perf):\n${await perf()}`);
          if (before) log(`${name}: ${schedReport(before, schedSnapshot(vm.child.pid!), pings)}`);
          if (sched) log(`${name}: guest after the ping:\n${await vm.run(guestSide, 30_000)}`);
          if (from >= 0) {
            const m = (await flushedLines(fcm.api, fcm.metrics)).slice(from);
            const per = (g: string, f: string) => (sumMetric(m, g, f) / pings).toFixed(1);
            log(
              `${name}: vCPU exits to the VMM per ping: io_in ${per('vcpu', 'exit_io_in')}, io_out ${per('vcpu', 'exit_io_out')}, mmio_read ${per('vcpu', 'exit_mmio_read')}, mmio_write ${per('vcpu', 'exit_mmio_write')}; net ${IFACE}: tx kicks ${per(`net_${IFACE}`, 'tx_queue_event_count')}, rx frames ${per(`net_${IFACE}`, 'rx_packets_count')}, rx kicks ${per(`net_${IFACE}`, 'rx_queue_event_count')}, TAP readable ${per(`net_${IFACE}`, 'rx_tap_event_count')}; ${['queue0_irqs', 'queue0_irqs_coalesced', 'queue0_irqs_suppressed', 'queue0_turns', 'queue1_irqs', 'queue1_irqs_coalesced', 'queue1_irqs_suppressed', 'queue1_turns'].map((f) => `${f} ${per('typervisor', `net_${IFACE}.${f}`)}`).join(', ')}`,
            );
          }
          const m = /min\/avg\/max = ([\d.]+)\/([\d.]+)\/([\d.]+)/.exec(out);
          if (!m) throw new Error(`no ping summary: ${out.slice(-300)}`);
          s.pingMs = Number(m[2]);
          // Each RTT too: an average can be one slow reply (a GC, a timer) or all of them.
          const each = [...out.matchAll(/time=([\d.]+) ms/g)].map((x) => x[1]).join(' ');
          log(`${name}: ping min/avg/max ${m[1]}/${m[2]}/${m[3]} ms; each: ${each}`);
        });
      // --only ping / console: that alone.
      if (only !== 'ping' && only !== 'console') {
        const irqsPerMB = async (before: number | undefined, out: string) => {
          const after = netIrqs(await vm.run(NET_IRQ_CMD, 30_000));
          const mb = iperfMBytes(out);
          return before === undefined || after === undefined || !mb
            ? undefined
            : (after - before) / mb;
        };
        // Typervisor's device counters over one iperf3 run (the lines its flushes added).
        const fc = fcFiles(uds);
        const counted = async (run: () => Promise<void>): Promise<string[] | undefined> => {
          if (!isOurs(name)) return (await run(), undefined);
          const from = (await flushedLines(fc.api, fc.metrics)).length;
          await run();
          return (await flushedLines(fc.api, fc.metrics)).slice(from);
        };
        const group = `net_${IFACE}`;
        await attempt('iperf3 guest->host', async () => {
          const traced = traceLines(uds).length;
          const before = netIrqs(await vm.run(NET_IRQ_CMD, 30_000));
          let out = '';
          const m = await counted(async () => {
            out = await vm.run(
              `iperf3 -c ${net.hostAddr} -t ${IPERF_SECONDS} -P ${PARALLEL} -f m 2>&1 | tail -n 4`,
              120_000,
            );
          });
          s.g2hMbit = iperfMbit(out);
          if (s.g2hMbit === undefined) throw new Error(`no iperf3 summary: ${out.slice(-300)}`);
          s.g2hIrqPerMB = await irqsPerMB(before, out);
          if (m) {
            const frames = sumMetric(m, group, 'tx_packets_count');
            s.g2hTxFramesPerKick = ratio(frames, sumMetric(m, group, 'tx_queue_event_count'));
            s.g2hTxFramesPerBatch = ratio(frames, sumMetric(m, group, 'tx_batches'));
            s.g2hQueues = queueFigures(m, group, iperfMBytes(out));
          }
          const qt = qemuQueues(traceLines(uds).slice(traced), iperfMBytes(out));
          if (!isOurs(name) && qt) log(`qemu guest → host per MB: ${qt}`);
        });
        await attempt('iperf3 host->guest', async () => {
          const traced = traceLines(uds).length;
          const before = netIrqs(await vm.run(NET_IRQ_CMD, 30_000));
          let out = '';
          const m = await counted(async () => {
            out = await vm.run(
              `iperf3 -c ${net.hostAddr} -t ${IPERF_SECONDS} -P ${PARALLEL} -f m -R 2>&1 | tail -n 4`,
              120_000,
            );
          });
          s.h2gMbit = iperfMbit(out);
          if (s.h2gMbit === undefined) throw new Error(`no iperf3 summary: ${out.slice(-300)}`);
          s.h2gIrqPerMB = await irqsPerMB(before, out);
          if (m) {
            s.h2gRxFramesPerKick = ratio(
              sumMetric(m, group, 'rx_packets_count'),
              sumMetric(m, group, 'rx_queue_event_count'),
            );
            s.h2gQueues = queueFigures(m, group, iperfMBytes(out));
          }
          const qt = qemuQueues(traceLines(uds).slice(traced), iperfMBytes(out));
          if (!isOurs(name) && qt) log(`qemu host → guest per MB: ${qt}`);
        });
      }
    }
    if (only !== 'ping' && only !== 'console') {
      // TYPERVISOR_BENCH_VSOCK_SCHED=1: per MiB of each transfer, every thread's CPU (the VMM's,
      // QEMU's vhost worker, our host-side sender's) and the lab's CPUs' busy share.
      const vsockSched = process.env.TYPERVISOR_BENCH_VSOCK_SCHED === '1';
      await attempt('vsock guest->host', async () => {
        // socat on the host for both (Typervisor: the Unix socket `${uds}_5001`; QEMU: AF_VSOCK).
        const listen = unixVsock(name) ? `UNIX-LISTEN:${uds}_5001` : 'VSOCK-LISTEN:5001,reuseaddr';
        const counter = background([
          'sh',
          '-c',
          `socat -u -b 65536 ${listen} STDOUT | ${process.execPath} ${helper} count`,
        ]);
        try {
          const t = Date.now();
          while (unixVsock(name) && !existsSync(`${uds}_5001`) && Date.now() - t < 10_000)
            await new Promise((r) => setTimeout(r, 20));
          await new Promise((r) => setTimeout(r, 200));
          const probe = vsockSched ? schedProbe([vm.child.pid!]) : undefined;
          await vm.run(
            `head -c ${bytes} /dev/zero | socat -u -b 65536 - VSOCK-CONNECT:2:5001 || echo SOCAT-FAILED`,
            300_000,
          );
          if (probe) log(`${name}: vsock guest -> host: ${probe(bytes / 1048576)}`);
          const [, n, ms] = await waitOut(counter, /COUNT (\d+) ([\d.]+)\n/, 60_000);
          if (Number(n) !== bytes) throw new Error(`received ${n} of ${bytes} bytes`);
          s.vsockG2hMBs = bytes / 1e6 / (Number(ms) / 1000);
        } finally {
          counter.proc.kill('SIGKILL');
          rmSync(`${uds}_5001`, { force: true });
        }
      });
      // TYPERVISOR_BENCH_VSOCK_WARM=N: N transfers before the timed one, in the same VM (each
      // logged): what the first transfer costs beyond the later ones (V8 compiling our path).
      const vsockWarm = Number(process.env.TYPERVISOR_BENCH_VSOCK_WARM ?? 0);
      await attempt('vsock host->guest', async () => {
        for (let i = 0; i <= vsockWarm; i++)
          await h2g(i === vsockWarm ? '' : ` (warm-up ${i + 1})`);
      });
      async function h2g(label: string): Promise<void> {
        const from = vm.out.length;
        vm.send(
          `socat -u -b 65536 VSOCK-LISTEN:5002 - | wc -c | sed "s/^/H2GV /" & sleep 1; echo "LIST""EN-OK"\n`,
        );
        await vm.waitFor(/LISTEN-OK/, 60_000, from);
        // The same sender for both, started first and told to go once it is up: the clock
        // runs from "go" to the guest's count (the connection and the transfer). Ours sends
        // Firecracker's CONNECT line first (the VMM reads it byte by byte, so the data after it
        // wait in the socket). Until 2026-12-05 ours was a Node program timed from its spawn:
        // its start-up (1.4-3 s in the lab) was inside our figure, and its CPU beside ours.
        const to = unixVsock(name) ? `UNIX-CONNECT:${uds}` : `VSOCK-CONNECT:${GUEST_CID}:5002`;
        const data = unixVsock(name)
          ? `{ printf 'CONNECT 5002\\n'; head -c ${bytes} /dev/zero; }`
          : `head -c ${bytes} /dev/zero`;
        const sender = background(
          ['sh', '-c', `echo READY; read go; ${data} | socat -u -b 65536 - ${to}`],
          true,
        );
        try {
          await waitOut(sender, /READY/, 60_000);
          // With VSOCK_SCHED, also the guest's vsock interrupts and (ours) the device's
          // counters per MiB: what wakes whom.
          const irqsBefore = vsockSched ? netIrqs(await vm.run(VSOCK_IRQ_CMD, 30_000)) : undefined;
          const fcm = fcFiles(uds);
          const mFrom =
            vsockSched && isOurs(name) ? (await flushedLines(fcm.api, fcm.metrics)).length : -1;
          const probe = vsockSched ? schedProbe([vm.child.pid!]) : undefined;
          // TYPERVISOR_BENCH_VSOCK_PERF=1: every thread's CPU during the transfer by thread and
          // DSO, and by thread and symbol (perf record of the VMM's process and, for QEMU, of
          // its vhost worker), in the log.
          const perf =
            process.env.TYPERVISOR_BENCH_VSOCK_PERF === '1'
              ? await perfProbe(
                  ['-p', [vm.child.pid!, ...vhostWorkers(vm.child.pid!)].join(',')],
                  [
                    ['--sort', 'pid,dso'],
                    ['--sort', 'comm,dso', '--percentage', 'relative'],
                    ['--comms', 'tv-device', '--sort', 'dso,sym', '--percentage', 'relative'],
                    ['--comms', 'node', '--sort', 'dso,sym', '--percentage', 'relative'],
                  ],
                )
              : undefined;
          // TYPERVISOR_BENCH_VSOCK_STRACE=1: the system calls of each of our threads that ran
          // (strace -c -f on the process), per transfer, in the log.
          const tracer =
            process.env.TYPERVISOR_BENCH_VSOCK_STRACE === '1'
              ? background(['strace', '-c', '-f', '-p', String(vm.child.pid!)])
              : undefined;
          if (tracer) await waitOut(tracer, /attached/, 10_000);
          const t = performance.now();
          const outFrom = vm.out.length;
          sender.proc.stdin!.write('go\n');
          const [, n] = await vm.waitFor(/H2GV (\d+)\r?\n/, 300_000, from);
          const ms = performance.now() - t;
          if (isOurs(name))
            logGcs(`${name}: V8 collections during vsock host -> guest${label}`, vm.out, outFrom);
          if (probe) log(`${name}: vsock host -> guest${label}: ${probe(bytes / 1048576)}`);
          if (irqsBefore !== undefined) {
            const after = netIrqs(await vm.run(VSOCK_IRQ_CMD, 30_000));
            const mib = bytes / 1048576;
            const irq = after === undefined ? 'n/a' : ((after - irqsBefore) / mib).toFixed(1);
            let dev = '';
            if (mFrom >= 0) {
              const m = (await flushedLines(fcm.api, fcm.metrics)).slice(mFrom);
              // Firecracker's names in `vsock`, ours in `typervisor` (METRICS_EXTRAS).
              const sum = (f: string) =>
                sumMetric(m, 'vsock', f) + sumMetric(m, 'typervisor', `vsock.${f}`);
              const per = (f: string) => (sum(f) / mib).toFixed(1);
              dev = `; device: rx packets ${per('rx_packets_count')}, rx batches ${per('rx_batches')}, socket reads ${per('rx_reads')}, rx kicks ${per('rx_queue_event_count')}, tx kicks ${per('tx_queue_event_count')}, tx packets ${per('tx_packets_count')}, rx budget yields ${per('rx_budget_yields')}`;
            }
            log(`${name}: vsock host -> guest${label}, per MiB: guest interrupts ${irq}${dev}`);
          }
          if (perf)
            log(`${name}: vsock host -> guest${label}, CPU by thread (perf):\n${await perf()}`);
          if (tracer) {
            tracer.proc.kill('SIGINT');
            await new Promise((r) => tracer.proc.once('exit', r));
            log(
              `${name}: vsock host -> guest${label}, system calls (strace -c -f):\n${tracer.out()}`,
            );
          }
          if (Number(n) !== bytes)
            throw new Error(
              `guest received ${n} of ${bytes} bytes; sender: ${sender.out()}\n${vm.tail()}`,
            );
          if (NODE_FLAGS.some((f) => f === '--trace-opt' || f === '--trace-deopt'))
            log(
              `${name}: V8 tier changes during the transfer${label}:\n${tierChanges(vm.out.slice(from))}`,
            );
          const mbs = bytes / 1e6 / (ms / 1000);
          if (label) log(`${name}: vsock host -> guest${label}: ${mbs.toFixed(2)} MB/s`);
          else s.vsockH2gMBs = mbs;
        } finally {
          sender.proc.kill('SIGKILL');
        }
      }
    }
    vm.send('poweroff -f\n');
    const code = await Promise.race([
      vm.exited,
      new Promise<'timeout'>((r) => setTimeout(() => r('timeout'), 60_000)),
    ]);
    if (code !== 0) s.errors.push(`exit ${code}`);
  } catch (e) {
    s.errors.push((e as Error).message.split('\n')[0]!);
    log(`${name}: ${(e as Error).message.slice(0, 3000)}`);
  } finally {
    vm.child.kill('SIGKILL');
    await vm.exited;
  }
  return s;
}

/**
 * Starts a measurement of the threads of `pids` (schedSnapshot) and of the lab's CPUs
 * (/proc/stat); the function it returns reports both since then, per `units` (e.g. MiB moved).
 */
function schedProbe(pids: number[]): (units: number) => string {
  const snap = () => new Map(pids.flatMap((p) => [...schedSnapshot(p)]));
  const cpu = () => {
    const f = readFileSync('/proc/stat', 'utf8').split('\n')[0]!.trim().split(/\s+/).slice(1);
    const v = f.map(Number);
    return { total: v.reduce((a, b) => a + b, 0), idle: v[3]! + v[4]! };
  };
  const b = snap();
  const c = cpu();
  return (units) => {
    const c2 = cpu();
    const busy = 1 - (c2.idle - c.idle) / Math.max(1, c2.total - c.total);
    return `lab CPUs ${(busy * 100).toFixed(0)}% busy; ${schedReport(b, snap(), units, 'MiB')}`;
  };
}

/**
 * What `--trace-opt` / `--trace-deopt` printed (in the VMM's output): per function, how often it
 * was optimized and deoptimized (with the reasons), the most frequent first.
 */
function tierChanges(out: string): string {
  const per = new Map<string, { opt: number; deopt: number; why: Map<string, number> }>();
  const get = (f: string) => {
    let e = per.get(f);
    if (!e) per.set(f, (e = { opt: 0, deopt: 0, why: new Map() }));
    return e;
  };
  for (const line of out.split('\n')) {
    const fn =
      /<JSFunction ([^ >]*)/.exec(line)?.[1] ?? /<SharedFunctionInfo ([^ >]*)/.exec(line)?.[1];
    if (!fn) continue;
    if (line.includes('completed optimizing')) get(fn).opt++;
    else if (/bailout|deoptimiz/.test(line)) {
      const e = get(fn);
      e.deopt++;
      const why = /reason: ([^)\]]*)/.exec(line)?.[1]?.trim() ?? '?';
      e.why.set(why, (e.why.get(why) ?? 0) + 1);
    }
  }
  return [...per]
    .sort((a, b) => b[1].deopt + b[1].opt - (a[1].deopt + a[1].opt))
    .slice(0, 50)
    .map(
      ([f, e]) =>
        `${f}: optimized ${e.opt}, deoptimized ${e.deopt} ${[...e.why].map(([w, n]) => `${w} x${n}`).join('; ')}`,
    )
    .join('\n');
}

/** The kernel's vhost worker threads of process `pid` (QEMU's vhost-vsock: `vhost-PID`). */
function vhostWorkers(pid: number): number[] {
  const out: number[] = [];
  for (const p of readdirSync('/proc'))
    if (/^\d+$/.test(p))
      try {
        if (readFileSync(`/proc/${p}/comm`, 'utf8').trim() === `vhost-${pid}`) out.push(Number(p));
      } catch {
        // gone
      }
  return out;
}

/**
 * Starts `perf record -F 999` on `target` (`-t TID` or `-p PID,...`); the function it returns
 * stops it and gives `perf report`'s top lines for each argument list in `reports` (e.g.
 * `['--sort', 'dso,sym']`). In the lab perf has only a software clock, so the samples are few:
 * read shares, not single lines.
 */
async function perfProbe(target: string[], reports: string[][]): Promise<() => Promise<string>> {
  const data = `/dev/shm/tv-bench-${process.pid}.perf`;
  const rec = background(['perf', 'record', '-F', '999', ...target, '-o', data]);
  await new Promise((r) => setTimeout(r, 1000));
  return async () => {
    rec.proc.kill('SIGINT');
    await new Promise((r) => rec.proc.once('exit', r));
    const parts = [rec.out().trim()];
    for (const args of reports) {
      const base = ['report', '-i', data, '--stdio', '--no-children', '--percent-limit', '0.3'];
      const rep = spawnSync('perf', [...base, ...args], { encoding: 'utf8' });
      const lines = rep.stdout.split('\n').filter((l) => l && !l.startsWith('#'));
      parts.push(`perf report ${args.join(' ')}:`, lines.slice(0, 60).join('\n'));
    }
    rmSync(data, { force: true });
    return parts.join('\n');
  };
}

/**
 * TYPERVISOR_BENCH_PING_SCHED=1: per thread of the VMM's process, per ping: the times it was
 * put on a CPU, its CPU time and its time runnable but waiting for a CPU (the kernel's
 * /proc/PID/task/TID/schedstat before and after the pings). Every thread of ours and of QEMU's,
 * the vCPU threads included, side by side.
 */
const FTRACE_EVENTS = [
  'kvm/kvm_mmio',
  'kvm/kvm_userspace_exit',
  'kvm/kvm_set_irq',
  'kvm/kvm_ioapic_set_irq',
  'kvm/kvm_apic_accept_irq',
  'kvm/kvm_inj_virq',
  'kvm/kvm_vcpu_wakeup',
  'sched/sched_wakeup',
  'sched/sched_switch',
  'net/netif_receive_skb',
  'net/net_dev_xmit',
];

/** Starts the lab kernel's tracer on FTRACE_EVENTS (an empty buffer, CLOCK_MONOTONIC stamps). */
function ftraceStart(pid: number): void {
  const w = tracefsWriter();
  w('tracing_on', '0');
  w('trace_clock', 'mono');
  w('buffer_size_kb', '16384');
  w('set_event', '');
  for (const e of FTRACE_EVENTS) w(`events/${e}/enable`, '1');
  // The system calls of the VMM's threads (the kernel matches the filter on each thread id).
  const tids = readdirSync(`/proc/${pid}/task`);
  const filter = tids.map((t) => `common_pid == ${t}`).join(' || ');
  for (const e of ['sys_enter', 'sys_exit']) {
    w(`events/raw_syscalls/${e}/filter`, filter);
    w(`events/raw_syscalls/${e}/enable`, '1');
  }
  w('trace', '');
  w('tracing_on', '1');
}

/** Stops it and writes the trace (with the VMM's pid and threads first) to `file`. */
function ftraceStop(file: string, pid: number): void {
  writeFileSync(join(TRACEFS, 'tracing_on'), '0');
  const threads = readdirSync(`/proc/${pid}/task`).map(
    (t) => `# thread ${t} ${readFileSync(`/proc/${pid}/task/${t}/comm`, 'utf8').trim()}`,
  );
  writeFileSync(
    file,
    `# vmm pid ${pid}\n${threads.join('\n')}\n` + readFileSync(join(TRACEFS, 'trace'), 'utf8'),
  );
  writeFileSync(join(TRACEFS, 'set_event'), '');
  log(`ftrace of the pings: ${file}`);
}

function schedSnapshot(pid: number): Map<string, number[]> {
  const m = new Map<string, number[]>();
  let tids: string[] = [];
  try {
    tids = readdirSync(`/proc/${pid}/task`).map((t) => `${pid}/task/${t}`);
  } catch {
    return m;
  }
  // The kernel's vhost workers for this process (QEMU's vhost-vsock: kernel threads named
  // vhost-PID, outside its thread group), so that their CPU counts beside its threads'.
  tids.push(...vhostWorkers(pid).map(String));
  for (const t of tids) {
    try {
      const comm = readFileSync(`/proc/${t}/comm`, 'utf8').trim();
      const v = readFileSync(`/proc/${t}/schedstat`, 'utf8').trim().split(/\s+/);
      m.set(`${comm}[${t.split('/').pop()}]`, v.map(Number));
    } catch {
      // the thread ended
    }
  }
  return m;
}

function schedReport(
  before: Map<string, number[]>,
  after: Map<string, number[]>,
  pings: number,
  unit = 'ping',
): string {
  const rows: Array<[string, number, number, number]> = [];
  for (const [k, [run, wait, slices]] of after) {
    const b = before.get(k) ?? [0, 0, 0];
    const n = slices! - b[2]!;
    if (n > 0)
      rows.push([
        k,
        n / pings,
        (run! - b[0]!) / 1e6 / pings,
        (wait! - b[1]!) / 1e6 / Math.max(1, n),
      ]);
  }
  rows.sort((x, y) => y[2] - x[2]);
  return `per ${unit} (${pings}): ${rows
    .map(
      ([k, n, cpu, wait]) =>
        `${k} ${n.toFixed(1)} runs ${cpu.toFixed(3)} ms CPU ${wait.toFixed(3)} ms waiting each`,
    )
    .join('; ')}`;
}

async function main(): Promise<void> {
  const args = parseArgs({
    options: {
      runs: { type: 'string' },
      only: { type: 'string' },
      vmm: { type: 'string' },
      baseline: { type: 'string' },
      parallel: { type: 'string' },
    },
  }).values;
  // --parallel N: iperf3 -P N (N TCP streams; default 1). A diagnostic: a guest whose one
  // stream is held back by TCP small queues (TX completions) gains from more streams.
  PARALLEL = Number(args.parallel ?? 1);
  if (!Number.isInteger(PARALLEL) || PARALLEL < 1 || PARALLEL > 16)
    throw new Error(`--parallel: 1-16 streams (got ${args.parallel})`);
  const runs = Number(args.runs ?? 1);
  // Our VMMs (children of this process) write their per-queue counters too (queueFigures).
  process.env.TYPERVISOR_METRICS_EXTRAS = '1';
  // --only vsock: the vsock transfers alone (no ping, no iperf3), for work on vsock;
  // --only ping: the ping alone (PINGS_ONLY of them), for work on latency.
  // --only console: the console's throughput alone.
  if (
    args.only !== undefined &&
    args.only !== 'vsock' &&
    args.only !== 'ping' &&
    args.only !== 'console'
  )
    throw new Error(`--only: 'vsock', 'ping' or 'console' (got ${args.only})`);
  const only = args.only as 'vsock' | 'ping' | 'console' | undefined;
  // --vmm typervisor|qemu: one VMM only (a profile run; the comparison needs both).
  if (args.vmm !== undefined && args.vmm !== 'typervisor' && args.vmm !== 'qemu')
    throw new Error(`--vmm: 'typervisor' or 'qemu' (got ${args.vmm})`);
  const kvm = detectKvm();
  spawnSync('modprobe', ['vhost_vsock']);
  const rootSrc = imagePaths('rootfs').ROOTFS!;
  if (!existsSync(rootSrc))
    throw new Error('the Debian root disk is not built: npm run guest -- build rootfs');
  // Unix sockets cannot live on the lab's /tmp (9p): keep everything on /dev/shm.
  const dir = mkdtempSync('/dev/shm/tv-net-bench-');
  const net = createNetFixture('bench', 1);
  // iperf3 keeps each stream's buffer in a temp file: the lab's /tmp (9p) cannot hold one.
  const iperf = background(
    net.exec([
      'env',
      'TMPDIR=/dev/shm',
      'iperf3',
      '-s',
      '-B',
      net.hostAddr,
      '-f',
      'm',
      '--forceflush',
    ]),
  );
  const samples: Sample[] = [];
  try {
    writeFileSync(join(dir, 'helper.mjs'), HELPER);
    const root = join(dir, 'rootfs.ext4');
    await waitOut(iperf, /listening/i, 10_000);
    // Every VMM takes every place in turn, from a random first one. The fixed order before
    // (ours first in even rounds, a baseline always second) put ours first in every one-round
    // invocation, and in an A/A run (2026-12-07, one build in both places, one shared image)
    // the second place booted 0.8-3.5 s slower than the others.
    const vmms: Name[] = args.baseline
      ? ['typervisor', 'baseline', 'qemu']
      : ['typervisor', 'qemu'];
    if (args.vmm !== 'qemu') {
      log(`typervisor runs ${whatRuns()}`);
      if (args.baseline) log(`baseline runs ${whatRuns(args.baseline)}`);
    }
    const first = Math.floor(Math.random() * vmms.length);
    for (let r = 0; r < runs; r++) {
      const k = (first + r) % vmms.length;
      const order = [...vmms.slice(k), ...vmms.slice(0, k)];
      log(`run ${r + 1}: order ${order.join(', ')}`);
      for (const name of order.filter(
        (n) =>
          args.vmm === undefined ||
          n === args.vmm ||
          (n === 'baseline' && args.vmm === 'typervisor'),
      )) {
        // Each VM boots its own fresh copy (common.ts freshImage: a shared one favoured the first).
        freshImage(rootSrc, root);
        const t = Date.now();
        const s = await measure(iperf.out, name, net, dir, root, kvm.kind, only, args.baseline);
        samples.push(s);
        log(`run ${r + 1} ${name} (${Date.now() - t} ms): ${JSON.stringify(s)}`);
      }
    }
  } finally {
    iperf.proc.kill('SIGKILL');
    net.cleanup();
    rmSync(dir, { recursive: true, force: true });
  }
  const pick = (name: Name, f: (s: Sample) => number | undefined) =>
    stat(
      samples
        .filter((s) => s.vmm === name)
        .map(f)
        .filter((x): x is number => x !== undefined),
    );
  const row = (
    metric: string,
    unit: string,
    f: (s: Sample) => number | undefined,
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
  const rows: Row[] = [
    row(
      `iperf3 TCP guest → host (${IPERF_SECONDS} s)`,
      'Mbit/s',
      (s) => s.g2hMbit,
      true,
      'QEMU: virtio-net-device, TAP, vhost=off',
    ),
    row(`iperf3 TCP host → guest (${IPERF_SECONDS} s, -R)`, 'Mbit/s', (s) => s.h2gMbit, true),
    row(
      'virtio-net interrupts per MB, iperf3 guest → host',
      'irq/MB',
      (s) => s.g2hIrqPerMB,
      false,
      "the guest's /proc/interrupts line of eth0's device, over the MB iperf3 moved",
    ),
    row('virtio-net interrupts per MB, iperf3 host → guest', 'irq/MB', (s) => s.h2gIrqPerMB, false),
    row(
      'virtio-net TX frames per kick, iperf3 guest → host',
      'frames',
      (s) => s.g2hTxFramesPerKick,
      true,
      "Typervisor's metrics (tx_packets_count / tx_queue_event_count) over the iperf3 run; QEMU has no such counter",
    ),
    row(
      'virtio-net TX frames per batched TAP write, iperf3 guest → host',
      'frames',
      (s) => s.g2hTxFramesPerBatch,
      true,
      'tx_packets_count / tx_batches: frames per io_uring_enter (n/a: one writev per frame)',
    ),
    row(
      'virtio-net RX frames per RX kick, iperf3 host → guest',
      'frames',
      (s) => s.h2gRxFramesPerKick,
      true,
      'rx_packets_count / rx_queue_event_count: the driver kicks RX only after the device ran out of its buffers',
    ),
    row(
      `ping guest → host, average RTT (${only === 'ping' ? PINGS_ONLY : PINGS} pings)`,
      'ms',
      (s) => s.pingMs,
      false,
    ),
    row(
      `console guest → host (${CONSOLE_KIB} KiB through the 16550 and Linux's tty)`,
      'KB/s',
      (s) => s.consoleKBs,
      true,
    ),
    row(
      'console: vCPU port-I/O exits per KiB',
      'exits',
      (s) => s.consoleExitsPerKB,
      false,
      "Typervisor's metrics (exit_io_in + exit_io_out); QEMU has no such counter",
    ),
    row(
      `vsock stream guest → host (${VSOCK_MIB} MiB, socat)`,
      'MB/s',
      (s) => s.vsockG2hMBs,
      true,
      "QEMU: vhost-vsock (in the lab's kernel)",
    ),
    row(
      `vsock stream host → guest (${VSOCK_MIB} MiB, socat)`,
      'MB/s',
      (s) => s.vsockH2gMBs,
      true,
      "QEMU: vhost-vsock (in the lab's kernel)",
    ),
  ];
  const notes = [
    `net: ${runs} run(s) per VMM; the Debian root disk, ${MEM_MIB} MiB, 1 vCPU; one TAP on a bridge in a network namespace of our own (169.254.0.0/16); iperf3 ${IPERF_SECONDS} s per direction, ${PARALLEL} stream(s) (receiver's figure); vsock: ${VSOCK_MIB} MiB of zeros through socat (-b 65536) at both ends, timed on the host.`,
    'net: QEMU runs virtio-net-device on the TAP with vhost=off (a userspace device, like Typervisor) and vhost-vsock-device (QEMU has no userspace vsock).',
    `vsock: Typervisor's ${VSOCK_BACKEND} backend${VSOCK_BACKEND === 'vhost' ? " (the lab kernel's vhost-vsock, as QEMU's; AF_VSOCK host side for both)" : " (Firecracker's Unix-socket host side)"}.`,
    ...samples
      .filter((s) => s.errors.length > 0)
      .map((s) => `net: ${s.vmm}: ${s.errors.join('; ')}`),
  ];
  const md = [
    '| net in the lab | unit | Typervisor | QEMU | T/QEMU |',
    '|---|---|---|---|---|',
    ...rows.map(
      (r) =>
        `| ${r.metric} | ${r.unit} | ${r.typervisor?.median.toFixed(2) ?? 'n/a'} | ${r.qemu?.median.toFixed(2) ?? 'n/a'} | ${r.typervisor && r.qemu ? (r.typervisor.median / r.qemu.median).toFixed(2) + 'x' : 'n/a'} |`,
    ),
  ].join('\n');
  process.stderr.write(`${md}\n`);
  // Where each direction's interrupts and frames come from, per run (Typervisor's counters).
  for (const x of samples)
    for (const [dir, q] of [
      ['guest → host', x.g2hQueues],
      ['host → guest', x.h2gQueues],
    ] as const)
      if (q)
        log(
          `${x.vmm} ${dir} per MB: ${Object.entries(q)
            .map(([k, v]) => `${k} ${v.toFixed(2)}`)
            .join(', ')}`,
        );
  if (samples.some((s) => s.vmm === 'baseline')) {
    for (const [what, f] of [
      ['iperf3 guest → host Mbit/s', (s: Sample) => s.g2hMbit],
      ['iperf3 host → guest Mbit/s', (s: Sample) => s.h2gMbit],
      ['irq/MB guest → host', (s: Sample) => s.g2hIrqPerMB],
      ['irq/MB host → guest', (s: Sample) => s.h2gIrqPerMB],
      ['TX frames per kick', (s: Sample) => s.g2hTxFramesPerKick],
      ['TX frames per batch', (s: Sample) => s.g2hTxFramesPerBatch],
      ['RX frames per RX kick', (s: Sample) => s.h2gRxFramesPerKick],
      ['ping ms', (s: Sample) => s.pingMs],
      ['console KB/s', (s: Sample) => s.consoleKBs],
      ['vsock guest → host MB/s', (s: Sample) => s.vsockG2hMBs],
      ['vsock host → guest MB/s', (s: Sample) => s.vsockH2gMBs],
    ] as const) {
      const b = pick('baseline', f);
      log(`baseline ${what}: median ${b?.median.toFixed(2) ?? 'n/a'} (n=${b?.n ?? 0})`);
    }
  }
  process.stdout.write(
    `BENCH-JSON-BEGIN\n${JSON.stringify({ rows, notes, samples })}\nBENCH-JSON-END\n`,
  );
}

main().catch((e) => {
  process.stderr.write(`lab-net: ${(e as Error).stack ?? e}\n`);
  process.exit(1);
});

/**
 * A ping's device path on the host's own KVM (issue 17): the micro guest's polled virtio-net
 * driver (bench/guests/netloop.S) sends ICMP echo requests to the host one at a time and waits
 * for each reply, under Typervisor and under QEMU microvm (`-netdev tap,vhost=off` +
 * `virtio-net-device`: the same design, a userspace device on a TAP), run alternately. No
 * interrupt and no guest kernel: what differs is the VMM's kick → TAP write → TAP read → used
 * entry. The lab's ping (bench/lab-net.ts) runs the same path under emulation, where our
 * JavaScript costs ~200x what it costs on a host (docs/bench.md "Ping"); this is that path on
 * real KVM.
 *
 * Per round trip: ((D - S)[big] - (D - S)[small]) / (big - small) round trips, S and D being when
 * the guest's "S" (500 untimed round trips done: Typervisor's net warm-up is over by then) and
 * "D" (done) lines reached stdout: what the timing itself costs cancels, and the VMM's teardown
 * is not in it. Runs as root; the TAP lives in a network
 * namespace of its own (made, then removed), each VMM started there with `ip netns exec`.
 *
 *   node dist/bench/net-micro.js [--runs N] [--count N]
 *
 * --count: the big loop's round trips (default 5000; the small loop has 200).
 */
import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { detectKvm } from '../src/kvm/detect.js';
import { REPO, isMainModule, stat, type Row, type Vmm } from './common.js';
import { vmmFor } from './micro.js';

const SMALL = 200;
/** The loops with a pause after each round trip (build.sh: netloop-gap-small and -big). */
const GAP_SMALL = 50;
const GAP_BIG = 550;
const NS = 'tvnetmicro';
const TAP = 'tvnm0';
/** The guest's MAC, as netloop.S's request has it (the TAP's is 06:00:0a:c8:00:01). */
export const NETLOOP_GUEST_MAC = '06:00:0a:c8:00:02';

function sh(args: string[]): void {
  const r = spawnSync(args[0]!, args.slice(1), { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`${args.join(' ')}: ${r.stderr || r.error?.message}`);
}

/**
 * The host's side of netloop.S in a new network namespace `ns` (one of that name is replaced):
 * TAP `tap` with the MAC and address the guest's request is sent to, and a permanent neighbour
 * entry for the guest. Remove it with `ip netns delete ns`.
 */
export function setUpNetloopNamespace(ns: string, tap: string): void {
  spawnSync('ip', ['netns', 'delete', ns]);
  sh(['ip', 'netns', 'add', ns]);
  const inNs = (a: string[]) => sh(['ip', 'netns', 'exec', ns, ...a]);
  inNs(['ip', 'link', 'set', 'lo', 'up']);
  inNs(['ip', 'tuntap', 'add', 'dev', tap, 'mode', 'tap', 'vnet_hdr']);
  inNs(['ip', 'link', 'set', 'dev', tap, 'address', '06:00:0a:c8:00:01']);
  // No IPv6 on it: the kernel's own solicitations would only be frames for the guest to skip.
  inNs(['sysctl', '-q', '-w', `net.ipv6.conf.${tap}.disable_ipv6=1`]);
  inNs(['ip', 'addr', 'add', '10.200.0.1/24', 'dev', tap]);
  inNs(['ip', 'link', 'set', tap, 'up']);
  const guest = ['10.200.0.2', 'lladdr', NETLOOP_GUEST_MAC];
  inNs(['ip', 'neigh', 'replace', ...guest, 'dev', tap, 'nud', 'permanent']);
}

type Name = 'typervisor' | 'qemu';

/** The micro suite's VMM command (micro.ts) with a virtio-net device on the TAP, in the namespace. */
function vmm(name: Name, dir: string, guest: string, kvmKind: string): Vmm {
  const v = vmmFor(name, dir, guest, kvmKind);
  const net =
    name === 'typervisor'
      ? ['--net', `tap=${TAP},mac=${NETLOOP_GUEST_MAC}`]
      : [
          ...['-global', 'virtio-mmio.force-legacy=false'],
          ...['-netdev', `tap,id=n0,ifname=${TAP},script=no,downscript=no,vhost=off`],
          ...['-device', `virtio-net-device,netdev=n0,mac=${NETLOOP_GUEST_MAC}`],
        ];
  return { ...v, cmd: 'ip', args: ['netns', 'exec', NS, v.cmd, ...v.args, ...net] };
}

/**
 * From the guest's "S" (its untimed round trips done) to its "D" on stdout, ms (not to the
 * exit: a VMM's teardown varies more than a loop's length in the lab); the guest must have said
 * "D".
 */
async function loopMs(name: Name, dir: string, guest: string, kvmKind: string): Promise<number> {
  const v = vmm(name, dir, guest, kvmKind);
  const t0 = performance.now();
  const child = spawn(v.cmd, v.args, { stdio: ['ignore', 'pipe', 'pipe'] });
  let stdout = '';
  let stderr = '';
  let m = -1;
  let d = -1;
  child.stdout.on('data', (b: Buffer) => {
    stdout += b.toString('latin1');
    const now = performance.now() - t0;
    if (m < 0 && stdout.includes('S\n')) m = now;
    if (d < 0 && stdout.includes('D\n')) d = now;
  });
  child.stderr.on('data', (b: Buffer) => (stderr += b.toString()));
  const timer = setTimeout(() => child.kill('SIGKILL'), 120_000);
  const code = await new Promise<number | null>((r) => child.on('exit', (c) => r(c)));
  clearTimeout(timer);
  await new Promise<void>((r) =>
    child.stdout.readableEnded ? r() : child.stdout.on('close', () => r()),
  );
  const e = /E(.)/.exec(stdout);
  if (code !== 0 || m < 0 || d < 0 || e)
    throw new Error(
      `${name} ${guest}: exit ${code}; ${e ? `the guest failed (E${e[1]}: bench/guests/netloop.S)` : d < 0 ? 'no "D"' : 'no "S"'}; stdout ${JSON.stringify(stdout.slice(-200))}\n${stderr.slice(-2000)}`,
    );
  return d - m;
}

export async function netMicro(o: { runs: number; count: number; log: (s: string) => void }) {
  const kvmKind = (detectKvm() as { kind?: string }).kind ?? 'kvm';
  const dir = mkdtempSync(join(tmpdir(), 'typervisor-net-micro-'));
  const per: Record<Name, number[]> = { typervisor: [], qemu: [] };
  const perGap: Record<Name, number[]> = { typervisor: [], qemu: [] };
  try {
    sh([
      'sh',
      join(REPO, 'bench', 'guests', 'build.sh'),
      dir,
      '1000',
      '500',
      '200',
      String(o.count),
    ]);
    setUpNetloopNamespace(NS, TAP);
    const elf = (n: string) => `netloop-${n}`;
    const names: Name[] = ['typervisor', 'qemu'];
    for (let round = 0; round < o.runs; round++) {
      const order = round % 2 === 0 ? names : [...names].reverse();
      for (const name of order) {
        const s = await loopMs(name, dir, elf('small'), kvmKind);
        const b = await loopMs(name, dir, elf('big'), kvmKind);
        per[name].push(((b - s) * 1000) / (o.count - SMALL));
        const gs = await loopMs(name, dir, elf('gap-small'), kvmKind);
        const gb = await loopMs(name, dir, elf('gap-big'), kvmKind);
        perGap[name].push(((gb - gs) * 1000) / (GAP_BIG - GAP_SMALL));
      }
      o.log(`round ${round + 1}/${o.runs} done`);
    }
  } finally {
    spawnSync('ip', ['netns', 'delete', NS]);
    rmSync(dir, { recursive: true, force: true });
  }
  return { per, perGap };
}

/** Why this host cannot run it (root, a TUN device, iproute2), or undefined. */
export function netMicroSkipReason(): string | undefined {
  if (process.getuid?.() !== 0) return 'needs root (a TAP in a network namespace)';
  if (spawnSync('ip', ['-V']).status !== 0) return 'no ip (iproute2)';
  if (spawnSync('sh', ['-c', 'test -c /dev/net/tun']).status !== 0) return 'no /dev/net/tun';
  return undefined;
}

/** The micro suite's rows (bench/run.ts). */
export async function netMicroRows(
  runs: number,
  log: (s: string) => void,
  count = 5000,
): Promise<Row[]> {
  const { per, perGap } = await netMicro({ runs, count, log });
  const note =
    "bench/net-micro.ts: the polled virtio-net guest (bench/guests/netloop.S) sends ICMP echo requests to the host on a TAP, one at a time; QEMU: -netdev tap,vhost=off + virtio-net-device. Per round trip from the guest's own start and end lines, small and big loops subtracted.";
  return [
    {
      suite: 'micro',
      metric: `virtio-net echo round trip, back to back (${count - SMALL} round trips)`,
      unit: 'µs',
      typervisor: stat(per.typervisor),
      qemu: stat(per.qemu),
      note,
    },
    {
      suite: 'micro',
      metric: `virtio-net echo round trip + 2000 guest pause instructions (${GAP_BIG - GAP_SMALL} round trips)`,
      unit: 'µs',
      typervisor: stat(perGap.typervisor),
      qemu: stat(perGap.qemu),
      note: 'the pause (~1 ms on our PVM host) is the same guest code in both VMMs: compare the difference',
    },
  ];
}

async function main(): Promise<void> {
  const { values: v } = parseArgs({
    options: { runs: { type: 'string' }, count: { type: 'string' } },
  });
  const runs = Number(v.runs ?? 5);
  const count = Number(v.count ?? 5000);
  if (!Number.isInteger(runs) || runs < 1 || !Number.isInteger(count) || count <= SMALL)
    throw new Error(`usage: net-micro.js [--runs N] [--count N > ${SMALL}]`);
  const { per, perGap } = await netMicro({
    runs,
    count,
    log: (s) => process.stderr.write(`net-micro: ${s}\n`),
  });
  const f = (xs: number[]) => {
    const s = stat(xs)!;
    return `${s.median.toFixed(1)} (${s.min.toFixed(1)}–${s.max.toFixed(1)})`;
  };
  const ratio = (a: number[], b: number[]) => `${(stat(a)!.median / stat(b)!.median).toFixed(2)}x`;
  const diff = (a: number[], b: number[]) => `${(stat(a)!.median - stat(b)!.median).toFixed(1)} µs`;
  console.log(
    `| virtio-net echo round trip, µs, ${runs} interleaved rounds | Typervisor | QEMU microvm | Typervisor/QEMU | Typervisor - QEMU |`,
  );
  console.log('|---|---|---|---|---|');
  console.log(
    `| back to back (${count - SMALL} round trips) | ${f(per.typervisor)} | ${f(per.qemu)} | ${ratio(per.typervisor, per.qemu)} | ${diff(per.typervisor, per.qemu)} |`,
  );
  console.log(
    `| with 2000 pause instructions after each (${GAP_BIG - GAP_SMALL} round trips; the pause included) | ${f(perGap.typervisor)} | ${f(perGap.qemu)} | ${ratio(perGap.typervisor, perGap.qemu)} | ${diff(perGap.typervisor, perGap.qemu)} |`,
  );
}

if (isMainModule(import.meta.url)) await main();

/**
 * virtio-net round trip on the host, no KVM (issue 17: ping RTT): the real device worker thread
 * over memfd guest RAM and a real TAP, the guest's rings played by this thread (the mock driver,
 * as src/vmm/device-worker.test.ts does). Each round trip: an ICMP echo request goes on the TX
 * queue and its eventfd is written (what KVM does on the guest's kick); the host kernel answers
 * on the TAP; the round trip ends when the reply's used entry is in the RX ring. The interrupt
 * eventfd (irqfd) is read too, as KVM would.
 *
 * What it measures is the device worker's wake-ups (TX kick, TAP readable) and its work per
 * frame; the lab's ping (bench/lab-net.ts) pays the same path under emulation, many times slower.
 * The floor beside it: the same frame written to and the reply read from the TAP by this thread
 * in a loop (the kernel's part alone).
 *
 * Runs as root in a network namespace of its own (created, then removed): `node
 * dist/bench/net-rtt.js [--count N] [--gap-ms MS] [--warmup N] [--settle-ms MS] [--profile DIR]`.
 * The round trips start `--settle-ms` (1,000) after the device worker, as a guest's first ping
 * comes after its boot; beside the RTTs it prints each thread's CPU per round trip (the device
 * worker's first), from /proc/self/task/TID/schedstat.
 */
import { spawnSync } from 'node:child_process';
import { readFileSync, readdirSync, mkdirSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { Bus } from '../src/devices/bus.js';
import {
  MmioDriver,
  GuestAllocator,
  MockQueue,
} from '../src/devices/virtio/testing/mock-driver.js';
import { native } from '../src/kvm/native.js';
import { configureSeccomp } from '../src/sandbox/seccomp/install.js';
import { createGuestRam, mapGuestRam } from '../src/vmm/guest-ram.js';
import { startDeviceWorker } from '../src/vmm/device-worker-handle.js';
import { closeVirtio, planVirtioDevices, transportSlots } from '../src/vmm/virtio-plan.js';
import { attachVirtioTransports } from '../src/vmm/virtio-transport.js';
import { VIRTIO_NET_F_MAC, RX_QUEUE, TX_QUEUE } from '../src/devices/virtio/net/net.js';
import { VIRTIO_F_VERSION_1, bit } from '../src/devices/virtio/constants.js';
import { NET_HDR_SIZE } from '../src/devices/virtio/net/header.js';
import { openTap } from '../src/devices/virtio/net/tap.js';

const TAP = 'tvrtt0';
const HOST_IP = [10, 200, 0, 1];
const GUEST_IP = [10, 200, 0, 2];
const GUEST_MAC = '06:00:0a:c8:00:02';
const VIRTIO_F_RING_EVENT_IDX = 29;

function sh(args: string[]): void {
  const r = spawnSync(args[0]!, args.slice(1), { encoding: 'utf8' });
  if (r.status !== 0) throw new Error(`${args.join(' ')}: ${r.stderr || r.error?.message}`);
}

const macBytes = (m: string) => m.split(':').map((x) => parseInt(x, 16));

function csum(b: Uint8Array, off: number, len: number): number {
  let s = 0;
  for (let i = 0; i < len; i += 2) s += (b[off + i]! << 8) | (i + 1 < len ? b[off + i + 1]! : 0);
  while (s > 0xffff) s = (s & 0xffff) + (s >>> 16);
  return ~s & 0xffff;
}

/** Ethernet + IPv4 + ICMP echo request with 56 bytes of data (ping's default), 98 bytes. */
function echoFrame(dst: number[], seq: number): Uint8Array {
  const f = new Uint8Array(98);
  const v = new DataView(f.buffer);
  f.set(dst, 0);
  f.set(macBytes(GUEST_MAC), 6);
  v.setUint16(12, 0x0800);
  f[14] = 0x45;
  v.setUint16(16, 84);
  v.setUint16(18, seq);
  f[22] = 64;
  f[23] = 1;
  f.set(GUEST_IP, 26);
  f.set(HOST_IP, 30);
  v.setUint16(24, csum(f, 14, 20));
  f[34] = 8;
  v.setUint16(38, 0x1234);
  v.setUint16(40, seq);
  for (let i = 42; i < 98; i++) f[i] = i;
  v.setUint16(36, csum(f, 34, 64));
  return f;
}

const stat = (xs: number[]) => {
  const s = [...xs].sort((a, b) => a - b);
  const q = (p: number) => s[Math.min(s.length - 1, Math.floor(p * s.length))]!;
  return `median ${q(0.5).toFixed(1)} us (p10 ${q(0.1).toFixed(1)}, p90 ${q(0.9).toFixed(1)}, min ${s[0]!.toFixed(1)})`;
};

/** CPU ns of each of this process's threads but the main one (/proc/self/task/TID/schedstat). */
function threadCpu(): Map<string, number> {
  const out = new Map<string, number>();
  for (const tid of readdirSync('/proc/self/task')) {
    if (tid === String(process.pid)) continue;
    try {
      const [ns] = readFileSync(`/proc/self/task/${tid}/schedstat`, 'utf8').split(' ');
      const comm = readFileSync(`/proc/self/task/${tid}/comm`, 'utf8').trim();
      out.set(`${comm}/${tid}`, Number(ns));
    } catch {
      // the thread ended
    }
  }
  return out;
}

function spinUntil(f: () => boolean, what: string): void {
  const end = performance.now() + 2000;
  while (!f()) if (performance.now() > end) throw new Error(`no ${what} within 2 s`);
}

async function inNamespace(count: number, gapMs: number, warmup: number, settleMs: number) {
  const dstMac = macBytes(readFileSync(`/sys/class/net/${TAP}/address`, 'utf8').trim());
  const n = native();
  if (process.env.TV_RTT_NO_SECCOMP === '1') configureSeccomp({ mode: 'off' });
  const layout = createGuestRam([{ base: 0, size: 8 << 20 }]);
  const ram = mapGuestRam(layout);
  const plan = planVirtioDevices([{ kind: 'net', id: 'eth0', tap: TAP, mac: GUEST_MAC }]);
  const dw = startDeviceWorker(plan, layout, {
    log: (m) => process.stderr.write(`${m}\n`),
    onFatal: (m) => process.stderr.write(`FATAL ${m}\n`),
  });
  const slot = plan.slots[0]!;
  try {
    const mmio = new Bus();
    attachVirtioTransports(transportSlots(plan), plan.controlFd, mmio);
    const drv = new MmioDriver(mmio.resolve(slot.addr, 4)!.device);
    const mem = ram.memory;
    const alloc = new GuestAllocator(0x10000, 8 << 20);
    const want = bit(VIRTIO_F_VERSION_1) | bit(VIRTIO_NET_F_MAC) | bit(VIRTIO_F_RING_EVENT_IDX);
    if (!drv.negotiate((f) => f & want)) throw new Error('features refused');
    const rx = new MockQueue(mem, alloc, 256);
    const tx = new MockQueue(mem, alloc, 256);
    drv.setupQueue(RX_QUEUE, rx);
    drv.setupQueue(TX_QUEUE, tx);
    drv.driverOk();
    const RXBUF = NET_HDR_SIZE + 1514;
    const post = () => rx.addChain([{ addr: alloc.alloc(RXBUF), len: RXBUF, write: true }]);
    for (let i = 0; i < 128; i++) post();
    n.eventfdWrite(slot.queueFds[RX_QUEUE]!, 1);
    const txBuf = alloc.alloc(NET_HDR_SIZE + 98);
    const irq = slot.irqFd;

    const rtt: number[] = [];
    let cpu0: Map<string, number> | undefined;
    let rxSeen = 0;
    let txSeen = 0;
    const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
    // As a guest's first ping comes after its boot: the device worker is up and idle first.
    await sleep(settleMs);
    for (let i = 0; i < count + warmup; i++) {
      // The guest asks for an interrupt at the next used entry of both queues (Linux's NAPI).
      rx.setUsedEvent(rxSeen);
      tx.setUsedEvent(txSeen);
      mem.fill(txBuf, NET_HDR_SIZE, 0);
      mem.write(txBuf + NET_HDR_SIZE, echoFrame(dstMac, i & 0xffff));
      tx.addChain([{ addr: txBuf, len: NET_HDR_SIZE + 98 }]);
      if (i === warmup) cpu0 = threadCpu();
      const t0 = performance.now();
      n.eventfdWrite(slot.queueFds[TX_QUEUE]!, 1);
      spinUntil(() => rx.usedIdx() !== (rxSeen & 0xffff), 'echo reply');
      const t1 = performance.now();
      const used = rx.takeUsed();
      rxSeen += used.length;
      spinUntil(() => tx.usedIdx() !== (txSeen & 0xffff), 'TX completion');
      txSeen += tx.takeUsed().length;
      for (let k = 0; k < used.length; k++) post();
      n.eventfdRead(irq); // as KVM would (none if the driver's used_event said no)
      drv.takeInterrupt();
      if (i >= warmup) rtt.push((t1 - t0) * 1000);
      // The warm-up's round trips come back to back (the device worker's code gets hot).
      if (gapMs > 0 && i >= warmup - 1) await sleep(gapMs);
      else await new Promise((r) => setImmediate(r));
    }
    const cpu1 = threadCpu();
    // The threads that ran meanwhile (the device worker first), in us of CPU per round trip.
    const per = [...cpu1]
      .map(([tid, ns]) => ({ tid, us: (ns - (cpu0?.get(tid) ?? 0)) / 1000 / count }))
      .filter((t) => t.us >= 0.5)
      .sort((a, b) => b.us - a.us);
    console.log(
      `device worker: ICMP echo round trip ${stat(rtt)} over ${count}, gap ${gapMs} ms, after ${warmup} back to back`,
    );
    console.log(
      `CPU per round trip, other threads than main's (the device worker first): ${per.map((t) => `${t.tid} ${t.us.toFixed(1)}`).join(', ')} us`,
    );
  } finally {
    await dw.stop();
    closeVirtio(plan);
    ram.unmap();
    n.close(layout.memfd);
  }

  // The floor: the kernel alone, this thread writing the request and reading the reply.
  const { fd } = openTap(n, TAP);
  const out = new Uint8Array(NET_HDR_SIZE + 98);
  const inb = new Uint8Array(NET_HDR_SIZE + 1514);
  const floor: number[] = [];
  for (let i = 0; i < count + 20; i++) {
    out.set(echoFrame(dstMac, i & 0xffff), NET_HDR_SIZE);
    const t0 = performance.now();
    n.writev(fd, [out]);
    let got = -1;
    const end = t0 + 2000;
    while (got < 0 && performance.now() < end) {
      try {
        got = n.read(fd, inb);
      } catch {
        got = -1;
      }
    }
    const t1 = performance.now();
    if (i >= 20) floor.push((t1 - t0) * 1000);
    if (gapMs > 0) await new Promise((r) => setTimeout(r, gapMs));
  }
  console.log(`floor (TAP write + read, this thread): ${stat(floor)}, gap ${gapMs} ms`);
  n.close(fd);
}

async function main() {
  const { values: v } = parseArgs({
    options: {
      count: { type: 'string', default: '2000' },
      'gap-ms': { type: 'string', default: '0' },
      warmup: { type: 'string', default: '20' },
      'settle-ms': { type: 'string', default: '1000' },
      profile: { type: 'string' },
      'in-ns': { type: 'boolean' },
    },
  });
  const count = Number(v.count);
  const gap = Number(v['gap-ms']);
  if (v['in-ns']) return inNamespace(count, gap, Number(v.warmup), Number(v['settle-ms']));
  const ns = `tv-rtt-${process.pid}`;
  sh(['ip', 'netns', 'add', ns]);
  try {
    const inNs = (a: string[]) => sh(['ip', '-n', ns, ...a]);
    inNs(['link', 'set', 'lo', 'up']);
    inNs(['tuntap', 'add', 'dev', TAP, 'mode', 'tap', 'vnet_hdr']);
    inNs(['addr', 'add', `${HOST_IP.join('.')}/24`, 'dev', TAP]);
    inNs(['link', 'set', TAP, 'up']);
    inNs(['neigh', 'add', GUEST_IP.join('.'), 'lladdr', GUEST_MAC, 'dev', TAP, 'nud', 'permanent']);
    if (v.profile) mkdirSync(v.profile, { recursive: true });
    const r = spawnSync(
      'ip',
      [
        ...['netns', 'exec', ns, process.execPath],
        ...(v.profile ? ['--cpu-prof', '--cpu-prof-dir', v.profile] : []),
        ...[process.argv[1]!, '--in-ns', ...process.argv.slice(2)],
      ],
      {
        stdio: 'inherit',
        // The profiler writes its file from the worker's thread at exit, which its seccomp
        // filter forbids: with --profile the device worker runs without it.
        env: v.profile ? { ...process.env, TV_RTT_NO_SECCOMP: '1' } : process.env,
      },
    );
    if (r.status !== 0) process.exitCode = 1;
  } finally {
    spawnSync('ip', ['netns', 'delete', ns]);
  }
}

await main();

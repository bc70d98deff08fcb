/**
 * Where a ping's round trip goes, from the lab kernel's trace of it
 * (`TYPERVISOR_BENCH_PING_FTRACE=DIR node dist/bench/lab-net.js --only ping`, which writes
 * DIR/<vm>.trace): per ping, the times from the guest's TX kick (its QueueNotify write of queue 1)
 * to each later step, medians over the pings, for each trace given.
 *
 *   node dist/bench/ping-timeline.js DIR/*.trace
 *
 * Steps: the VMM thread that takes the kick is woken and put on a CPU, the echo request enters
 * the host's stack from the TAP, the reply leaves through the TAP, the guest's interrupt is set
 * (kvm_set_irq) and injected, the guest reads InterruptStatus (the read exits to the VMM and
 * completes; not with register pages, where it is a load) and writes InterruptACK. The pings' own RTTs are in lab-net's log.
 */
import { readFileSync } from 'node:fs';

interface Ev {
  t: number; // ms
  comm: string;
  tid: number;
  name: string;
  rest: string;
}

const LINE = /^\s*(.+)-(\d+)\s+\[\d+\]\s+\S+\s+(\d+\.\d+): (\w+): (.*)$/;

function parse(text: string): { pid: number; threads: Map<number, string>; evs: Ev[] } {
  let pid = 0;
  const threads = new Map<number, string>();
  const evs: Ev[] = [];
  for (const line of text.split('\n')) {
    let m = /^# vmm pid (\d+)/.exec(line);
    if (m) pid = Number(m[1]);
    m = /^# thread (\d+) (.*)$/.exec(line);
    if (m) threads.set(Number(m[1]), m[2]!);
    m = LINE.exec(line);
    if (m)
      evs.push({
        comm: m[1]!.trim(),
        tid: Number(m[2]),
        t: Number(m[3]) * 1000,
        name: m[4]!,
        rest: m[5]!,
      });
  }
  return { pid, threads, evs };
}

const SYSCALLS: Record<number, string> = {
  0: 'read',
  1: 'write',
  7: 'poll',
  16: 'ioctl',
  19: 'readv',
  20: 'writev',
  202: 'futex',
  228: 'clock_gettime',
  232: 'epoll_wait',
  233: 'epoll_ctl',
  271: 'ppoll',
  281: 'epoll_pwait',
  426: 'io_uring_enter',
  441: 'epoll_pwait2',
};

/** The lab-net fixture's TAP and bridge (tvtap0, tvbr0). */
const TAP = /dev=tv/;

const median = (a: number[]): number => {
  if (a.length === 0) return NaN;
  const s = [...a].sort((x, y) => x - y);
  const h = s.length >> 1;
  return s.length % 2 ? s[h]! : (s[h - 1]! + s[h]!) / 2;
};

function analyse(file: string): void {
  const { pid, threads, evs } = parse(readFileSync(file, 'utf8'));
  const ours = (tid: number) => threads.has(tid);
  const mmio = (e: Ev) => /^mmio (\S+) len \d+ gpa 0x([0-9a-f]+) val 0x([0-9a-f]+)/.exec(e.rest);
  // The TX kicks: QueueNotify (offset 0x50) writes of queue 1.
  const kicks = evs.filter((e) => {
    if (e.name !== 'kvm_mmio' || !ours(e.tid)) return false;
    const m = mmio(e);
    return m !== null && m[1] === 'write' && (parseInt(m[2]!, 16) & 0x1ff) === 0x50 && m[3] === '1';
  });
  if (kicks.length === 0) {
    console.log(`${file}: no TX kicks found (pid ${pid}, ${evs.length} events)`);
    return;
  }
  const base = parseInt(mmio(kicks[0]!)![2]!, 16) - 0x50;
  const steps: Record<string, number[]> = {};
  const add = (k: string, v: number | undefined) => {
    if (v !== undefined) (steps[k] ??= []).push(v);
  };
  const writers = new Map<string, number>();
  let idx = 0;
  let shown = 0;
  const shapes = new Map<string, number[][]>();
  for (let i = 0; i < kicks.length; i++) {
    const k = kicks[i]!;
    const end = i + 1 < kicks.length ? kicks[i + 1]!.t : Infinity;
    while (idx < evs.length && evs[idx]!.t < k.t) idx++;
    const after = (from: number, pred: (e: Ev) => boolean): Ev | undefined => {
      for (let j = idx; j < evs.length && evs[j]!.t < end; j++)
        if (evs[j]!.t >= from && pred(evs[j]!)) return evs[j];
      return undefined;
    };
    const wake = after(k.t, (e) => {
      if (e.name !== 'sched_wakeup') return false;
      const m = /pid=(\d+)/.exec(e.rest);
      return m !== null && ours(Number(m[1])) && Number(m[1]) !== k.tid;
    });
    const woken = wake ? Number(/pid=(\d+)/.exec(wake.rest)![1]) : undefined;
    const run = wake
      ? after(wake.t, (e) => e.name === 'sched_switch' && e.rest.includes(`next_pid=${woken} `))
      : undefined;
    // The echo request entering the host from the TAP (the bridge's copy comes after it), the
    // reply leaving through it, and the GSI going up after that.
    const rx = after(k.t, (e) => e.name === 'netif_receive_skb' && TAP.test(e.rest));
    const tx = rx ? after(rx.t, (e) => e.name === 'net_dev_xmit' && TAP.test(e.rest)) : undefined;
    const irq = after(tx?.t ?? k.t, (e) => e.name === 'kvm_set_irq' && / level 1 /.test(e.rest));
    const inj = irq ? after(irq.t, (e) => e.name === 'kvm_inj_virq') : undefined;
    const isReg = (off: number, type: string) => (e: Ev) => {
      if (e.name !== 'kvm_mmio') return false;
      const m = mmio(e);
      return m !== null && m[1] === type && parseInt(m[2]!, 16) === base + off;
    };
    const isrAsk = after(inj?.t ?? irq?.t ?? k.t, isReg(0x60, 'unsatisfied-read'));
    const isr = isrAsk ? after(isrAsk.t, isReg(0x60, 'read')) : undefined;
    // With register pages (vmm/register-pages.ts) the read is a load, with no event: then the
    // acknowledgement is the handler's first trace.
    const ack = after(isr?.t ?? inj?.t ?? irq?.t ?? k.t, isReg(0x64, 'write'));
    const d = (e: Ev | undefined) => (e ? e.t - k.t : undefined);
    // The woken thread's system calls from when it ran until the interrupt was set.
    if (run && woken !== undefined) {
      const seq: string[] = [];
      for (let j = idx; j < evs.length && evs[j]!.t < end; j++) {
        const e = evs[j]!;
        if (e.t < run.t) continue;
        if (irq && e.t > irq.t) break;
        if (e.tid !== woken) continue;
        const m = /^NR (\d+)/.exec(e.rest);
        if (!m) continue;
        const nr = Number(m[1]);
        const what = `${e.name === 'sys_enter' ? '>' : '<'}${SYSCALLS[nr] ?? nr}`;
        seq.push(`${what}@${(e.t - k.t).toFixed(2)}`);
      }
      if (shown < 6) {
        shown++;
        console.log(
          `  ping ${i}: ${seq.join(' ')} | reply ${d(tx)?.toFixed(2)} irq ${d(irq)?.toFixed(2)}`,
        );
      }
      const key = seq.map((x) => x.split('@')[0]).join(' ');
      const times = seq.map((x) => Number(x.split('@')[1]));
      const g = (shapes.get(key) ?? shapes.set(key, []).get(key))!;
      g.push(times);
    }
    // The reply's way into the guest: the VMM's read of it from the TAP (a read of the 12-byte
    // virtio-net header and the 98-byte echo reply) and the first interrupt set after it.
    const got = after(
      k.t,
      (e) => e.name === 'sys_exit' && ours(e.tid) && /^NR (0|19) = 110$/.test(e.rest),
    );
    const irq2 = got
      ? after(got.t, (e) => e.name === 'kvm_set_irq' && / level 1 /.test(e.rest))
      : undefined;
    // The guest's first InterruptStatus read after the reply is in its ring: the handler that
    // goes on to find it (whichever interrupt brought it there).
    const isr2 = got ? after(got.t, isReg(0x60, 'read')) : undefined;
    add('a reply read from the TAP', d(got));
    add('b interrupt set after it', d(irq2));
    add('c the guest handles it (InterruptStatus read)', d(isr2));
    // Its acknowledgement, which every VMM sees (the read is none with register pages).
    add(
      'd the guest acknowledges it (InterruptACK)',
      d(got ? after(got.t, isReg(0x64, 'write')) : undefined),
    );
    if (rx) writers.set(`${rx.comm}-${rx.tid}`, (writers.get(`${rx.comm}-${rx.tid}`) ?? 0) + 1);
    add('1 woken (sched_wakeup)', d(wake));
    add('2 on a CPU (sched_switch)', d(run));
    add('3 request into the host (TAP)', d(rx));
    add('4 reply out of the host (TAP)', d(tx));
    add('5 interrupt set (kvm_set_irq)', d(irq));
    add('6 injected (kvm_inj_virq)', d(inj));
    add('7 InterruptStatus read exits', d(isrAsk));
    add('8 InterruptStatus read done', d(isr));
    add('9 InterruptACK written', d(ack));
  }
  console.log(`${file}: pid ${pid}, ${kicks.length} TX kicks, net base 0x${base.toString(16)}`);
  console.log(`  TAP writers: ${[...writers].map(([w, n]) => `${w} x${n}`).join(', ')}`);
  const common = [...shapes].sort((a, b) => b[1].length - a[1].length)[0];
  if (common && common[0] !== '') {
    const [key, rows] = common;
    const names = key.split(' ');
    console.log(`  the commonest sequence (${rows.length} pings), median time from the kick (ms):`);
    console.log(
      '   ' + names.map((n, c) => `${n}@${median(rows.map((r) => r[c]!)).toFixed(2)}`).join(' '),
    );
  }
  for (const [k, v] of Object.entries(steps).sort())
    console.log(
      `  ${k.padEnd(34)} median ${median(v).toFixed(3)} ms (n ${v.length}; min ${Math.min(...v).toFixed(3)}, max ${Math.max(...v).toFixed(3)})`,
    );
}

for (const f of process.argv.slice(2)) analyse(f);

// What the lab machine was doing when it stopped making progress (the harness's hung-lab
// detection, or its timeout), read from outside before QEMU is killed: which of QEMU's
// threads burn CPU and which sleep (and where), and where each emulated CPU is, from QEMU's
// monitor, twice ~2 s apart, with kernel addresses named from the lab kernel's /proc/kallsyms
// (lab-init.sh copies it out at boot). A lab that "froze" in QEMU (no thread runs) reads
// differently from one whose CPUs spin in the lab kernel or in a nested guest, and that is what
// tells a QEMU/TCG problem from a lab-kernel one.
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import net from 'node:net';
import { setTimeout as sleep } from 'node:timers/promises';

interface ThreadSample {
  tid: string;
  comm: string;
  state: string;
  ticks: number;
  wchan: string;
}

const read = (p: string) => {
  try {
    return readFileSync(p, 'utf8');
  } catch {
    return '';
  }
};

function threads(pid: number): ThreadSample[] {
  let tids: string[];
  try {
    tids = readdirSync(`/proc/${pid}/task`);
  } catch {
    return [];
  }
  const out: ThreadSample[] = [];
  for (const tid of tids) {
    const stat = read(`/proc/${pid}/task/${tid}/stat`);
    const close = stat.lastIndexOf(')');
    if (close < 0) continue;
    const comm = stat.slice(stat.indexOf('(') + 1, close);
    const f = stat.slice(close + 2).split(' '); // f[0] is field 3 (state)
    out.push({
      tid,
      comm,
      state: f[0] ?? '?',
      ticks: Number(f[11] ?? 0) + Number(f[12] ?? 0), // utime + stime (fields 14, 15)
      wchan: read(`/proc/${pid}/task/${tid}/wchan`).trim() || '-',
    });
  }
  return out;
}

/** Sends HMP commands to QEMU's monitor socket; the text each printed. */
export async function hmp(sock: string, cmds: string[], timeoutMs = 4000): Promise<string[]> {
  return await new Promise((resolve) => {
    const outs: string[] = [];
    let buf = '';
    let i = -1; // -1: waiting for the first prompt
    const c = net.connect(sock);
    const done = () => {
      clearTimeout(timer);
      c.destroy();
      resolve(outs);
    };
    const timer = setTimeout(() => {
      if (i >= 0 && i < cmds.length) outs.push(`${buf}\n(no prompt within ${timeoutMs} ms)`);
      done();
    }, timeoutMs);
    c.on('error', (e) => {
      outs.push(`monitor: ${e.message}`);
      done();
    });
    c.setEncoding('utf8');
    c.on('data', (d: string) => {
      buf += d;
      const at = buf.lastIndexOf('(qemu) ');
      if (at < 0) return;
      if (i >= 0) {
        // The echo of the command is the first line; the rest up to the prompt is its output.
        const text = buf
          .slice(0, at)
          .replace(/\r/g, '')
          .replace(/\x1b\[[0-9;]*[A-Za-z]/g, '');
        outs.push(text.split('\n').slice(1).join('\n').trim());
      }
      buf = '';
      i++;
      if (i >= cmds.length) done();
      else c.write(`${cmds[i]}\n`);
    });
  });
}

/**
 * Names kernel addresses from a System.map or /proc/kallsyms text (nearest symbol at or below,
 * as sym+0xoff, with its [module] if any).
 */
export class SymbolMap {
  private readonly addrs: bigint[] = [];
  private readonly names: string[] = [];

  constructor(text: string) {
    const rows: [bigint, string][] = [];
    for (const line of text.split('\n')) {
      const [a, t, n, mod] = line.split(/\s+/);
      if (!a || !n || !/^[tTwW]$/.test(t ?? '') || !/^[0-9a-f]+$/.test(a)) continue;
      rows.push([BigInt(`0x${a}`), mod ? `${n} ${mod}` : n]);
    }
    rows.sort((x, y) => (x[0] < y[0] ? -1 : x[0] > y[0] ? 1 : 0));
    for (const [a, n] of rows) {
      this.addrs.push(a);
      this.names.push(n);
    }
  }

  name(addr: bigint): string | undefined {
    let lo = 0;
    let hi = this.addrs.length - 1;
    if (hi < 0 || addr < this.addrs[0]!) return undefined;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (this.addrs[mid]! <= addr) lo = mid;
      else hi = mid - 1;
    }
    const off = addr - this.addrs[lo]!;
    return off < 0x100000n ? `${this.names[lo]}+0x${off.toString(16)}` : undefined;
  }
}

/** The lines of `info registers -a` worth reading, RIPs named. */
export function cpuLines(registers: string, map?: SymbolMap): string[] {
  const keep: string[] = [];
  for (const line of registers.split('\n')) {
    if (/^CPU#\d+/.test(line)) keep.push(line.trim());
    const rip = /^RIP=([0-9a-f]{16})\s+RFL=\S+\s+\[[^\]]*\]\s+(CPL=\d).*?(HLT=\d)/.exec(line);
    if (rip) {
      const sym = map?.name(BigInt(`0x${rip[1]}`));
      keep.push(`  RIP=${rip[1]}${sym ? ` <${sym}>` : ''} ${rip[2]} ${rip[3]}`);
    }
    const cr = /^CR0=(\S+)\s+CR2=(\S+)\s+CR3=(\S+)/.exec(line);
    if (cr) keep.push(`  CR0=${cr[1]} CR3=${cr[3]}`);
  }
  return keep;
}

/**
 * A few lines on the state of the lab's QEMU (pid) and its CPUs; at most ~10 s. Never throws.
 */
export async function labDiagnosis(pid: number, monitorSock: string, systemMap?: string) {
  const lines: string[] = [`lab diagnosis (QEMU pid ${pid}):`];
  try {
    const map = systemMap && existsSync(systemMap) ? new SymbolMap(read(systemMap)) : undefined;
    const a = threads(pid);
    const t0 = Date.now();
    const regs1 = existsSync(monitorSock)
      ? await hmp(monitorSock, ['info status', 'info cpus', 'info registers -a'])
      : [];
    await sleep(Math.max(0, 2000 - (Date.now() - t0)));
    const b = threads(pid);
    const secs = (Date.now() - t0) / 1000;
    const hz = 100; // USER_HZ on Linux
    lines.push(`QEMU threads over ${secs.toFixed(1)} s (CPU %, state, wchan):`);
    for (const t of b) {
      const before = a.find((x) => x.tid === t.tid);
      const pct = before ? ((t.ticks - before.ticks) / hz / secs) * 100 : NaN;
      lines.push(`  ${t.tid} ${t.comm}: ${pct.toFixed(0)}% ${t.state} ${t.wchan}`);
    }
    if (regs1.length === 0) lines.push('(no monitor socket)');
    else {
      lines.push(`status: ${regs1[0] ?? ''}`, ...(regs1[1] ?? '').split('\n').map((l) => `  ${l}`));
      lines.push('CPUs (1st look):', ...cpuLines(regs1[2] ?? '', map));
      const regs2 = await hmp(monitorSock, ['info registers -a']);
      lines.push('CPUs (2nd look, ~2 s later):', ...cpuLines(regs2[0] ?? '', map));
    }
    if (!map) lines.push('(no kallsyms from the lab: addresses not named)');
  } catch (e) {
    lines.push(`diagnosis failed: ${(e as Error).message}`);
  }
  return lines.join('\n');
}

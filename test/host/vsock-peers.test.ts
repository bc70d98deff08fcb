/**
 * Hostile host programs on a real virtio-vsock device (issue 12): peers that connect and never
 * send `CONNECT`, many of them under a low RLIMIT_NOFILE (so accept fails with EMFILE), and a
 * peer that never reads. The device runs in a child process (vsock-peers-child.ts: the real
 * descriptor, native sockets and epoll loop, a scripted guest on the mock driver); we measure
 * its CPU time over a few seconds, its budgets, and that guest and host connections still work
 * once the peers are gone. Needs the native shim and `prlimit` (util-linux), not /dev/kvm.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { type Server, type Socket, connect, createServer } from 'node:net';
import { join } from 'node:path';
import { REPO, tempDir } from './helpers.js';

const CHILD = join(REPO, 'dist', 'test', 'host', 'vsock-peers-child.js');
const SHIM = join(REPO, 'native', 'build', 'Release', 'typervisor_native.node');
const BUF_ALLOC = 256 * 1024;
const MAX_PENDING_HANDSHAKES = 64;

function skipReason(): string | undefined {
  if (!existsSync(SHIM)) return 'the native shim is not built';
  if (spawnSync('sh', ['-c', 'command -v prlimit']).status !== 0) return 'prlimit is missing';
  return undefined;
}

type Msg = Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any

/** The child: commands on stdin, JSON lines on stdout. Killed in `finally` by every test. */
class Child {
  private readonly msgs: Msg[] = [];
  private waiters: Array<() => void> = [];
  private buf = '';
  stderr = '';
  private constructor(readonly proc: ChildProcess) {
    proc.stdout!.on('data', (d: Buffer) => {
      this.buf += d.toString();
      for (let i = this.buf.indexOf('\n'); i >= 0; i = this.buf.indexOf('\n')) {
        this.msgs.push(JSON.parse(this.buf.slice(0, i)) as Msg);
        this.buf = this.buf.slice(i + 1);
      }
      for (const w of this.waiters.splice(0)) w();
    });
    proc.stderr!.on('data', (d: Buffer) => void (this.stderr += d.toString()));
    proc.on('exit', () => {
      for (const w of this.waiters.splice(0)) w();
    });
  }

  static async start(uds: string, nofile?: number): Promise<Child> {
    const argv = [process.execPath, CHILD, uds];
    const proc = nofile
      ? spawn('prlimit', [`--nofile=${nofile}:${nofile}`, ...argv], { stdio: 'pipe' })
      : spawn(argv[0]!, argv.slice(1), { stdio: 'pipe' });
    const c = new Child(proc);
    await c.next((m) => m.ready === true, 10_000);
    return c;
  }

  send(line: string): void {
    this.proc.stdin!.write(`${line}\n`);
  }

  /** The next message (after those already taken) that `pred` accepts. */
  async next(pred: (m: Msg) => boolean, timeoutMs: number): Promise<Msg> {
    const end = Date.now() + timeoutMs;
    for (;;) {
      const i = this.msgs.findIndex(pred);
      if (i >= 0) return this.msgs.splice(0, i + 1)[i]!;
      if (this.proc.exitCode !== null || this.proc.signalCode !== null)
        throw new Error(`the child ended (${this.proc.exitCode}): ${this.stderr}`);
      const left = end - Date.now();
      if (left <= 0) throw new Error(`no answer from the child in ${timeoutMs} ms: ${this.stderr}`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.waiters.push(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
  }

  async stats(): Promise<Msg> {
    this.send('stats');
    return (await this.next((m) => m.stats !== undefined && m.cpuMs === undefined, 5000)).stats;
  }

  /** CPU time of the child over `ms` of wall time, as a fraction, and its stats then. */
  async measure(ms: number): Promise<{ cpu: number; stats: Msg }> {
    this.send(`measure ${ms}`);
    const m = await this.next((x) => x.cpuMs !== undefined, ms + 5000);
    return { cpu: m.cpuMs / m.wallMs, stats: m.stats };
  }

  kill(): void {
    if (this.proc.exitCode === null && this.proc.signalCode === null) this.proc.kill('SIGKILL');
  }
}

async function until(what: string, cond: () => Promise<boolean>, timeoutMs: number) {
  const end = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** Connects to `path`; resolves once connected, or on error (returned, not thrown). */
function dial(path: string): Promise<{ sock: Socket; error?: Error }> {
  return new Promise((resolve) => {
    const sock = connect(path);
    sock.once('connect', () => resolve({ sock }));
    sock.once('error', (error) => resolve({ sock, error }));
  });
}

/** Reads from `sock` until `want(text so far)` holds. */
function readUntil(sock: Socket, want: (s: string) => boolean, timeoutMs: number) {
  return new Promise<string>((resolve, reject) => {
    let got = '';
    const t = setTimeout(
      () => reject(new Error(`read timed out; got ${JSON.stringify(got)}`)),
      timeoutMs,
    );
    sock.on('data', (d: Buffer) => {
      got += d.toString();
      if (want(got)) {
        clearTimeout(t);
        resolve(got);
      }
    });
  });
}

/** A host program listening on `${uds}_${port}` that answers each line with "echo:<line>". */
function echoServer(path: string): Promise<Server> {
  return new Promise((resolve) => {
    const s = createServer((c) => c.on('data', (d) => c.write(`echo:${d.toString()}`)));
    s.listen(path, () => resolve(s));
  });
}

/** A guest connection and a host-initiated one both work. */
async function connectionsWork(child: Child, uds: string): Promise<void> {
  const host = await dial(uds);
  assert.equal(host.error, undefined);
  try {
    host.sock.write('CONNECT 52\n');
    await readUntil(host.sock, (s) => /^OK \d+\n/.test(s), 10_000);
    const echoed = readUntil(host.sock, (s) => s.includes('ping'), 10_000);
    host.sock.write('ping');
    assert.ok((await echoed).includes('ping'), 'the guest echoed');
  } finally {
    host.sock.destroy();
  }
  child.send('connect 80 hello');
  const m = await child.next((x) => x.guestGot !== undefined, 10_000);
  assert.equal(m.guestGot, 'echo:hello');
}

const skip = skipReason();

test(
  'vsock peers: many silent peers under RLIMIT_NOFILE=64 (EMFILE): no busy loop; all works after',
  { skip, timeout: 60_000 },
  async (t) => {
    const dir = tempDir('typervisor-vsock-');
    const uds = join(dir, 'v.sock');
    const server = await echoServer(`${uds}_80`);
    const child = await Child.start(uds, 64);
    const peers: Socket[] = [];
    try {
      for (let i = 0; i < 100; i++) peers.push((await dial(uds)).sock);
      await new Promise((r) => setTimeout(r, 300));
      const { cpu, stats } = await child.measure(3000);
      t.diagnostic(
        `EMFILE: child CPU ${(cpu * 100).toFixed(1)}% over 3 s; accept_fails ${stats.metrics.accept_fails}; handshakes ${stats.budgets.handshakes}`,
      );
      assert.ok(stats.counters.acceptFails >= 1, 'accept did fail with EMFILE');
      assert.ok(stats.budgets.handshakes <= MAX_PENDING_HANDSHAKES);
      assert.ok(
        cpu < 0.3,
        `the child used ${(cpu * 100).toFixed(1)}% of a core (a busy loop is ~100%)`,
      );
      assert.ok(
        stats.logs.some((l: string) => l.includes('EMFILE')),
        'logged',
      );
      // The peers go away: their handshakes end (EOF) and descriptors come back.
      for (const p of peers) p.destroy();
      await until(
        'the handshakes to end',
        async () => (await child.stats()).budgets.handshakes === 0,
        15_000,
      );
      await connectionsWork(child, uds);
    } finally {
      for (const p of peers) p.destroy();
      child.kill();
      server.close();
    }
  },
);

test(
  'vsock peers: a peer that never sends CONNECT is closed after the handshake timeout',
  { skip, timeout: 30_000 },
  async (t) => {
    const dir = tempDir('typervisor-vsock-');
    const uds = join(dir, 'v.sock');
    const server = await echoServer(`${uds}_80`);
    const child = await Child.start(uds);
    let peer: Socket | undefined;
    try {
      const t0 = Date.now();
      const d = await dial(uds);
      peer = d.sock;
      assert.equal(d.error, undefined);
      const closed = new Promise<number>((resolve) =>
        peer!.on('close', () => resolve(Date.now() - t0)),
      );
      peer.on('error', () => {});
      const { cpu } = await child.measure(2000);
      assert.ok(cpu < 0.3, `CPU ${(cpu * 100).toFixed(1)}% while a peer is silent`);
      const after = await closed;
      t.diagnostic(`silent peer closed after ${after} ms; child CPU ${(cpu * 100).toFixed(1)}%`);
      assert.ok(after >= 4000 && after < 9000, `closed after ${after} ms`);
      const stats = await child.stats();
      assert.equal(stats.counters.handshakeTimeouts, 1);
      assert.equal(stats.budgets.handshakes, 0);
      await connectionsWork(child, uds);
    } finally {
      peer?.destroy();
      child.kill();
      server.close();
    }
  },
);

test(
  'vsock peers: a host program that never reads holds at most the credit; no busy loop',
  { skip, timeout: 30_000 },
  async (t) => {
    const dir = tempDir('typervisor-vsock-');
    const uds = join(dir, 'v.sock');
    const server = await echoServer(`${uds}_80`);
    const accepted: Socket[] = [];
    const sink = await new Promise<Server>((resolve) => {
      const s = createServer((c) => {
        c.pause(); // never reads
        accepted.push(c);
      });
      s.listen(`${uds}_81`, () => resolve(s));
    });
    const child = await Child.start(uds);
    try {
      child.send('flood 81');
      await until(
        'the guest to be stalled',
        async () => {
          const s = await child.stats();
          return s.budgets.bufferedBytes > 0 && s.counters.txBytes > BUF_ALLOC;
        },
        10_000,
      );
      const { cpu, stats } = await child.measure(2000);
      t.diagnostic(
        `never-reading peer: ${stats.budgets.bufferedBytes} bytes held (${stats.budgets.bufferAllocated} allocated); child CPU ${(cpu * 100).toFixed(1)}%`,
      );
      assert.ok(cpu < 0.3, `CPU ${(cpu * 100).toFixed(1)}% while the peer does not read`);
      assert.ok(stats.budgets.bufferAllocated <= BUF_ALLOC);
      assert.equal(stats.counters.creditViolations, 0);
      assert.equal(stats.budgets.sockets, 1);
      // The stall is flow control, not a leak: once the peer reads, data flows again.
      const before = (await child.stats()).counters.txBytes;
      let got = 0;
      accepted[0]!.on('data', (d: Buffer) => void (got += d.length));
      accepted[0]!.resume();
      await until(
        'more guest data',
        async () => (await child.stats()).counters.txBytes > before + BUF_ALLOC,
        10_000,
      );
      assert.ok(got > 0);
      accepted[0]!.destroy();
      await connectionsWork(child, uds);
    } finally {
      for (const a of accepted) a.destroy();
      child.kill();
      server.close();
      sink.close();
    }
  },
);

test(
  'vsock peers: data right after CONNECT while the guest has not answered does not keep the loop busy',
  { skip, timeout: 30_000 },
  async (t) => {
    const dir = tempDir('typervisor-vsock-');
    const uds = join(dir, 'v.sock');
    const child = await Child.start(uds);
    let peer: Socket | undefined;
    try {
      child.send('mute');
      const d = await dial(uds);
      peer = d.sock;
      peer.on('error', () => {});
      peer.write('CONNECT 52\nearly data the guest cannot take yet');
      await until(
        'the connection to wait for the guest',
        async () => (await child.stats()).budgets.sockets === 1,
        5000,
      );
      const { cpu, stats } = await child.measure(3000);
      t.diagnostic(`waiting for the guest with data pending: child CPU ${(cpu * 100).toFixed(1)}%`);
      assert.ok(cpu < 0.3, `CPU ${(cpu * 100).toFixed(1)}% while the guest does not answer`);
      assert.equal(stats.counters.connectionsHost, 1);
    } finally {
      peer?.destroy();
      child.kill();
    }
  },
);

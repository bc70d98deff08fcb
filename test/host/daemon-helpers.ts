/**
 * Helpers for the daemon's host tests: start `typervisor serve` as a child process, wait for its
 * socket, poll a VM until a condition holds, and find processes by their command line.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, readlinkSync } from 'node:fs';
import { join } from 'node:path';
import { call } from '../api/client.js';
import { CLI, tempDir } from './helpers.js';

export interface DaemonProcess {
  child: ChildProcess;
  sock: string;
  stateDir: string;
  stderr(): string;
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  /** SIGTERM, then wait for its exit. */
  stop(): Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
}

export async function startDaemon(
  args: string[] = [],
  stateDir = join(tempDir('typervisor-daemon-'), 'state'),
  env: Record<string, string | undefined> = {},
): Promise<DaemonProcess> {
  const dir = tempDir('typervisor-daemon-sock-');
  const sock = join(dir, 'd.sock');
  const child = spawn(
    process.execPath,
    [CLI, 'serve', '--socket', sock, '--state-dir', stateDir, ...args],
    {
      stdio: ['ignore', 'ignore', 'pipe'],
      env: { ...process.env, TYPERVISOR_LOG: undefined, ...env },
    },
  );
  let err = '';
  child.stderr!.setEncoding('utf8').on('data', (s: string) => (err += s));
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((r) =>
    child.on('exit', (code, signal) => r({ code, signal })),
  );
  const deadline = Date.now() + 20_000;
  while (!existsSync(sock) || (await call(sock, 'GET', '/').catch(() => undefined)) === undefined) {
    if (child.exitCode !== null) throw new Error(`daemon exited early: ${err}`);
    if (Date.now() > deadline) throw new Error(`no daemon socket after 20 s: ${err}`);
    await sleep(20);
  }
  return {
    child,
    sock,
    stateDir,
    stderr: () => err,
    exited,
    async stop() {
      if (child.exitCode === null && child.signalCode === null) child.kill('SIGTERM');
      return exited;
    },
  };
}

export const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Polls GET /vms/{id} until `pred` holds (or throws after timeoutMs), returning the VM. */
export async function waitVm(
  sock: string,
  id: string,
  pred: (vm: any) => boolean, // eslint-disable-line @typescript-eslint/no-explicit-any
  timeoutMs = 20_000,
): Promise<any> {
  // eslint-disable-line @typescript-eslint/no-explicit-any
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const r = await call(sock, 'GET', `/vms/${id}`);
    if (r.status === 200 && pred(r.json)) return r.json;
    if (Date.now() > deadline) throw new Error(`VM ${id}: condition not met: ${r.body}`);
    await sleep(25);
  }
}

/**
 * Pauses a running VM through its own API socket, snapshots it (state and memory files in
 * `dir`), and creates VM `id` from that snapshot through the daemon, resumed: the create's answer.
 */
export async function snapshotAndRestore(
  daemonSock: string,
  vmSock: string,
  dir: string,
  id: string,
): Promise<Awaited<ReturnType<typeof call>>> {
  const paused = await call(vmSock, 'PATCH', '/vm', { state: 'Paused' });
  if (paused.status !== 204) throw new Error(`pause: ${paused.body}`);
  const snap = { snapshot_path: `${dir}/vm.state`, mem_file_path: `${dir}/vm.mem` };
  const c = await call(vmSock, 'PUT', '/snapshot/create', snap, 20_000);
  if (c.status !== 204) throw new Error(`snapshot: ${c.body}`);
  const load = {
    snapshot_path: snap.snapshot_path,
    mem_backend: { backend_type: 'File', backend_path: snap.mem_file_path },
    resume_vm: true,
  };
  return call(daemonSock, 'POST', '/vms', { vm_id: id, snapshot: load }, 20_000);
}

/** Waits until the pool reports `ready` warm VMMs. */
export async function waitPool(sock: string, ready: number, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const r = await call(sock, 'GET', '/pool');
    if (r.json?.ready >= ready) return;
    if (Date.now() > deadline) throw new Error(`pool not ready: ${r.body}`);
    await sleep(50);
  }
}

/** The node options a process runs with: its command line before the script. */
export function nodeOptionsOf(pid: number): string[] {
  const argv = readFileSync(`/proc/${pid}/cmdline`, 'utf8').split('\0');
  const script = argv.findIndex((a, i) => i > 0 && !a.startsWith('-'));
  return argv.slice(1, script);
}

/** The environment a process was started with (execve's), as KEY=value strings. */
export function environOf(pid: number): string[] {
  return readFileSync(`/proc/${pid}/environ`, 'utf8').split('\0').filter(Boolean);
}

/** How many KVM VMs a process holds: its anon_inode:kvm-vm descriptors. */
export function kvmVmFds(pid: number): number {
  return readdirSync(`/proc/${pid}/fd`).filter((f) => {
    try {
      return readlinkSync(`/proc/${pid}/fd/${f}`) === 'anon_inode:kvm-vm';
    } catch {
      return false; // closed meanwhile
    }
  }).length;
}

/** Pids of live processes whose command line contains `needle` (zombies excluded). */
export function pidsWith(needle: string): number[] {
  const out: number[] = [];
  for (const e of readdirSync('/proc')) {
    if (!/^\d+$/.test(e)) continue;
    try {
      const stat = readFileSync(`/proc/${e}/stat`, 'utf8');
      if (stat.slice(stat.lastIndexOf(')') + 2).startsWith('Z')) continue;
      if (readFileSync(`/proc/${e}/cmdline`, 'latin1').includes(needle)) out.push(Number(e));
    } catch {
      // gone meanwhile
    }
  }
  return out;
}

export function vmConfig(kernel: string): Record<string, unknown> {
  return {
    'boot-source': { kernel_image_path: kernel },
    'machine-config': { vcpu_count: 1, mem_size_mib: 32 },
  };
}

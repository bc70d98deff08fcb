/**
 * Helpers for tests that boot stock Linux guests with Typervisor. They need a KVM that runs
 * stock kernels (hardware VT-x/AMD-V): inside the lab on our PVM hosts, anywhere on real
 * hardware. Elsewhere they skip, saying why.
 */
import { execFileSync, spawn } from 'node:child_process';
import { existsSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { detectKvm } from '../../src/kvm/detect.js';
import { imagePaths, repoRoot } from '../../src/lab/guest.js';

export const kvm = detectKvm();
export const skipReason = kvm.canRunStockGuests
  ? undefined
  : `needs a KVM that runs stock kernels: ${kvm.reason}`;

/**
 * The guest's last command: a pause, then power off. A shell's output is in the guest's tty
 * buffer when the command returns, and the 8250 driver sends it to the UART from its transmit
 * interrupts: a `poweroff -f` right behind it can end the machine with the last lines still in
 * that buffer, never written to the UART. Seen in the lab with shadow paging (slower interrupt
 * handling in the guest): "echo CPUS=$(nproc)" ran and its line never came out.
 */
export const POWEROFF = 'sleep 1; poweroff -f';

export function defaultGuest(): { kernel: string; initrd: string } {
  const kernel = imagePaths('kernel').KERNEL!;
  const initrd = imagePaths('initramfs').INITRAMFS!;
  if (!existsSync(kernel) || !existsSync(initrd))
    throw new Error('default guest not built: run `npm run guest`');
  return { kernel, initrd };
}

/** The same command line as the QEMU comparisons, for --config-file boots. */
export const GUEST_BOOT_ARGS = 'console=ttyS0 reboot=k panic=1 pci=off quiet';

/**
 * Writes a --config-file at `path`: the default guest's boot-source and `sections` (machine-config
 * and the rest, in the file's shape). Returns `path`.
 */
export function writeGuestConfig(path: string, sections: Record<string, unknown>): string {
  const g = defaultGuest();
  writeFileSync(
    path,
    JSON.stringify({
      'boot-source': {
        kernel_image_path: g.kernel,
        initrd_path: g.initrd,
        boot_args: GUEST_BOOT_ARGS,
      },
      ...sections,
    }),
  );
  return path;
}

/**
 * Debian's generic kernel and an initramfs with its modules (`npm run guest -- build generic`):
 * it has CONFIG_VMGENID, which the default (cloud) kernel lacks.
 */
export function genericGuest(): { kernel: string; initrd: string } {
  const p = imagePaths('generic');
  const kernel = p.GENERIC_KERNEL!;
  const initrd = p.GENERIC_INITRAMFS!;
  if (!existsSync(kernel) || !existsSync(initrd))
    throw new Error('generic guest not built: run `npm run guest -- build generic`');
  return { kernel, initrd };
}

export interface RunResult {
  code: number | null;
  signal: NodeJS.Signals | null;
  stdout: string;
  stderr: string;
  ms: number;
}

/** Runs bin/typervisor with args, feeding `input` on stdin, killed after timeoutMs. */
export function typervisor(
  args: string[],
  input: string,
  timeoutMs = 120_000,
  /** Send `input` only once stdout matches this (default: at once, then EOF). */
  inputAfter?: RegExp,
): Promise<RunResult> {
  const bin = join(repoRoot(), 'bin', 'typervisor');
  const t0 = Date.now();
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [bin, ...args], { stdio: ['pipe', 'pipe', 'pipe'] });
    let stdout = '';
    let stderr = '';
    let sent = false;
    const send = () => {
      sent = true;
      child.stdin.end(input);
    };
    child.stdout.on('data', (d: Buffer) => {
      stdout += d.toString();
      if (!sent && inputAfter?.test(stdout)) send();
    });
    child.stderr.on('data', (d: Buffer) => (stderr += d.toString()));
    child.stdin.on('error', () => undefined);
    if (!inputAfter) send();
    const timer = setTimeout(() => child.kill('SIGKILL'), timeoutMs);
    child.on('close', (code, signal) => {
      clearTimeout(timer);
      resolve({ code, signal, stdout, stderr, ms: Date.now() - t0 });
    });
  });
}

/** Prints a run's output when an assertion about it fails. */
export function describeRun(r: RunResult): string {
  return `exit ${r.code} signal ${r.signal} after ${r.ms} ms\n--- stdout ---\n${r.stdout}\n--- stderr ---\n${r.stderr}`;
}

/**
 * One API request with curl over the VMM's Unix socket (the tool a user would reach for): the
 * status and the body. Throws when curl cannot connect (no socket yet).
 */
export function curl(
  sock: string,
  method: string,
  path: string,
  body?: unknown,
): { status: number; body: string } {
  const args = ['-s', '--unix-socket', sock, '-X', method, '-w', '\n%{http_code}'];
  args.push(`http://localhost${path}`);
  if (body !== undefined)
    args.push('-H', 'Content-Type: application/json', '-d', JSON.stringify(body));
  const out = execFileSync('curl', args, { encoding: 'utf8', timeout: 30_000 });
  const nl = out.lastIndexOf('\n');
  return { status: Number(out.slice(nl + 1)), body: out.slice(0, nl) };
}

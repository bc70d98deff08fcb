/**
 * The Firecracker-compatible API driving a stock Linux guest (run inside the lab): configure a
 * VM entirely with curl over the Unix socket, start it, pause it (the console stops), resume
 * it, Ctrl-Alt-Del it; and the same VM from a --config-file.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { repoRoot } from '../../src/lab/guest.js';
import { curl, defaultGuest, describeRun, POWEROFF, skipReason, typervisor } from './helpers.js';

const opts = { skip: skipReason, timeout: 300_000 };
const MARKER = /TYPERVISOR-BOOT-OK/;

async function until(
  what: string,
  cond: () => boolean,
  ms: number,
  log: () => string,
): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}\n${log()}`);
    await sleep(100);
  }
}

test(
  'configure, start, pause, resume and Ctrl-Alt-Del a guest through the API with curl',
  opts,
  async (t) => {
    const g = defaultGuest();
    // Not under /tmp: in the lab that is the host's /tmp over 9p, where Unix sockets cannot live.
    const dir = mkdtempSync(join(existsSync('/run') ? '/run' : tmpdir(), 'tv-api-'));
    const sock = join(dir, 'api.sock');
    const child = spawn(
      process.execPath,
      [join(repoRoot(), 'bin', 'typervisor'), '--api-sock', sock],
      {
        stdio: ['pipe', 'pipe', 'pipe'],
      },
    );
    let out = '';
    let err = '';
    child.stdout.on('data', (d: Buffer) => (out += d.toString()));
    child.stderr.on('data', (d: Buffer) => (err += d.toString()));
    const exited = new Promise<number | null>((r) => child.on('close', (code) => r(code)));
    const metrics = join(dir, 'metrics.json');
    // What the UART saw, first (CI shows the head of a failure): input the console held back
    // never reached the UART (read_count), or reached it and the guest took no interrupt.
    const uart = (): string => {
      try {
        curl(sock, 'PUT', '/actions', { action_type: 'FlushMetrics' });
        const sum: Record<string, number> = {};
        for (const line of readFileSync(metrics, 'utf8').trim().split('\n')) {
          const g = (JSON.parse(line) as Record<string, Record<string, number>>).uart ?? {};
          for (const [k, v] of Object.entries(g)) sum[k] = (sum[k] ?? 0) + Number(v);
        }
        return JSON.stringify(sum);
      } catch (e) {
        return `(no metrics: ${(e as Error).message})`;
      }
    };
    const log = () =>
      `uart: ${uart()}\n--- stdout (last 2000 chars) ---\n${out.slice(-2000)}\n` +
      `--- stderr ---\n${err.slice(-2000)}`;
    try {
      await until(
        'the API socket',
        () => {
          try {
            return curl(sock, 'GET', '/').status === 200;
          } catch {
            return false;
          }
        },
        20_000,
        log,
      );
      assert.equal(
        curl(sock, 'PUT', '/machine-config', { vcpu_count: 1, mem_size_mib: 256 }).status,
        204,
      );
      assert.equal(curl(sock, 'PUT', '/metrics', { metrics_path: metrics }).status, 204);
      assert.equal(
        curl(sock, 'PUT', '/boot-source', {
          kernel_image_path: g.kernel,
          initrd_path: g.initrd,
          boot_args: 'console=ttyS0 reboot=k panic=1 pci=off quiet',
        }).status,
        204,
      );
      const bad = curl(sock, 'PUT', '/machine-config', {
        vcpu_count: 1,
        mem_size_mib: 256,
        bogus: 1,
      });
      assert.equal(bad.status, 400, bad.body);
      assert.match(bad.body, /bogus/);
      const t0 = performance.now();
      const start = curl(sock, 'PUT', '/actions', { action_type: 'InstanceStart' });
      assert.equal(start.status, 204, start.body);
      await until('the boot marker', () => MARKER.test(out), 200_000, log);
      t.diagnostic(`InstanceStart to boot marker: ${(performance.now() - t0).toFixed(0)} ms`);
      // A clock on the console, and Ctrl-Alt-Del rebooting at once (no init to handle SIGINT).
      child.stdin.write(
        'echo 1 > /proc/sys/kernel/ctrl-alt-del\nwhile true; do echo tick; sleep 0.2; done &\n',
      );
      await until('ticks', () => (out.match(/^tick/gm) ?? []).length >= 3, 60_000, log);

      assert.equal(curl(sock, 'PATCH', '/vm', { state: 'Paused' }).status, 204);
      await sleep(500);
      const frozen = out.length;
      await sleep(2_000);
      assert.equal(out.length, frozen, `the console advanced while paused\n${log()}`);
      assert.equal(curl(sock, 'PATCH', '/vm', { state: 'Resumed' }).status, 204);
      await until('ticks after resume', () => out.length > frozen + 10, 30_000, log);

      const post = curl(sock, 'PUT', '/boot-source', { kernel_image_path: g.kernel });
      assert.equal(post.status, 400, 'boot-source is pre-boot only');
      assert.equal(curl(sock, 'PUT', '/actions', { action_type: 'SendCtrlAltDel' }).status, 204);
      const code = await Promise.race([exited, sleep(60_000).then(() => 'timeout')]);
      assert.equal(code, 0, `after Ctrl-Alt-Del: ${code}\n${log()}`);
    } finally {
      child.kill('SIGKILL');
      rmSync(dir, { recursive: true, force: true });
    }
  },
);

test('the same VM from --config-file --no-api', opts, async () => {
  const g = defaultGuest();
  const dir = mkdtempSync(join(tmpdir(), 'tv-cfg-'));
  try {
    const cfg = join(dir, 'vm.json');
    writeFileSync(
      cfg,
      JSON.stringify({
        'boot-source': {
          kernel_image_path: g.kernel,
          initrd_path: g.initrd,
          boot_args: 'console=ttyS0 reboot=k panic=1 pci=off quiet',
        },
        'machine-config': { vcpu_count: 2, mem_size_mib: 256 },
        entropy: {},
      }),
    );
    const r = await typervisor(
      ['--no-api', '--config-file', cfg],
      `echo CPUS=$(nproc)\n${POWEROFF}\n`,
      200_000,
      MARKER,
    );
    assert.equal(r.code, 0, describeRun(r));
    assert.match(r.stdout, /CPUS=2/, describeRun(r));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

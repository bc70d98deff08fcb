/**
 * virtio-balloon with Debian's driver (run inside the lab, issue 16), two boots:
 * - the guest dirties memory and frees it; inflating the balloon by N MiB makes the VMM's RSS
 *   drop by at least 80% of N (the pages leave the memfd); deflating gives them back (the
 *   guest fills them again and the RSS grows back); statistics arrive at the polling interval.
 * - free page reporting (`free_page_reporting: true`, no inflating): the guest negotiated the
 *   feature; it dirties most of its free memory (the VMM's RSS grows) and frees it, and within
 *   60 s Linux has reported the freed ranges (it reports 2 s after high-order pages are freed):
 *   the RSS drops back by at least 80% of what was dirtied, and the metrics'
 *   `free_page_report_freed` grew by as much. The guest fills that memory again (it is still
 *   the guest's: the host allocates it on touch) and the RSS grows back.
 * Takes ~40 s per boot in the lab.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { repoRoot } from '../../src/lab/guest.js';
import { defaultGuest, skipReason } from './helpers.js';

const opts = { skip: skipReason, timeout: 300_000 };
const MARKER = /TYPERVISOR-BOOT-OK/;
const MEM_MIB = 256;
const FILL_MIB = 160;
const INFLATE_MIB = 160;
/** Guest memory the first fill leaves free (so the balloon's pages are ones the host holds). */
const LEAVE_FREE_MIB = 12;

function curl(sock: string, method: string, path: string, body?: unknown) {
  const args = ['-s', '--unix-socket', sock, '-X', method, '-w', '\n%{http_code}'];
  args.push(`http://localhost${path}`);
  if (body !== undefined)
    args.push('-H', 'Content-Type: application/json', '-d', JSON.stringify(body));
  const out = execFileSync('curl', args, { encoding: 'utf8', timeout: 30_000 });
  const nl = out.lastIndexOf('\n');
  const text = out.slice(0, nl);
  let json: Record<string, number> = {};
  try {
    json = JSON.parse(text) as Record<string, number>;
  } catch {}
  return { status: Number(out.slice(nl + 1)), body: text, json };
}

/** The process's resident set in MiB (VmRSS: anonymous + file + shared memfd pages). */
function rssMib(pid: number): number {
  const m = /^VmRSS:\s+(\d+) kB/m.exec(readFileSync(`/proc/${pid}/status`, 'utf8'));
  return Number(m![1]) / 1024;
}

async function until<T>(what: string, get: () => T | undefined, ms: number, log: () => string) {
  const end = Date.now() + ms;
  for (;;) {
    const v = get();
    if (v !== undefined) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}\n${log()}`);
    await sleep(200);
  }
}

/** A VMM on an API socket with the default guest and `balloon`, booted to its marker. */
async function bootWithBalloon(balloon: Record<string, unknown>) {
  const g = defaultGuest();
  // Not under /tmp: in the lab that is the host's /tmp over 9p, where Unix sockets cannot live.
  const dir = mkdtempSync(join(existsSync('/run') ? '/run' : tmpdir(), 'tv-balloon-'));
  const sock = join(dir, 'api.sock');
  const metrics = join(dir, 'metrics.json');
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
  child.stdin.on('error', () => undefined);
  const log = () => `--- stdout ---\n${out.slice(-4000)}\n--- stderr ---\n${err.slice(-3000)}`;
  const vm = {
    pid: child.pid!,
    sock,
    log,
    /** Runs a guest shell command; resolves when it printed `tag`. */
    run: async (cmd: string, tag: string, ms = 60_000) => {
      const from = out.length;
      child.stdin.write(`${cmd}; echo ${tag}-$((6*7))\n`);
      await until(tag, () => (out.indexOf(`${tag}-42`, from) >= 0 ? true : undefined), ms, log);
      return out.slice(from);
    },
    stats: () => curl(sock, 'GET', '/balloon/statistics').json,
    /** A metric summed over the lines flushed so far (a line holds what changed since the last). */
    metric: (group: string, field: string): number => {
      assert.equal(curl(sock, 'PUT', '/actions', { action_type: 'FlushMetrics' }).status, 204);
      return readFileSync(metrics, 'utf8')
        .trim()
        .split('\n')
        .reduce(
          (a, l) =>
            a +
            Number((JSON.parse(l) as Record<string, Record<string, number>>)[group]?.[field] ?? 0),
          0,
        );
    },
    dispose: () => {
      child.kill('SIGKILL');
      rmSync(dir, { recursive: true, force: true });
    },
  };
  try {
    await until(
      'the API socket',
      () => {
        try {
          return curl(sock, 'GET', '/').status === 200 ? true : undefined;
        } catch {
          return undefined;
        }
      },
      60_000,
      log,
    );
    const put = (path: string, body: unknown) => {
      const r = curl(sock, 'PUT', path, body);
      assert.equal(r.status, 204, `${path}: ${r.body}`);
    };
    put('/machine-config', { vcpu_count: 1, mem_size_mib: MEM_MIB });
    put('/boot-source', {
      kernel_image_path: g.kernel,
      initrd_path: g.initrd,
      boot_args: 'console=ttyS0 reboot=k panic=1 pci=off quiet',
    });
    put('/balloon', balloon);
    put('/metrics', { metrics_path: metrics });
    put('/actions', { action_type: 'InstanceStart' });
    await until('the boot marker', () => (MARKER.test(out) ? true : undefined), 200_000, log);
    const drv = await vm.run('ls /sys/bus/virtio/drivers/', 'DRIVERS');
    assert.match(drv, /virtio_balloon/, 'the guest bound its balloon driver');
  } catch (e) {
    vm.dispose();
    throw e;
  }
  return vm;
}

test(
  'balloon: inflate returns guest memory to the host, deflate gives it back',
  opts,
  async (t) => {
    const vm = await bootWithBalloon({
      amount_mib: 0,
      deflate_on_oom: true,
      stats_polling_interval_s: 1,
    });
    const { pid, sock, log, run, stats } = vm;
    try {
      // Statistics arrive (the driver gives them at probe, then at each 1 s poll).
      const s0 = await until('statistics', () => stats().free_memory ?? undefined, 20_000, log);
      assert.ok(stats().total_memory! > 200 * 1024 * 1024, JSON.stringify(stats()));

      // The guest dirties all but LEAVE_FREE_MIB of its free memory and frees it: the host
      // holds those pages now, so whichever free pages the driver puts in the balloon, the host
      // had them. A tmpfs of its own: the root's is capped at half the RAM.
      const fill = await run(
        `mkdir -p /mnt/fill; mount -t tmpfs -o size=${MEM_MIB}m fill /mnt/fill; n=$(awk '/MemFree/{print int($2/1024)-${LEAVE_FREE_MIB}}' /proc/meminfo); dd if=/dev/zero of=/mnt/fill/x bs=1M count=$n 2>/dev/null; echo FILL=$n:$?; rm /mnt/fill/x`,
        'FILLED',
      );
      const filled0 = /FILL=(\d+):0/.exec(fill);
      assert.ok(filled0, `the guest could not fill its memory: ${fill}`);
      t.diagnostic(`the guest dirtied and freed ${filled0[1]} MiB`);
      await sleep(1500);
      const before = rssMib(pid);

      const t0 = performance.now();
      const r = curl(sock, 'PATCH', '/balloon', { amount_mib: INFLATE_MIB });
      assert.equal(r.status, 204, r.body);
      await until(
        'the balloon to inflate',
        () => (stats().actual_mib! >= INFLATE_MIB ? true : undefined),
        120_000,
        () => JSON.stringify(stats()) + log(),
      );
      const inflateMs = performance.now() - t0;
      await sleep(500);
      const inflated = rssMib(pid);
      const st = stats();
      t.diagnostic(
        `RSS before ${before.toFixed(0)} MiB, inflated by ${INFLATE_MIB} MiB: ${inflated.toFixed(0)} MiB (returned ${(before - inflated).toFixed(0)} MiB in ${inflateMs.toFixed(0)} ms)`,
      );
      assert.equal(st.target_mib, INFLATE_MIB);
      assert.ok(
        before - inflated >= 0.8 * INFLATE_MIB,
        `RSS ${before.toFixed(0)} -> ${inflated.toFixed(0)} MiB: less than 80% of ${INFLATE_MIB} MiB returned`,
      );
      // The guest's free memory as the driver reports it went down by about the balloon's size.
      const s1 = await until(
        'statistics after inflating',
        () => {
          const f = stats().free_memory!;
          return f < s0 - 100 * 1024 * 1024 ? f : undefined;
        },
        10_000,
        () => `free before ${s0}, now ${JSON.stringify(stats())}`,
      );
      t.diagnostic(
        `guest free memory ${(s0 / 2 ** 20).toFixed(0)} -> ${(s1 / 2 ** 20).toFixed(0)} MiB`,
      );

      // Deflate: the guest has its memory back, uses it, and the host allocates it again.
      assert.equal(curl(sock, 'PATCH', '/balloon', { amount_mib: 0 }).status, 204);
      await until(
        'the balloon to deflate',
        () => (stats().actual_pages === 0 ? true : undefined),
        120_000,
        () => JSON.stringify(stats()) + log(),
      );
      const filled = await run(
        `dd if=/dev/zero of=/mnt/fill/x bs=1M count=${FILL_MIB} 2>/dev/null; echo FILLCODE=$?`,
        'REFILLED',
      );
      assert.match(filled, /FILLCODE=0/, filled);
      await sleep(500);
      const after = rssMib(pid);
      t.diagnostic(`after deflating and refilling ${FILL_MIB} MiB: RSS ${after.toFixed(0)} MiB`);
      assert.ok(
        after - inflated >= 0.8 * INFLATE_MIB,
        `RSS ${inflated.toFixed(0)} -> ${after.toFixed(0)} MiB after deflating`,
      );
      const m = curl(sock, 'GET', '/balloon');
      assert.equal(m.json.amount_mib, 0, m.body);
    } finally {
      vm.dispose();
    }
  },
);

test('balloon: free page reporting returns memory the guest frees to the host', opts, async (t) => {
  const vm = await bootWithBalloon({
    amount_mib: 0,
    deflate_on_oom: false,
    free_page_reporting: true,
  });
  const { pid, log, run } = vm;
  try {
    // The driver negotiated VIRTIO_BALLOON_F_PAGE_REPORTING (bit 5 of the features string,
    // one character per bit) on the balloon (virtio device id 5).
    const feat = await run(
      'for d in /sys/bus/virtio/devices/*; do [ "$(cat $d/device)" = 0x0005 ] && echo "BFEAT=$(cat $d/features)"; done',
      'FEATURES',
    );
    const [, bits] = /BFEAT=([01]+)/.exec(feat) ?? [];
    assert.equal(bits?.[5], '1', `free page reporting not negotiated: ${feat}`);

    // Linux reports what is free 2 s after the driver registers: let that pass, then take
    // the baseline.
    await sleep(4000);
    const freed0 = vm.metric('balloon', 'free_page_report_freed');
    const count0 = vm.metric('balloon', 'free_page_report_count');
    const idle = rssMib(pid);

    // The guest dirties all but LEAVE_FREE_MIB of its free memory (a tmpfs of its own: the
    // root's is capped at half the RAM); the host holds those pages now.
    const fill = await run(
      `mkdir -p /mnt/fill; mount -t tmpfs -o size=${MEM_MIB}m fill /mnt/fill; n=$(awk '/MemFree/{print int($2/1024)-${LEAVE_FREE_MIB}}' /proc/meminfo); dd if=/dev/zero of=/mnt/fill/x bs=1M count=$n 2>/dev/null; echo FILL=$n:$?`,
      'FILLED',
    );
    const m = /FILL=(\d+):0/.exec(fill);
    assert.ok(m, `the guest could not fill its memory: ${fill}`);
    const n = Number(m[1]);
    await sleep(500);
    const filled = rssMib(pid);
    assert.ok(
      filled - idle >= 0.8 * n,
      `RSS ${idle.toFixed(0)} -> ${filled.toFixed(0)} MiB after the guest dirtied ${n} MiB`,
    );

    // It frees them: no balloon inflation, only the driver's reports give the memory back.
    const t0 = performance.now();
    await run('rm /mnt/fill/x', 'FREED');
    let now = filled;
    await until(
      'the RSS to drop after the guest freed its memory',
      () => ((now = rssMib(pid)) <= filled - 0.8 * n ? true : undefined),
      60_000,
      () =>
        `RSS idle ${idle.toFixed(0)}, filled ${filled.toFixed(0)}, now ${now.toFixed(0)} MiB\n${log()}`,
    );
    const dropMs = performance.now() - t0;
    // A little longer: what the reports still had in flight.
    await sleep(3000);
    const reported = rssMib(pid);
    const freedMib = (vm.metric('balloon', 'free_page_report_freed') - freed0) / 2 ** 20;
    const reports = vm.metric('balloon', 'free_page_report_count') - count0;
    const fails = vm.metric('balloon', 'free_page_report_fails');
    t.diagnostic(
      `RSS idle ${idle.toFixed(0)} MiB, after dirtying ${n} MiB ${filled.toFixed(0)}, after freeing it ${reported.toFixed(0)} (returned ${(filled - reported).toFixed(0)} MiB, ${(dropMs / 1000).toFixed(1)} s to 80%); free_page_report_freed +${freedMib.toFixed(0)} MiB in ${reports} ranges, ${fails} failed`,
    );
    assert.ok(reports > 0, 'free_page_report_count did not move');
    assert.ok(freedMib >= 0.8 * n, `free_page_report_freed grew by ${freedMib} MiB only`);
    assert.equal(fails, 0);

    // The memory is still the guest's: it fills it again and the host allocates it again.
    const again = await run(
      `dd if=/dev/zero of=/mnt/fill/x bs=1M count=${n} 2>/dev/null; echo FILLCODE=$?`,
      'REFILLED',
    );
    assert.match(again, /FILLCODE=0/, again);
    await sleep(500);
    const refilled = rssMib(pid);
    t.diagnostic(`after refilling ${n} MiB: RSS ${refilled.toFixed(0)} MiB`);
    assert.ok(
      refilled - reported >= 0.8 * n,
      `RSS ${reported.toFixed(0)} -> ${refilled.toFixed(0)} MiB after refilling ${n} MiB`,
    );
  } finally {
    vm.dispose();
  }
});

/**
 * Rate limiters with a stock Linux guest, inside the lab (issue 16), in one boot of the Debian
 * root disk: a read-only data drive with a bandwidth bucket is read with `dd iflag=direct` at
 * the configured rate (+-15%), a PATCH /drives doubles the rate live and the next read follows,
 * and a PATCH with a bucket of size 0 removes the limit (the guest's own speed, reported);
 * a TAP's TX bandwidth bucket is PATCHed away to measure the guest's own TCP speed with iperf3
 * (the guest's `iperf3 -c`, `iperf3 -s` in the test's network namespace on the lab host), then
 * set to a quarter of it (at most 256 KiB/s) and iperf3 must send at that rate (the receiving
 * server's figure), and a PATCH /network-interfaces doubles it. The throttled counters of the
 * metrics are checked to have moved.
 *
 * Expected rates count the bucket's initial fill (a bucket starts full: its `size` bytes go at
 * once): a read of B bytes at R bytes/s with a bucket of S takes (B - S) / R seconds. iperf3's
 * rates leave the first second out instead (its per-second intervals from 1 s on): the burst
 * and TCP's slow start are in it.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { imagePaths } from '../../src/lab/guest.js';
import { iperfReceivedRate, type ReceivedRate } from '../../src/lab/iperf.js';
import { createNetFixture, type NetFixture } from '../../src/lab/net-fixture.js';
import { call } from '../api/client.js';
import { defaultGuest, skipReason } from './helpers.js';
import { GuestSession } from './session.js';

const opts = { skip: skipReason, timeout: 600_000 };
const KIB = 1024;
const MIB = 1024 * KIB;
/** Accuracy asked by the issue. */
const TOLERANCE = 0.15;

/** A rate of `perSec` bytes/s as a bucket refilled every 125 ms. */
const bucket = (perSec: number) => ({ size: perSec / 8, refill_time: 125 });

class ApiVm extends GuestSession {
  constructor(
    readonly sock: string,
    prefix: string[],
  ) {
    super(['--api-sock', sock], prefix);
  }
  async ready(): Promise<void> {
    const end = Date.now() + 30_000;
    for (;;) {
      try {
        if ((await call(this.sock, 'GET', '/')).status === 200) return;
      } catch {
        // not listening yet
      }
      if (Date.now() > end) throw new Error(`no API socket after 30 s\n${this.describe()}`);
      await sleep(100);
    }
  }
  async api(method: string, path: string, body: unknown): Promise<void> {
    const r = await call(this.sock, method, path, body, 30_000);
    assert.equal(r.status, 204, `${method} ${path}: ${r.body}\n${this.describe()}`);
  }
}

test(
  'rate limiters: a drive reads and a TAP sends at the configured rate; PATCH changes it live',
  opts,
  async () => {
    const g = defaultGuest();
    const rootfs = imagePaths('rootfs').ROOTFS!;
    if (!existsSync(rootfs))
      throw new Error('the Debian root disk is not built: npm run guest -- build rootfs');
    const dir = mkdtempSync(join(existsSync('/run') ? '/run' : tmpdir(), 'tv-rate-'));
    const file = (n: string) => join(dir, n);
    spawnSync('truncate', ['-s', '32M', file('data.img')]);
    const figures: string[] = [];
    let net: NetFixture | undefined;
    let vm: ApiVm | undefined;
    const helpers: Array<ReturnType<typeof spawn>> = [];
    try {
      net = createNetFixture('rate', 1);
      const inNs = net.exec([]);
      vm = new ApiVm(file('api.sock'), inNs);
      const v = vm;
      await v.ready();
      await v.api('PUT', '/machine-config', { vcpu_count: 1, mem_size_mib: 256 });
      await v.api('PUT', '/boot-source', {
        kernel_image_path: g.kernel,
        initrd_path: g.initrd,
        boot_args: 'console=ttyS0 reboot=k panic=1 pci=off quiet',
      });
      await v.api('PUT', '/drives/rootfs', {
        drive_id: 'rootfs',
        path_on_host: rootfs,
        is_root_device: true,
        is_read_only: true,
      });
      const disk1 = 512 * KIB;
      await v.api('PUT', '/drives/data', {
        drive_id: 'data',
        path_on_host: file('data.img'),
        is_root_device: false,
        is_read_only: true,
        rate_limiter: { bandwidth: bucket(disk1) },
      });
      const tx1 = 256 * KIB;
      await v.api('PUT', '/network-interfaces/eth0', {
        iface_id: 'eth0',
        host_dev_name: net.taps[0],
        guest_mac: '06:00:a9:fe:0a:02',
        tx_rate_limiter: { bandwidth: bucket(tx1) },
      });
      await v.api('PUT', '/metrics', { metrics_path: file('metrics.json') });
      await v.api('PUT', '/actions', { action_type: 'InstanceStart' });
      await v.waitFor(/TYPERVISOR-BOOT-OK/, 300_000);
      figures.push(`booted in ${Date.now() - v.t0} ms`);
      v.send('stty -echo\n');

      let seq = 0;
      /** Reads `bytes` of /dev/vdb from `skip` (MiB) with O_DIRECT: the guest's dd seconds. */
      const dd = async (bytes: number, skipMib: number): Promise<number> => {
        const tag = `DD${++seq}`;
        v.send(
          `dd if=/dev/vdb of=/dev/null bs=64k count=${bytes / (64 * KIB)} skip=${skipMib * 16} iflag=direct 2>&1 | tail -1 | sed "s/^/${tag} /"\n`,
        );
        const m = await v.waitFor(new RegExp(`${tag} (\\d+) bytes .*copied, ([\\d.]+) s`), 120_000);
        assert.equal(Number(m[1]), bytes);
        return Number(m[2]);
      };
      const check = (what: string, got: number, want: number) => {
        const err = got / want - 1;
        figures.push(
          `${what}: ${(got / KIB).toFixed(0)} KiB/s for ${(want / KIB).toFixed(0)} KiB/s (${(err * 100).toFixed(1)}%)`,
        );
        // Every measurement runs; the verdict comes at the end with all the figures.
        if (Math.abs(err) > TOLERANCE) off.push(what);
      };
      const off: string[] = [];

      // The drive at 512 KiB/s, then PATCHed to 1 MiB/s, then unlimited (a bucket of size 0:
      // the guest's own speed in the lab, which the limits must stay well under).
      const b1 = 2 * MIB;
      const s1 = await dd(b1, 0);
      check('drive read', (b1 - bucket(disk1).size) / s1, disk1);
      const disk2 = 1 * MIB;
      await v.api('PATCH', '/drives/data', {
        drive_id: 'data',
        rate_limiter: { bandwidth: bucket(disk2) },
      });
      const b2 = 4 * MIB;
      const s2 = await dd(b2, 4);
      check('drive read after PATCH', (b2 - bucket(disk2).size) / s2, disk2);
      await v.api('PATCH', '/drives/data', {
        drive_id: 'data',
        rate_limiter: { bandwidth: { size: 0, refill_time: 0 } },
      });
      const s3 = await dd(b2, 12);
      figures.push(`drive read unlimited: ${(b2 / s3 / KIB).toFixed(0)} KiB/s`);
      assert.ok(b2 / s3 > disk2 * 1.5, `the guest is not faster unlimited: ${figures.join('; ')}`);

      // The TAP's TX, unlimited and at two rates below that: iperf3 from the guest to a server
      // in the namespace, the server's received bytes per second after the first second. The
      // root disk is read-only here and iperf3 keeps its buffer in a temp file: a tmpfs on /tmp.
      v.send(
        'mount -t tmpfs tmpfs /tmp; ip addr add 169.254.10.2/16 dev eth0; ip link set eth0 up; ' +
          'busybox ping -c 2 -W 5 169.254.10.1 >/dev/null && echo "PING""-OK"\n',
      );
      await v.waitFor(/PING-OK/, 120_000);
      const iperf = async (port: number, seconds: number): Promise<ReceivedRate> => {
        // One test per server (-1), its JSON (-J) printed when it ends. The server's temp file
        // on /dev/shm: the lab's /tmp (9p) cannot hold one.
        const h = spawn(
          inNs[0]!,
          [
            ...inNs.slice(1),
            'env',
            'TMPDIR=/dev/shm',
            'iperf3',
            '-s',
            '-1',
            '-J',
            '-B',
            net!.hostAddr,
            '-p',
            String(port),
          ],
          { stdio: ['ignore', 'pipe', 'pipe'] },
        );
        helpers.push(h);
        let out = '';
        h.stdout!.on('data', (d: Buffer) => (out += d.toString()));
        h.stderr!.on('data', (d: Buffer) => (out += d.toString()));
        const closed = new Promise((r) => h.on('close', r));
        for (let end = Date.now() + 30_000; ;) {
          const ss = spawnSync(inNs[0]!, [...inNs.slice(1), 'ss', '-Hltn', `sport = :${port}`], {
            encoding: 'utf8',
          });
          if (ss.stdout.includes(`:${port}`)) break;
          if (Date.now() > end) throw new Error(`iperf3 -s is not listening on ${port}: ${out}`);
          await sleep(100);
        }
        // The client's own summary (sender and receiver lines) stays in the console output.
        v.send(
          `iperf3 -c ${net!.hostAddr} -p ${port} -t ${seconds} -f k 2>&1 | tail -n 4; echo "IPERF""-DONE-${port}"\n`,
        );
        await v.waitFor(new RegExp(`IPERF-DONE-${port}`), (seconds + 120) * 1000);
        await Promise.race([closed, sleep(30_000, undefined, { ref: false })]);
        try {
          return iperfReceivedRate(out);
        } catch (e) {
          throw new Error(`iperf3 on port ${port}: ${(e as Error).message}\n${out.slice(-3000)}`);
        }
      };
      // TCP/IP and Ethernet headers are in the bucket's bytes, not in the payload iperf3 counts
      // (about 4% with 1500-byte frames, less with TSO): within the tolerance.
      //
      // First the guest's own TCP speed (a bucket of size 0 removes the limiter PUT gave): in
      // the lab, on a loaded machine, it has been as low as 350 KiB/s, and a limit close to it
      // is not reached (the guest's own time per frame adds to the limiter's waits: 81 KiB/s
      // for 256). So the limits are a quarter and a half of that speed, at most 256 and
      // 512 KiB/s, at least 32 and 64, in steps of 16 KiB/s.
      await v.api('PATCH', '/network-interfaces/eth0', {
        iface_id: 'eth0',
        tx_rate_limiter: { bandwidth: { size: 0, refill_time: 0 } },
      });
      /** The counted rate, with every second's figure in KiB/s (where a stall was, if any). */
      const tx = async (what: string, port: number, seconds: number, want?: number) => {
        const r = await iperf(port, seconds);
        const each = r.perInterval.map((x) => (x / KIB).toFixed(0)).join('/');
        if (want === undefined)
          figures.push(`${what}: ${(r.rate / KIB).toFixed(0)} KiB/s (per second: ${each})`);
        else {
          check(what, r.rate, want);
          figures[figures.length - 1] += ` (per second: ${each})`;
        }
        return r.rate;
      };
      const own = await tx('TAP TX unlimited', 5201, 3);
      const step = 16 * KIB;
      const txA = Math.min(tx1, Math.max(2 * step, Math.floor(own / 4 / step) * step));
      await v.api('PATCH', '/network-interfaces/eth0', {
        iface_id: 'eth0',
        tx_rate_limiter: { bandwidth: bucket(txA) },
      });
      // 5 s: the 4 after the first are counted.
      await tx('TAP TX (iperf3)', 5202, 5, txA);
      const txB = 2 * txA;
      await v.api('PATCH', '/network-interfaces/eth0', {
        iface_id: 'eth0',
        tx_rate_limiter: { bandwidth: bucket(txB) },
      });
      await tx('TAP TX after PATCH (iperf3)', 5203, 5, txB);
      // The guest's TCP retransmissions (a stalled TCP, not the limiter, if these are many).
      v.send(`awk '/^Tcp:/{n++} /^Tcp:/&&n==2{print "RETRANS " $13}' /proc/net/snmp\n`);
      const [, retrans] = (await v.waitFor(/RETRANS (\d+)\r?\n/, 30_000)) as RegExpMatchArray;
      figures.push(`guest TCP retransmitted segments: ${retrans}`);

      // The throttled counters moved (Firecracker's metric names).
      await v.api('PUT', '/actions', { action_type: 'FlushMetrics' });
      const lines = readFileSync(file('metrics.json'), 'utf8').trim().split('\n');
      const sum = (group: string, field: string) =>
        lines.reduce(
          (a, l) =>
            a +
            Number((JSON.parse(l) as Record<string, Record<string, number>>)[group]?.[field] ?? 0),
          0,
        );
      const blkThrottled = sum('block_data', 'rate_limiter_throttled_events');
      const txThrottled = sum('net_eth0', 'tx_rate_limiter_throttled');
      figures.push(
        `throttled: block_data ${blkThrottled}, net_eth0 tx ${txThrottled}; net_eth0 tx_fails ${sum('net_eth0', 'tx_fails')}, tx_packets ${sum('net_eth0', 'tx_packets_count')}`,
      );
      assert.deepEqual(off, [], `off by more than ${TOLERANCE * 100}%: ${figures.join('; ')}`);
      assert.ok(blkThrottled > 0, figures.join('; '));
      assert.ok(txThrottled > 0, figures.join('; '));

      v.send('poweroff -f\n');
      assert.equal(await v.exited, 0, v.describe());
      console.log(`# ${figures.join('; ')}`);
    } catch (e) {
      throw new Error(`${(e as Error).message}\n${figures.join('; ')}\n${vm?.describe()}`);
    } finally {
      vm?.kill();
      for (const h of helpers) h.kill('SIGKILL');
      net?.cleanup();
      rmSync(dir, { recursive: true, force: true });
    }
  },
);

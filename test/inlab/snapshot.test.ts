/**
 * Snapshots of a stock Linux guest, end to end, inside the lab (issue 13's in-lab test), in one
 * guest boot. Debian's generic kernel (it has CONFIG_VMGENID) with the Debian root disk (read
 * only, shared), a small ext4 data disk of the test's own, a TAP and vsock. VM A runs a shell
 * loop that prints an increasing counter and appends it to a file on the data disk (sync each
 * time); A is paused, snapshotted and killed (SIGKILL). Two fresh processes B and C load the same
 * snapshot files, each with its own TAP (network_overrides), vsock socket (vsock_override) and
 * copy of the data disk (bind-mounted over the saved path in the process's own mount namespace,
 * as a jailer would). Then:
 * - B: the counter goes on from A's last value with no gap or repeat (A's console then B's read
 *   as one stream), the file on the disk is intact and grows, `ping` to the host over the new TAP
 *   works, a new vsock connection works both ways (host -> guest to a listener the guest had
 *   before the snapshot; guest -> host);
 * - B and C: the guest's vmgenid driver saw a new generation id ("crng reseeded due to virtual
 *   machine fork"), and 16 bytes of /dev/urandom read right after the restore differ.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { setTimeout as sleep } from 'node:timers/promises';
import { imagePaths } from '../../src/lab/guest.js';
import { createNetFixture, type NetFixture } from '../../src/lab/net-fixture.js';
import { call } from '../api/client.js';
import { genericGuest, skipReason } from './helpers.js';
import { GuestSession } from './session.js';

const opts = { skip: skipReason, timeout: 600_000 };
const MEM_MIB = 256;
const GUEST_IP = '169.254.10.2';
/** Runs the rest of its argv with file $1 bind-mounted over $2 (in ip netns exec's mount ns). */
const BIND = 'mount --bind "$1" "$2" && shift 2 && exec "$@"';

/**
 * Every complete `CNT=n` line of a console stream (after shell prompts maybe; the typed loop
 * itself reads `CNT=$i`).
 */
const counters = (s: string) => [...s.matchAll(/CNT=(\d+)\r?\n/g)].map((m) => Number(m[1]));

/** Says whether line n of the counter file is n, and how many lines it has. */
// Every number read back from the console is matched up to its end of line: the console
// arrives a few bytes at a time under the lab's emulation, so "FILE-GOOD 1" may be the first
// part of "FILE-GOOD 15" (what made this test fail twice with "file has 1 lines").
const CHECK_FILE =
  'wc -l /mnt/counter; tail -n 2 /mnt/counter; awk \'$1!=NR{bad++} END{print "FILE-" (bad?"BAD":"GOOD"), NR}\' /mnt/counter\n';

/** A Typervisor process in API mode, its console on stdin/stdout. */
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

  async put(method: string, path: string, body: unknown, timeoutMs = 30_000): Promise<void> {
    const r = await call(this.sock, method, path, body, timeoutMs);
    assert.equal(r.status, 204, `${method} ${path}: ${r.body}\n${this.describe()}`);
  }
}

/** Host -> guest over Firecracker's vsock socket: CONNECT, OK, send, half-close, the echo. */
function hostConnect(uds: string, port: number, data: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const s = net.connect(uds);
    let buf = '';
    s.setEncoding('utf8');
    s.on('connect', () => s.write(`CONNECT ${port}\n`));
    s.on('data', (d: string) => {
      const before = buf;
      buf += d;
      if (!before.includes('\n') && buf.includes('\n')) {
        const ok = buf.slice(0, buf.indexOf('\n'));
        if (/^OK \d+$/.test(ok)) s.end(data);
        else reject(new Error(`vsock CONNECT ${port} answered '${ok}'`));
      }
    });
    s.on('end', () => resolve(buf.slice(buf.indexOf('\n') + 1)));
    s.on('error', reject);
  });
}

test(
  'snapshot of a Debian guest: kill -9, two clones on new TAPs and vsock sockets, VMGenID',
  opts,
  async () => {
    const g = genericGuest();
    const rootfs = imagePaths('rootfs').ROOTFS!;
    if (!existsSync(rootfs))
      throw new Error('the Debian root disk is not built: npm run guest -- build rootfs');
    // Sockets, disks and the memory file on a local file system (the lab's /tmp is 9p).
    const dir = mkdtempSync(join(existsSync('/run') ? '/run' : tmpdir(), 'tv-snap-'));
    const file = (n: string) => join(dir, n);
    const sh = (argv: string[]) => {
      const r = spawnSync(argv[0]!, argv.slice(1), { encoding: 'utf8' });
      assert.equal(r.status, 0, `${argv.join(' ')}: ${r.stderr}`);
      return r.stdout;
    };
    sh(['truncate', '-s', '32M', file('data-a.ext4')]);
    sh(['mkfs.ext4', '-q', '-F', file('data-a.ext4')]);

    const timings: string[] = [];
    const nets: NetFixture[] = [];
    const vms: ApiVm[] = [];
    const servers: net.Server[] = [];
    try {
      // A and B on one bridge (B on a new TAP); C, which has the same IP and MAC, on its own.
      const netAB = createNetFixture('snapab', 2);
      nets.push(netAB);
      const netC = createNetFixture('snapc', 1);
      nets.push(netC);

      const a = new ApiVm(file('a.sock'), netAB.exec([]));
      vms.push(a);
      await a.ready();
      await a.put('PUT', '/machine-config', { vcpu_count: 1, mem_size_mib: MEM_MIB });
      await a.put('PUT', '/boot-source', {
        kernel_image_path: g.kernel,
        initrd_path: g.initrd,
        // quiet: kernel messages would cut into the counter's lines on the console.
        boot_args: 'console=ttyS0 reboot=k panic=1 pci=off quiet',
      });
      await a.put('PUT', '/drives/rootfs', {
        drive_id: 'rootfs',
        path_on_host: rootfs,
        is_root_device: true,
        is_read_only: true,
      });
      await a.put('PUT', '/drives/data', {
        drive_id: 'data',
        path_on_host: file('data-a.ext4'),
        is_root_device: false,
        is_read_only: false,
      });
      await a.put('PUT', '/network-interfaces/eth0', {
        iface_id: 'eth0',
        host_dev_name: netAB.taps[0],
        guest_mac: '06:00:a9:fe:0a:02',
      });
      await a.put('PUT', '/vsock', { guest_cid: 3, uds_path: file('a.vsock') });
      await a.put('PUT', '/actions', { action_type: 'InstanceStart' });
      await a.waitFor(/TYPERVISOR-BOOT-OK/, 300_000);
      timings.push(`A booted in ${Date.now() - a.t0} ms`);

      // The guest's side: the data disk, the network, a ready CRNG (so that a new VM id makes it
      // reseed), a vsock echo service, then the counter loop.
      // No echo of typed input: it would cut into the counter's lines on the console.
      a.send(
        'stty -echo\n' +
          'mount -t ext4 /dev/vdb /mnt && echo "MNT""-OK"\n' +
          `ip addr add ${GUEST_IP}/16 dev eth0; ip link set eth0 up\n` +
          'head -c 1 /dev/random >/dev/null && echo "CRNG""-READY"\n' +
          'echo "VMGENID-DRIVER $(ls /sys/bus/acpi/drivers/vmgenid | grep -c VMGENCTR)"\n' +
          'socat VSOCK-LISTEN:6000,fork,reuseaddr EXEC:cat &\n' +
          'i=0; while true; do i=$((i+1)); echo CNT=$i; echo $i >> /mnt/counter; sync; sleep 0.5; done &\n',
      );
      await a.waitFor(/MNT-OK/, 60_000);
      await a.waitFor(/CRNG-READY/, 120_000);
      const [, bound] = (await a.waitFor(/VMGENID-DRIVER (\d+)\r?\n/, 60_000)) as RegExpMatchArray;
      assert.equal(bound, '1', `the guest's vmgenid driver did not bind\n${a.describe()}`);
      const end = Date.now() + 120_000;
      while (counters(a.out).length < 6) {
        if (Date.now() > end) throw new Error(`no counter\n${a.describe()}`);
        await sleep(200);
      }

      // The file before the snapshot: line n is n.
      a.send(CHECK_FILE);
      const [, aVerdict, aLines] = (await a.waitFor(
        /FILE-(GOOD|BAD) (\d+)\r?\n/,
        60_000,
      )) as RegExpMatchArray;
      assert.equal(aVerdict, 'GOOD', a.describe());
      assert.ok(Number(aLines) >= 5, `A's file has ${aLines} lines\n${a.describe()}`);

      let t = Date.now();
      await a.put('PATCH', '/vm', { state: 'Paused' });
      await a.put(
        'PUT',
        '/snapshot/create',
        { snapshot_type: 'Full', snapshot_path: file('vm.snap'), mem_file_path: file('vm.mem') },
        120_000,
      );
      timings.push(`pause + create: ${Date.now() - t} ms`);
      await sleep(300); // the console's last bytes through the pipe
      a.kill();
      await a.exited;
      const aOut = a.out;
      const lastA = Math.max(...counters(aOut));

      // Each clone: its own copy of the disk (bind-mounted over A's path), TAP and vsock socket.
      const clone = (n: string, nf: NetFixture, tap: string) => {
        sh(['cp', '--sparse=always', file('data-a.ext4'), file(`data-${n}.ext4`)]);
        const vm = new ApiVm(
          file(`${n}.sock`),
          nf.exec(['sh', '-c', BIND, 'sh', file(`data-${n}.ext4`), file('data-a.ext4')]),
        );
        vms.push(vm);
        return { vm, tap, uds: file(`${n}.vsock`) };
      };
      const clones = [clone('b', netAB, netAB.taps[1]!), clone('c', netC, netC.taps[0]!)];
      const b = clones[0]!.vm;
      const c = clones[1]!.vm;
      await Promise.all(clones.map((x) => x.vm.ready()));
      // One load after the other, paused, then both resumed: two device workers starting at
      // once under the lab's emulated CPU can miss the worker's 10 s answer time.
      t = Date.now();
      for (const x of clones)
        await x.vm.put(
          'PUT',
          '/snapshot/load',
          {
            snapshot_path: file('vm.snap'),
            mem_backend: { backend_type: 'File', backend_path: file('vm.mem') },
            resume_vm: false,
            network_overrides: [{ iface_id: 'eth0', host_dev_name: x.tap }],
            vsock_override: { uds_path: x.uds },
          },
          60_000,
        );
      for (const x of clones) await x.vm.put('PATCH', '/vm', { state: 'Resumed' });
      timings.push(`two loads and resumes: ${Date.now() - t} ms`);

      // B: the counter continues from A's, exactly (A's console then B's, as one stream; read
      // before anything is typed into B).
      const until = Date.now() + 60_000;
      for (const vm of [b, c])
        while (!counters(vm.out).some((n) => n > lastA + 3)) {
          if (Date.now() > until) throw new Error(`the counter did not go on\n${vm.describe()}`);
          await sleep(200);
        }
      const all = counters(aOut + b.out);
      assert.equal(all[0], 1);
      for (let i = 1; i < all.length; i++)
        assert.equal(all[i], all[i - 1]! + 1, `counter ${all[i - 1]} then ${all[i]}`);

      // VMGenID: each clone's kernel reseeded on the new id; then urandom differs.
      const rnd: string[] = [];
      // The reseed runs in the guest's ACPI notify work a moment after it resumes: wait for it
      // (up to 10 s) before reading, then say whether it came.
      const FORK = "'crng reseeded due to virtual machine fork'";
      for (const vm of [b, c])
        vm.send(
          `n=0; until dmesg | grep -q ${FORK} || [ $n -ge 50 ]; do n=$((n+1)); sleep 0.2; done\n` +
            "echo RND-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n')\n" +
            `echo "RESEEDS $(dmesg | grep -c ${FORK})"\n`,
        );
      for (const vm of [b, c]) {
        const [, hex] = (await vm.waitFor(/RND-([0-9a-f]{32})\r?\n/, 60_000)) as RegExpMatchArray;
        rnd.push(hex!);
        const [, reseeds] = (await vm.waitFor(/RESEEDS (\d+)\r?\n/, 60_000)) as RegExpMatchArray;
        assert.equal(reseeds, '1', `the guest did not reseed on the new VM id\n${vm.describe()}`);
      }
      assert.notEqual(rnd[0], rnd[1], 'two clones read the same bytes from /dev/urandom');
      timings.push(`urandom: B ${rnd[0]}, C ${rnd[1]}`);

      // B: the file on the disk is intact (line n is n) and has grown past A's last value.
      b.send(CHECK_FILE);
      const [, verdict, lines] = (await b.waitFor(
        /FILE-(GOOD|BAD) (\d+)\r?\n/,
        60_000,
      )) as RegExpMatchArray;
      assert.equal(verdict, 'GOOD', b.describe());
      assert.ok(Number(lines) >= lastA + 2, `file has ${lines} lines, A's last count ${lastA}`);
      timings.push(`A: count ${lastA}, file ${aLines} lines; B: file ${lines} lines`);

      // B: ping over the new TAP.
      b.send(`busybox ping -c 2 -W 5 169.254.10.1 && echo "PING""-OK"\n`);
      await b.waitFor(/PING-OK/, 60_000);

      // B: vsock, host -> guest (the listener from before the snapshot) and guest -> host.
      const bUds = clones[0]!.uds;
      const echoed = await hostConnect(bUds, 6000, 'hello through the new socket\n');
      assert.equal(echoed, 'hello through the new socket\n');
      let fromGuest = '';
      const srv = net.createServer((s) => {
        s.setEncoding('utf8');
        s.on('data', (d: string) => {
          fromGuest += d;
          if (fromGuest.includes('\n')) s.end('ACK-FROM-HOST\n');
        });
        s.on('error', () => undefined);
      });
      servers.push(srv);
      await new Promise<void>((r) => srv.listen(`${bUds}_5000`, r));
      b.send('echo guest-says-hi | socat -t 10 - VSOCK-CONNECT:2:5000\n');
      await b.waitFor(/ACK-FROM-HOST/, 60_000);
      assert.equal(fromGuest, 'guest-says-hi\n');

      // B's disk copy, from the host after B is gone: the same intact file.
      b.kill();
      await b.exited;
      const debugfs = spawnSync('debugfs', ['-R', 'cat /counter', file('data-b.ext4')], {
        encoding: 'utf8',
      });
      if (debugfs.status === 0) {
        const ns = debugfs.stdout.trim().split('\n').map(Number);
        ns.forEach((n, i) => assert.equal(n, i + 1, `line ${i + 1} of B's /counter`));
        assert.ok(ns.length >= Number(lines));
        timings.push(`B's disk copy (debugfs): ${ns.length} intact lines`);
      } else
        timings.push(`B's disk copy not read: debugfs ${debugfs.error?.message ?? debugfs.stderr}`);
      console.log(`# ${timings.join('; ')}`);
    } catch (e) {
      throw new Error(
        `${(e as Error).message}\n${timings.join('; ')}\n${vms.map((v) => v.describe()).join('\n=====\n')}`,
      );
    } finally {
      vms.forEach((v) => v.kill());
      servers.forEach((s) => s.close());
      nets.forEach((n) => n.cleanup());
      rmSync(dir, { recursive: true, force: true });
    }
  },
);

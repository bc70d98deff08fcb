/**
 * virtio-net with Debian's cloud kernel (run inside the lab, as root): in a network namespace
 * of the test's own (bridge 169.254.10.1/16, TAPs on it), the guest configures an address,
 * pings the host, moves data both ways over TCP (busybox nc in the guest, node's net on the
 * host) with matching SHA-256, and a second VM on the same bridge reaches the first. Bad TAP
 * configurations fail before boot with exit 2. Everything is removed afterwards.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createNetFixture } from '../../src/lab/net-fixture.js';
import { repoRoot } from '../../src/lab/guest.js';
import { defaultGuest, skipReason } from './helpers.js';
import { GuestSession } from './session.js';

const MIB = Number(process.env.TYPERVISOR_NET_TEST_MIB ?? 64);
const opts = { skip: skipReason, timeout: 600_000 };

/** node's net in the namespace: `recv` reads until EOF, `send` writes BYTES random bytes. */
const HELPER = `
import net from 'node:net';
import { createHash, randomBytes } from 'node:crypto';
const [mode, host, port, bytes] = process.argv.slice(2);
const srv = net.createServer({ allowHalfOpen: true }, (s) => {
  const h = createHash('sha256');
  if (mode === 'recv') {
    let n = 0;
    s.on('data', (d) => { h.update(d); n += d.length; });
    s.on('end', () => { console.log('RECV ' + h.digest('hex') + ' ' + n); s.end(); srv.close(); });
  } else {
    let left = Number(bytes);
    const more = () => {
      while (left > 0) {
        const b = randomBytes(Math.min(left, 1 << 20));
        left -= b.length;
        h.update(b);
        if (!s.write(b)) return s.once('drain', more);
      }
      console.log('SENT ' + h.digest('hex') + ' ' + bytes);
      s.end();
      srv.close();
    };
    s.on('error', (e) => console.log('ERR ' + e.message));
    s.resume();
    more();
  }
});
srv.listen(Number(port), host, () => console.log('LISTENING'));
`;

/**
 * A wait on the host side that fails as soon as the VM ends, with what it printed: a guest that
 * crashed mid-transfer (CI of 92febbb: this test waited 600 s for a host-side line) is a clear
 * failure at once, not a timeout with no output.
 */
function whileUp<T>(vm: GuestSession, p: Promise<T>): Promise<T> {
  return Promise.race([
    p,
    vm.exited.then((code): never => {
      throw new Error(`the VM ended (exit code ${code}) during the transfer\n${vm.describe()}`);
    }),
  ]);
}

function helper(prefix: string[], file: string, args: string[]) {
  const c = spawn(prefix[0]!, [...prefix.slice(1), process.execPath, file, ...args], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  c.stdout.on('data', (d: Buffer) => (out += d.toString()));
  c.stderr.on('data', (d: Buffer) => (out += d.toString()));
  const wait = (re: RegExp, ms: number) =>
    new Promise<RegExpMatchArray>((resolve, reject) => {
      const t0 = Date.now();
      const tick = () => {
        const m = out.match(re);
        if (m) return resolve(m);
        if (Date.now() - t0 > ms) return reject(new Error(`helper: no ${re}: ${out}`));
        setTimeout(tick, 50);
      };
      tick();
    });
  return { wait, kill: () => c.kill('SIGKILL') };
}

test(
  'virtio-net: ping, TCP both ways with matching SHA-256, two VMs on one bridge',
  opts,
  async () => {
    const g = defaultGuest();
    const net = createNetFixture('net', 2);
    const dir = mkdtempSync(join(tmpdir(), 'tv-net-'));
    const helperFile = join(dir, 'helper.mjs');
    writeFileSync(helperFile, HELPER);
    const base = ['run', '--kernel', g.kernel, '--initrd', g.initrd, '--memory', '512'];
    const inNs = net.exec([]);
    let a: GuestSession | undefined;
    let b: GuestSession | undefined;
    const timings: string[] = [];
    try {
      a = new GuestSession([...base, '--net', `tap=${net.taps[0]},mac=06:00:a9:fe:0a:02`], inNs);
      await a.waitFor(/TYPERVISOR-BOOT-OK/, 240_000);
      timings.push(`VM A booted in ${Date.now() - a.t0} ms`);
      a.send(
        'ip addr add 169.254.10.2/16 dev eth0; ip link set eth0 up; cat /sys/class/net/eth0/address; ' +
          'ping -c 3 -W 5 169.254.10.1 && echo "PING-HOST""-OK"\n',
      );
      await a.waitFor(/PING-HOST-OK/, 120_000);
      assert.match(a.out, /06:00:a9:fe:0a:02/); // the MAC from config space

      // Guest -> host.
      let t = Date.now();
      const recv = helper(inNs, helperFile, ['recv', '169.254.10.1', '5001']);
      await recv.wait(/LISTENING/, 30_000);
      a.send(
        `head -c ${MIB * 1024 * 1024} /dev/urandom > /tmp/f; sha256sum /tmp/f; ` +
          'echo "NC1""-START"; nc 169.254.10.1 5001 < /tmp/f; echo "NC1""-DONE"\n',
      );
      await a.waitFor(/NC1-START/, 300_000);
      const tx0 = Date.now();
      const [, gsum] = (await a.waitFor(/([0-9a-f]{64})\s+\/tmp\/f/, 10_000)) as RegExpMatchArray;
      const [, hsum, n] = await whileUp(a, recv.wait(/RECV ([0-9a-f]{64}) (\d+)/, 600_000));
      timings.push(
        `guest->host ${MIB} MiB: ${Date.now() - tx0} ms (total with urandom ${Date.now() - t} ms)`,
      );
      assert.equal(Number(n), MIB * 1024 * 1024);
      assert.equal(hsum, gsum);
      await a.waitFor(/NC1-DONE/, 60_000);

      // Host -> guest.
      t = Date.now();
      const send = helper(inNs, helperFile, [
        'send',
        '169.254.10.1',
        '5002',
        String(MIB * 1024 * 1024),
      ]);
      await send.wait(/LISTENING/, 30_000);
      // nc's stdin stays the console (busybox nc may quit at EOF on stdin); it ends when the
      // host closes the connection.
      a.send('nc 169.254.10.1 5002 | sha256sum | sed "s/^/H2G /"; echo "NC2""-DONE"\n');
      const [, sent] = await whileUp(a, send.wait(/SENT ([0-9a-f]{64})/, 300_000));
      const [, got] = (await a.waitFor(/H2G ([0-9a-f]{64})/, 600_000)) as RegExpMatchArray;
      timings.push(`host->guest ${MIB} MiB: ${Date.now() - t} ms`);
      assert.equal(got, sent);

      // A second VM on the same bridge.
      b = new GuestSession([...base, '--net', `tap=${net.taps[1]},mac=06:00:a9:fe:0a:03`], inNs);
      await b.waitFor(/TYPERVISOR-BOOT-OK/, 240_000);
      b.send(
        'ip addr add 169.254.10.3/16 dev eth0; ip link set eth0 up; ' +
          'i=0; until ping -c 1 -W 2 169.254.10.2 >/dev/null; do i=$((i+1)); [ $i -gt 30 ] && break; done; ' +
          'ping -c 2 169.254.10.2 && echo "PEER-B""-OK"\n',
      );
      await b.waitFor(/PEER-B-OK/, 180_000);
      a.send('ping -c 2 -W 5 169.254.10.3 && echo "PEER-A""-OK"\n');
      await a.waitFor(/PEER-A-OK/, 60_000);

      // The TAP is in use by VM A: refused before boot.
      const busy = spawnSync(
        inNs[0]!,
        [
          ...inNs.slice(1),
          process.execPath,
          join(repoRoot(), 'bin', 'typervisor'),
          ...base,
          '--net',
          `tap=${net.taps[0]}`,
        ],
        { encoding: 'utf8', input: '', timeout: 60_000 },
      );
      assert.equal(busy.status, 2, busy.stderr);
      assert.match(busy.stderr, /in use/);

      for (const s of [a, b]) s.send('poweroff -f\n');
      assert.equal(await a.exited, 0, a.describe());
      assert.equal(await b.exited, 0, b.describe());
      console.log(`# ${timings.join('; ')}`);
    } catch (e) {
      throw new Error(
        `${(e as Error).message}\n${timings.join('; ')}\nVM A ${a?.describe()}\nVM B ${b?.describe()}`,
      );
    } finally {
      a?.kill();
      b?.kill();
      net.cleanup();
      rmSync(dir, { recursive: true, force: true });
    }
    const left = spawnSync('ip', ['netns', 'list'], { encoding: 'utf8' }).stdout;
    assert.doesNotMatch(left, new RegExp(net.ns), 'namespace removed');
  },
);

test('virtio-net: bad TAP configurations are a clear error before boot (exit 2)', opts, () => {
  const g = defaultGuest();
  const net = createNetFixture('bad', 1);
  try {
    const run = (args: string[], prefix: string[] = []) => {
      const argv = [
        ...net.exec(prefix),
        process.execPath,
        join(repoRoot(), 'bin', 'typervisor'),
        'run',
        '--kernel',
        g.kernel,
        '--initrd',
        g.initrd,
        ...args,
      ];
      return spawnSync(argv[0]!, argv.slice(1), { encoding: 'utf8', input: '', timeout: 60_000 });
    };
    let r = run(['--net', 'tap=averyveryverylongtapname']);
    assert.equal(r.status, 2, r.stderr);
    assert.match(r.stderr, /1 to 15 bytes/);
    // A multicast MAC (01:...) is accepted, as Firecracker accepts it (src/vmm/resources-wire.test.ts).
    r = run(['--net', 'mac=06:00:00:00:00:01']);
    assert.equal(r.status, 2, r.stderr);
    // Without CAP_NET_ADMIN a TAP cannot be created (an existing one with no owner could be
    // attached: the kernel only checks owner/group then).
    r = run(
      ['--net', 'tap=tvnewtap0'],
      ['setpriv', '--bounding-set=-net_admin', '--inh-caps=-net_admin'],
    );
    assert.equal(r.status, 2, r.stderr);
    assert.match(r.stderr, /CAP_NET_ADMIN/);
  } finally {
    net.cleanup();
  }
});

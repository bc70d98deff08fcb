/**
 * MMDS with Debian's cloud kernel (run inside the lab, as root): two VMs boot at once from
 * --config-file with --metadata, each on a TAP of the test's own network namespace, one with
 * MMDS V2 and one with V1. The guests fetch with busybox wget (GET, --header) and busybox nc
 * (PUT /latest/api/token, which wget cannot send). V2: refused without a token (401), answered
 * with one, refused once it has expired; a PATCH /mmds through the API reaches the guest. V1:
 * answered without a token, IMDS and JSON formats. The guest measures its request latency.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { existsSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createNetFixture } from '../../src/lab/net-fixture.js';
import { defaultGuest, skipReason } from './helpers.js';
import { GuestSession } from './session.js';

const opts = { skip: skipReason, timeout: 400_000 };
const IP = '169.254.169.254';
const REQUESTS = 50;

function curl(sock: string, method: string, path: string, body?: unknown): string {
  const args = ['-s', '--unix-socket', sock, '-X', method, '-w', '\n%{http_code}'];
  if (body !== undefined)
    args.push('-H', 'Content-Type: application/json', '-d', JSON.stringify(body));
  return execFileSync('curl', [...args, `http://localhost${path}`], {
    encoding: 'utf8',
    timeout: 30_000,
  });
}

test(
  'MMDS V1 and V2 answer busybox wget/nc in the guest; tokens, expiry, a live PATCH',
  opts,
  async () => {
    const g = defaultGuest();
    const net = createNetFixture('mmds', 2);
    const dir = mkdtempSync(join(existsSync('/run') ? '/run' : tmpdir(), 'tv-mmds-'));
    const sessions: GuestSession[] = [];
    const report: string[] = [];
    try {
      const start = (name: string, tap: string, version: 'V1' | 'V2') => {
        const cfg = join(dir, `${name}.json`);
        const meta = join(dir, `${name}-meta.json`);
        writeFileSync(
          cfg,
          JSON.stringify({
            'boot-source': {
              kernel_image_path: g.kernel,
              initrd_path: g.initrd,
              boot_args: 'console=ttyS0 reboot=k panic=1 pci=off quiet',
            },
            'machine-config': { vcpu_count: 1, mem_size_mib: 256 },
            'network-interfaces': [{ iface_id: 'eth0', host_dev_name: tap }],
            'mmds-config': { version, network_interfaces: ['eth0'] },
          }),
        );
        writeFileSync(
          meta,
          JSON.stringify({
            latest: { 'meta-data': { 'ami-id': `ami-${name}`, 'instance-type': 'tv.small' } },
          }),
        );
        const sock = join(dir, `${name}.sock`);
        const s = new GuestSession(
          ['--api-sock', sock, '--config-file', cfg, '--metadata', meta],
          net.exec([]),
        );
        sessions.push(s);
        return { s, sock };
      };
      const v2 = start('v2', net.taps[0]!, 'V2');
      const v1 = start('v1', net.taps[1]!, 'V1');
      const setup = (addr: string) =>
        `ip addr add ${addr}/16 dev eth0; ip link set eth0 up; sleep 1\n`;
      await Promise.all([
        v2.s.waitFor(/TYPERVISOR-BOOT-OK/, 300_000),
        v1.s.waitFor(/TYPERVISOR-BOOT-OK/, 300_000),
      ]);
      report.push(`both booted in ${Date.now() - v2.s.t0} ms`);

      // V2.
      const a = v2.s;
      a.send(setup('169.254.10.2'));
      const TOKEN_PUT = (ttl: number) =>
        `{ printf 'PUT /latest/api/token HTTP/1.0\\r\\nX-metadata-token-ttl-seconds: ${ttl}\\r\\n\\r\\n'; sleep 2; } | nc ${IP} 80 | tail -n 1`;
      a.send(
        `wget -q -O - http://${IP}/latest/meta-data/ami-id 2>&1 | sed 's/^/NOTOK: /'; ` +
          `T=$(${TOKEN_PUT(300)}); echo "TOKEN=[$T]"; ` +
          `echo "WITH=[$(wget -q -O - --header "X-metadata-token: $T" http://${IP}/latest/meta-data/ami-id)]"; ` +
          `echo "DIR=[$(wget -q -O - --header "X-metadata-token: $T" http://${IP}/latest/meta-data/ | tr '\\n' ,)]"; ` +
          'echo "V2-STEP1""-DONE"\n',
      );
      await a.waitFor(/V2-STEP1-DONE/, 120_000);
      assert.match(a.out, /NOTOK: .*401/, a.describe());
      const [, token] = a.out.match(/TOKEN=\[([A-Za-z0-9_-]+)\]/) ?? [];
      assert.ok(token, `a token came back\n${a.describe()}`);
      assert.match(a.out, /WITH=\[ami-v2\]/, a.describe());
      assert.match(a.out, /DIR=\[ami-id,instance-type\]/, a.describe());

      // A PATCH through the API reaches the guest.
      const patched = curl(v2.sock, 'PATCH', '/mmds', {
        latest: { 'meta-data': { 'ami-id': 'ami-new' } },
      });
      assert.match(patched, /204$/, patched);
      assert.match(curl(v2.sock, 'GET', '/mmds'), /ami-new/);
      a.send(
        `echo "PATCHED=[$(wget -q -O - --header "X-metadata-token: $T" http://${IP}/latest/meta-data/ami-id)]"\n`,
      );
      await a.waitFor(/PATCHED=\[ami-new\]/, 60_000);

      // Latency: REQUESTS sequential GETs with the token (each a new wget and TCP connection).
      a.send(
        `s=$(cut -d' ' -f1 /proc/uptime); for i in $(seq ${REQUESTS}); do wget -q -O /dev/null --header "X-metadata-token: $T" http://${IP}/latest/meta-data/ami-id || echo "REQ""-FAIL"; done; ` +
          `e=$(cut -d' ' -f1 /proc/uptime); echo "LAT s=$s e=$e END"\n`,
      );
      const [, s0, e0] = (await a.waitFor(
        /LAT s=([\d.]+) e=([\d.]+) END/,
        120_000,
      )) as RegExpMatchArray;
      const perReq = ((Number(e0) - Number(s0)) * 1000) / REQUESTS;
      report.push(
        `V2 GET with token: ${perReq.toFixed(1)} ms per request (wget start included, ${REQUESTS} sequential)`,
      );
      assert.doesNotMatch(a.out, /REQ-FAIL/);

      // Expiry: a 5 s token works at once and is refused after it (nc itself takes 2 s: it
      // waits for the end of its input).
      a.send(
        `S=$(${TOKEN_PUT(5)}); echo "SHORT=[$(wget -q -O - --header "X-metadata-token: $S" http://${IP}/latest/meta-data/ami-id)]"; ` +
          `sleep 6; wget -q -O - --header "X-metadata-token: $S" http://${IP}/latest/meta-data/ami-id 2>&1 | sed 's/^/EXPIRED: /'; echo "V2-STEP2""-DONE"\n`,
      );
      await a.waitFor(/V2-STEP2-DONE/, 60_000);
      assert.match(a.out, /SHORT=\[ami-new\]/, a.describe());
      assert.match(a.out, /EXPIRED: .*401/, a.describe());

      // V1: no token needed; JSON on request.
      const b = v1.s;
      b.send(setup('169.254.10.3'));
      b.send(
        `echo "V1=[$(wget -q -O - http://${IP}/latest/meta-data/ami-id)]"; ` +
          `echo "V1JSON=[$(wget -q -O - --header "Accept: application/json" http://${IP}/latest/meta-data)]"; ` +
          'echo "V1-STEP""-DONE"\n',
      );
      await b.waitFor(/V1-STEP-DONE/, 120_000);
      assert.match(b.out, /V1=\[ami-v1\]/, b.describe());
      const [, j] = b.out.match(/V1JSON=\[(\{.*\})\]/) ?? [];
      assert.deepEqual(JSON.parse(j ?? 'null'), {
        'ami-id': 'ami-v1',
        'instance-type': 'tv.small',
      });
    } finally {
      for (const s of sessions) s.kill();
      await Promise.all(sessions.map((s) => s.exited));
      net.cleanup();
      rmSync(dir, { recursive: true, force: true });
      console.log(`# mmds: ${report.join('; ')}`);
    }
  },
);

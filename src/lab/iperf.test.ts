import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import { setTimeout as sleep } from 'node:timers/promises';
import { iperfMBytes, iperfMbit, iperfReceivedRate } from './iperf.js';

const haveIperf = spawnSync('iperf3', ['--version']).status === 0;

test(
  'iperfReceivedRate: a real iperf3 pair on loopback at 4 Mbit/s, the first second left out',
  { skip: haveIperf ? undefined : 'iperf3 is not installed', timeout: 30_000 },
  async () => {
    const port = String(20_000 + (process.pid % 20_000));
    const srv = spawn('iperf3', ['-s', '-1', '-J', '-B', '127.0.0.1', '-p', port], {
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let json = '';
    srv.stdout.on('data', (d: Buffer) => (json += d.toString()));
    const done = new Promise((r) => srv.on('close', r));
    try {
      // Listening once ss shows the port.
      for (let i = 0; ; i++) {
        const ss = spawnSync('ss', ['-Hltn', `sport = :${port}`], { encoding: 'utf8' });
        if (ss.stdout.includes(port)) break;
        assert.ok(i < 100, 'iperf3 -s did not listen');
        await sleep(50);
      }
      const c = spawnSync(
        'iperf3',
        ['-c', '127.0.0.1', '-p', port, '-t', '3', '-b', '4M', '-f', 'm'],
        { encoding: 'utf8', timeout: 20_000 },
      );
      assert.equal(c.status, 0, c.stderr);
      // The client's text summary (what bench/lab-net.ts reads).
      const mbit = iperfMbit(c.stdout);
      assert.ok(mbit !== undefined && Math.abs(mbit - 4) < 0.4, `${mbit} Mbit/s: ${c.stdout}`);
      const mb = iperfMBytes(c.stdout);
      assert.ok(mb !== undefined && Math.abs(mb - 1.5) < 0.2, `${mb} MBytes: ${c.stdout}`);
      await done;
      const r = iperfReceivedRate(json);
      // Two whole seconds counted (1-2, 2-3), at 500,000 bytes/s.
      assert.ok(Math.abs(r.seconds - 2) < 0.1, `${r.seconds} s`);
      assert.ok(Math.abs(r.rate / 500_000 - 1) < 0.1, `${r.rate} bytes/s`);
      assert.ok(Math.abs(r.totalSeconds - 3) < 0.2, `${r.totalSeconds} s in all`);
      assert.ok(r.totalBytes >= r.bytes);
      assert.equal(r.perInterval.length, 3);
    } finally {
      srv.kill('SIGKILL');
    }
  },
);

test('iperfReceivedRate: an error or a test without intervals throws', () => {
  assert.throws(() => iperfReceivedRate('{"error":"unable to connect"}'), /unable to connect/);
  assert.throws(
    () =>
      iperfReceivedRate(
        JSON.stringify({
          intervals: [{ sum: { start: 0, end: 1, seconds: 1, bytes: 10 } }],
        }),
      ),
    /no interval/,
  );
});

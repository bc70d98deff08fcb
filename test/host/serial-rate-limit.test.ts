/**
 * PUT /serial's rate_limiter with a real guest (needs /dev/kvm, gcc and ld for the tiny guests):
 * the consoleburst guest writes 256 KiB to COM1 as fast as it can and powers off. With a bucket
 * of 4096 bytes, a one-time burst of 1000 and a refill too slow to matter during the test, the
 * output file holds exactly the first 5096 bytes the guest wrote; the rest is dropped without
 * holding the guest (it reaches its poweroff) and counted in uart.rate_limiter_dropped_bytes.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { call, startServer } from '../api/client.js';
import { guestPath, tinyGuests } from './helpers.js';

const guests = tinyGuests();
const T = { timeout: 90_000, skip: guests.skip ?? false };
const BANNER = 'tiny guest up\n';
const BURST_BYTES = 256 * 1024;

test(
  'the serial rate limiter drops what is over the bucket, counts it, and never stalls the guest',
  T,
  async (t) => {
    const srv = await startServer();
    try {
      const out = join(srv.dir, 'serial.out');
      const metrics = join(srv.dir, 'metrics.ndjson');
      const limit = { size: 4096, one_time_burst: 1000, refill_time: 1e12 };
      for (const [path, body] of [
        ['/serial', { serial_out_path: out, rate_limiter: limit }],
        ['/metrics', { metrics_path: metrics }],
        ['/machine-config', { vcpu_count: 1, mem_size_mib: 32 }],
        ['/boot-source', { kernel_image_path: guestPath('consoleburst') }],
        ['/actions', { action_type: 'InstanceStart' }],
      ] as Array<[string, unknown]>) {
        const r = await call(srv.sock, 'PUT', path, body);
        assert.equal(r.status, 204, `${path}: ${r.body}`);
      }
      const t0 = performance.now();
      const ended = await srv.exited;
      t.diagnostic(`the guest powered off ${(performance.now() - t0).toFixed(0)} ms after start`);
      assert.equal(ended.code, 0, srv.stderr());
      const got = readFileSync(out);
      const allowed = limit.size + limit.one_time_burst;
      assert.equal(got.length, allowed, 'bucket + one-time burst, not a byte more');
      assert.ok(got.toString('latin1').startsWith(BANNER));
      // The guest's lines: 63 bytes '0'..'n', then '\n'.
      const body = got.subarray(BANNER.length);
      for (let i = 0; i < body.length; i++) {
        const want = i % 64 === 63 ? 0x0a : 0x30 + (i % 64);
        if (body[i] !== want) assert.fail(`byte ${i} of the output is ${body[i]}, not ${want}`);
      }
      const lines = readFileSync(metrics, 'utf8').trim().split('\n');
      const sum = (k: string) =>
        lines.reduce((a, l) => a + ((JSON.parse(l).uart?.[k] as number | undefined) ?? 0), 0);
      const written = BANNER.length + BURST_BYTES;
      assert.equal(sum('write_count'), written);
      assert.equal(sum('rate_limiter_dropped_bytes'), written - allowed);
      assert.equal(sum('missed_write_count'), 0);
    } finally {
      await srv.kill();
    }
  },
);

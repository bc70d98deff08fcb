/**
 * Needs /dev/kvm, gcc and ld. Issue 12, hostile guest 2: virtio-blk aliasing. hostile-blk
 * (test/guests/hostile-guests.S, MODE_BLK) sends reads whose indirect table holds 1022 data
 * descriptors of 1 MiB, every one the same 1 MiB of guest RAM: 1022 MiB of host I/O per request
 * from 1 MiB of guest memory, one request per kick, kick after kick, against a sparse scratch
 * image. virtio-blk advertises seg_max 254: such a request must be refused (VIRTIO_BLK_S_IOERR,
 * the guest prints 'x'), not served ('.'); whatever it does, the VMM's memory stays bounded, the
 * guest's virtio-rng requests between rounds are served, the API answers and SIGTERM stops it.
 *
 * RSS: the guest touches under 5 MiB of its RAM (rings, the 1 MiB buffer); the image's page
 * cache is not the VMM's RSS.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { closeSync, ftruncateSync, openSync } from 'node:fs';
import { join } from 'node:path';
import { tempDir } from './helpers.js';
import {
  apiUp,
  assertAnsweredBoundedStopped,
  hostileGuest,
  hostileSkipReason,
  type HostileVm,
  measure,
  metricSum,
  report,
  startVm,
  STOP_MS,
  STORM_MS,
  windowFigures,
} from './hostile-helpers.js';

const skip = hostileSkipReason();
/** The guest reads sectors [0, 1022 MiB): a sparse image a little larger. */
const DISK_BYTES = 1100 * 1024 * 1024;

test(
  'blk requests aliasing one buffer 1022 times: refused, memory bounded, rng and API served, SIGTERM stops it',
  { skip: skip ?? false, timeout: 60_000 },
  async (t) => {
    const disk = join(tempDir('typervisor-hostile-disk-'), 'scratch.img');
    const fd = openSync(disk, 'w');
    ftruncateSync(fd, DISK_BYTES); // sparse: no disk space, reads see zeros
    closeSync(fd);
    let vm: HostileVm | undefined;
    try {
      vm = await startVm({
        kernel: hostileGuest('hostile-blk'),
        rng: true,
        drives: [{ id: 'scratch', path: disk, readOnly: true }],
      });
      await vm.waitFor(/F\n/, 20_000);
      // The first round also fills the image's page cache (a second or more on a busy host).
      const t0 = performance.now();
      await vm.waitFor(/F\n[.xT]/, 20_000);
      const firstRoundMs = performance.now() - t0;
      await apiUp(vm);
      let rounds = '';
      const w = await measure(vm, STORM_MS, () => (rounds = vm!.stdout().split('F\n')[1]!));
      const served = (rounds.match(/\./g) ?? []).length;
      const refused = (rounds.match(/x/g) ?? []).length;
      const misses = (rounds.match(/T/g) ?? []).length;
      const stopMs = await vm.stop('SIGTERM', STOP_MS);
      const ex = vm.gone() ? await vm.exited : undefined;
      const readBytes = metricSum(vm, 'block_scratch', 'read_bytes');
      report(t, 'blk-aliasing', {
        firstRoundMs: Math.round(firstRoundMs),
        stormMs: Math.round(w.ms),
        roundsServed: served,
        roundsRefused: refused,
        hostReadGiB: Math.round((readBytes / 2 ** 30) * 10) / 10,
        invalidRequests: metricSum(vm, 'block_scratch', 'invalid_reqs_count'),
        rngMissed: misses,
        ...windowFigures(w, stopMs, ex),
      });
      assert.equal(misses, 0, 'a virtio-rng request was not served between blk rounds');
      assertAnsweredBoundedStopped(w, stopMs, ex, vm, 'the storm');
      // The cap: 1022 data segments (over seg_max 254, 1022 MiB in one request) are refused.
      assert.ok(served + refused > 0, `no blk round completed: ${JSON.stringify(rounds)}`);
      assert.equal(
        served,
        0,
        `${served} requests of 1022 x 1 MiB aliasing one buffer were served (${readBytes} bytes read from 1 MiB of guest RAM); they must be refused`,
      );
    } finally {
      await vm?.kill();
    }
  },
);

import { test } from 'node:test';
import assert from 'node:assert/strict';
import { GuestMemory } from '../../../memory/guest-memory.js';
import { PersistError } from '../../../util/persist.js';
import { harness, RAM_SIZE } from '../testing/harness.js';
import {
  BALLOON_PAGE,
  BalloonDevice,
  BalloonRequestError,
  type BalloonDescription,
  type BalloonOptions,
  type BalloonRequest,
  CONFIG_ACTUAL,
  CONFIG_HINT_CMD_ID,
  CONFIG_NUM_PAGES,
  HINT_CMD_DONE,
  HINT_CMD_STOP,
  MAX_PFNS_PER_CHAIN,
  VIRTIO_BALLOON_F_FREE_PAGE_HINT,
  VIRTIO_BALLOON_F_STATS_VQ,
  balloonIdentity,
  queueRoles,
} from './balloon.js';
import { bit } from '../constants.js';

const BASE: BalloonOptions = {
  amountMib: 1,
  deflateOnOom: true,
  statsPollingIntervalS: 0,
  freePageHinting: false,
  freePageReporting: false,
};

/** A balloon over the harness's memory; discards are recorded and zero the pages. */
function setup(over: Partial<BalloonOptions> = {}, from?: ReturnType<typeof harness>) {
  const opts = { ...BASE, ...over };
  const mem = from?.mem ?? GuestMemory.anonymous([{ base: 0, size: RAM_SIZE }]);
  const discards: Array<[number, number, number]> = [];
  const timers: Array<{ ms: number; fn: (() => void) | undefined }> = [];
  const dev = new BalloonDevice(
    opts,
    {
      regions: mem.regions,
      discard(i, off, len) {
        discards.push([i, off, len]);
        mem.regions[i]!.bytes.fill(0, off, off + len);
      },
    },
    (ms, fn) => {
      const t = { ms, fn: fn as (() => void) | undefined };
      timers.push(t);
      return () => void (t.fn = undefined);
    },
  );
  const h = harness(balloonIdentity(opts), dev, { mem, ...(from ? { alloc: from.alloc } : {}) });
  const config: BalloonDescription[] = [];
  dev.onConfig = (c) => void h.device.state.changeConfig(c.offset, c.bytes);
  const control = (r: BalloonRequest) => {
    const out = dev.control(r, h.device.state.config);
    if (out.config) h.device.state.changeConfig(out.config.offset, out.config.bytes);
    return out.value;
  };
  const fire = () => {
    const live = timers.filter((t) => t.fn);
    timers.length = 0;
    for (const t of live) t.fn!();
    return live.map((t) => t.ms);
  };
  return { h, dev, mem, discards, control, fire, config };
}

const pfnBuf = (h: ReturnType<typeof harness>, pfns: number[]) => {
  const a = h.alloc.alloc(pfns.length * 4);
  const v = new DataView(h.mem.regions[0]!.bytes.buffer);
  pfns.forEach((p, i) => v.setUint32(a + i * 4, p, true));
  return { addr: a, len: pfns.length * 4 };
};

test('balloon: queues and features follow the options', () => {
  assert.deepEqual(queueRoles(balloonIdentity(BASE).features), ['inflate', 'deflate']);
  const all = balloonIdentity({
    ...BASE,
    statsPollingIntervalS: 1,
    freePageHinting: true,
    freePageReporting: true,
  });
  assert.deepEqual(queueRoles(all.features), ['inflate', 'deflate', 'stats', 'hint', 'report']);
  assert.equal(all.queueSizes.length, 5);
  // A driver that takes hinting but not statistics: the hint queue is the third.
  assert.deepEqual(queueRoles(bit(VIRTIO_BALLOON_F_FREE_PAGE_HINT)), [
    'inflate',
    'deflate',
    'hint',
  ]);
});

test('balloon: inflate gives valid pages back (coalesced), counts bad PFNs, never fails', () => {
  const { h, dev, discards, mem } = setup();
  const [inflate] = h.start();
  mem.regions[0]!.bytes.fill(0xaa, 0x200000, 0x204000);
  // Pages 0x200..0x203 (in any order), one outside RAM, one far beyond, and a repeated one.
  inflate!.addChain([pfnBuf(h, [0x201, 0x200, 0x203, 0x202, 0x10_0000, 0xffff_ffff, 0x300])]);
  h.kick(0);
  assert.deepEqual(inflate!.takeUsed(), [{ id: 0, len: 0 }]);
  assert.deepEqual(discards, [
    [0, 0x200000, 4 * BALLOON_PAGE],
    [0, 0x300000, BALLOON_PAGE],
  ]);
  assert.ok(mem.regions[0]!.bytes.subarray(0x200000, 0x204000).every((b) => b === 0));
  assert.equal(dev.counters.invalid_pfns, 2);
  assert.equal(dev.counters.inflated_pages, 5);
  assert.equal(dev.counters.inflate_count, 1);
  assert.equal(h.device.deviceState.kind, 'active');
  assert.ok(h.interrupts() >= 1);
});

test('balloon: a chain of too many PFNs is cut at the cap (counted), a torn PFN counted', () => {
  const { h, dev, discards } = setup();
  const [inflate, deflate] = h.start();
  const many = Array.from({ length: MAX_PFNS_PER_CHAIN + 10 }, (_, i) => 0x100 + (i % 256));
  inflate!.addChain([pfnBuf(h, many)]);
  h.kick(0);
  assert.equal(dev.counters.pfn_cap_hits, 1);
  assert.equal(dev.counters.inflated_pages, MAX_PFNS_PER_CHAIN);
  assert.equal(discards.length, 1, 'contiguous pages go back in one call');
  // Deflate: nothing is discarded; bad input is counted.
  const torn = h.alloc.alloc(6);
  deflate!.addChain([pfnBuf(h, [0x100, 0x999999]), { addr: torn, len: 6 }]);
  h.kick(1);
  assert.deepEqual(deflate!.takeUsed(), [{ id: 0, len: 0 }]);
  assert.equal(dev.counters.deflate_count, 1);
  assert.equal(dev.counters.invalid_pfns, 2);
  assert.equal(discards.length, 1);
});

test('balloon: the target is written to config (with a config interrupt), actual is read back', () => {
  const { h, control } = setup({ amountMib: 2 });
  h.start();
  assert.equal(h.driver.read(0x100 + CONFIG_NUM_PAGES), 512);
  const gen = h.driver.read(0x0fc);
  control({ op: 'set-target', amountMib: 8 });
  assert.equal(h.driver.read(0x100 + CONFIG_NUM_PAGES), 2048);
  assert.notEqual(h.driver.read(0x0fc), gen);
  assert.equal(h.driver.takeInterrupt() & 2, 2);
  // The driver writes actual; the device reports it. Other config bytes stay read-only.
  h.driver.write(0x100 + CONFIG_ACTUAL, 1000);
  h.driver.write(0x100 + CONFIG_NUM_PAGES, 7);
  h.driver.write(0x100 + CONFIG_HINT_CMD_ID, 7);
  const d = control({ op: 'describe' }) as BalloonDescription;
  assert.equal(d.actualPages, 1000);
  assert.equal(d.targetPages, 2048);
  assert.equal(h.driver.read(0x100 + CONFIG_HINT_CMD_ID), HINT_CMD_STOP);
  assert.throws(() => control({ op: 'set-target', amountMib: 2 ** 24 }), BalloonRequestError);
});

function statsBuf(h: ReturnType<typeof harness>, entries: Array<[number, bigint]>) {
  const a = h.alloc.alloc(entries.length * 10);
  const v = new DataView(h.mem.regions[0]!.bytes.buffer);
  entries.forEach(([tag, val], i) => {
    v.setUint16(a + i * 10, tag, true);
    v.setBigUint64(a + i * 10 + 2, val, true);
  });
  return { addr: a, len: entries.length * 10 };
}

test('balloon: statistics are held, given back at each poll, and read when refilled', () => {
  const { h, dev, control, fire } = setup({ statsPollingIntervalS: 2 });
  const qs = h.start();
  const stats = qs[2]!;
  const buf = statsBuf(h, [
    [4, 1000n],
    [5, 4096n],
    [99, 5n], // unknown tag: ignored
  ]);
  stats.addChain([buf]);
  h.kick(2);
  assert.deepEqual(stats.takeUsed(), [], 'the buffer is held until the poll');
  let d = control({ op: 'describe' }) as BalloonDescription;
  assert.deepEqual(d.stats, { free_memory: 1000, total_memory: 4096 });
  assert.deepEqual(fire(), [2000], 'the poll runs at the interval');
  assert.deepEqual(stats.takeUsed(), [{ id: 0, len: 0 }]);
  // The driver refills it.
  stats.addChain([statsBuf(h, [[4, 900n]])]);
  h.kick(2);
  d = control({ op: 'describe' }) as BalloonDescription;
  assert.equal(d.stats.free_memory, 900);
  assert.equal(d.stats.total_memory, 4096, 'a tag not given again keeps its value');
  assert.equal(dev.counters.stats_updates_count, 2);
  // PATCH /balloon/statistics: polled at once, then at the new interval; cannot turn off.
  control({ op: 'set-stats-interval', seconds: 5 });
  assert.equal(stats.takeUsed().length, 1);
  assert.deepEqual(fire(), [5000]);
  assert.throws(
    () => control({ op: 'set-stats-interval', seconds: 0 }),
    /cannot be enabled\/disabled/,
  );
  // A torn entry is a failed update (counted), not an error of the device.
  stats.addChain([{ addr: h.alloc.alloc(15), len: 15 }]);
  h.kick(2);
  assert.equal(dev.counters.stats_update_fails, 1);
  assert.equal(h.device.deviceState.kind, 'active');
});

test('balloon: statistics disabled pre-boot cannot be enabled', () => {
  const { h, control } = setup();
  h.start();
  assert.throws(() => control({ op: 'set-stats-interval', seconds: 1 }), BalloonRequestError);
  assert.equal(queueRoles(balloonIdentity(BASE).features).includes('stats'), false);
  assert.equal((balloonIdentity(BASE).features & bit(VIRTIO_BALLOON_F_STATS_VQ)) !== 0n, false);
});

test('balloon: free page reporting gives every reported range back', () => {
  const { h, dev, discards } = setup({ freePageReporting: true });
  const qs = h.start();
  const report = qs[2]!;
  const a = 0x100000; // a free range of the guest's, 2 pages (page aligned)
  report.addChain([
    { addr: a, len: 2 * BALLOON_PAGE, write: true },
    { addr: 0x180800, len: 0x100, write: true }, // less than a page: nothing to give back
  ]);
  h.kick(2);
  assert.deepEqual(report.takeUsed(), [{ id: 0, len: 0 }]);
  assert.deepEqual(discards, [[0, a, 2 * BALLOON_PAGE]]);
  assert.equal(dev.counters.free_page_report_count, 2);
  assert.equal(dev.counters.free_page_report_freed, 2 * BALLOON_PAGE);
  assert.equal(dev.counters.free_page_report_fails, 1);
});

test('balloon: free page hinting runs as Firecracker runs it', () => {
  const { h, dev, discards, control } = setup({ freePageHinting: true });
  const qs = h.start();
  const hint = qs[2]!;
  const cmd = (id: number) => {
    const a = h.alloc.alloc(4);
    new DataView(h.mem.regions[0]!.bytes.buffer).setUint32(a, id, true);
    return { addr: a, len: 4 };
  };
  assert.deepEqual(control({ op: 'hint-status' }), { host_cmd: 0 });
  control({ op: 'hint-start', acknowledgeOnStop: true });
  assert.equal(h.driver.read(0x100 + CONFIG_HINT_CMD_ID), 2);
  // A range before the driver named the run is ignored; then the run's ranges go back.
  hint.addChain([{ addr: 0x200000, len: BALLOON_PAGE, write: true }]);
  hint.addChain([cmd(2)]);
  hint.addChain([{ addr: 0x300000, len: 4 * BALLOON_PAGE, write: true }]);
  h.kick(2);
  assert.deepEqual(discards, [[0, 0x300000, 4 * BALLOON_PAGE]]);
  assert.equal(dev.counters.free_page_hint_freed, 4 * BALLOON_PAGE);
  // The driver's STOP: acknowledged with DONE (the guest takes its pages back).
  hint.addChain([cmd(HINT_CMD_STOP)]);
  h.kick(2);
  assert.equal(h.driver.read(0x100 + CONFIG_HINT_CMD_ID), HINT_CMD_DONE);
  assert.deepEqual(control({ op: 'hint-status' }), { host_cmd: 1, guest_cmd: 0 });
  // A new run gets a new id; stop says DONE; ranges after it are not given back.
  control({ op: 'hint-start', acknowledgeOnStop: false });
  assert.equal(h.driver.read(0x100 + CONFIG_HINT_CMD_ID), 3);
  control({ op: 'hint-stop' });
  hint.addChain([cmd(3)]);
  hint.addChain([{ addr: 0x380000, len: BALLOON_PAGE, write: true }]);
  h.kick(2);
  assert.equal(discards.length, 1);
  assert.equal(hint.takeUsed().length, 6);
  const plain = setup();
  assert.throws(() => plain.control({ op: 'hint-start', acknowledgeOnStop: true }), /not enabled/);
});

test('balloon: save and restore keep statistics, hinting and the held buffer', () => {
  const a = setup({ statsPollingIntervalS: 1, freePageHinting: true });
  const qs = a.h.start();
  qs[2]!.addChain([statsBuf(a.h, [[4, 77n]])]);
  a.h.kick(2);
  a.control({ op: 'hint-start', acknowledgeOnStop: false });
  a.h.driver.write(0x100 + CONFIG_ACTUAL, 12);
  const saved = a.h.device.save();

  const b = setup({ statsPollingIntervalS: 1, freePageHinting: true }, a.h);
  const r = b.h.device.restore(saved);
  assert.ok(r.ok, r.ok ? '' : r.error.message);
  const d = b.control({ op: 'describe' }) as BalloonDescription;
  assert.equal(d.stats.free_memory, 77);
  assert.equal(d.actualPages, 12);
  assert.equal(d.hostCmd, 2);
  // The held statistics buffer went back to the queue: the resumed device takes it again.
  b.h.device.kickAll();
  b.fire();
  assert.equal(b.dev.counters.stats_updates_count, 1);

  // Into a device without statistics: refused, nothing changed.
  const c = setup({ freePageHinting: true }, a.h);
  const bad = c.h.device.restore(saved);
  assert.equal(bad.ok, false);
  assert.throws(() => c.dev.restore(new Uint8Array(3)), PersistError);
});

/**
 * virtio-balloon (device ID 5, virtio 1.2 §5.5), with Firecracker's feature set: inflate and
 * deflate queues, the statistics queue (VIRTIO_BALLOON_F_STATS_VQ) polled on the device worker's
 * timer, deflate-on-OOM, free page hinting (VIRTIO_BALLOON_F_FREE_PAGE_HINT) and free page
 * reporting (VIRTIO_BALLOON_F_PAGE_REPORTING).
 *
 * Queues are numbered as the driver finds them (Linux skips the absent ones): inflateq 0,
 * deflateq 1, then statsq, free_page_vq, reporting_vq, each only if its feature was negotiated.
 *
 * Config space (12 bytes): num_pages (the target, written by the host: PATCH /balloon), actual
 * (the pages the driver holds, written by the driver: the one driver-writable field), and
 * free_page_hint_cmd_id (written by the host: /balloon/hinting/*).
 *
 * Memory given back: every page the driver inflates, reports or hints is discarded from the
 * host (BalloonRam.discard: MADV_DONTNEED on private RAM, a booted VM's anonymous memory or a
 * restored VM's mapping of its file; MADV_REMOVE on a shared memfd, which punches a hole), so the
 * host's RSS drops. Nothing is done on deflate:
 * a page the guest touches again is allocated again (VIRTIO_BALLOON_F_MUST_TELL_HOST is not
 * offered). Every PFN is checked (a page wholly inside one guest RAM region); a bad one is
 * counted (invalid_pfns) and skipped, never fatal.
 *
 * Budgets: the generic per-turn budget of VirtioDevice (64 chains), and per chain at most
 * MAX_PFNS_PER_CHAIN PFNs (Linux sends 256) and MAX_STATS per statistics buffer; what is beyond
 * is ignored and counted (pfn_cap_hits, stats_cap_hits).
 */
import type { GuestRegion } from '../../../memory/guest-memory.js';
import {
  PersistError,
  array,
  bool,
  optional,
  struct,
  u32,
  u53,
  versioned,
} from '../../../util/persist.js';
import type { DescriptorChain } from '../chain.js';
import { QUEUE_SIZE_MAX, VIRTIO_F_RING_INDIRECT_DESC, bit } from '../constants.js';
import type { QueueIo, VirtioBackend } from '../device.js';
import type { VirtioDeviceIdentity } from '../mmio-state.js';

export const DEVICE_ID_BALLOON = 5;
export const VIRTIO_BALLOON_F_MUST_TELL_HOST = 0;
export const VIRTIO_BALLOON_F_STATS_VQ = 1;
export const VIRTIO_BALLOON_F_DEFLATE_ON_OOM = 2;
export const VIRTIO_BALLOON_F_FREE_PAGE_HINT = 3;
export const VIRTIO_BALLOON_F_PAGE_REPORTING = 5;

export const CONFIG_NUM_PAGES = 0;
export const CONFIG_ACTUAL = 4;
export const CONFIG_HINT_CMD_ID = 8;
export const BALLOON_CONFIG_LEN = 12;

/** The balloon's page: PFNs are in 4 KiB units whatever the guest's page size. */
export const BALLOON_PAGE = 4096;
export const PAGES_PER_MIB = 256;
/** Linux sends at most 256 PFNs per request (VIRTIO_BALLOON_ARRAY_PFNS_MAX). */
export const MAX_PFNS_PER_CHAIN = 1024;
/** Statistics tags 0..15 exist; a buffer with more entries than this is cut. */
export const MAX_STATS = 64;
const STAT_ENTRY = 10; // le16 tag, le64 value (packed)

/** Free page hinting command ids (the spec's VIRTIO_BALLOON_CMD_ID_STOP / _DONE). */
export const HINT_CMD_STOP = 0;
export const HINT_CMD_DONE = 1;

/** The statistics tags (§5.5.6.3), by Firecracker's API names. */
export const STAT_NAMES = [
  'swap_in',
  'swap_out',
  'major_faults',
  'minor_faults',
  'free_memory',
  'total_memory',
  'available_memory',
  'disk_caches',
  'hugetlb_allocations',
  'hugetlb_failures',
  'oom_kill',
  'alloc_stall',
  'async_scan',
  'direct_scan',
  'async_reclaim',
  'direct_reclaim',
] as const;
export type StatName = (typeof STAT_NAMES)[number];

export interface BalloonOptions {
  amountMib: number;
  deflateOnOom: boolean;
  /** 0: no statistics queue. */
  statsPollingIntervalS: number;
  freePageHinting: boolean;
  freePageReporting: boolean;
}

export function balloonFeatures(o: BalloonOptions): bigint {
  let f = 0n;
  if (o.statsPollingIntervalS > 0) f |= bit(VIRTIO_BALLOON_F_STATS_VQ);
  if (o.deflateOnOom) f |= bit(VIRTIO_BALLOON_F_DEFLATE_ON_OOM);
  if (o.freePageHinting) f |= bit(VIRTIO_BALLOON_F_FREE_PAGE_HINT);
  if (o.freePageReporting) f |= bit(VIRTIO_BALLOON_F_PAGE_REPORTING);
  return f;
}

/** The queues present with these features: [inflate, deflate, stats?, hint?, report?]. */
export function queueRoles(features: bigint): QueueRole[] {
  const roles: QueueRole[] = ['inflate', 'deflate'];
  if (features & bit(VIRTIO_BALLOON_F_STATS_VQ)) roles.push('stats');
  if (features & bit(VIRTIO_BALLOON_F_FREE_PAGE_HINT)) roles.push('hint');
  if (features & bit(VIRTIO_BALLOON_F_PAGE_REPORTING)) roles.push('report');
  return roles;
}
export type QueueRole = 'inflate' | 'deflate' | 'stats' | 'hint' | 'report';

const le32 = (v: number): Uint8Array => {
  const b = new Uint8Array(4);
  new DataView(b.buffer).setUint32(0, v >>> 0, true);
  return b;
};

export function balloonIdentity(o: BalloonOptions): VirtioDeviceIdentity {
  const features = balloonFeatures(o);
  const config = new Uint8Array(BALLOON_CONFIG_LEN);
  config.set(le32(o.amountMib * PAGES_PER_MIB), CONFIG_NUM_PAGES);
  config.set(le32(HINT_CMD_STOP), CONFIG_HINT_CMD_ID);
  return {
    deviceId: DEVICE_ID_BALLOON,
    features: features | bit(VIRTIO_F_RING_INDIRECT_DESC),
    queueSizes: queueRoles(features).map(() => QUEUE_SIZE_MAX),
    config,
    configWritable: { offset: CONFIG_ACTUAL, length: 4 },
  };
}

/** Guest RAM as the balloon sees it: the regions, and how a page range goes back to the host. */
export interface BalloonRam {
  readonly regions: readonly GuestRegion[];
  /** Gives bytes [offset, offset + length) of region `index` back to the host; may throw. */
  discard(index: number, offset: number, length: number): void;
}

/** The device worker's timer, as the balloon uses it (EventOps.setTimer). */
export type SetTimer = (ms: number, fn: () => void) => () => void;

/** What the API asks of a running balloon (through the device worker's mailbox). */
export type BalloonRequest =
  | { op: 'set-target'; amountMib: number }
  | { op: 'set-stats-interval'; seconds: number }
  | { op: 'describe' }
  | { op: 'hint-start'; acknowledgeOnStop: boolean }
  | { op: 'hint-stop' }
  | { op: 'hint-status' };

export interface BalloonDescription {
  targetPages: number;
  actualPages: number;
  statsPollingIntervalS: number;
  /** The latest statistics the driver gave, by name (absent: never given). */
  stats: Partial<Record<StatName, number>>;
  hostCmd: number;
  guestCmd?: number;
}

/** A control request's answer, and the config-space bytes the worker must change. */
export interface BalloonReply {
  value: unknown;
  config?: { offset: number; bytes: Uint8Array };
}

/** Thrown for a request the balloon refuses (the API answers 400 with the message). */
export class BalloonRequestError extends Error {}

export const BalloonStateV1 = versioned(
  'virtio-balloon',
  1,
  struct({
    statsPollingIntervalS: u32,
    /** The latest value of each statistics tag (undefined: never given). */
    stats: array(optional(u53), STAT_NAMES.length),
    hostCmd: u32,
    lastCmdId: u32,
    guestCmd: optional(u32),
    acknowledgeOnStop: bool,
  }),
);

export interface BalloonCounters {
  inflate_count: number;
  deflate_count: number;
  stats_updates_count: number;
  stats_update_fails: number;
  event_fails: number;
  free_page_report_count: number;
  free_page_report_freed: number;
  free_page_report_fails: number;
  free_page_hint_count: number;
  free_page_hint_freed: number;
  free_page_hint_fails: number;
  /** Ours: PFNs outside guest RAM (inflate and deflate), pages discarded, caps hit. */
  invalid_pfns: number;
  inflated_pages: number;
  discard_fails: number;
  pfn_cap_hits: number;
  stats_cap_hits: number;
}

export class BalloonDevice implements VirtioBackend {
  readonly name = 'virtio-balloon';
  readonly counters: BalloonCounters = {
    inflate_count: 0,
    deflate_count: 0,
    stats_updates_count: 0,
    stats_update_fails: 0,
    event_fails: 0,
    free_page_report_count: 0,
    free_page_report_freed: 0,
    free_page_report_fails: 0,
    free_page_hint_count: 0,
    free_page_hint_freed: 0,
    free_page_hint_fails: 0,
    invalid_pfns: 0,
    inflated_pages: 0,
    discard_fails: 0,
    pfn_cap_hits: 0,
    stats_cap_hits: 0,
  };
  private readonly offered: bigint;
  private roles: QueueRole[];
  private io: QueueIo | undefined;
  private statsInterval: number;
  private stats: Array<number | undefined> = new Array(STAT_NAMES.length).fill(undefined);
  /** The statistics buffer the driver gave, held until the next poll. */
  private held: number | undefined;
  private cancelTimer: (() => void) | undefined;
  private hostCmd = HINT_CMD_STOP;
  private lastCmdId = 0;
  private guestCmd: number | undefined;
  private acknowledgeOnStop = true;

  constructor(
    private readonly opts: BalloonOptions,
    private readonly ram: BalloonRam,
    private readonly setTimer: SetTimer,
    private readonly log: (m: string) => void = () => undefined,
  ) {
    this.offered = balloonFeatures(opts);
    this.roles = queueRoles(this.offered);
    this.statsInterval = opts.statsPollingIntervalS;
  }

  /** The statistics queue is served here (its buffer is held between polls). */
  get selfServed(): readonly number[] {
    const i = this.roles.indexOf('stats');
    return i < 0 ? [] : [i];
  }

  activate(features: bigint, io: QueueIo, _restored?: boolean): void {
    this.roles = queueRoles(features & this.offered);
    this.io = io;
    this.held = undefined;
    this.schedulePoll();
  }

  deactivate(): void {
    this.io = undefined;
    this.held = undefined;
    this.cancelTimer?.();
    this.cancelTimer = undefined;
  }

  handle(queue: number, chain: DescriptorChain): number {
    switch (this.roles[queue]) {
      case 'inflate':
        this.counters.inflate_count++;
        this.inflate(chain);
        return 0;
      case 'deflate':
        this.counters.deflate_count++;
        // Pages come back on first touch: only the PFNs' validity is checked (and counted).
        this.pfns(chain);
        return 0;
      case 'report':
        this.report(chain);
        return 0;
      case 'hint':
        this.hint(chain);
        return 0;
      default:
        this.counters.event_fails++;
        return 0;
    }
  }

  /** A kick of the statistics queue: the driver gave (back) its buffer, with fresh values. */
  kick(queue: number): void {
    const io = this.io;
    if (!io || this.roles[queue] !== 'stats') return;
    // At most a queue's worth per kick (a second vCPU could keep publishing buffers).
    for (let n = 0, c = io.pop(queue); c; c = ++n < QUEUE_SIZE_MAX ? io.pop(queue) : undefined) {
      if (this.held !== undefined) {
        // A second buffer while one is held: the driver's protocol has one. Give the old back.
        this.counters.stats_update_fails++;
        io.pushUsed(queue, this.held, 0);
      }
      this.readStats(c);
      this.held = c.head;
    }
    io.notify(queue);
  }

  /** The PFNs of an inflate/deflate request, validated: [region, offset] of each good page. */
  private pfns(chain: DescriptorChain): Array<[number, number]> {
    const out: Array<[number, number]> = [];
    let seen = 0;
    for (const seg of chain.readable) {
      const v = new DataView(seg.buffer, seg.byteOffset, seg.byteLength);
      const whole = seg.byteLength & ~3;
      if (whole !== seg.byteLength) this.counters.invalid_pfns++;
      for (let o = 0; o < whole; o += 4) {
        if (seen++ >= MAX_PFNS_PER_CHAIN) {
          this.counters.pfn_cap_hits++;
          return out;
        }
        const at = this.locate(v.getUint32(o, true) * BALLOON_PAGE, BALLOON_PAGE);
        if (at) out.push(at);
        else this.counters.invalid_pfns++;
      }
    }
    return out;
  }

  /** [region index, offset] of guest range [gpa, gpa+len) if wholly inside one region. */
  private locate(gpa: number, len: number): [number, number] | undefined {
    const rs = this.ram.regions;
    for (let i = 0; i < rs.length; i++) {
      const r = rs[i]!;
      if (gpa >= r.base && gpa + len <= r.base + r.size) return [i, gpa - r.base];
    }
    return undefined;
  }

  private inflate(chain: DescriptorChain): void {
    const pages = this.pfns(chain).sort((a, b) => a[0] - b[0] || a[1] - b[1]);
    // Contiguous pages go back in one call.
    let i = 0;
    while (i < pages.length) {
      const [region, start] = pages[i]!;
      let end = start + BALLOON_PAGE;
      let j = i + 1;
      for (; j < pages.length; j++) {
        const [r, o] = pages[j]!;
        if (r !== region || o > end) break;
        end = Math.max(end, o + BALLOON_PAGE);
      }
      if (this.discard(region, start, end - start)) this.counters.inflated_pages += j - i;
      i = j;
    }
  }

  private discard(region: number, offset: number, length: number): boolean {
    try {
      this.ram.discard(region, offset, length);
      return true;
    } catch (e) {
      this.counters.discard_fails++;
      this.log(`${this.name}: giving back ${length} bytes failed: ${(e as Error).message}`);
      return false;
    }
  }

  /**
   * A buffer of the guest (a chain segment: a view into one region's host buffer) as whole
   * balloon pages: [region, offset, length], or undefined if it holds none.
   */
  private pagesOf(seg: Uint8Array): [number, number, number] | undefined {
    const rs = this.ram.regions;
    for (let i = 0; i < rs.length; i++) {
      const b = rs[i]!.bytes;
      if (seg.buffer !== b.buffer) continue;
      const rel = seg.byteOffset - b.byteOffset;
      if (rel < 0 || rel + seg.byteLength > b.byteLength) continue;
      const gpa = rs[i]!.base + rel;
      const first = Math.ceil(gpa / BALLOON_PAGE) * BALLOON_PAGE;
      const last = Math.floor((gpa + seg.byteLength) / BALLOON_PAGE) * BALLOON_PAGE;
      if (last <= first) return undefined;
      return [i, first - rs[i]!.base, last - first];
    }
    return undefined;
  }

  /** Free page reporting: every buffer is a free range of the guest's; give it back. */
  private report(chain: DescriptorChain): void {
    for (const seg of [...chain.readable, ...chain.writable]) {
      this.counters.free_page_report_count++;
      const p = this.pagesOf(seg);
      if (p && this.discard(...p)) this.counters.free_page_report_freed += p[2];
      else this.counters.free_page_report_fails++;
    }
  }

  /**
   * Free page hinting, as Firecracker runs it: a 4-byte buffer is the driver's command id (the
   * run it answers, or STOP when it has hinted all it found); other buffers are free ranges of
   * the current run, given back unless the host has stopped the run.
   */
  private hint(chain: DescriptorChain): void {
    let complete = false;
    for (const seg of [...chain.readable, ...chain.writable]) {
      if (seg.byteLength === 4) {
        const cmd = new DataView(seg.buffer, seg.byteOffset, 4).getUint32(0, true);
        this.guestCmd = cmd;
        complete = cmd === HINT_CMD_STOP || cmd === HINT_CMD_DONE;
        continue;
      }
      if (this.hostCmd === HINT_CMD_STOP || this.hostCmd === HINT_CMD_DONE) continue;
      if (this.guestCmd !== this.hostCmd) continue; // a range of an earlier run
      this.counters.free_page_hint_count++;
      const p = this.pagesOf(seg);
      if (p && this.discard(...p)) this.counters.free_page_hint_freed += p[2];
      else this.counters.free_page_hint_fails++;
    }
    if (complete && this.acknowledgeOnStop && this.hostCmd > HINT_CMD_DONE) {
      this.hostCmd = HINT_CMD_DONE;
      this.onConfig?.({ offset: CONFIG_HINT_CMD_ID, bytes: le32(HINT_CMD_DONE) });
    }
  }

  /**
   * How the balloon changes its config space on its own (the hinting run's DONE after the
   * driver's STOP): the device worker sets it to VirtioMmioState.changeConfig + the irqfd.
   */
  onConfig: ((c: { offset: number; bytes: Uint8Array }) => void) | undefined;

  private readStats(c: DescriptorChain): void {
    let n = 0;
    let bad = false;
    for (const seg of c.readable) {
      const v = new DataView(seg.buffer, seg.byteOffset, seg.byteLength);
      if (seg.byteLength % STAT_ENTRY !== 0) bad = true;
      for (let o = 0; o + STAT_ENTRY <= seg.byteLength; o += STAT_ENTRY) {
        if (n++ >= MAX_STATS) {
          this.counters.stats_cap_hits++;
          break;
        }
        const tag = v.getUint16(o, true);
        const value = Math.min(Number(v.getBigUint64(o + 2, true)), Number.MAX_SAFE_INTEGER);
        if (tag < STAT_NAMES.length) this.stats[tag] = value;
      }
    }
    // Linux gives whole entries in one buffer; an entry cut across buffers is not read.
    if (bad) this.counters.stats_update_fails++;
    else this.counters.stats_updates_count++;
  }

  /** The polling timer: give the held buffer back, so the driver refills it. */
  private schedulePoll(): void {
    this.cancelTimer?.();
    this.cancelTimer = undefined;
    if (!this.io || this.statsInterval <= 0 || !this.roles.includes('stats')) return;
    this.cancelTimer = this.setTimer(this.statsInterval * 1000, () => {
      this.cancelTimer = undefined;
      this.poll();
      this.schedulePoll();
    });
  }

  private poll(): void {
    const io = this.io;
    const q = this.roles.indexOf('stats');
    if (!io || q < 0 || this.held === undefined) return;
    io.pushUsed(q, this.held, 0);
    this.held = undefined;
    io.notify(q);
  }

  /** A request of the API (device worker thread). Throws BalloonRequestError to refuse. */
  control(r: BalloonRequest, config: Uint8Array): BalloonReply {
    const cfg = new DataView(config.buffer, config.byteOffset, BALLOON_CONFIG_LEN);
    const hinting = this.opts.freePageHinting;
    switch (r.op) {
      case 'describe': {
        const stats: Partial<Record<StatName, number>> = {};
        STAT_NAMES.forEach((name, i) => {
          const v = this.stats[i];
          if (v !== undefined) stats[name] = v;
        });
        const d: BalloonDescription = {
          targetPages: cfg.getUint32(CONFIG_NUM_PAGES, true),
          actualPages: cfg.getUint32(CONFIG_ACTUAL, true),
          statsPollingIntervalS: this.statsInterval,
          stats,
          hostCmd: this.hostCmd,
          ...(this.guestCmd !== undefined ? { guestCmd: this.guestCmd } : {}),
        };
        return { value: d };
      }
      case 'set-target': {
        const pages = r.amountMib * PAGES_PER_MIB;
        if (!Number.isSafeInteger(pages) || pages < 0 || pages > 0xffff_ffff)
          throw new BalloonRequestError(
            `Requested memory should be less than ${Math.floor(0xffff_ffff / PAGES_PER_MIB)}MiB`,
          );
        return { value: undefined, config: { offset: CONFIG_NUM_PAGES, bytes: le32(pages) } };
      }
      case 'set-stats-interval': {
        if ((this.opts.statsPollingIntervalS === 0) !== (r.seconds === 0))
          throw new BalloonRequestError('Statistics cannot be enabled/disabled after activation.');
        this.statsInterval = r.seconds;
        // The first update right away, then at the new interval.
        this.poll();
        this.schedulePoll();
        return { value: undefined };
      }
      case 'hint-start': {
        if (!hinting) throw new BalloonRequestError('Attempting to use hinting when not enabled');
        let id = (this.lastCmdId + 1) >>> 0;
        if (id <= HINT_CMD_DONE) id = 2;
        this.lastCmdId = id;
        this.hostCmd = id;
        this.acknowledgeOnStop = r.acknowledgeOnStop;
        return { value: undefined, config: { offset: CONFIG_HINT_CMD_ID, bytes: le32(id) } };
      }
      case 'hint-stop':
        if (!hinting) throw new BalloonRequestError('Attempting to use hinting when not enabled');
        this.hostCmd = HINT_CMD_DONE;
        return {
          value: undefined,
          config: { offset: CONFIG_HINT_CMD_ID, bytes: le32(HINT_CMD_DONE) },
        };
      case 'hint-status':
        if (!hinting) throw new BalloonRequestError('Attempting to use hinting when not enabled');
        return {
          value: {
            host_cmd: this.hostCmd,
            ...(this.guestCmd !== undefined ? { guest_cmd: this.guestCmd } : {}),
          },
        };
    }
  }

  /** Counters in Firecracker's balloon metric names (and ours, after them). */
  metrics(): Record<string, number> {
    return { activate_fails: 0, ...this.counters };
  }

  save(): Uint8Array {
    // A held statistics buffer goes back to its queue (restore re-reads it at the next kick).
    const q = this.roles.indexOf('stats');
    if (this.io && q >= 0 && this.held !== undefined && this.io.unpop(q, this.held))
      this.held = undefined;
    return BalloonStateV1.encode({
      statsPollingIntervalS: this.statsInterval,
      stats: [...this.stats],
      hostCmd: this.hostCmd,
      lastCmdId: this.lastCmdId,
      guestCmd: this.guestCmd,
      acknowledgeOnStop: this.acknowledgeOnStop,
    });
  }

  restore(bytes: Uint8Array): void {
    const d = BalloonStateV1.decode(bytes);
    if (!d.ok) throw d.error;
    const s = d.value;
    if (s.stats.length !== STAT_NAMES.length)
      throw new PersistError(
        `virtio-balloon: ${s.stats.length} statistics saved, ${STAT_NAMES.length} expected`,
      );
    if ((s.statsPollingIntervalS === 0) !== (this.opts.statsPollingIntervalS === 0))
      throw new PersistError(
        `virtio-balloon: statistics ${s.statsPollingIntervalS === 0 ? 'off' : 'on'} in the saved state, ${this.opts.statsPollingIntervalS === 0 ? 'off' : 'on'} in this device`,
      );
    this.statsInterval = s.statsPollingIntervalS;
    this.stats = [...s.stats];
    this.hostCmd = s.hostCmd;
    this.lastCmdId = s.lastCmdId;
    this.guestCmd = s.guestCmd;
    this.acknowledgeOnStop = s.acknowledgeOnStop;
  }
}

/**
 * The answer to port-I/O and MMIO accesses that no device claims: reads return all-ones (what
 * a floating ISA/PCI bus gives, and what probing drivers take for "nothing here"), writes are
 * dropped. Each address is reported once (through `log`) per VM, not once per thread: the set of
 * reported addresses is a small lock-free hash table in a SharedArrayBuffer that every vCPU
 * worker shares. Counts are shared too. Never throws for what a guest does.
 */

export type AddressSpace = 'pio' | 'mmio';

export interface UnhandledAccessInfo {
  space: AddressSpace;
  addr: number;
  size: number;
  write: boolean;
}

/** Distinct addresses remembered; after that, new ones are counted but not logged. */
const TABLE_SLOTS = 1024;
const C_READS = 0;
const C_WRITES = 1;
const C_UNLOGGED = 2; // accesses to addresses we had no room to remember
const COUNTERS = 4;
/** Addresses each object (thread) remembers as already claimed, direct-mapped. */
const SEEN_SLOTS = 64;

export interface UnhandledCounters {
  reads: number;
  writes: number;
  distinctAddresses: number;
}

export class UnhandledAccesses {
  private readonly table: BigInt64Array;
  private readonly counters: BigInt64Array;
  /**
   * The counters as 32-bit halves (little-endian: [2i] low, [2i+1] high), so that counting an
   * access makes no BigInt: a guest that loops on an unclaimed port (Linux's io_delay port 0x80,
   * the micro guest's exits/s loop) takes this path on every exit.
   */
  private readonly halves: Uint32Array;
  /**
   * Keys (see noteOnce) this object has seen claimed in the shared table, so that a repeated
   * access does no BigInt hashing; 0 is empty. Per object, i.e. per thread: no sharing.
   */
  private readonly seen = new Float64Array(SEEN_SLOTS);

  static createState(): SharedArrayBuffer {
    return new SharedArrayBuffer((TABLE_SLOTS + COUNTERS) * 8);
  }

  constructor(
    state: SharedArrayBuffer,
    private readonly log: (info: UnhandledAccessInfo) => void,
  ) {
    if (state.byteLength !== (TABLE_SLOTS + COUNTERS) * 8)
      throw new Error('not an UnhandledAccesses state buffer');
    this.table = new BigInt64Array(state, 0, TABLE_SLOTS);
    this.counters = new BigInt64Array(state, TABLE_SLOTS * 8, COUNTERS);
    this.halves = new Uint32Array(state, TABLE_SLOTS * 8, COUNTERS * 2);
  }

  read(space: AddressSpace, addr: number, data: Uint8Array): void {
    data.fill(0xff);
    this.count(C_READS);
    this.noteOnce(space, addr, data.length, false);
  }

  write(space: AddressSpace, addr: number, data: Uint8Array): void {
    this.count(C_WRITES);
    this.noteOnce(space, addr, data.length, true);
  }

  stats(): UnhandledCounters {
    let distinct = 0;
    for (let i = 0; i < TABLE_SLOTS; i++) if (Atomics.load(this.table, i) !== 0n) distinct++;
    return {
      reads: Number(Atomics.load(this.counters, C_READS)),
      writes: Number(Atomics.load(this.counters, C_WRITES)),
      distinctAddresses: distinct,
    };
  }

  /**
   * Adds 1 to a 64-bit counter through its halves: the low half atomically, the carry into the
   * high half when the low one wraps. A reader between the two sees the count 2^32 short for
   * that moment; these are statistics.
   */
  private count(c: number): number {
    const h = this.halves;
    const before = Atomics.add(h, 2 * c, 1);
    return before === 0xffff_ffff ? Atomics.add(h, 2 * c + 1, 1) * 0x1_0000_0000 : before;
  }

  /** Claims the address in the shared table; only the claiming thread logs it. */
  private noteOnce(space: AddressSpace, addr: number, size: number, write: boolean): void {
    // Key: address * 2 + space, plus 1 so that 0 means an empty slot. Addresses are guest
    // physical (< 2^52 on x86) or ports, so the key is exact as a double and fits in 64 bits.
    const k = addr * 2 + (space === 'mmio' ? 2 : 1);
    const slot = (addr ^ (addr >>> 6)) & (SEEN_SLOTS - 1);
    if (this.seen[slot] === k) return;
    this.seen[slot] = k;
    const info: UnhandledAccessInfo = { space, addr, size, write };
    const key = BigInt(k);
    let i = Number((key * 0x9e3779b1n) % BigInt(TABLE_SLOTS));
    for (let probes = 0; probes < TABLE_SLOTS; probes++, i = (i + 1) % TABLE_SLOTS) {
      const seen = Atomics.compareExchange(this.table, i, 0n, key);
      if (seen === 0n) {
        this.log(info);
        return;
      }
      if (seen === key) return;
    }
    // Table full: log the first overflow only, then stay quiet.
    if (this.count(C_UNLOGGED) === 0) this.log(info);
  }
}

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

export interface UnhandledCounters {
  reads: number;
  writes: number;
  distinctAddresses: number;
}

export class UnhandledAccesses {
  private readonly table: BigInt64Array;
  private readonly counters: BigInt64Array;

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
  }

  read(space: AddressSpace, addr: number, data: Uint8Array): void {
    data.fill(0xff);
    Atomics.add(this.counters, C_READS, 1n);
    this.noteOnce({ space, addr, size: data.length, write: false });
  }

  write(space: AddressSpace, addr: number, data: Uint8Array): void {
    Atomics.add(this.counters, C_WRITES, 1n);
    this.noteOnce({ space, addr, size: data.length, write: true });
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

  /** Claims the address in the shared table; only the claiming thread logs it. */
  private noteOnce(info: UnhandledAccessInfo): void {
    // Key: address * 2 + space, plus 1 so that 0 means an empty slot. Addresses are guest
    // physical (< 2^52 on x86) or ports, so the key fits in 64 bits.
    const key = BigInt(info.addr) * 2n + (info.space === 'mmio' ? 1n : 0n) + 1n;
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
    if (Atomics.add(this.counters, C_UNLOGGED, 1n) === 0n) this.log(info);
  }
}

/**
 * io_uring for virtio-blk's Async engine (issue 17 part B; io_uring_setup(2), io_uring_enter(2)).
 * The native shim only makes the three syscalls and maps the rings (mmap at IORING_OFF_SQ_RING
 * and IORING_OFF_SQES); every index, SQE and CQE is handled here over the shared mappings.
 *
 * Memory ordering (the rings are shared with the kernel): we are the only writer of the SQ tail
 * and the CQ head, the kernel of the SQ head and the CQ tail. An SQE is written in full before
 * the tail that publishes it is stored (Atomics.store: a release), and a CQE is read only after
 * the tail that covers it was loaded (Atomics.load: an acquire); the CQ head is stored after the
 * CQEs were read, so the kernel never overwrites one we have not read yet. The indices are u32
 * that wrap: every distance is taken modulo 2^32 (`>>> 0`).
 *
 * The SQ's index array is the identity (array[i] = i, set once): the SQE for tail t is entry
 * t & mask. SQEs are consumed by io_uring_enter itself (no SQPOLL), so they are free again when
 * it returns.
 */
import type { Buf } from '../descriptor.js';

/** The syscalls this needs (the native shim's, through HostSys). */
export interface UringSys {
  ioUringSetup(entries: number, params: Buf): number;
  ioUringEnter(fd: number, toSubmit: number, minComplete: number, flags: number): number;
  ioUringRegister(fd: number, opcode: number, arg: Buf | null, nrArgs: number): number;
  mmap(length: number, prot: number, flags: number, fd: number, offset: number): ArrayBuffer;
  munmap(buffer: ArrayBuffer): void;
  close(fd: number): void;
  eventfd(initval: number, flags: number): number;
  eventfdRead(fd: number): bigint;
}

export const IORING_OP_NOP = 0;
export const IORING_OP_READV = 1;
export const IORING_OP_WRITEV = 2;
export const IORING_OP_FSYNC = 3;
/** SQE flag: start only after every SQE submitted before it has completed. */
export const IOSQE_IO_DRAIN = 1 << 1;
/** SQE flag: never try the request inline in io_uring_enter; hand it to a kernel worker (io-wq). */
export const IOSQE_ASYNC = 1 << 4;
export const IORING_FSYNC_DATASYNC = 1;
export const IORING_ENTER_GETEVENTS = 1;
/** SQ ring flag: completions are waiting in the kernel's overflow list (CQ was full). */
export const IORING_SQ_CQ_OVERFLOW = 1 << 1;
export const IORING_FEAT_SINGLE_MMAP = 1 << 0;
export const IORING_FEAT_NODROP = 1 << 1;
const IORING_REGISTER_EVENTFD = 4;
const IORING_REGISTER_RESTRICTIONS = 11;
const IORING_REGISTER_ENABLE_RINGS = 12;
/** io_uring_setup flag: the ring starts disabled, so restrictions can be registered first. */
const IORING_SETUP_R_DISABLED = 1 << 6;
/** struct io_uring_restriction opcodes. */
const IORING_RESTRICTION_SQE_OP = 1;
const IORING_RESTRICTION_SQE_FLAGS_ALLOWED = 2;
const RESTRICTION_SIZE = 16;
const IORING_OFF_SQ_RING = 0;
const IORING_OFF_SQES = 0x10000000;
const PARAMS_SIZE = 120;
export const SQE_SIZE = 64;
export const CQE_SIZE = 16;
const PROT_RW = 3;
const MAP_SHARED = 1;
const MAP_POPULATE = 0x8000;
const EFD_NONBLOCK = 0o4000;
const EFD_CLOEXEC = 0o2000000;
/** Entries we ask for at most (the kernel's limit is 32768; we need far fewer). */
export const URING_MAX_ENTRIES = 4096;

/**
 * What a ring may be asked to do once enabled (IORING_REGISTER_RESTRICTIONS, Linux >= 5.10):
 * these SQE opcodes with at most these SQE flags, and no io_uring_register operation at all.
 * Anything else completes with -EACCES in the kernel's checks, before any of the opcode's own
 * code runs. So a ring of ours reaches only the few io_uring paths its device uses, whatever
 * is written into its SQEs.
 */
export interface UringAllow {
  ops: readonly number[];
  flags: number;
}

/** Byte offsets of the SQ ring's fields (struct io_sqring_offsets). */
export interface SqOffsets {
  head: number;
  tail: number;
  ringMask: number;
  ringEntries: number;
  flags: number;
  dropped: number;
  array: number;
}
/** Byte offsets of the CQ ring's fields (struct io_cqring_offsets). */
export interface CqOffsets {
  head: number;
  tail: number;
  ringMask: number;
  ringEntries: number;
  overflow: number;
  cqes: number;
}

export interface UringParams {
  sqEntries: number;
  cqEntries: number;
  features: number;
  sq: SqOffsets;
  cq: CqOffsets;
}

/** struct io_uring_params as io_uring_setup filled it. */
export function parseParams(bytes: Uint8Array): UringParams {
  if (bytes.length < PARAMS_SIZE) throw new Error(`io_uring params of ${bytes.length} bytes`);
  const v = new DataView(bytes.buffer, bytes.byteOffset, PARAMS_SIZE);
  const u = (o: number) => v.getUint32(o, true);
  return {
    sqEntries: u(0),
    cqEntries: u(4),
    features: u(20),
    sq: {
      head: u(40),
      tail: u(44),
      ringMask: u(48),
      ringEntries: u(52),
      flags: u(56),
      dropped: u(60),
      array: u(64),
    },
    cq: {
      head: u(80),
      tail: u(84),
      ringMask: u(88),
      ringEntries: u(92),
      overflow: u(96),
      cqes: u(100),
    },
  };
}

function word(offset: number, what: string, size: number): number {
  if (offset % 4 !== 0 || offset + 4 > size)
    throw new Error(`io_uring ${what} offset ${offset} outside the ${size}-byte ring`);
  return offset / 4;
}

/** One SQE's fields (struct io_uring_sqe; the rest is zero). */
export interface Sqe {
  opcode: number;
  flags?: number;
  fd: number;
  /** File offset (< 2^53). */
  offset?: number;
  /** Address of the buffer or iovec array (< 2^53). */
  addr?: number;
  len?: number;
  /** rw_flags / fsync_flags. */
  opFlags?: number;
  /** Handed back in the CQE (a u32 here). */
  userData: number;
}

/** The submission side: we write SQEs and the tail, the kernel moves the head. */
export class SubmissionRing {
  private readonly words: Uint32Array;
  private readonly sqes: DataView;
  private readonly headIx: number;
  private readonly tailIx: number;
  private readonly flagsIx: number;
  private readonly mask: number;
  readonly entries: number;
  /** Our copy of the tail (the shared one is stored by publish()). */
  private tail: number;
  /** SQEs published but not yet handed to io_uring_enter. */
  unsubmitted = 0;

  constructor(ring: ArrayBuffer, sqes: ArrayBuffer, off: SqOffsets) {
    this.words = new Uint32Array(ring);
    const size = ring.byteLength;
    this.headIx = word(off.head, 'sq head', size);
    this.tailIx = word(off.tail, 'sq tail', size);
    this.flagsIx = word(off.flags, 'sq flags', size);
    this.entries = this.words[word(off.ringEntries, 'sq entries', size)]!;
    this.mask = this.words[word(off.ringMask, 'sq mask', size)]!;
    if (
      this.entries === 0 ||
      (this.entries & (this.entries - 1)) !== 0 ||
      this.mask !== this.entries - 1
    )
      throw new Error(`io_uring SQ of ${this.entries} entries with mask ${this.mask}`);
    const arrayIx = word(off.array, 'sq array', size);
    if (arrayIx + this.entries > this.words.length)
      throw new Error('io_uring SQ index array outside the ring');
    if (sqes.byteLength < this.entries * SQE_SIZE)
      throw new Error(`io_uring SQE array of ${sqes.byteLength} bytes for ${this.entries}`);
    for (let i = 0; i < this.entries; i++) this.words[arrayIx + i] = i;
    this.sqes = new DataView(sqes);
    this.tail = Atomics.load(this.words, this.tailIx);
  }

  /** Free SQE slots now. */
  get free(): number {
    return this.entries - ((this.tail - Atomics.load(this.words, this.headIx)) >>> 0);
  }

  /** The SQ ring's flags word (IORING_SQ_CQ_OVERFLOW ...). */
  get flags(): number {
    return Atomics.load(this.words, this.flagsIx);
  }

  /** Writes one SQE and publishes it; false (nothing written) when the SQ is full. */
  push(e: Sqe): boolean {
    if (this.free === 0) return false;
    const v = this.sqes;
    const at = (this.tail & this.mask) * SQE_SIZE;
    for (let i = 0; i < SQE_SIZE; i += 4) v.setUint32(at + i, 0);
    v.setUint8(at, e.opcode);
    v.setUint8(at + 1, e.flags ?? 0);
    v.setInt32(at + 4, e.fd, true);
    setU64(v, at + 8, e.offset ?? 0);
    setU64(v, at + 16, e.addr ?? 0);
    v.setUint32(at + 24, e.len ?? 0, true);
    v.setUint32(at + 28, e.opFlags ?? 0, true);
    v.setUint32(at + 32, e.userData >>> 0, true);
    this.tail = (this.tail + 1) >>> 0;
    // Release: the SQE above is complete before the kernel can see the new tail.
    Atomics.store(this.words, this.tailIx, this.tail);
    this.unsubmitted++;
    return true;
  }

  /** io_uring_enter consumed `n` SQEs. */
  consumed(n: number): void {
    this.unsubmitted = Math.max(0, this.unsubmitted - n);
  }
}

/** The completion side: the kernel writes CQEs and the tail, we move the head. */
export class CompletionRing {
  private readonly words: Uint32Array;
  private readonly view: DataView;
  private readonly headIx: number;
  private readonly tailIx: number;
  private readonly overflowIx: number;
  private readonly cqes: number;
  private readonly mask: number;
  readonly entries: number;

  constructor(ring: ArrayBuffer, off: CqOffsets) {
    this.words = new Uint32Array(ring);
    this.view = new DataView(ring);
    const size = ring.byteLength;
    this.headIx = word(off.head, 'cq head', size);
    this.tailIx = word(off.tail, 'cq tail', size);
    this.overflowIx = word(off.overflow, 'cq overflow', size);
    this.entries = this.words[word(off.ringEntries, 'cq entries', size)]!;
    this.mask = this.words[word(off.ringMask, 'cq mask', size)]!;
    if (
      this.entries === 0 ||
      (this.entries & (this.entries - 1)) !== 0 ||
      this.mask !== this.entries - 1
    )
      throw new Error(`io_uring CQ of ${this.entries} entries with mask ${this.mask}`);
    if (off.cqes % 8 !== 0 || off.cqes + this.entries * CQE_SIZE > size)
      throw new Error('io_uring CQE array outside the ring');
    this.cqes = off.cqes;
  }

  /** CQEs the kernel dropped because the CQ was full (without IORING_FEAT_NODROP). */
  get overflow(): number {
    return Atomics.load(this.words, this.overflowIx);
  }

  /** CQEs ready now. */
  get ready(): number {
    return (Atomics.load(this.words, this.tailIx) - Atomics.load(this.words, this.headIx)) >>> 0;
  }

  /**
   * Hands every ready CQE to `fn` (user_data's low 32 bits, res, flags), oldest first, then
   * frees their slots; returns how many.
   */
  reap(fn: (userData: number, res: number, flags: number) => void): number {
    // Acquire: the CQEs up to this tail are written.
    const tail = Atomics.load(this.words, this.tailIx);
    let head = Atomics.load(this.words, this.headIx);
    let n = 0;
    while (head !== tail) {
      const at = this.cqes + (head & this.mask) * CQE_SIZE;
      const userData = this.view.getUint32(at, true);
      const res = this.view.getInt32(at + 8, true);
      const flags = this.view.getUint32(at + 12, true);
      head = (head + 1) >>> 0;
      n++;
      // Release the slot before the callback: it may submit (and so complete) more.
      Atomics.store(this.words, this.headIx, head);
      fn(userData, res, flags);
    }
    return n;
  }
}

/** struct io_uring_restriction[]: one SQE_OP entry per opcode, one SQE_FLAGS_ALLOWED entry. */
export function encodeRestrictions(allow: UringAllow): Uint8Array {
  if (allow.ops.length === 0) throw new RangeError('io_uring restrictions: no opcode allowed');
  for (const op of allow.ops)
    if (!Number.isInteger(op) || op < 0 || op > 0xff)
      throw new RangeError(`io_uring restrictions: opcode ${op}`);
  if (!Number.isInteger(allow.flags) || allow.flags < 0 || allow.flags > 0xff)
    throw new RangeError(`io_uring restrictions: SQE flags 0x${allow.flags.toString(16)}`);
  const b = new Uint8Array((allow.ops.length + 1) * RESTRICTION_SIZE);
  const v = new DataView(b.buffer);
  allow.ops.forEach((op, i) => {
    v.setUint16(i * RESTRICTION_SIZE, IORING_RESTRICTION_SQE_OP, true);
    b[i * RESTRICTION_SIZE + 2] = op;
  });
  const last = allow.ops.length * RESTRICTION_SIZE;
  v.setUint16(last, IORING_RESTRICTION_SQE_FLAGS_ALLOWED, true);
  b[last + 2] = allow.flags;
  return b;
}

/** Stores a u64 (< 2^53) little-endian: SQE fields and the iovecs the rings point to. */
export function setU64(v: DataView, at: number, x: number): void {
  v.setUint32(at, x >>> 0, true);
  v.setUint32(at + 4, Math.floor(x / 0x1_0000_0000), true);
}

/**
 * Host addresses of views of guest RAM (or of any ArrayBuffer-backed bytes), for iovecs: the
 * base of each buffer asked once (`bufferAddress` is a native call), then base + byteOffset.
 */
export class HostAddresses {
  private readonly bases = new WeakMap<ArrayBufferLike, number>();
  constructor(private readonly bufferAddress: (b: Uint8Array) => bigint) {}

  of(view: Uint8Array): number {
    let base = this.bases.get(view.buffer);
    if (base === undefined) {
      base = Number(this.bufferAddress(view)) - view.byteOffset;
      this.bases.set(view.buffer, base);
    }
    return base + view.byteOffset;
  }
}

/** An io_uring instance: its fd, mapped rings, and the eventfd its completions signal. */
export class IoUring {
  readonly sq: SubmissionRing;
  readonly cq: CompletionRing;
  /** Non-blocking eventfd registered with IORING_REGISTER_EVENTFD (-1 until registered). */
  eventFd = -1;
  private closed = false;

  private constructor(
    private readonly sys: UringSys,
    readonly fd: number,
    private readonly ring: ArrayBuffer,
    private readonly sqes: ArrayBuffer,
    readonly params: UringParams,
  ) {
    this.sq = new SubmissionRing(ring, sqes, params.sq);
    this.cq = new CompletionRing(ring, params.cq);
  }

  /**
   * A ring of at least `entries` SQEs (rounded up to a power of two by the kernel), its
   * completions signalled on a new eventfd, restricted to `allow` (set up disabled, the eventfd
   * and the restrictions registered, then enabled). Throws the syscall's error where io_uring
   * is not available (ENOSYS: old kernel; EPERM: seccomp, io_uring_disabled; EINVAL: a kernel
   * before 5.10, without IORING_SETUP_R_DISABLED) or an Error naming the feature this kernel
   * lacks; nothing is left open then.
   */
  static open(sys: UringSys, entries: number, allow: UringAllow): IoUring {
    if (!Number.isInteger(entries) || entries < 1 || entries > URING_MAX_ENTRIES)
      throw new RangeError(`io_uring entries ${entries} not in 1..${URING_MAX_ENTRIES}`);
    const restrictions = encodeRestrictions(allow);
    const pbytes = new Uint8Array(PARAMS_SIZE);
    new DataView(pbytes.buffer).setUint32(8, IORING_SETUP_R_DISABLED, true); // params.flags
    const fd = sys.ioUringSetup(entries, pbytes);
    const undo: Array<() => void> = [() => sys.close(fd)];
    try {
      const p = parseParams(pbytes);
      const need = IORING_FEAT_SINGLE_MMAP | IORING_FEAT_NODROP;
      if ((p.features & need) !== need)
        throw new Error(
          `this kernel's io_uring lacks IORING_FEAT_SINGLE_MMAP or IORING_FEAT_NODROP (features 0x${p.features.toString(16)}; Linux >= 5.5 needed)`,
        );
      const ringBytes = Math.max(p.sq.array + p.sqEntries * 4, p.cq.cqes + p.cqEntries * CQE_SIZE);
      const ring = sys.mmap(ringBytes, PROT_RW, MAP_SHARED | MAP_POPULATE, fd, IORING_OFF_SQ_RING);
      undo.push(() => sys.munmap(ring));
      const sqes = sys.mmap(
        p.sqEntries * SQE_SIZE,
        PROT_RW,
        MAP_SHARED | MAP_POPULATE,
        fd,
        IORING_OFF_SQES,
      );
      undo.push(() => sys.munmap(sqes));
      const u = new IoUring(sys, fd, ring, sqes, p);
      const efd = sys.eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
      undo.push(() => sys.close(efd));
      sys.ioUringRegister(fd, IORING_REGISTER_EVENTFD, new Int32Array([efd]), 1);
      u.eventFd = efd;
      // Registering is unrestricted until the ring is enabled; from then on no register
      // operation is allowed (none is in the list), and only `allow`'s SQEs.
      sys.ioUringRegister(
        fd,
        IORING_REGISTER_RESTRICTIONS,
        restrictions,
        restrictions.length / RESTRICTION_SIZE,
      );
      sys.ioUringRegister(fd, IORING_REGISTER_ENABLE_RINGS, null, 0);
      return u;
    } catch (e) {
      for (const f of undo.reverse()) f();
      throw e;
    }
  }

  /**
   * Hands the published SQEs to the kernel, and with `waitFor` > 0 waits until that many
   * completions are ready. Returns the SQEs consumed (errors: the syscall's, thrown).
   */
  enter(waitFor = 0): number {
    const n = this.sq.unsubmitted;
    if (n === 0 && waitFor === 0 && !this.cqOverflowed) return 0;
    const done = this.sys.ioUringEnter(
      this.fd,
      n,
      waitFor,
      waitFor > 0 || this.sq.flags & IORING_SQ_CQ_OVERFLOW ? IORING_ENTER_GETEVENTS : 0,
    );
    this.sq.consumed(done);
    return done;
  }

  /** True when completions wait in the kernel's overflow list (enter(…GETEVENTS) moves them). */
  get cqOverflowed(): boolean {
    return (this.sq.flags & IORING_SQ_CQ_OVERFLOW) !== 0;
  }

  /** Resets the eventfd's counter (after it fired). */
  clearEvent(): void {
    if (this.eventFd >= 0) this.sys.eventfdRead(this.eventFd);
  }

  /** Unmaps the rings and closes the ring and the eventfd (in-flight I/O is cancelled by the kernel). */
  close(): void {
    if (this.closed) return;
    this.closed = true;
    this.sys.munmap(this.sqes);
    this.sys.munmap(this.ring);
    this.sys.close(this.fd);
    if (this.eventFd >= 0) this.sys.close(this.eventFd);
  }
}

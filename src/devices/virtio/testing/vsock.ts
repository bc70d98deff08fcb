/**
 * Test fixtures for virtio-vsock (not used by the VMM): a fake VsockHost (sockets as byte
 * arrays, timers fired by hand) and a device on the mock driver with helpers that play the
 * guest: post RX buffers, send packets (one kick each, or many chains per kick), read replies.
 */
import { harness } from './harness.js';
import type { MockQueue } from './mock-driver.js';
import {
  HOST_CID,
  OP_REQUEST,
  TYPE_STREAM,
  VSOCK_HDR_SIZE,
  type VsockHeader,
  readHeader,
  writeHeader,
} from '../vsock/packet.js';
import { RX_QUEUE, TX_QUEUE, VsockDevice, vsockIdentity, type VsockHost } from '../vsock/vsock.js';

export const CID = 3;

export interface FakeSock {
  inbox: number[];
  eof: boolean;
  written: number[];
  shutWr: boolean;
  closed: boolean;
  watch: [boolean, boolean] | undefined;
}

export class FakeHost implements VsockHost {
  listeners = new Set<string>();
  socks = new Map<number, FakeSock>();
  acceptQueue: number[] = [];
  nextFd = 100;
  writeLimit = Infinity;
  /** Set: accept() throws it (EMFILE...). */
  acceptError: Error | undefined;
  accepts = 0;
  private sock(): number {
    const fd = this.nextFd++;
    this.socks.set(fd, {
      inbox: [],
      eof: false,
      written: [],
      shutWr: false,
      closed: false,
      watch: undefined,
    });
    return fd;
  }
  dial(): number {
    const fd = this.sock();
    this.acceptQueue.push(fd);
    return fd;
  }
  connect(path: string): number {
    if (!this.listeners.has(path)) throw new Error('connect failed: ECONNREFUSED');
    return this.sock();
  }
  accept(): number {
    this.accepts++;
    if (this.acceptError) throw this.acceptError;
    return this.acceptQueue.shift() ?? -1;
  }
  read(fd: number, bufs: Uint8Array[]): number {
    const s = this.socks.get(fd)!;
    if (s.inbox.length === 0) return s.eof ? 0 : -1;
    let n = 0;
    for (const b of bufs)
      for (let i = 0; i < b.length && s.inbox.length > 0; i++, n++) b[i] = s.inbox.shift()!;
    return n;
  }
  write(fd: number, bufs: Uint8Array[]): number {
    const s = this.socks.get(fd)!;
    let n = 0;
    for (const b of bufs)
      for (const x of b) {
        if (n >= this.writeLimit) return n === 0 ? -1 : n;
        s.written.push(x);
        n++;
      }
    return n;
  }
  shutdownWrite(fd: number): void {
    this.socks.get(fd)!.shutWr = true;
  }
  close(fd: number): void {
    this.socks.get(fd)!.closed = true;
  }
  watch(fd: number, r: boolean, w: boolean): void {
    this.socks.get(fd)!.watch = [r, w];
  }
  unwatch(fd: number): void {
    this.socks.get(fd)!.watch = undefined;
  }
  listening = true;
  watchListener(on: boolean): void {
    this.listening = on;
  }
  timers: Array<{ ms: number; fn: () => void }> = [];
  after(ms: number, fn: () => void): () => void {
    const t = { ms, fn };
    this.timers.push(t);
    return () => {
      this.timers = this.timers.filter((x) => x !== t);
    };
  }
  /** Runs every timer set so far (time passes); `only`: those of that many ms. */
  fireTimers(only?: number): void {
    const t = this.timers.filter((x) => only === undefined || x.ms === only);
    this.timers = this.timers.filter((x) => !t.includes(x));
    for (const x of t) x.fn();
  }
  /** Runs 0 ms timers (the loop's "after this batch") until none is left; returns how many. */
  drainYields(max = 100_000): number {
    let n = 0;
    while (this.timers.some((x) => x.ms === 0) && n < max) {
      this.fireTimers(0);
      n++;
    }
    return n;
  }
  text(fd: number): string {
    return Buffer.from(this.socks.get(fd)!.written).toString();
  }
}

export function hdr(h: Partial<VsockHeader>): VsockHeader {
  return {
    srcCid: CID,
    dstCid: HOST_CID,
    srcPort: 5000,
    dstPort: 80,
    len: 0,
    type: TYPE_STREAM,
    op: OP_REQUEST,
    flags: 0,
    bufAlloc: 65536,
    fwdCnt: 0,
    ...h,
  };
}

export function setup() {
  const host = new FakeHost();
  const logs: string[] = [];
  const dev = new VsockDevice('virtio-vsock test', CID, '/tmp/v.sock', host, (m) => logs.push(m));
  const h = harness(vsockIdentity(CID), dev);
  const [rx, tx, ev] = h.start() as [MockQueue, MockQueue, MockQueue];
  /** RX buffer address by descriptor head. */
  const rxBufs = new Map<number, number>();
  const addRx = (n: number, size = 4096 + VSOCK_HDR_SIZE) => {
    for (let i = 0; i < n; i++) {
      const a = h.alloc.alloc(size);
      rxBufs.set(rx.addChain([{ addr: a, len: size, write: true }]), a);
    }
    h.kick(RX_QUEUE);
  };
  const send = (x: Partial<VsockHeader>, payload = new Uint8Array(0), rawLen?: number) => {
    const len = rawLen ?? VSOCK_HDR_SIZE + payload.length;
    const a = h.alloc.alloc(Math.max(len, VSOCK_HDR_SIZE));
    const b = h.mem.view(a, Math.max(len, VSOCK_HDR_SIZE));
    writeHeader(b, hdr({ len: payload.length, ...x }));
    b.set(payload, VSOCK_HDR_SIZE);
    tx.addChain([{ addr: a, len }]);
    h.kick(TX_QUEUE);
  };
  /**
   * Sends `count` packets made by `make(i)` (payload of `payloadLen` zero bytes each), a ring's
   * worth of chains per kick, from buffers allocated once (guest memory is small). Runs the
   * device's yields (0 ms timers) after each kick, as the loop would.
   */
  const slotsBySize = new Map<number, number[]>();
  const sendMany = (
    count: number,
    make: (i: number) => Partial<VsockHeader>,
    payloadLen = 0,
    fill?: (i: number, payload: Uint8Array) => void,
  ) => {
    const size = VSOCK_HDR_SIZE + payloadLen;
    const per = tx.size;
    const slots = slotsBySize.get(size) ?? [];
    slotsBySize.set(size, slots);
    for (let i = 0; i < count;) {
      const batch = Math.min(per, count - i);
      for (let j = 0; j < batch; j++, i++) {
        if (slots.length <= j) slots.push(h.alloc.alloc(size));
        const a = slots[j]!;
        writeHeader(h.mem.view(a, VSOCK_HDR_SIZE), hdr({ len: payloadLen, ...make(i) }));
        if (fill) fill(i, h.mem.view(a + VSOCK_HDR_SIZE, payloadLen));
        tx.addChain([{ addr: a, len: size }]);
      }
      h.kick(TX_QUEUE);
      host.drainYields();
      tx.takeUsed();
    }
  };
  /** Packets the device put in the RX ring since the last call. */
  const received = () =>
    rx.takeUsed().map((u) => {
      const a = rxBufs.get(u.id)!;
      const hd = readHeader(h.mem.view(a, VSOCK_HDR_SIZE));
      return {
        ...hd,
        data: Buffer.from(h.mem.view(a + VSOCK_HDR_SIZE, u.len - VSOCK_HDR_SIZE)).toString(),
      };
    });
  return { host, dev, h, rx, tx, ev, addRx, send, sendMany, received, logs };
}

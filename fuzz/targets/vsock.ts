/**
 * virtio-vsock through DeviceType.create on a fake host: TX packets from the guest (headers
 * valid and not: CIDs, ports, ops, types, lengths against the chain, flags, credit fields;
 * payload split across buffers) and host socket events (peers dialling the listener with good,
 * bad, partial or no CONNECT lines, data, hang-ups, peers that stop reading, read errors,
 * accept failures with EMFILE, connect() failures, time passing for the connect timeout). The
 * fake guest keeps a pool of RX buffers, reads what the device put there and answers like a
 * driver (RESPONSE to host connections, CREDIT_UPDATE, RW data to its connections).
 *
 * Some sessions are floods a hostile guest can make: TX packets to connections that do not
 * exist with no RX buffers ever posted (replies pile up), and 1-byte segments to a host peer
 * that does not read. Heap growth per session is bounded by the target's limit.
 *
 * Checks: no exception, no busy loop on any socket (level-triggered, EPOLLHUP always on), no
 * device-caught exception, bounded heap.
 */
import { GuestAllocator } from '../../src/devices/virtio/testing/mock-driver.js';
import { type Prng, type Session, type Target } from '../core.js';
import type { FakeFd } from '../host.js';
import { checkNoDeviceException, type Seg } from '../rig.js';
import { openVirtio, scratchDir } from '../virtio-kinds.js';
import { join } from 'node:path';

const RXQ = 0;
const TXQ = 1;
const EVQ = 2;
const HDR = 44;
const GUEST_CID = 3;
const OP = {
  REQUEST: 1,
  RESPONSE: 2,
  RST: 3,
  SHUTDOWN: 4,
  RW: 5,
  CREDIT_UPDATE: 6,
  CREDIT_REQUEST: 7,
};
const TX_AREA = { base: 0x20000, end: 0x40000 };
const RX_POOL = 0x40000;
const RX_BUF = 1024;

interface Conn {
  guestPort: number;
  hostPort: number;
  fwd: number;
}

interface Header {
  srcCid: number | bigint;
  dstCid: number | bigint;
  srcPort: number;
  dstPort: number;
  len: number;
  type: number;
  op: number;
  flags: number;
  bufAlloc: number;
  fwdCnt: number;
}

let sockNo = 0;

export const vsockTarget: Target = {
  name: 'virtio-vsock',
  what: 'vsock/ TX packets and host socket events through DeviceType.create on a fake host',
  cases: 100_000,
  session: 2000,
  heapLimitMiB: 32,
  open(srng: Prng): Session {
    const uds = join(scratchDir(), `v${process.pid}-${sockNo++}.sock`);
    const v = openVirtio('vsock', { cid: GUEST_CID, uds }, srng);
    const { rig, host } = v;
    const mem = v.ram.mem;
    const mode =
      (process.env.TYPERVISOR_FUZZ_VSOCK_MODE as
        'normal' | 'no-rx-flood' | 'slow-peer' | undefined) ??
      srng.pick(['normal', 'normal', 'normal', 'no-rx-flood', 'slow-peer'] as const);
    const settle = () => host.settle('virtio-vsock');
    const conns: Conn[] = [];
    let cursor = [0, 0, 0];
    /** Descriptor slots of TX chains written since the last TX kick. */
    let txSlotsUsed = 0;
    let nextGuestPort = 1000;
    let started = rig.resets;
    /** RX slot -> posted. */
    const rxPosted = new Set<number>();

    const writeHdr = (a: number, h: Header) => {
      mem.writeU64(a, BigInt(h.srcCid));
      mem.writeU64(a + 8, BigInt(h.dstCid));
      mem.writeU32(a + 16, h.srcPort >>> 0);
      mem.writeU32(a + 20, h.dstPort >>> 0);
      mem.writeU32(a + 24, h.len >>> 0);
      mem.writeU16(a + 28, h.type & 0xffff);
      mem.writeU16(a + 30, h.op & 0xffff);
      mem.writeU32(a + 32, h.flags >>> 0);
      mem.writeU32(a + 36, h.bufAlloc >>> 0);
      mem.writeU32(a + 40, h.fwdCnt >>> 0);
    };
    const base = (op: number, c?: Conn): Header => ({
      srcCid: GUEST_CID,
      dstCid: 2,
      srcPort: c?.guestPort ?? nextGuestPort,
      dstPort: c?.hostPort ?? 80,
      len: 0,
      type: 1,
      op,
      flags: 0,
      bufAlloc: 256 * 1024,
      fwdCnt: c?.fwd ?? 0,
    });

    /** Writes one TX packet; false when there was no room for it (nothing was sent). */
    const sendTx = (
      rng: Prng,
      h: Header,
      payload: number,
      mutate: number,
      txa: GuestAllocator,
    ): boolean => {
      let a: number;
      try {
        a = txa.alloc(HDR + payload, 8);
      } catch {
        return false;
      }
      writeHdr(a, h);
      const total = HDR + payload;
      const segs: Seg[] = [];
      if (rng.chance(0.7)) segs.push({ addr: a, len: total, write: false });
      else {
        segs.push({
          addr: a,
          len: Math.min(total, rng.chance(0.5) ? HDR : 1 + rng.below(total)),
          write: false,
        });
        if (segs[0]!.len < total)
          segs.push({ addr: a + segs[0]!.len, len: total - segs[0]!.len, write: false });
      }
      if (mode === 'normal' && rng.chance(0.02)) segs.push({ addr: a, len: 16, write: true });
      const size = rig.queues[TXQ]!.q.size;
      const indirect = rig.indirect && rng.chance(0.2);
      const slots = indirect ? 1 : segs.length;
      // A driver never reuses descriptors the device has not returned: kick first.
      if (txSlotsUsed + slots > size) return false;
      txSlotsUsed += slots;
      rig.writeChain(rng, TXQ, segs, mutate, indirect, cursor[TXQ]);
      cursor[TXQ] = (cursor[TXQ]! + slots) % size;
      return true;
    };

    const postRx = (rng: Prng) => {
      const q = rig.queues[RXQ]!.q;
      const size = q.size;
      if (rig.pending(RXQ) >= size) return;
      const slot = cursor[RXQ]!;
      cursor[RXQ] = (slot + 1) % size;
      const a = RX_POOL + (slot % 256) * RX_BUF;
      const len = rng.chance(0.95) ? RX_BUF : rng.below(HDR + 8);
      rig.writeChain(
        rng,
        RXQ,
        [{ addr: a, len, write: true }],
        rng.chance(0.03) ? 1 : 0,
        false,
        slot,
      );
      rxPosted.add(slot);
    };

    /** The driver reads the used RX ring and answers. */
    const readRx = (rng: Prng, txa: GuestAllocator) => {
      for (const u of rig.queues[RXQ]!.q.takeUsed()) {
        if (u.len < HDR || u.id >= 256) continue;
        const a = RX_POOL + u.id * RX_BUF;
        const op = mem.readU16(a + 30);
        const srcPort = mem.readU32(a + 16);
        const dstPort = mem.readU32(a + 20);
        const c = conns.find((x) => x.guestPort === dstPort && x.hostPort === srcPort);
        if (op === OP.REQUEST && rng.chance(0.8)) {
          const nc = { guestPort: dstPort, hostPort: srcPort, fwd: 0 };
          conns.push(nc);
          sendTx(rng, base(rng.chance(0.9) ? OP.RESPONSE : OP.RST, nc), 0, 0, txa);
        } else if (op === OP.RW && c) {
          c.fwd += u.len - HDR;
          if (rng.chance(0.3)) sendTx(rng, base(OP.CREDIT_UPDATE, c), 0, 0, txa);
        } else if (op === OP.RST && c) conns.splice(conns.indexOf(c), 1);
        else if (op === OP.CREDIT_REQUEST && c) sendTx(rng, base(OP.CREDIT_UPDATE, c), 0, 0, txa);
      }
    };

    const listenFd = [...host.fds.values()].find((f) => f.kind === 'listen')!;
    const sockets = (): FakeFd[] => [...host.fds.values()].filter((f) => f.kind === 'socket');

    return {
      ram: v.ram,
      rig,
      stats: () => ({
        chains: rig.chainsPublished,
        resets: rig.resets,
        ...v.created.metrics?.(),
        ...rig.deviceStats(),
      }),
      close() {
        v.opened.close();
      },
      run(rng: Prng) {
        rig.ensureRunning(rng);
        if (rig.resets !== started) {
          // A new driver instance: its rings are new, its connections gone.
          started = rig.resets;
          cursor = [0, 0, 0];
          conns.length = 0;
          rxPosted.clear();
        }
        const txa = new GuestAllocator(TX_AREA.base, TX_AREA.end);
        const flood = mode === 'no-rx-flood';
        // The driver posts RX and event buffers.
        if (!flood) {
          const n = rng.below(8);
          for (let i = 0; i < n; i++) postRx(rng);
          if (n > 0 || rng.chance(0.2)) rig.kick(RXQ, settle, true, 'virtio-vsock RX');
          if (rng.chance(0.05)) {
            const e = txa.alloc(8);
            rig.writeChain(rng, EVQ, [{ addr: e, len: 8, write: true }], 0, false, cursor[EVQ]);
            cursor[EVQ] = (cursor[EVQ]! + 1) % rig.queues[EVQ]!.q.size;
            rig.kick(EVQ, settle, true, 'virtio-vsock event');
          }
        }
        // Guest TX packets.
        const size = rig.queues[TXQ]!.q.size;
        const ntx = flood || mode === 'slow-peer' ? size : rng.below(6);
        for (let i = 0; i < ntx && rig.pending(TXQ) < size; i++) {
          const c = conns.length > 0 && rng.chance(0.7) ? rng.pick(conns) : undefined;
          let h: Header;
          let payload = 0;
          let opened: Conn | undefined;
          if (flood) {
            h = base(OP.RW);
            h.srcPort = rng.u32();
            h.dstPort = rng.u32() % 100_000;
            payload = 1;
          } else if (mode === 'slow-peer' && conns.length >= 2) {
            // 1-byte segments to the first connections, whose host peer reads nothing.
            h = base(OP.RW, conns[rng.below(2)]);
            payload = 1;
          } else if (mode === 'slow-peer') {
            h = base(OP.REQUEST);
            h.srcPort = nextGuestPort++;
            h.dstPort = 5000;
            opened = { guestPort: h.srcPort, hostPort: h.dstPort, fwd: 0 };
          } else {
            const op = rng.chance(0.9)
              ? rng.pick([1, 1, 2, 3, 4, 5, 5, 5, 6, 7])
              : rng.u32() & 0xffff;
            h = base(op, c);
            if (op === OP.REQUEST && !c) {
              h.srcPort = nextGuestPort++;
              h.dstPort = rng.below(4) + 5000;
              opened = { guestPort: h.srcPort, hostPort: h.dstPort, fwd: 0 };
            }
            if (op === OP.RW)
              payload = rng.chance(0.8) ? rng.below(2048) : rng.pick([0, 65536, 65537]);
            if (op === OP.SHUTDOWN) h.flags = rng.below(4);
          }
          h.len = payload;
          // Header field mutations (not in flood sessions: those are well-formed, and many).
          if (mode === 'normal' && rng.chance(0.15)) {
            switch (rng.below(8)) {
              case 0:
                h.srcCid = rng.pick([0, 1, 2, 4, 0xffff_ffff, 2 ** 40]);
                break;
              case 1:
                h.dstCid = rng.pick([0, 1, 3, 0xffff_ffff, 0xffff_ffff_ffff_ffffn]);
                break;
              case 2:
                h.len = rng.pick([payload + 1, 0xffff_ffff, 65537, payload ? payload - 1 : 5]);
                break;
              case 3:
                h.type = rng.pick([0, 2, 3, 0xffff]);
                break;
              case 4:
                h.srcPort = 0xffff_ffff;
                break;
              case 5:
                h.dstPort = rng.pick([0xffff_ffff, 0, 1 << 30]);
                break;
              case 6:
                h.bufAlloc = rng.pick([0, 1, 0xffff_ffff]);
                h.fwdCnt = rng.u32();
                break;
              default:
                h.flags = rng.u32();
            }
          }
          const mutate = mode === 'normal' && rng.chance(0.1) ? 1 : 0;
          // The driver's connection exists once its REQUEST went out.
          if (sendTx(rng, h, Math.min(payload, 70000), mutate, txa) && opened) conns.push(opened);
        }
        // The host side.
        host.connectResult = () =>
          mode !== 'normal' || rng.chance(0.85)
            ? 'ok'
            : rng.pick(['ENOENT', 'ECONNREFUSED', 'pending', 'EMFILE', 'EAGAIN']);
        // Flood sessions are the guest's alone (a host event failing would end them early).
        const nev = mode === 'normal' ? rng.below(4) : 0;
        for (let e = 0; e < nev; e++) {
          const k = rng.below(12);
          const socks = sockets();
          const s = socks.length > 0 ? rng.pick(socks) : undefined;
          if (k <= 2) {
            // A peer dials the listener.
            const p = host.newFd('socket');
            const port = rng.below(4) + 52;
            const line = rng.pick([
              `CONNECT ${port}\n`,
              `CONNECT ${port}\n`,
              `CONNECT ${port}\n`,
              rng.chance(0.1) ? `CONNECT ${port}\nhello` : `CONNECT ${port}\n`,
              `CONNECT ${port}`,
              `CONNECT ${rng.u32()}\n`,
              'CONNECT 99999999999\n',
              'GET / HTTP/1.0\r\n\r\n',
              '',
              'x'.repeat(40),
              `CONNECT ${port}\r\n`,
            ]);
            if (line) p.inbox.push(new TextEncoder().encode(line));
            if (rng.chance(0.1)) p.hup = true;
            listenFd.backlog.push(p.fd);
          } else if (k === 3 && s) {
            s.inbox.push(
              new Uint8Array(1 + rng.below(rng.chance(0.1) ? 300_000 : 4000)).fill(0x61),
            );
          } else if (k === 4 && s) {
            s.hup = true;
          } else if (k === 5 && s) {
            s.eof = true;
          } else if (k === 6 && s) {
            s.room = rng.chance(0.5) ? 0 : 1 << 20;
          } else if (k === 7 && s) {
            s.readError = rng.pick(['ECONNRESET', 'EIO']);
          } else if (k === 8 && rng.chance(0.05)) {
            // Descriptor exhaustion (rare: the listener's answer to it is a known finding).
            listenFd.acceptError = rng.pick(['EMFILE', 'ENFILE', 'ECONNABORTED']);
          } else if (k === 9 && rng.chance(0.05)) {
            host.emfile = true;
          } else if (k === 10) {
            host.advance(rng.pick([10, 1000, 2500, 11_000]));
          }
        }
        if (mode === 'slow-peer') for (const s of sockets()) s.room = 0;
        rig.kick(TXQ, settle, false, 'virtio-vsock TX');
        txSlotsUsed = 0;
        settle();
        if (!flood) readRx(rng, txa);
        if (rig.pending(TXQ) > 0) rig.kick(TXQ, settle, false, 'virtio-vsock TX');
        txSlotsUsed = 0;
        // An accept error that stays forever is the host's problem; let it clear sometimes.
        if (rng.chance(0.2)) listenFd.acceptError = undefined;
        if (rng.chance(0.2)) host.emfile = false;
        checkNoDeviceException(rig, 'virtio-vsock');
      },
    };
  },
};

/**
 * virtio-net TX and RX through DeviceType.create on a fake TAP (IOV_MAX enforced as the native
 * shim does). TX: virtio_net_hdr fields (flags, GSO type and size, csum start/offset, hdr_len)
 * valid and not, frames of every size up to past the 64 KiB limit, split across buffers; the
 * chain mutations of the rig. RX: buffers posted (sizes, counts up to past IOV_MAX through
 * indirect tables, readable ones on the RX queue), frames arriving on the TAP (sizes up to past
 * the spill buffer), TAP read errors (EAGAIN: readv returns -1, a spurious wake-up; EIO, EBADFD:
 * readv throws, and the device fails, by design). Checks: the loop never spins on a readable TAP, frames
 * never wait while buffers that can take them are available and the TAP is not watched, no
 * exception, every TX chain used.
 */
import { checkTxHeader, parseNetHeader } from '../../src/devices/virtio/net/header.js';
import {
  type NetDevice,
  VIRTIO_NET_F_CSUM,
  VIRTIO_NET_F_HOST_TSO4,
  VIRTIO_NET_F_HOST_TSO6,
} from '../../src/devices/virtio/net/net.js';
import { TCP_ACK, TCP_SYN } from '../../src/mmds/frames.js';
import type { MmdsResponder } from '../../src/mmds/responder.js';
import { arpRequest, guestTcp } from '../../src/mmds/testing.js';
import { fail, type Prng, type Session, type Target } from '../core.js';
import { checkNoDeviceException, type Seg } from '../rig.js';
import { openVirtio } from '../virtio-kinds.js';

const RX = 0;
const TX = 1;
const HDR = 12;

function netHeader(rng: Prng, frameLen: number): Uint8Array {
  const h = new Uint8Array(HDR);
  const dv = new DataView(h.buffer);
  if (rng.chance(0.5)) return h; // no offload: all zero
  h[0] = rng.chance(0.8) ? rng.pick([0, 1, 2, 3]) : rng.u32() & 0xff; // flags
  h[1] = rng.chance(0.8) ? rng.pick([0, 1, 3, 4, 0x81, 0x84]) : rng.u32() & 0xff; // gso_type
  dv.setUint16(2, rng.chance(0.5) ? rng.below(128) : rng.u32() & 0xffff, true); // hdr_len
  dv.setUint16(4, rng.chance(0.5) ? rng.pick([0, 1, 536, 1448, 9000]) : rng.u32() & 0xffff, true);
  dv.setUint16(6, rng.chance(0.7) ? rng.below(frameLen + 8) : rng.u32() & 0xffff, true); // csum_start
  dv.setUint16(8, rng.pick([6, 16, 0, 0xfffe, rng.below(64)]), true); // csum_offset
  dv.setUint16(10, rng.u32() & 0xffff, true);
  return h;
}

/** A frame for the MMDS responder: ARP for it, a SYN, or a request on a connection or none. */
function mmdsFrame(rng: Prng, ip: Uint8Array): Uint8Array {
  if (rng.chance(0.3)) return arpRequest(ip);
  const port = 2000 + rng.below(4);
  const payload = rng.chance(0.5) ? Buffer.from('GET /latest HTTP/1.1\r\n\r\n') : undefined;
  const f = guestTcp({
    dstIp: ip,
    srcPort: port,
    seq: rng.u32(),
    ack: rng.u32(),
    flags: payload ? TCP_ACK : rng.pick([TCP_SYN, TCP_ACK, TCP_SYN | TCP_ACK]),
    ...(payload ? { payload } : {}),
  });
  return rng.chance(0.2) ? f.subarray(0, rng.below(f.length)) : f;
}

export const netTarget: Target = {
  name: 'virtio-net',
  what: 'net/ TX frames and RX buffers + TAP frames through DeviceType.create on a fake TAP',
  // Each case has TX frames or RX work or both: 170,000 cases give each more than 100,000.
  cases: 170_000,
  session: 500,
  open(srng: Prng): Session {
    const v = openVirtio(
      'net',
      {
        tap: 'fuzz0',
        mac: srng.chance(0.5) ? '06:00:a9:fe:00:02' : undefined,
        ...(srng.chance(0.3)
          ? {
              mmds: {
                version: srng.pick(['V1', 'V2']),
                ipv4: '169.254.169.254',
                imdsCompat: false,
              },
            }
          : {}),
      },
      srng,
    );
    const { rig, host } = v;
    const mmds = (v.created.backend as NetDevice).interceptor as MmdsResponder | undefined;
    const tap = [...host.fds.values()].find((f) => f.kind === 'tap')!;
    const settle = () => host.settle('virtio-net');
    tap.frames = [];
    let txCases = 0;
    let rxCases = 0;
    return {
      ram: v.ram,
      rig,
      stats: () => ({
        tx_cases: txCases,
        rx_cases: rxCases,
        chains: rig.chainsPublished,
        resets: rig.resets,
        ...v.created.metrics?.(),
        ...rig.deviceStats(),
        tap_errors_injected: host.errorsThrown,
      }),
      close() {
        v.opened.close();
      },
      run(rng: Prng) {
        rig.ensureRunning(rng);
        rig.resetData();
        const mem = rig.ram.mem;
        const hostErrors = host.errorsThrown;
        // TX
        const ntx = rng.chance(0.6) ? 1 + rng.below(4) : 0;
        for (let f = 0; f < ntx; f++) {
          // With MMDS on the interface: frames for it too (ARP, SYNs, data to port 80 or not).
          const special = mmds && rng.chance(0.3) ? mmdsFrame(rng, mmds.ip) : undefined;
          const frameLen = special
            ? special.length
            : rng.chance(0.9)
              ? 14 + rng.below(1500)
              : rng.pick([0, 13, 65550, 65562 - HDR + 1, 70000]);
          const total = HDR + frameLen;
          const a = rig.alloc(Math.min(total, 200_000)) ?? 0x20000;
          const hdr = netHeader(rng, frameLen);
          if (mem.isValidRange(a, HDR)) mem.write(a, hdr);
          if (special && mem.isValidRange(a + HDR, special.length)) mem.write(a + HDR, special);
          // Split into 1..4 buffers (sometimes the header itself is split).
          const parts = 1 + rng.below(4);
          const segs: Seg[] = [];
          let o = 0;
          for (let p = 0; p < parts && o < total; p++) {
            const len = p === parts - 1 ? total - o : 1 + rng.below(total - o);
            segs.push({ addr: a + o, len, write: false });
            o += len;
          }
          if (rng.chance(0.03)) segs.push({ addr: a, len: 64, write: true });
          const mutate = rng.chance(0.2) ? 1 + rng.below(2) : 0;
          rig.writeChain(rng, TX, segs, mutate, rig.indirect && rng.chance(0.3));
        }
        if (ntx > 0) {
          txCases++;
          rig.kick(TX, settle, false, 'virtio-net TX');
        }
        // RX buffers
        const nrx = rng.chance(0.6) ? 1 + rng.below(6) : 0;
        for (let b = 0; b < nrx; b++) {
          const segs: Seg[] = [];
          const kind = rng.below(4000);
          if (kind === 0 && rig.indirect) {
            // More buffers than one readv takes (IOV_MAX): 1024 indirect + the spill buffer.
            const a = rig.alloc(64) ?? 0x20000;
            const count = rng.pick([1023, 1024, 1024]);
            for (let i = 0; i < count; i++) segs.push({ addr: a, len: 64, write: true });
          } else {
            const n = kind < 200 ? 1 + rng.below(64) : 1 + rng.below(3);
            for (let i = 0; i < n; i++) {
              const len = rng.chance(0.8)
                ? rng.pick([HDR, 1526, 2048, 4096, 65562])
                : rng.below(100);
              const a = rig.alloc(len);
              if (a === undefined) break;
              segs.push({ addr: a, len, write: rng.chance(0.98) });
            }
          }
          const mutate = rng.chance(0.15) ? 1 : 0;
          rig.writeChain(
            rng,
            RX,
            segs,
            mutate,
            rig.indirect && (segs.length > 16 || rng.chance(0.3)),
          );
        }
        if (nrx > 0 || rng.chance(0.1)) rig.kick(RX, settle, true, 'virtio-net RX');
        // Frames from the host
        const nframes = rng.chance(0.6) ? 1 + rng.below(8) : 0;
        if (nrx > 0 || nframes > 0) rxCases++;
        for (let f = 0; f < nframes; f++) {
          const len = rng.chance(0.9)
            ? HDR + 14 + rng.below(1500)
            : rng.pick([1, HDR, 65562, 65563, 70000]);
          const frame = new Uint8Array(len);
          if (rng.chance(0.2)) rng.fill(frame.subarray(0, Math.min(64, len)));
          tap.inbox.push(frame);
        }
        if (rng.chance(0.02)) tap.readError = rng.pick(['EIO', 'EAGAIN', 'EBADFD']);
        settle();
        // A TAP read error (EIO, EBADFD) the fuzzer injected and the device got in this case
        // breaks the device by design; an exception from the guest's input alone is a bug.
        checkNoDeviceException(rig, 'virtio-net', host.errorsThrown !== hostErrors);
        // Checked is used: every frame that reached the TAP has a header the device accepts
        // (with a racing vCPU, one validated on a copy but sent from live memory would not).
        const st = rig.h.device.deviceState;
        if (st.kind === 'active') {
          const has = (b: number) => (st.features & (1n << BigInt(b))) !== 0n;
          const csum = has(VIRTIO_NET_F_CSUM);
          const offloads = {
            csum,
            tso4: csum && has(VIRTIO_NET_F_HOST_TSO4),
            tso6: csum && has(VIRTIO_NET_F_HOST_TSO6),
          };
          for (const f of tap.frames!) {
            const ok = checkTxHeader(parseNetHeader(f.hdr), f.len - HDR, offloads);
            if (!ok.ok)
              fail(
                `virtio-net TX: a frame reached the TAP with a header the device refuses (${ok.error}): checked is not what was used`,
              );
          }
        }
        tap.frames!.length = 0;
        if (rig.racing || rig.broken()) {
          tap.inbox.length = 0;
          return;
        }
        // Liveness: frames waiting, a buffer available, and nobody watching the TAP.
        if (tap.inbox.length > 0 && rig.pending(RX) > 0 && !(host.interest(tap.fd) & 1))
          fail(
            'virtio-net: RX stalled: frames wait on the TAP, RX buffers are available, the TAP is not watched',
          );
        // MMDS answers never wait while the guest has RX buffers the RX path has not tried.
        if (mmds && mmds.queued > 0 && rig.pending(RX) > 0 && st.kind === 'active')
          fail(
            'virtio-net: MMDS answers wait, RX buffers are available, and nothing will serve them',
          );
        // The host drops what the guest had no room for (the TAP's queue is bounded).
        if (tap.inbox.length > 256) tap.inbox.splice(0, tap.inbox.length - 256);
      },
    };
  },
};

/**
 * The MMDS responder (src/mmds/responder.ts) as a hostile guest sees it: ARP, IPv4 and TCP
 * frames to the MMDS address, well-formed conversations (connect, HTTP requests of every kind,
 * V1 and V2, split at random points) mutated on the way (segments dropped, duplicated,
 * reordered, flags and sequence numbers changed, bytes flipped, frames cut short or padded,
 * checksums left to the device), random frames, floods of SYNs and ARPs, a guest that stops
 * reading, and the clock moving (retransmissions, timeouts). Checks: nothing throws and no
 * internal error is counted; every frame the responder queues parses with correct checksums;
 * connections, queued frames and held bytes stay within their caps.
 */
import {
  parseArp,
  parseEth,
  ETHERTYPE_ARP,
  TCP_ACK,
  TCP_FIN,
  TCP_RST,
  TCP_SYN,
} from '../../src/mmds/frames.js';
import { MAX_BODY, MAX_HEAD } from '../../src/mmds/http.js';
import {
  MAX_CONNECTIONS,
  MAX_OUT,
  MAX_QUEUED_FRAMES,
  RX_BUFFER,
  type MmdsResponder,
} from '../../src/mmds/responder.js';
import {
  FakeTimers,
  arpRequest,
  decodeReply,
  guestTcp,
  makeResponder,
} from '../../src/mmds/testing.js';
import { fail, type Prng, type Session, type Target } from '../core.js';

const PATHS = [
  '/',
  '/latest',
  '/latest/',
  '/latest/meta-data/ami-id',
  '/nope',
  '/latest/n',
  '/big',
  '/%zz',
  '/a~1b',
];

function request(rng: Prng): string {
  const method = rng.pick(['GET', 'GET', 'GET', 'PUT', 'POST', 'DELETE', 'get', 'G\u00e9T']);
  const path = rng.chance(0.9) ? rng.pick(PATHS) : '/latest/api/token';
  const headers: string[] = [];
  if (rng.chance(0.4))
    headers.push(`Accept: ${rng.pick(['application/json', 'text/plain', '*/*'])}`);
  if (rng.chance(0.3))
    headers.push(
      `X-metadata-token-ttl-seconds: ${rng.pick(['1', '0', '21600', '21601', 'x', '-1', '999999999'])}`,
    );
  if (rng.chance(0.3))
    headers.push(`X-metadata-token: ${rng.pick(['', 'AAAA', 'A'.repeat(200), 'x!'])}`);
  if (rng.chance(0.1)) headers.push('X-Forwarded-For: 1.2.3.4');
  if (rng.chance(0.2)) headers.push(`Connection: ${rng.pick(['close', 'keep-alive'])}`);
  if (rng.chance(0.1))
    headers.push(`Content-Length: ${rng.pick(['0', '5', '-3', String(MAX_BODY + 1), 'zz'])}`);
  if (rng.chance(0.05)) headers.push('Transfer-Encoding: chunked');
  if (rng.chance(0.05)) headers.push(`X-Big: ${'b'.repeat(rng.below(2 * MAX_HEAD))}`);
  if (rng.chance(0.05)) headers.push('bad header line');
  const version = rng.pick(['HTTP/1.1', 'HTTP/1.1', 'HTTP/1.0', 'HTTP/2', '']);
  return `${method} ${path} ${version}\r\n${headers.map((h) => h + '\r\n').join('')}\r\n${rng.chance(0.1) ? 'hello' : ''}`;
}

interface Flow {
  port: number;
  seq: number;
  ack: number;
}

/** Reads every queued frame: each must parse with valid checksums. */
function drainChecked(r: MmdsResponder, flows: Map<number, Flow>, keep: boolean): number {
  let n = 0;
  for (let f = r.takeReply(); f; f = r.takeReply()) {
    n++;
    const eth = parseEth(f);
    if (!eth) fail('a queued reply is not an Ethernet frame');
    if (eth.type === ETHERTYPE_ARP) {
      if (!parseArp(eth.payload)) fail('a queued ARP reply does not parse');
      continue;
    }
    let s;
    try {
      s = decodeReply(f);
    } catch (e) {
      fail(`a queued reply is malformed: ${(e as Error).message}`);
    }
    const fl = flows.get(s.dstPort);
    if (!fl || !keep) continue;
    if (s.flags & TCP_SYN) fl.ack = (s.seq + 1) >>> 0;
    else if (s.seq === fl.ack)
      fl.ack = (fl.ack + s.payload.length + (s.flags & TCP_FIN ? 1 : 0)) >>> 0;
  }
  return n;
}

export const mmdsTarget: Target = {
  name: 'mmds',
  what: 'the MMDS ARP/IPv4/TCP/HTTP responder: mutated conversations, random frames, floods, time',
  cases: 100_000,
  session: 400,
  open(srng: Prng): Session {
    const timers = new FakeTimers();
    const { r } = makeResponder(
      { version: srng.chance(0.5) ? 'V2' : 'V1', imdsCompat: srng.chance(0.2) },
      timers,
    );
    r.setData(
      JSON.stringify({
        latest: { 'meta-data': { 'ami-id': 'ami-1' }, n: 5 },
        big: 'x'.repeat(srng.below(100_000)),
        'a/b': 'slash',
      }),
    );
    const flows = new Map<number, Flow>();
    let frames = 0;
    let replies = 0;
    let maxConns = 0;
    let maxBuffered = 0;
    const send = (f: Uint8Array, rng: Prng) => {
      frames++;
      r.handleFrame(f, rng.chance(0.2));
    };
    const mutate = (f: Uint8Array, rng: Prng): Uint8Array => {
      if (!rng.chance(0.15)) return f;
      const m = rng.below(3);
      if (m === 0) return f.subarray(0, rng.below(f.length + 1));
      if (m === 1) {
        const g = Uint8Array.from(f);
        for (let i = 0, k = 1 + rng.below(4); i < k; i++) g[rng.below(g.length)] = rng.u32() & 0xff;
        return g;
      }
      if (m === 2) {
        const g = new Uint8Array(f.length + rng.below(64));
        g.set(f);
        return g;
      }
      return f;
    };
    return {
      stats: () => ({
        frames,
        replies,
        max_connections: maxConns,
        max_buffered: maxBuffered,
        ...r.counters,
      }),
      run(rng: Prng) {
        const kind = rng.below(10);
        if (kind <= 4) {
          // A conversation, mutated.
          const port = 1024 + rng.below(rng.chance(0.9) ? 8 : 60_000);
          let fl = flows.get(port);
          if (!fl || rng.chance(0.2)) {
            fl = { port, seq: rng.u32(), ack: 0 };
            flows.set(port, fl);
            send(
              mutate(
                guestTcp({
                  dstIp: r.ip,
                  srcPort: port,
                  seq: fl.seq,
                  ack: 0,
                  flags: TCP_SYN,
                  ...(rng.chance(0.7) ? { mss: rng.pick([1, 64, 536, 1460, 65535]) } : {}),
                }),
                rng,
              ),
              rng,
            );
            fl.seq = (fl.seq + 1) >>> 0;
            drainChecked(r, flows, true);
          }
          const text = Buffer.from(
            Array.from({ length: 1 + rng.below(3) }, () => request(rng)).join(''),
          );
          let off = 0;
          while (off < text.length) {
            const n = 1 + rng.below(Math.min(text.length - off, rng.chance(0.5) ? 64 : 2000));
            const seg = text.subarray(off, off + n);
            const flags = rng.chance(0.9)
              ? TCP_ACK
              : rng.pick([TCP_ACK | TCP_FIN, TCP_RST, TCP_SYN, 0, TCP_ACK | TCP_SYN, 0x3f]);
            const seq = rng.chance(0.9)
              ? fl.seq
              : (fl.seq + rng.pick([-1, 1, 100, -100, 0x7fffffff])) >>> 0;
            const f = guestTcp({
              dstIp: r.ip,
              srcPort: port,
              seq,
              ack: rng.chance(0.9) ? fl.ack : rng.u32(),
              flags,
              window: rng.pick([0, 1, 100, 65535]),
              payload: seg,
            });
            if (!rng.chance(0.05)) send(mutate(f, rng), rng); // else: lost
            if (rng.chance(0.05)) send(f, rng); // duplicated
            off += n;
            fl.seq = (fl.seq + n) >>> 0;
            if (rng.chance(0.8)) replies += drainChecked(r, flows, true);
            if (rng.chance(0.8))
              send(
                guestTcp({
                  dstIp: r.ip,
                  srcPort: port,
                  seq: fl.seq,
                  ack: fl.ack,
                  flags: TCP_ACK,
                  window: 65535,
                }),
                rng,
              );
          }
          if (rng.chance(0.3)) {
            send(
              guestTcp({
                dstIp: r.ip,
                srcPort: port,
                seq: fl.seq,
                ack: fl.ack,
                flags: TCP_ACK | TCP_FIN,
              }),
              rng,
            );
            fl.seq = (fl.seq + 1) >>> 0;
          }
        } else if (kind === 5) {
          // Random bytes, sometimes with a plausible head.
          const f = new Uint8Array(rng.below(200));
          rng.fill(f);
          if (f.length > 34 && rng.chance(0.7)) {
            f[12] = 8;
            f[13] = rng.chance(0.5) ? 0 : 6;
            f.set(r.ip, 30);
          }
          send(f, rng);
        } else if (kind === 6) {
          // A flood of SYNs or ARPs.
          for (
            let i = 0, n = rng.chance(0.2) ? rng.below(3 * MAX_CONNECTIONS) : rng.below(4);
            i < n;
            i++
          )
            send(
              rng.chance(0.5)
                ? arpRequest(r.ip)
                : guestTcp({
                    dstIp: r.ip,
                    srcPort: 100 + rng.below(5000),
                    seq: rng.u32(),
                    ack: 0,
                    flags: TCP_SYN,
                  }),
              rng,
            );
        } else if (kind === 7) {
          // The guest stops reading for a while; the clock moves.
          timers.advance(rng.pick([10, 200, 1000, 5000, 31_000]));
        } else {
          replies += drainChecked(r, flows, rng.chance(0.5));
          if (rng.chance(0.5)) timers.advance(rng.below(500));
        }
        if (r.counters.internal_errors > 0) fail('the responder caught an internal error');
        if (r.connections > MAX_CONNECTIONS) fail(`${r.connections} connections`);
        if (r.queued > MAX_QUEUED_FRAMES) fail(`${r.queued} frames queued`);
        // Each connection: a request buffer, answers up to MAX_OUT plus the one that crossed it.
        const cap = MAX_CONNECTIONS * (RX_BUFFER + MAX_OUT + 200_000);
        if (r.buffered > cap) fail(`${r.buffered} bytes held (cap ${cap})`);
        maxConns = Math.max(maxConns, r.connections);
        maxBuffered = Math.max(maxBuffered, r.buffered);
      },
    };
  },
};

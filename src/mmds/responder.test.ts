import assert from 'node:assert/strict';
import { test } from 'node:test';
import { MMDS_MAC, TCP_ACK, TCP_RST, TCP_SYN, parseArp, parseEth } from './frames.js';
import { IDLE_MS, MAX_CONNECTIONS, MAX_QUEUED_FRAMES, RTO_MS } from './responder.js';
import {
  GUEST_IP,
  GUEST_MAC,
  GuestConn,
  arpRequest,
  decodeReply,
  guestTcp,
  makeResponder,
  parseAnswer,
} from './testing.js';

const DATA = {
  latest: { 'meta-data': { 'ami-id': 'ami-87654321', 'reservation-id': 'r-79054aef' } },
  n: 5,
};

test('ARP: a request for the MMDS address is answered with its MAC; other targets are not', () => {
  const { r } = makeResponder();
  assert.ok(r.wants(arpRequest(r.ip)));
  assert.ok(!r.wants(arpRequest(Uint8Array.from([169, 254, 169, 253]))));
  r.handleFrame(arpRequest(r.ip), false);
  const f = r.takeReply()!;
  const eth = parseEth(f)!;
  assert.deepEqual([...eth.dst], [...GUEST_MAC]);
  const arp = parseArp(eth.payload)!;
  assert.equal(arp.op, 2);
  assert.deepEqual([...arp.senderMac], [...MMDS_MAC]);
  assert.deepEqual([...arp.senderIp], [169, 254, 169, 254]);
  assert.deepEqual([...arp.targetIp], [...GUEST_IP]);
  assert.equal(r.takeReply(), undefined);
});

test('V1: GET in the IMDS format and as JSON over one keep-alive connection, then FIN both ways', () => {
  const { r } = makeResponder();
  r.setData(JSON.stringify(DATA));
  const c = new GuestConn(r, 40000);
  c.connect();
  assert.equal(r.connections, 1);
  let a = parseAnswer(c.request('GET /latest/meta-data HTTP/1.1\r\nHost: x\r\n\r\n'));
  assert.equal(a.status, 200);
  assert.equal(a.body, 'ami-id\nreservation-id');
  assert.equal(a.headers.get('content-type'), 'text/plain');
  a = parseAnswer(c.request('GET /latest/ HTTP/1.1\r\n\r\n'));
  assert.equal(a.body, 'meta-data/');
  a = parseAnswer(c.request('GET /latest/meta-data/ami-id HTTP/1.1\r\n\r\n'));
  assert.equal(a.body, 'ami-87654321');
  a = parseAnswer(c.request('GET /latest HTTP/1.1\r\nAccept: application/json\r\n\r\n'));
  assert.equal(a.headers.get('content-type'), 'application/json');
  assert.deepEqual(JSON.parse(a.body), DATA.latest);
  a = parseAnswer(c.request('GET /n HTTP/1.1\r\n\r\n'));
  assert.equal(a.status, 400, 'a number has no IMDS form');
  a = parseAnswer(c.request('GET /nope HTTP/1.1\r\n\r\n'));
  assert.equal(a.status, 404);
  a = parseAnswer(c.request('DELETE / HTTP/1.1\r\n\r\n'));
  assert.equal(a.status, 405);
  c.close();
  assert.ok(c.gotFin, 'our FIN came back');
  assert.equal(r.connections, 0);
  assert.equal(r.counters.connections_created, 1);
  assert.equal(r.counters.connections_destroyed, 1);
  assert.equal(r.counters.rx_no_token, 6, 'V1 counts GETs without a token');
});

test('V2: a token is needed, issued by PUT /latest/api/token with a TTL, and expires', () => {
  const { r, timers } = makeResponder({ version: 'V2' });
  r.setData(JSON.stringify(DATA));
  const c = new GuestConn(r, 40001);
  c.connect();
  const get = (tok?: string) =>
    parseAnswer(
      c.request(
        `GET /latest/meta-data/ami-id HTTP/1.1\r\n${tok ? `X-metadata-token: ${tok}\r\n` : ''}\r\n`,
      ),
    );
  assert.equal(get().status, 401);
  assert.equal(get('bogus').status, 401);
  let t = parseAnswer(c.request('PUT /latest/api/token HTTP/1.1\r\n\r\n'));
  assert.equal(t.status, 400, 'no TTL');
  t = parseAnswer(
    c.request('PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 0\r\n\r\n'),
  );
  assert.equal(t.status, 400);
  t = parseAnswer(
    c.request('PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 21601\r\n\r\n'),
  );
  assert.equal(t.status, 400);
  t = parseAnswer(
    c.request(
      'PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 5\r\nX-Forwarded-For: 1.2.3.4\r\n\r\n',
    ),
  );
  assert.equal(t.status, 400);
  t = parseAnswer(
    c.request('PUT /latest/api/token HTTP/1.1\r\nX-metadata-token-ttl-seconds: 2\r\n\r\n'),
  );
  assert.equal(t.status, 200);
  const token = t.body;
  const ok = get(token);
  assert.equal(ok.status, 200);
  assert.equal(ok.body, 'ami-87654321');
  // A token with one character changed is refused.
  const forged = token.slice(0, -2) + (token.at(-2) === 'A' ? 'B' : 'A') + token.at(-1)!;
  assert.equal(get(forged).status, 401);
  timers.advance(2100); // past the TTL (keep-alive ACKs flow meanwhile: the connection lives)
  assert.equal(get(token).status, 401, 'expired');
  assert.ok(r.counters.rx_invalid_token >= 3);
  assert.ok(r.counters.rx_no_token >= 1);
});

test('V1 accepts a valid token, and an invalid one too (counted)', () => {
  const { r } = makeResponder();
  r.setData('{"a":"b"}');
  const c = new GuestConn(r, 40002);
  c.connect();
  const tok = parseAnswer(
    c.request('PUT /latest/api/token HTTP/1.1\r\nX-aws-ec2-metadata-token-ttl-seconds: 60\r\n\r\n'),
  ).body;
  assert.equal(
    parseAnswer(c.request(`GET /a HTTP/1.1\r\nX-metadata-token: ${tok}\r\n\r\n`)).body,
    'b',
  );
  assert.equal(parseAnswer(c.request('GET /a HTTP/1.1\r\nX-metadata-token: x\r\n\r\n')).body, 'b');
  assert.equal(r.counters.rx_invalid_token, 1);
});

test('imds_compat answers text whatever the Accept header asks', () => {
  const { r } = makeResponder({ imdsCompat: true });
  r.setData(JSON.stringify(DATA));
  const c = new GuestConn(r, 40003);
  c.connect();
  const a = parseAnswer(c.request('GET /latest HTTP/1.1\r\nAccept: application/json\r\n\r\n'));
  assert.equal(a.body, 'meta-data/');
});

test('a large answer is sent in MSS-sized segments within the guest window, all checksummed', () => {
  const { r } = makeResponder();
  const big = 'x'.repeat(20_000);
  r.setData(JSON.stringify({ big }));
  const c = new GuestConn(r, 40004, r.ip, 7, 4000);
  c.connect(536);
  const a = parseAnswer(c.request('GET /big HTTP/1.1\r\n\r\n'));
  assert.equal(a.body, big);
  const data = c.segments.filter((s) => s.payload.length > 0);
  assert.ok(data.every((s) => s.payload.length <= 536));
  assert.ok(data.length >= 20_000 / 536);
});

test('Connection: close and HTTP/1.0 close after the answer', () => {
  const { r } = makeResponder();
  r.setData('{"a":"b"}');
  for (const [port, req] of [
    [40005, 'GET /a HTTP/1.1\r\nConnection: close\r\n\r\n'],
    [40006, 'GET /a HTTP/1.0\r\n\r\n'],
  ] as const) {
    const c = new GuestConn(r, port);
    c.connect();
    assert.equal(parseAnswer(c.request(req)).body, 'b');
    assert.ok(c.gotFin);
    c.close();
  }
  assert.equal(r.connections, 0);
});

test('hostile: a bad TCP checksum is dropped and counted; a partial checksum is accepted', () => {
  const { r } = makeResponder();
  const f = guestTcp({ dstIp: r.ip, srcPort: 1, seq: 1, ack: 0, flags: TCP_SYN });
  const at = f.length - 20 + 16; // the TCP checksum
  f[at] = f[at]! ^ 0xff;
  r.handleFrame(f, false);
  assert.equal(r.counters.rx_bad_checksum, 1);
  assert.equal(r.queued, 0);
  r.handleFrame(f, true); // NEEDS_CSUM: the checksum field is not checked
  assert.equal(r.connections, 1);
  const s = decodeReply(r.takeReply()!);
  assert.equal(s.flags, TCP_SYN | TCP_ACK);
});

test('hostile: truncated frames, bad IP headers and fragments are dropped, never thrown', () => {
  const { r } = makeResponder();
  const good = guestTcp({ dstIp: r.ip, srcPort: 2, seq: 1, ack: 0, flags: TCP_SYN });
  for (let n = 0; n < good.length; n++) r.handleFrame(good.subarray(0, n), false);
  const frag = Uint8Array.from(good);
  frag[14 + 6] = 0x20; // MF
  r.handleFrame(frag, false);
  const ihl = Uint8Array.from(good);
  ihl[14] = 0x4f; // IHL 60 > the header we have
  r.handleFrame(ihl, false);
  assert.equal(r.connections, 0);
  assert.equal(r.counters.internal_errors, 0);
  assert.ok(
    r.counters.rx_bad_eth + r.counters.rx_accepted_unusual + r.counters.rx_accepted_err > 0,
  );
});

test('out-of-order data is dropped and answered with the ACK we expect', () => {
  const { r } = makeResponder();
  const c = new GuestConn(r, 40007);
  c.connect();
  r.handleFrame(
    guestTcp({
      dstIp: r.ip,
      srcPort: 40007,
      seq: c.seq + 100,
      ack: c.ack,
      flags: TCP_ACK,
      payload: Buffer.from('GET / HTTP/1.1\r\n\r\n'),
    }),
    false,
  );
  const s = decodeReply(r.takeReply()!);
  assert.equal(s.ack, c.seq, 'dup ACK of what we expect');
  assert.equal(s.payload.length, 0);
});

test('a segment for no connection gets RST; the connection cap refuses SYNs with RST', () => {
  const { r } = makeResponder();
  r.handleFrame(guestTcp({ dstIp: r.ip, srcPort: 9, seq: 5, ack: 77, flags: TCP_ACK }), false);
  const rst = decodeReply(r.takeReply()!);
  assert.equal(rst.flags & TCP_RST, TCP_RST);
  assert.equal(rst.seq, 77);
  for (let i = 0; i < MAX_CONNECTIONS + 3; i++)
    r.handleFrame(
      guestTcp({ dstIp: r.ip, srcPort: 1000 + i, seq: 1, ack: 0, flags: TCP_SYN }),
      false,
    );
  assert.equal(r.connections, MAX_CONNECTIONS);
  assert.equal(r.counters.conn_cap_refused, 3);
});

test('an oversized request head is refused (431) and the connection closed', () => {
  const { r } = makeResponder();
  const c = new GuestConn(r, 40008);
  c.connect();
  const raw = c.request('GET / HTTP/1.1\r\nX: ' + 'a'.repeat(5000));
  assert.equal(parseAnswer(raw).status, 431);
  assert.ok(c.gotFin);
});

test('a lost answer is sent again after the RTO; a silent guest is timed out', () => {
  const { r, timers } = makeResponder();
  r.setData('{"a":"b"}');
  const c = new GuestConn(r, 40009);
  c.connect();
  // The request, then the answer "lost": taken from the queue and not read.
  r.handleFrame(
    guestTcp({
      dstIp: r.ip,
      srcPort: 40009,
      seq: c.seq,
      ack: c.ack,
      flags: TCP_ACK,
      payload: Buffer.from('GET /a HTTP/1.1\r\n\r\n'),
    }),
    false,
  );
  c.seq += 'GET /a HTTP/1.1\r\n\r\n'.length;
  while (r.takeReply());
  timers.advance(RTO_MS + 150);
  assert.ok(r.queued > 0, 'retransmitted');
  c.drain();
  assert.equal(parseAnswer(c.received.toString()).body, 'b');
  timers.advance(IDLE_MS + 1000);
  assert.equal(r.connections, 0);
  assert.equal(r.counters.conn_timeouts, 1);
  assert.equal(timers.pending, 0, 'no timer left once no connection is');
});

test('the reply queue is bounded: a guest that never reads gets at most MAX_QUEUED_FRAMES', () => {
  const { r } = makeResponder();
  for (let i = 0; i < 3 * MAX_QUEUED_FRAMES; i++) r.handleFrame(arpRequest(r.ip), false);
  assert.equal(r.queued, MAX_QUEUED_FRAMES);
  assert.equal(r.counters.reply_queue_full, 2 * MAX_QUEUED_FRAMES);
});

test('a zero window is probed with one byte after the RTO; the window opening lets the rest out', () => {
  const { r, timers } = makeResponder();
  r.setData('{"a":"b"}');
  const c = new GuestConn(r, 40010, r.ip, 1000, 0);
  c.connect();
  const req = 'GET /a HTTP/1.1\r\n\r\n';
  r.handleFrame(
    guestTcp({
      dstIp: r.ip,
      srcPort: 40010,
      seq: c.seq,
      ack: c.ack,
      flags: TCP_ACK,
      window: 0,
      payload: Buffer.from(req),
    }),
    false,
  );
  c.seq += req.length;
  const first = decodeReply(r.takeReply()!);
  assert.equal(first.payload.length, 0, 'window 0: only our ACK');
  assert.equal(r.queued, 0);
  timers.advance(RTO_MS + 150);
  const probe = decodeReply(r.takeReply()!);
  assert.equal(probe.payload.length, 1, 'a one-byte probe');
  // The window opens: everything follows.
  const open = new GuestConn(r, 40010, r.ip, 0, 65535);
  open.seq = c.seq;
  open.ack = c.ack;
  open.drain();
  for (let i = 0; i < 10 && r.queued > 0; i++) open.drain();
  assert.equal(parseAnswer(open.received.toString()).body, 'b');
});

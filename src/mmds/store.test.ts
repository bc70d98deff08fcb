import assert from 'node:assert/strict';
import { test } from 'node:test';
import { MAX_BODY, MAX_HEAD, parseRequest } from './http.js';
import {
  MMDS_LIMIT_EXCEEDED,
  MMDS_MAX_DEPTH,
  MMDS_NOT_INITIALIZED,
  MmdsStore,
  checkMmdsConfig,
  jsonDepth,
  lookup,
  mergePatch,
  parseLinkLocal,
} from './store.js';
import { TokenAuthority } from './token.js';

test('mergePatch follows RFC 7396 (its appendix A examples)', () => {
  const cases: Array<[unknown, unknown, unknown]> = [
    [{ a: 'b' }, { a: 'c' }, { a: 'c' }],
    [{ a: 'b' }, { b: 'c' }, { a: 'b', b: 'c' }],
    [{ a: 'b' }, { a: null }, {}],
    [{ a: 'b', b: 'c' }, { a: null }, { b: 'c' }],
    [{ a: ['b'] }, { a: 'c' }, { a: 'c' }],
    [{ a: 'c' }, { a: ['b'] }, { a: ['b'] }],
    [{ a: { b: 'c' } }, { a: { b: 'd', c: null } }, { a: { b: 'd' } }],
    [{ a: [{ b: 'c' }] }, { a: [1] }, { a: [1] }],
    [
      ['a', 'b'],
      ['c', 'd'],
      ['c', 'd'],
    ],
    [{ a: 'b' }, ['c'], ['c']],
    [{ a: 'foo' }, null, null],
    [{ a: 'foo' }, 'bar', 'bar'],
    [{ e: null }, { a: 1 }, { e: null, a: 1 }],
    [[1, 2], { a: 'b', c: null }, { a: 'b' }],
    [{}, { a: { bb: { ccc: null } } }, { a: { bb: {} } }],
  ];
  // "__proto__" is a key like any other (JSON.parse makes it an own property).
  const proto = mergePatch(JSON.parse('{"a":1}'), JSON.parse('{"__proto__":{"x":"y"}}'));
  assert.equal(JSON.stringify(proto), '{"a":1,"__proto__":{"x":"y"}}');
  assert.equal(({} as Record<string, unknown>).x, undefined);
  for (const [t, p, want] of cases) {
    const before = JSON.stringify(t);
    assert.deepEqual(mergePatch(t, p), want, `${before} + ${JSON.stringify(p)}`);
    assert.equal(JSON.stringify(t), before, 'the target is not changed');
  }
});

test('the store: {} before the first PUT, PATCH refused until then, the size limit changes nothing', () => {
  const s = new MmdsStore(40);
  assert.equal(s.text(), '{}');
  assert.deepEqual(s.patch({ a: 1 }), { ok: false, error: MMDS_NOT_INITIALIZED });
  assert.ok(s.put({ a: 'b' }).ok);
  assert.ok(s.patch({ c: 'd' }).ok);
  assert.deepEqual(s.value(), { a: 'b', c: 'd' });
  assert.deepEqual(s.patch({ big: 'x'.repeat(40) }), { ok: false, error: MMDS_LIMIT_EXCEEDED });
  assert.deepEqual(s.put({ big: 'x'.repeat(40) }), { ok: false, error: MMDS_LIMIT_EXCEEDED });
  assert.deepEqual(s.value(), { a: 'b', c: 'd' });
  assert.ok(s.put(null).ok);
  assert.equal(s.text(), '{}', 'null reads back as {} (Firecracker)');
});

test('lookup: JSON pointer paths, the IMDS format, JSON on request', () => {
  const d = { latest: { 'meta-data': { 'ami-id': 'ami-1', net: { x: '1' } }, list: [1, 'two'] } };
  assert.deepEqual(lookup(d, '/latest/meta-data/', false), {
    ok: true,
    body: 'ami-id\nnet/',
    json: false,
  });
  assert.deepEqual(lookup(d, '/latest/meta-data/ami-id', false), {
    ok: true,
    body: 'ami-1',
    json: false,
  });
  assert.deepEqual(lookup(d, '/latest/meta-data/ami-id', true), {
    ok: true,
    body: '"ami-1"',
    json: true,
  });
  assert.equal(lookup(d, '/', false).ok, true);
  assert.deepEqual(lookup(d, '/latest/list/1', false), { ok: true, body: 'two', json: false });
  const arr = lookup(d, '/latest/list', false);
  assert.equal(arr.ok ? 0 : arr.status, 400);
  const missing = lookup(d, '/latest/nope', false);
  assert.equal(missing.ok ? 0 : missing.status, 404);
  assert.equal(lookup(d, '/latest/list/07', false).ok, false);
  assert.equal(lookup({ 'a/b': { '~': 'z' } }, '/a~1b/~0', false).ok, true);
  // __proto__ and friends are not keys of the data.
  assert.equal(lookup(d, '/__proto__', false).ok, false);
  assert.equal(lookup(d, '/latest/constructor', false).ok, false);
});

test('parseLinkLocal and checkMmdsConfig: what Firecracker accepts', () => {
  assert.deepEqual(parseLinkLocal('169.254.169.254'), [169, 254, 169, 254]);
  assert.deepEqual(parseLinkLocal('169.254.1.0'), [169, 254, 1, 0]);
  for (const bad of [
    '169.254.0.1',
    '169.254.255.1',
    '10.0.0.1',
    '169.254.1',
    '169.254.01.1',
    '169.254.1.256',
    'x',
  ])
    assert.equal(parseLinkLocal(bad), undefined, bad);
  assert.equal(checkMmdsConfig({ network_interfaces: ['eth0'] }, ['eth0']), undefined);
  assert.match(checkMmdsConfig({ network_interfaces: [] }, ['eth0'])!, /empty/);
  assert.match(checkMmdsConfig({ network_interfaces: ['eth1'] }, ['eth0'])!, /eth1/);
  assert.match(
    checkMmdsConfig({ network_interfaces: ['eth0'], ipv4_address: '10.0.0.1' }, ['eth0'])!,
    /link local/,
  );
});

test('jsonDepth counts nesting and stops past the limit', () => {
  assert.equal(jsonDepth(1), 0);
  assert.equal(jsonDepth({ a: [1] }), 2);
  let deep: unknown = 0;
  for (let i = 0; i < 10_000; i++) deep = [deep];
  assert.equal(jsonDepth(deep), MMDS_MAX_DEPTH + 1);
});

test('parseRequest: complete, incomplete, bounded, pipelined', () => {
  const one = Buffer.from('GET /a?x=1 HTTP/1.1\r\nHost: h\r\nAccept: application/json\r\n\r\n');
  const r = parseRequest(one);
  assert.equal(r.kind, 'request');
  if (r.kind === 'request') {
    assert.equal(r.request.path, '/a');
    assert.equal(r.request.headers.get('accept'), 'application/json');
    assert.equal(r.consumed, one.length);
    assert.equal(r.request.close, false);
  }
  assert.equal(parseRequest(one.subarray(0, one.length - 1)).kind, 'incomplete');
  const two = parseRequest(Buffer.concat([one, one]));
  assert.equal(two.kind === 'request' && two.consumed, one.length);
  const big = parseRequest(Buffer.from('GET / HTTP/1.1\r\n' + 'a'.repeat(MAX_HEAD)));
  assert.equal(big.kind === 'error' && big.status, 431);
  const body = parseRequest(
    Buffer.from(`PUT / HTTP/1.1\r\nContent-Length: ${MAX_BODY + 1}\r\n\r\n`),
  );
  assert.equal(body.kind === 'error' && body.status, 413);
  for (const bad of [
    'GET /\r\n\r\n',
    'get / HTTP/1.1\r\n\r\n',
    'GET / HTTP/1.1\r\nNoColon\r\n\r\n',
    'GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n',
    'GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n',
  ])
    assert.equal(parseRequest(Buffer.from(bad)).kind, 'error', bad);
  const withBody = parseRequest(Buffer.from('PUT / HTTP/1.0\r\nContent-Length: 3\r\n\r\nab'));
  assert.equal(withBody.kind, 'incomplete');
});

test('tokens: valid until their TTL, unforgeable, bounded in size', () => {
  let now = 1000;
  const t = new TokenAuthority(new Uint8Array(32).fill(1), () => now);
  const tok = t.issue(10);
  assert.ok(t.valid(tok));
  const other = new TokenAuthority(new Uint8Array(32).fill(2), () => now);
  assert.ok(!other.valid(tok), 'another VM key');
  assert.ok(!t.valid(tok + 'A'));
  assert.ok(!t.valid(''));
  assert.ok(!t.valid('!'.repeat(10)));
  assert.ok(!t.valid('A'.repeat(10_000)));
  now += 10_001;
  assert.ok(!t.valid(tok), 'expired');
  assert.notEqual(t.issue(1), t.issue(1), 'each token is new');
});

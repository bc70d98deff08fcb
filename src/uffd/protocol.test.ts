/**
 * The handshake's text and its checks, without the kernel: our JSON is serde_json's for
 * Firecracker's GuestRegionUffdMapping; what Firecracker versions send is accepted; hostile
 * messages are refused with a message that names the problem; uffd_msg decodes.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  decodeUffdMsg,
  encodeUffdRegions,
  HandshakeError,
  MAX_HANDSHAKE_BYTES,
  MAX_UFFD_REGIONS,
  parseUffdRegions,
  UFFD_EVENT_PAGEFAULT,
  UFFD_EVENT_REMOVE,
} from './protocol.js';

const MiB = 1024 * 1024;
const base = 0x7f12_3456_0000;

test('encode: serde_json of Vec<GuestRegionUffdMapping>, page_size_kib in bytes', () => {
  const text = encodeUffdRegions([
    { baseHostVirtAddr: base, size: 2 * MiB, offset: 0, pageSize: 4096 },
    { baseHostVirtAddr: base + 4 * MiB, size: MiB, offset: 2 * MiB, pageSize: 4096 },
  ]);
  assert.equal(
    text,
    `[{"base_host_virt_addr":${base},"size":2097152,"offset":0,"page_size":4096,"page_size_kib":4096},` +
      `{"base_host_virt_addr":${base + 4 * MiB},"size":1048576,"offset":2097152,"page_size":4096,"page_size_kib":4096}]`,
  );
  // Round trip through our parser.
  assert.deepEqual(parseUffdRegions(text, 3 * MiB), [
    { baseHostVirtAddr: base, size: 2 * MiB, offset: 0, pageSize: 4096 },
    { baseHostVirtAddr: base + 4 * MiB, size: MiB, offset: 2 * MiB, pageSize: 4096 },
  ]);
  assert.throws(
    () => encodeUffdRegions([{ baseHostVirtAddr: -1, size: 1, offset: 0, pageSize: 4096 }]),
    RangeError,
  );
});

test("parse: every Firecracker version's message (page size fields optional, extras ignored)", () => {
  const one = (o: object) => parseUffdRegions(JSON.stringify([o]), MiB)[0]!;
  const r = { base_host_virt_addr: base, size: MiB, offset: 0 };
  assert.equal(one(r).pageSize, 4096, 'neither field: 4 KiB (Firecracker 1.0-1.5)');
  assert.equal(one({ ...r, page_size_kib: 4096 }).pageSize, 4096, 'page_size_kib alone');
  assert.equal(one({ ...r, page_size: 4096 }).pageSize, 4096, 'page_size alone');
  assert.equal(one({ ...r, page_size: 4096, page_size_kib: 4096, later: 'x' }).pageSize, 4096);
  assert.equal(
    parseUffdRegions(
      JSON.stringify([
        {
          ...r,
          base_host_virt_addr: 0x7f00_0000_0000,
          size: 2 * MiB,
          page_size: 2 * MiB,
          page_size_kib: 2 * MiB,
        },
      ]),
      2 * MiB,
    )[0]!.pageSize,
    2 * MiB,
    'hugetlbfs 2M',
  );
});

test('parse: hostile messages are refused, each with its reason', () => {
  const r = { base_host_virt_addr: base, size: MiB, offset: 0, page_size: 4096 };
  const refused = (text: string, re: RegExp, file = MiB) =>
    assert.throws(
      () => parseUffdRegions(text, file),
      (e: unknown) => e instanceof HandshakeError && re.test(e.message),
      text.slice(0, 80),
    );
  const j = (v: unknown) => JSON.stringify(v);
  refused('[{"base', /not JSON/);
  refused(j({ regions: [r] }), /not a JSON array/);
  refused('[]', /no memory regions/);
  refused(j(new Array(MAX_UFFD_REGIONS + 1).fill(r)), /at most 64/);
  refused(' '.repeat(MAX_HANDSHAKE_BYTES + 1), /over 65536 bytes/);
  refused(j([1]), /region 0 is not an object/);
  refused(j([{ ...r, size: undefined }]), /`size` must be/);
  refused(j([{ ...r, offset: -4096 }]), /`offset` must be/);
  refused(j([{ ...r, offset: 4096.5 }]), /`offset` must be/);
  refused(j([{ ...r, size: '1048576' }]), /`size` must be/);
  refused('[{"base_host_virt_addr":18446744073709551615,"size":4096,"offset":0}]', /below 2\^53/);
  refused(j([{ ...r, page_size: 4096, page_size_kib: 4 }]), /differ/);
  refused(j([{ ...r, page_size: 3000 }]), /not a power of two/);
  refused(j([{ ...r, page_size: 1024 }]), /from 4096/);
  refused(j([{ ...r, page_size: 1 << 30 }]), /to 2097152/);
  refused(j([{ ...r, size: 0 }]), /region 0 is empty/);
  refused(j([{ ...r, base_host_virt_addr: base + 1 }]), /multiples of the page size/);
  refused(j([{ ...r, offset: 512 }]), /multiples of the page size/);
  refused(j([{ ...r, base_host_virt_addr: 2 ** 47 }]), /not in user address space/);
  refused(j([{ ...r, offset: 4096 }]), /outside the 1048576-byte memory file/);
  refused(j([r, { ...r, offset: 0, size: 2 * MiB }]), /region 1 .* outside/);
  refused(j([r, { ...r, base_host_virt_addr: base + MiB - 4096 }]), /two regions overlap/, 2 * MiB);
  refused(
    j([r, { ...r, base_host_virt_addr: 0x7f00_0000_0000, page_size: 2 * MiB, size: 2 * MiB }]),
    /different page sizes/,
    4 * MiB,
  );
});

test('uffd_msg: page faults and removes decode; other events are named', () => {
  const m = new Uint8Array(64);
  const dv = new DataView(m.buffer);
  m[0] = UFFD_EVENT_PAGEFAULT;
  dv.setBigUint64(8, 1n, true);
  dv.setBigUint64(16, 0x7f00_1234_5678n, true);
  m[32] = UFFD_EVENT_REMOVE;
  dv.setBigUint64(40, 0x1000n, true);
  dv.setBigUint64(48, 0x3000n, true);
  assert.deepEqual(decodeUffdMsg(m, 0), {
    kind: 'pagefault',
    flags: 1n,
    address: 0x7f00_1234_5678n,
  });
  assert.deepEqual(decodeUffdMsg(m, 32), { kind: 'remove', start: 0x1000n, end: 0x3000n });
  m[0] = 0x13;
  assert.deepEqual(decodeUffdMsg(m, 0), { kind: 'other', event: 0x13 });
});

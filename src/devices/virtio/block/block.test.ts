import { test } from 'node:test';
import assert from 'node:assert/strict';
import {
  closeSync,
  existsSync,
  statSync,
  mkdtempSync,
  openSync,
  readFileSync,
  readSync,
  rmSync,
  writeFileSync,
  writeSync,
  chmodSync,
  mkdirSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ConfigError } from '../../../util/errors.js';
import { harness, type Harness } from '../testing/harness.js';
import type { MockQueue } from '../testing/mock-driver.js';
import { Prng } from '../testing/prng.js';
import { VIRTIO_F_VERSION_1, bit } from '../constants.js';
import {
  BlockDevice,
  blockIdentity,
  fdBlockFile,
  transferAll,
  VIRTIO_BLK_F_FLUSH,
  VIRTIO_BLK_F_RO,
  type BlockFile,
} from './block.js';
import { openBlockImage, type BlockImageConfig } from './config.js';

/** Opens every drive as the VMM does at start (shared claims), then closes them. */
function validateBlockConfigs(configs: Array<Omit<BlockImageConfig, 'id'>>) {
  const claims = new Map<string, string>();
  const claim = (r: string, owner: string) => {
    const prev = claims.get(r);
    if (prev === undefined) claims.set(r, owner);
    return prev;
  };
  const opened: number[] = [];
  try {
    return configs.map((c, i) => {
      const b = openBlockImage({ ...c, id: `drive${i}` }, { claim });
      opened.push(b.fd);
      return b;
    });
  } finally {
    opened.forEach((fd) => closeSync(fd));
  }
}
import {
  VIRTIO_BLK_S_IOERR,
  VIRTIO_BLK_S_OK,
  VIRTIO_BLK_S_UNSUPP,
  VIRTIO_BLK_T_FLUSH,
  VIRTIO_BLK_T_GET_ID,
  VIRTIO_BLK_T_IN,
  VIRTIO_BLK_T_OUT,
} from './request.js';

const SECTORS = 64;

function tempImage(bytes = SECTORS * 512): { dir: string; path: string } {
  const dir = mkdtempSync(join(tmpdir(), 'typervisor-blk-'));
  const path = join(dir, 'disk.img');
  const data = new Uint8Array(bytes);
  for (let i = 0; i < bytes; i++) data[i] = (i * 7 + (i >> 9)) & 0xff;
  writeFileSync(path, data);
  return { dir, path };
}

interface Disk {
  h: Harness;
  q: MockQueue;
  dev: BlockDevice;
  /** Sends one request; returns [status, used.len]. */
  req(
    type: number,
    sector: number | bigint,
    data: { len: number; write?: boolean; bytes?: Uint8Array }[],
    statusLen?: number,
  ): [number, number, number[]];
}

function disk(file: BlockFile, opts: { readOnly?: boolean; serial?: string } = {}): Disk {
  const dev = new BlockDevice({
    name: 'test-blk',
    file,
    capacity: SECTORS,
    readOnly: opts.readOnly ?? false,
    serial: new TextEncoder().encode(opts.serial ?? ''),
    log: () => undefined,
  });
  const h = harness(blockIdentity(SECTORS, opts.readOnly ?? false), dev);
  const [q] = h.start();
  return {
    h,
    q: q!,
    dev,
    req(type, sector, data, statusLen = 1) {
      const hdr = h.alloc.alloc(16);
      h.mem.writeU32(hdr, type);
      h.mem.writeU64(hdr + 8, BigInt(sector));
      const bufs = data.map((d) => {
        const a = h.alloc.alloc(d.len, 512);
        if (d.bytes) h.mem.write(a, d.bytes);
        return { addr: a, len: d.len, write: d.write ?? false };
      });
      const st = h.alloc.alloc(statusLen, 1);
      h.mem.fill(st, statusLen, 0xee);
      q!.addChain([{ addr: hdr, len: 16 }, ...bufs, { addr: st, len: statusLen, write: true }]);
      h.kick();
      const used = q!.takeUsed();
      assert.equal(used.length, 1);
      return [h.mem.readU8(st + statusLen - 1), used[0]!.len, bufs.map((b) => b.addr)];
    },
  };
}

test('read, write, flush and GET_ID through the queue against a real file', () => {
  const { dir, path } = tempImage();
  const fd = openSync(path, 'r+');
  try {
    const d = disk(fdBlockFile(fd), { serial: 'vol-1234' });
    const offered = d.h.transport.state.deviceFeatures;
    assert.ok(offered & bit(VIRTIO_BLK_F_FLUSH) && offered & bit(VIRTIO_F_VERSION_1));
    assert.equal(offered & bit(VIRTIO_BLK_F_RO), 0n);
    // Capacity in the config space (Linux reads it as two 32-bit halves).
    assert.equal(d.h.driver.read(0x100), SECTORS);
    assert.equal(d.h.driver.read(0x104), 0);

    const file = readFileSync(path);
    // Read sectors 3..4 into two segments of 512.
    const [s1, n1, [a, b]] = d.req(VIRTIO_BLK_T_IN, 3, [
      { len: 512, write: true },
      { len: 512, write: true },
    ]);
    assert.equal(s1, VIRTIO_BLK_S_OK);
    assert.equal(n1, 1025);
    assert.deepEqual(Buffer.from(d.h.mem.view(a!, 512)), file.subarray(3 * 512, 4 * 512));
    assert.deepEqual(Buffer.from(d.h.mem.view(b!, 512)), file.subarray(4 * 512, 5 * 512));

    // Write sector 10.
    const data = new Uint8Array(1024).fill(0x5a);
    const [s2, n2] = d.req(VIRTIO_BLK_T_OUT, 10, [{ len: 1024, bytes: data }]);
    assert.equal(s2, VIRTIO_BLK_S_OK);
    assert.equal(n2, 1);
    assert.deepEqual(readFileSync(path).subarray(10 * 512, 12 * 512), Buffer.from(data));

    assert.deepEqual(d.req(VIRTIO_BLK_T_FLUSH, 0, []).slice(0, 2), [VIRTIO_BLK_S_OK, 1]);

    const [s3, n3, [id]] = d.req(VIRTIO_BLK_T_GET_ID, 0, [{ len: 20, write: true }]);
    assert.equal(s3, VIRTIO_BLK_S_OK);
    assert.equal(n3, 21);
    assert.equal(
      Buffer.from(d.h.mem.view(id!, 20)).toString('latin1'),
      'vol-1234'.padEnd(20, '\0'),
    );

    assert.equal(d.req(11, 0, [])[0], VIRTIO_BLK_S_UNSUPP); // DISCARD: not offered
    assert.equal(d.dev.counters.reads, 1);
    assert.equal(d.dev.counters.writes, 1);
    assert.ok(d.h.interrupts() >= 5);
  } finally {
    closeSync(fd);
    rmSync(dir, { recursive: true });
  }
});

test('Sync engine: a multi-segment request goes to preadv/pwritev whole, its bytes in order', () => {
  const { dir, path } = tempImage();
  const fd = openSync(path, 'r+');
  try {
    // preadv/pwritev as the shim does them (src/kvm/native-io.test.ts runs the real ones), over
    // node:fs, moving at most 1500 bytes per call: short transfers are resumed.
    const calls = { preadv: 0, pwritev: 0 };
    const vec = (write: boolean) => (f: number, bufs: Uint8Array[], o: number) => {
      let moved = 0;
      for (const b of bufs) {
        const want = Math.min(b.length, 1500 - moved);
        const n = write ? writeSync(f, b, 0, want, o + moved) : readSync(f, b, 0, want, o + moved);
        moved += n;
        if (n < b.length || moved === 1500) break;
      }
      return moved;
    };
    const sys = {
      preadv: (f: number, b: Uint8Array[], o: number) => (calls.preadv++, vec(false)(f, b, o)),
      pwritev: (f: number, b: Uint8Array[], o: number) => (calls.pwritev++, vec(true)(f, b, o)),
    };
    const d = disk(fdBlockFile(fd, sys));
    const file = readFileSync(path);
    const lens = [512, 1024, 512, 2048];
    const [st, len, addrs] = d.req(
      VIRTIO_BLK_T_IN,
      5,
      lens.map((l) => ({ len: l, write: true })),
    );
    assert.equal(st, VIRTIO_BLK_S_OK);
    assert.equal(len, 4096 + 1);
    assert.equal(calls.preadv, 3, 'ceil(4096 / 1500) calls: one per short transfer');
    let at = 5 * 512;
    addrs.forEach((a, i) => {
      assert.deepEqual(Buffer.from(d.h.mem.view(a, lens[i]!)), file.subarray(at, at + lens[i]!));
      at += lens[i]!;
    });
    const parts = lens.map((l, i) => new Uint8Array(l).fill(0x10 + i));
    const [sw] = d.req(
      VIRTIO_BLK_T_OUT,
      20,
      parts.map((p) => ({ len: p.length, bytes: p })),
    );
    assert.equal(sw, VIRTIO_BLK_S_OK);
    assert.equal(calls.pwritev, 3);
    assert.deepEqual(
      readFileSync(path).subarray(20 * 512, 20 * 512 + 4096),
      Buffer.concat(parts.map((p) => Buffer.from(p))),
    );
    // Past the end of the file (the image shrank under the VM): IOERR, not a hang or a throw.
    const small = join(dir, 'small.img');
    writeFileSync(small, new Uint8Array(512));
    const fd2 = openSync(small, 'r');
    try {
      d.dev.swapImage(fdBlockFile(fd2, sys), SECTORS);
      const [se] = d.req(VIRTIO_BLK_T_IN, 0, [
        { len: 512, write: true },
        { len: 512, write: true },
      ]);
      assert.equal(se, VIRTIO_BLK_S_IOERR);
    } finally {
      closeSync(fd2);
    }
  } finally {
    closeSync(fd);
    rmSync(dir, { recursive: true });
  }
});

test('transferAll resumes short transfers where they stopped and refuses one that moves nothing', () => {
  const src = new Uint8Array(5000);
  for (let i = 0; i < src.length; i++) src[i] = (i * 13) & 0xff;
  const bufs = [0, 700, 0, 1, 1299, 0, 2000].map((l) => new Uint8Array(l));
  let calls = 0;
  // Moves at most 333 bytes per call and never more than two iovecs: every boundary is crossed.
  transferAll(
    (b, pos) => {
      calls++;
      assert.ok(b.length > 0 && b.every((x) => x !== undefined));
      let moved = 0;
      for (const x of b.slice(0, 2)) {
        const k = Math.min(x.length, 333 - moved);
        x.set(src.subarray(pos + moved, pos + moved + k));
        moved += k;
        if (moved === 333) break;
      }
      return moved;
    },
    bufs,
    100,
    'read',
  );
  assert.deepEqual(
    Buffer.concat(bufs.map((b) => Buffer.from(b))),
    Buffer.from(src.subarray(100, 4100)),
  );
  assert.ok(calls >= 4000 / 333);
  assert.throws(() => transferAll(() => 0, [new Uint8Array(4)], 7, 'read'), /short read at 7/);
  assert.throws(
    () => transferAll((b) => (b[0]!.length === 4 ? 2 : 0), [new Uint8Array(4)], 0, 'write'),
    /short write at 2/,
  );
  transferAll(() => assert.fail('nothing to move'), [new Uint8Array(0)], 0, 'read');
});

test('out-of-range sectors, partial sectors and wrong directions answer IOERR, no I/O', () => {
  const { dir, path } = tempImage();
  const fd = openSync(path, 'r+');
  try {
    const d = disk(fdBlockFile(fd));
    const before = readFileSync(path);
    assert.equal(
      d.req(VIRTIO_BLK_T_IN, SECTORS, [{ len: 512, write: true }])[0],
      VIRTIO_BLK_S_IOERR,
    );
    assert.equal(
      d.req(VIRTIO_BLK_T_IN, SECTORS - 1, [{ len: 1024, write: true }])[0],
      VIRTIO_BLK_S_IOERR,
    );
    assert.equal(
      d.req(VIRTIO_BLK_T_OUT, 0xffff_ffff_ffff_ffffn, [{ len: 512 }])[0],
      VIRTIO_BLK_S_IOERR,
    );
    assert.equal(d.req(VIRTIO_BLK_T_OUT, 2n ** 60n, [{ len: 512 }])[0], VIRTIO_BLK_S_IOERR);
    assert.equal(d.req(VIRTIO_BLK_T_IN, 0, [{ len: 100, write: true }])[0], VIRTIO_BLK_S_IOERR);
    assert.equal(d.req(VIRTIO_BLK_T_OUT, 0, [{ len: 512, write: true }])[0], VIRTIO_BLK_S_IOERR); // write with writable data
    assert.equal(d.req(VIRTIO_BLK_T_IN, 0, [{ len: 512 }])[0], VIRTIO_BLK_S_IOERR); // read with readable data
    // The last sector is fine.
    assert.equal(
      d.req(VIRTIO_BLK_T_IN, SECTORS - 1, [{ len: 512, write: true }])[0],
      VIRTIO_BLK_S_OK,
    );
    assert.deepEqual(readFileSync(path), before);
    assert.equal(d.dev.counters.badRequests, 7);
  } finally {
    closeSync(fd);
    rmSync(dir, { recursive: true });
  }
});

test('a read-only disk offers VIRTIO_BLK_F_RO and fails writes with IOERR', () => {
  const { dir, path } = tempImage();
  const fd = openSync(path, 'r');
  try {
    const d = disk(fdBlockFile(fd), { readOnly: true });
    assert.ok(d.h.transport.state.deviceFeatures & bit(VIRTIO_BLK_F_RO));
    const before = readFileSync(path);
    assert.equal(
      d.req(VIRTIO_BLK_T_OUT, 0, [{ len: 512, bytes: new Uint8Array(512) }])[0],
      VIRTIO_BLK_S_IOERR,
    );
    assert.equal(d.req(VIRTIO_BLK_T_IN, 0, [{ len: 512, write: true }])[0], VIRTIO_BLK_S_OK);
    assert.equal(d.req(VIRTIO_BLK_T_FLUSH, 0, [])[0], VIRTIO_BLK_S_OK);
    assert.deepEqual(readFileSync(path), before);
  } finally {
    closeSync(fd);
    rmSync(dir, { recursive: true });
  }
});

test('host I/O errors answer IOERR: a descriptor closed underneath, a failing file', () => {
  const { dir, path } = tempImage();
  const fd = openSync(path, 'r+');
  closeSync(fd); // EBADF from now on
  try {
    const d = disk(fdBlockFile(fd));
    assert.equal(d.req(VIRTIO_BLK_T_IN, 0, [{ len: 512, write: true }])[0], VIRTIO_BLK_S_IOERR);
    assert.equal(d.req(VIRTIO_BLK_T_OUT, 0, [{ len: 512 }])[0], VIRTIO_BLK_S_IOERR);
    assert.equal(d.req(VIRTIO_BLK_T_FLUSH, 0, [])[0], VIRTIO_BLK_S_IOERR);
    assert.equal(d.dev.counters.ioErrors, 3);
    const eio = (): never => {
      throw Object.assign(new Error('EIO: i/o error'), { code: 'EIO' });
    };
    const f = disk({ read: eio, write: eio, flush: eio });
    const [st, len] = f.req(VIRTIO_BLK_T_IN, 0, [{ len: 512, write: true }]);
    assert.equal(st, VIRTIO_BLK_S_IOERR);
    assert.equal(len, 1);
  } finally {
    rmSync(dir, { recursive: true });
  }
});

test('requests without a status byte or header fail without touching memory outside the chain', () => {
  const { dir, path } = tempImage();
  const fd = openSync(path, 'r+');
  try {
    const d = disk(fdBlockFile(fd));
    const hdr = d.h.alloc.alloc(16);
    d.q.addChain([{ addr: hdr, len: 16 }]); // no writable status
    d.h.kick();
    assert.deepEqual(
      d.q.takeUsed().map((u) => u.len),
      [0],
    );
    const st = d.h.alloc.alloc(1);
    d.q.addChain([
      { addr: hdr, len: 8 },
      { addr: st, len: 1, write: true },
    ]); // short header
    d.h.kick();
    assert.equal(d.h.mem.readU8(st), VIRTIO_BLK_S_IOERR);
  } finally {
    closeSync(fd);
    rmSync(dir, { recursive: true });
  }
});

test('fuzz: random block requests over random chains never throw and stay in bounds', () => {
  const rng = new Prng(42);
  const image = new Uint8Array(SECTORS * 512);
  const file: BlockFile = {
    read: (b, pos) => {
      assert.ok(pos >= 0 && pos + b.length <= image.length);
      b.set(image.subarray(pos, pos + b.length));
    },
    write: (b, pos) => {
      assert.ok(pos >= 0 && pos + b.length <= image.length);
      image.set(b, pos);
    },
    flush: () => undefined,
  };
  const d = disk(file);
  for (let i = 0; i < 3000; i++) {
    const hdr = d.h.alloc.alloc(16);
    d.h.mem.writeU32(hdr, rng.pick([0, 1, 4, 8, 11, rng.u32()]));
    d.h.mem.writeU64(
      hdr + 8,
      rng.chance(0.8) ? BigInt(rng.below(SECTORS + 4)) : BigInt(rng.u32()) << 32n,
    );
    const n = rng.below(4);
    const bufs: Array<{ addr: number; len: number; write: boolean }> = [
      { addr: hdr, len: rng.chance(0.9) ? 16 : rng.below(20), write: false },
    ];
    let wrote = false;
    for (let k = 0; k < n; k++) {
      wrote = wrote || rng.chance(0.5);
      const len = rng.pick([0, 1, 20, 512, 1024, rng.below(4096)]);
      bufs.push({ addr: 0x20_0000 + rng.below(0x1000) * 256, len, write: wrote });
    }
    if (rng.chance(0.9)) bufs.push({ addr: 0x30_0000 + rng.below(4096), len: 1, write: true });
    d.q.addChain(bufs);
    d.h.kick();
    assert.equal(d.q.takeUsed().length, 1);
  }
  assert.equal(d.h.transport.state.counters().needsReset, 0);
});

test('config validation: missing, directory, unwritable, duplicate, size rounding, serial', () => {
  const { dir, path } = tempImage(SECTORS * 512 + 100);
  try {
    const [v] = validateBlockConfigs([{ kind: 'block', path, readOnly: false, serial: 'abc' }]);
    assert.equal(v!.capacity, SECTORS);
    assert.equal(v!.warnings.length, 1);
    const bad = (c: Parameters<typeof validateBlockConfigs>[0], re: RegExp) =>
      assert.throws(
        () => validateBlockConfigs(c),
        (e: unknown) => e instanceof ConfigError && re.test(e.message),
      );
    bad([{ kind: 'block', path: join(dir, 'nope'), readOnly: false }], /does not exist/);
    mkdirSync(join(dir, 'sub'));
    bad([{ kind: 'block', path: join(dir, 'sub'), readOnly: true }], /directory/);
    bad(
      [
        { kind: 'block', path, readOnly: true },
        { kind: 'block', path: join(dir, '.', 'disk.img'), readOnly: true },
      ],
      /same image/,
    );
    bad([{ kind: 'block', path, readOnly: true, serial: 'x'.repeat(21) }], /serial/);
    const tiny = join(dir, 'tiny.img');
    writeFileSync(tiny, new Uint8Array(100));
    bad([{ kind: 'block', path: tiny, readOnly: true }], /smaller than one sector/);
    // A host block device only when the drive asks for it (an idle loop device: 0 sectors).
    const blk = ['/dev/loop7', '/dev/loop0'].find(
      (p) => existsSync(p) && statSync(p).isBlockDevice(),
    );
    if (blk && process.getuid?.() === 0) {
      bad(
        [{ kind: 'block', path: blk, readOnly: true }],
        /path_on_host is a block device; refused/,
      );
      bad(
        [{ kind: 'block', path: blk, readOnly: true, allowBlockDevice: true }],
        /smaller than one sector|block device's size/,
      );
    }
    bad([{ kind: 'block', path: '/dev/null', readOnly: true }], /not a regular file/);
    if (process.getuid?.() !== 0) {
      chmodSync(path, 0o444);
      bad([{ kind: 'block', path, readOnly: false }], /not writable/);
      assert.equal(validateBlockConfigs([{ kind: 'block', path, readOnly: true }]).length, 1);
    }
  } finally {
    rmSync(dir, { recursive: true });
  }
});

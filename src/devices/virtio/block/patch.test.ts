/**
 * PATCH /drives after boot (helper P): the backend's image swap, the transport's config change
 * (capacity, ConfigGeneration, the config-change interrupt) and the replacement image's checks.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { closeSync, mkdirSync, mkdtempSync, openSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ConfigError } from '../../../util/errors.js';
import { harness } from '../testing/harness.js';
import { REG } from '../mmio.js';
import { INT_CONFIG_CHANGE } from '../constants.js';
import { BLK_CONFIG_CAPACITY, BlockDevice, blockIdentity, fdBlockFile } from './block.js';
import { openReplacementImage } from './config.js';
import { VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_IN } from './request.js';

function image(dir: string, name: string, sectors: number, fill: number): string {
  const p = join(dir, name);
  writeFileSync(p, new Uint8Array(sectors * 512).fill(fill));
  return p;
}

test('swapImage: the next request reads the new file, bounded by the new capacity', () => {
  const dir = mkdtempSync(join(tmpdir(), 'typervisor-blkpatch-'));
  const fds: number[] = [];
  try {
    const a = openSync(image(dir, 'a.img', 8, 0xaa), 'r');
    const b = openSync(image(dir, 'b.img', 16, 0xbb), 'r');
    fds.push(a, b);
    const dev = new BlockDevice({
      name: 'blk',
      file: fdBlockFile(a),
      capacity: 8,
      readOnly: true,
      serial: new Uint8Array(),
      log: () => undefined,
    });
    const h = harness(blockIdentity(8, true), dev);
    const [q] = h.start();
    const read = (sector: number): [number, number] => {
      const hdr = h.alloc.alloc(16);
      h.mem.writeU32(hdr, VIRTIO_BLK_T_IN);
      h.mem.writeU64(hdr + 8, BigInt(sector));
      const buf = h.alloc.alloc(512, 512);
      const st = h.alloc.alloc(1, 1);
      q!.addChain([
        { addr: hdr, len: 16 },
        { addr: buf, len: 512, write: true },
        { addr: st, len: 1, write: true },
      ]);
      h.kick();
      assert.equal(q!.takeUsed().length, 1);
      return [h.mem.readU8(st), h.mem.readU8(buf)];
    };
    assert.deepEqual(read(0), [VIRTIO_BLK_S_OK, 0xaa]);
    assert.equal(read(12)[0], VIRTIO_BLK_S_IOERR, 'past the old end');

    const gen0 = h.driver.read(REG.CONFIG_GENERATION);
    const field = dev.swapImage(fdBlockFile(b), 16);
    assert.equal(dev.sectors, 16);
    assert.equal(dev.counters.updates, 1);
    // The worker's part: the config space, a new generation, the interrupt bit (driver live).
    assert.equal(h.transport.state.changeConfig(BLK_CONFIG_CAPACITY, field), true);
    assert.equal(h.driver.read(0x100), 16);
    assert.equal(h.driver.read(0x104), 0);
    assert.equal(h.driver.read(REG.CONFIG_GENERATION), gen0 + 1);
    assert.ok(h.driver.read(REG.INTERRUPT_STATUS) & INT_CONFIG_CHANGE);
    assert.deepEqual(read(12), [VIRTIO_BLK_S_OK, 0xbb]);
    assert.deepEqual(read(0), [VIRTIO_BLK_S_OK, 0xbb]);
    assert.equal(read(16)[0], VIRTIO_BLK_S_IOERR, 'past the new end');

    assert.throws(() => dev.swapImage(fdBlockFile(a), 0), /bad disk capacity/);
    assert.throws(() => dev.swapImage(fdBlockFile(a), 1.5), /bad disk capacity/);
    assert.equal(dev.sectors, 16, 'a refused swap changes nothing');
    assert.equal(dev.counters.updates, 1);
    assert.deepEqual(read(12), [VIRTIO_BLK_S_OK, 0xbb]);
  } finally {
    fds.forEach((fd) => closeSync(fd));
    rmSync(dir, { recursive: true, force: true });
  }
});

test('changeConfig: bounded by the config space; no interrupt before DRIVER_OK', () => {
  const dev = new BlockDevice({
    name: 'blk',
    file: { read() {}, write() {}, flush() {} },
    capacity: 8,
    readOnly: false,
    serial: new Uint8Array(),
    log: () => undefined,
  });
  const h = harness(blockIdentity(8, false), dev);
  const st = h.transport.state;
  assert.equal(st.changeConfig(0, new Uint8Array(8).fill(1)), false, 'no driver yet');
  assert.equal(h.driver.read(REG.CONFIG_GENERATION), 1);
  assert.equal(h.driver.read(REG.INTERRUPT_STATUS) & INT_CONFIG_CHANGE, 0);
  assert.throws(() => st.changeConfig(60, new Uint8Array(8)), /outside the 64-byte space/);
  assert.throws(() => st.changeConfig(-1, new Uint8Array(1)), /outside/);
  assert.equal(h.driver.read(REG.CONFIG_GENERATION), 1, 'a refused change bumps nothing');
});

test("openReplacementImage: the start-up checks, and not another drive's image", () => {
  const dir = mkdtempSync(join(tmpdir(), 'typervisor-blkpatch-'));
  const fds: number[] = [];
  try {
    const mine = image(dir, 'mine.img', 8, 1);
    const other = image(dir, 'other.img', 8, 2);
    const fresh = image(dir, 'fresh.img', 10, 3);
    mkdirSync(join(dir, 'd'));
    const otherFd = openSync(other, 'r');
    fds.push(otherFd);
    const others = [{ id: 'rootfs', fd: otherFd }];
    const c = (path: string) => ({ kind: 'block' as const, id: 'data', path, readOnly: true });
    const ok = openReplacementImage(c(fresh), others);
    fds.push(ok.fd);
    assert.equal(ok.capacity, 10);
    assert.equal(ok.path, fresh);
    const same = openReplacementImage(c(mine), others); // its own file again (a resize)
    fds.push(same.fd);
    assert.throws(
      () => openReplacementImage(c(other), others),
      (e: Error) => e instanceof ConfigError && /the same image as drive rootfs/.test(e.message),
    );
    assert.throws(() => openReplacementImage(c(join(dir, 'none')), others), /does not exist/);
    assert.throws(() => openReplacementImage(c(''), others), /not a valid path/);
    assert.throws(() => openReplacementImage(c(`${fresh}\0x`), others), /not a valid path/);
    assert.throws(() => openReplacementImage(c(join(dir, 'd')), others), /is a directory/);
    writeFileSync(join(dir, 'tiny.img'), new Uint8Array(100));
    assert.throws(
      () => openReplacementImage(c(join(dir, 'tiny.img')), others),
      /smaller than one sector/,
    );
  } finally {
    fds.forEach((fd) => closeSync(fd));
    rmSync(dir, { recursive: true, force: true });
  }
});

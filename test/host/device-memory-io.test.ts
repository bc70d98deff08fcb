/**
 * Needs /dev/kvm, gcc and ld. Virtio buffers in device memory: the blk-loop guest
 * (bench/guests/blkloop.S built with BLK_DATA_HIGH) puts its virtio-blk data buffer at the first
 * byte of a pmem file, which the VMM maps at the start of device memory (4 GiB for a 64 MiB VM).
 * The device worker must reach it as it reaches RAM: a read fills the file, a write takes the
 * file's bytes to the disk; a read into a read-only pmem file is refused (as a guest write to it
 * would be), and the file keeps its bytes.
 */
import { test, type TestContext } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { deviceMemoryBase } from '../../src/arch/x86_64/layout.js';
import { REPO, processGone, runCli, tempDir, benchGuestSkipReason } from './helpers.js';

const MiB = 1024 * 1024;
const SECTORS = 2051;
const PMEM = 2 * MiB;
/** pmem is the VM's only device memory: it starts where device memory does. */
const PMEM_ADDR = deviceMemoryBase(64 * MiB);

const skip = benchGuestSkipReason();
const T = { skip: skip ?? false, timeout: 60_000 };
let dir = '';

/** blkloop.S with its data buffer at PMEM_ADDR (4 KiB requests). */
function build(name: string, defines: string[]): string {
  const src = join(REPO, 'bench', 'guests', 'micro.S');
  const obj = join(dir, `${name}.o`);
  const elf = join(dir, `${name}.elf`);
  const high = `-DBLK_DATA_HIGH=${PMEM_ADDR / 2 ** 32}`;
  for (const [cmd, args] of [
    ['gcc', ['-c', '-o', obj, '-DMODE_BLKLOOP', '-DBLK_BYTES=4096', high, ...defines, src]],
    [
      'ld',
      [
        '-m',
        'elf_x86_64',
        '-nostdlib',
        '-static',
        '-T',
        join(REPO, 'test', 'guests', 'tiny.ld'),
      ].concat(['-z', 'noexecstack', '-o', elf, obj]),
    ],
  ] as const) {
    const r = spawnSync(cmd, args, { encoding: 'utf8' });
    if (r.status !== 0) throw new Error(`${cmd} failed (${r.status}): ${r.stderr}`);
  }
  return elf;
}

let reads = '';
let writes = '';
if (!skip) {
  dir = tempDir('typervisor-devmem-io-');
  assert.equal(PMEM_ADDR % 2 ** 32, 0, 'the guest takes the high word only');
  // Three reads (sectors 0-7, 8-15, 16-23) into the same buffer: the last one stays.
  reads = build('reads', ['-DBLK_COUNT=3']);
  // One write of the buffer to sectors 0-7, a flush, then one read of them back into it.
  writes = build('writes', ['-DBLK_COUNT=1', '-DBLK_WRITE_KEY=0']);
}

/** A disk whose every sector starts with its number; the rest 0. */
function disk(name: string): string {
  const b = Buffer.alloc(SECTORS * 512);
  for (let i = 0; i < SECTORS; i++) b.writeUInt32LE(i, i * 512);
  const p = join(dir, name);
  writeFileSync(p, b);
  return p;
}

/** A pmem file of 0xee with `first` at its start. */
function pmemFile(name: string, first?: Buffer): string {
  const b = Buffer.alloc(PMEM, 0xee);
  first?.copy(b);
  const p = join(dir, name);
  writeFileSync(p, b);
  return p;
}

/** The first word of each 512-byte sector of the first 4 KiB (the disk's: the sector number). */
function firstWords(b: Buffer): number[] {
  return Array.from({ length: 8 }, (_, i) => b.readUInt32LE(i * 512));
}

async function run(
  t: TestContext,
  elf: string,
  image: string,
  pmem: string,
  readOnly: boolean,
): Promise<{ stdout: string; stderr: string }> {
  const config = join(dir, 'vm.json');
  writeFileSync(
    config,
    JSON.stringify({
      'boot-source': { kernel_image_path: elf },
      'machine-config': { vcpu_count: 1, mem_size_mib: 64 },
      drives: [{ drive_id: 'd0', path_on_host: image, is_root_device: false, is_read_only: false }],
      pmem: [{ id: 'pm0', path_on_host: pmem, root_device: false, read_only: readOnly }],
    }),
  );
  const r = await runCli(['--no-api', '--config-file', config], { timeoutMs: 45_000 });
  t.diagnostic(`exit ${r.code} in ${r.ms.toFixed(0)} ms, stdout ${JSON.stringify(r.stdout)}`);
  assert.equal(r.timedOut, false, `timed out; stdout=${JSON.stringify(r.stdout)}`);
  assert.ok(processGone(r.pid), `child ${r.pid} is still there (zombie?)`);
  assert.equal(r.code, 0, r.stderr);
  return r;
}

test('virtio-blk reads into a buffer in a pmem file: the file gets the data', T, async (t) => {
  const pm = pmemFile('reads.pmem');
  const r = await run(t, reads, disk('reads.img'), pm, false);
  assert.equal(r.stdout, 'M\nD\n', r.stderr);
  assert.doesNotMatch(r.stderr, /outside guest/);
  const b = readFileSync(pm);
  assert.deepEqual(firstWords(b), [16, 17, 18, 19, 20, 21, 22, 23], 'the last read (16-23)');
  assert.equal(b[4096], 0xee, 'nothing past the buffer');
});

test('virtio-blk writes from a buffer in a pmem file: the disk gets its bytes', T, async (t) => {
  const data = Buffer.alloc(4096);
  for (let i = 0; i < 4096; i += 4) data.writeUInt32LE(0xc0de0000 + i, i);
  const pm = pmemFile('writes.pmem', data);
  const img = disk('writes.img');
  const r = await run(t, writes, img, pm, false);
  assert.equal(r.stdout, 'M\nD\n', r.stderr);
  assert.deepEqual(readFileSync(img).subarray(0, 4096), data, 'sectors 0-7 hold the buffer');
  assert.deepEqual(readFileSync(pm).subarray(0, 4096), data, 'read back into the file');
});

test('a read-only pmem file: the device reads from it, its writes are refused', T, async (t) => {
  const data = Buffer.alloc(4096, 0x5a);
  const pm = pmemFile('ro.pmem', data);
  const img = disk('ro.img');
  const r = await run(t, writes, img, pm, true);
  // The write pass reads the buffer (allowed); the read back would write it: a bad chain,
  // completed with used.len 0 ("El"), and the device tells why once.
  assert.equal(r.stdout, 'M\nEl\n', r.stderr);
  assert.match(r.stderr, /buffer \[0x100000000, \+4096\) in read-only device memory/);
  assert.deepEqual(readFileSync(img).subarray(0, 4096), data, 'the write pass wrote the buffer');
  assert.deepEqual(readFileSync(pm), Buffer.alloc(PMEM, 0xee).fill(0x5a, 0, 4096), 'unchanged');
});

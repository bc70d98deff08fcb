/**
 * Needs /dev/kvm, gcc and ld. PATCH /drives/{id} after boot, seen by a guest driver (helper P,
 * issue 15): bench/guests/blkloop.S in MODE_BLKWATCH reads sector 0 of its disk and prints the
 * disk's tag, then "R", then polls the config-space capacity. We PATCH the drive to a bigger
 * image with another tag: the guest must see the new capacity together with the config-change
 * InterruptStatus bit and a new ConfigGeneration, and read the new image's last sector (past
 * the old end). Failed PATCHes (unknown id, missing file, a directory) answer 400 and change
 * nothing the guest or GET /vm/config can see.
 */
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { mkdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { call, startServer, type ServerProcess } from '../api/client.js';
import { REPO, tempDir, benchGuestSkipReason } from './helpers.js';

const skip = benchGuestSkipReason();
const T = { skip: skip ?? false, timeout: 90_000 };
let dir = '';
if (!skip) {
  dir = tempDir('typervisor-drive-patch-');
  const r = spawnSync('sh', [join(REPO, 'bench', 'guests', 'build.sh'), dir, '10', '10', '10'], {
    encoding: 'utf8',
  });
  if (r.status !== 0) throw new Error(`bench/guests/build.sh failed (${r.status}): ${r.stderr}`);
}

/** `sectors` sectors, each starting with its number (u32 LE) and then the tag byte. */
function disk(name: string, sectors: number, tag: string): string {
  const b = Buffer.alloc(sectors * 512);
  for (let i = 0; i < sectors; i++) {
    b.writeUInt32LE(i, i * 512);
    b.write(tag, i * 512 + 4, 'latin1');
  }
  const p = join(dir, name);
  writeFileSync(p, b);
  return p;
}

const fault = (r: { json: { fault_message?: string } }) => r.json?.fault_message ?? '';

async function until(what: string, srv: ServerProcess, ok: () => boolean, ms = 60_000) {
  const end = Date.now() + ms;
  while (!ok()) {
    if (srv.child.exitCode !== null)
      throw new Error(`${what}: the VMM exited; stdout ${JSON.stringify(srv.stdout())}`);
    if (Date.now() > end)
      throw new Error(`${what}: not within ${ms} ms; stdout ${JSON.stringify(srv.stdout())}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

const servers: ServerProcess[] = [];
after(async () => {
  for (const s of servers) await s.kill();
});

test(
  'PATCH /drives after boot: the guest reads the new image, with its new capacity',
  T,
  async () => {
    const oldImg = disk('old.img', 16, 'a');
    const newImg = disk('new.img', 24, 'b');
    mkdirSync(join(dir, 'a-dir'));
    const srv = await startServer();
    servers.push(srv);
    const sock = srv.sock;
    const put = async (path: string, body: unknown) => {
      const r = await call(sock, 'PUT', path, body);
      assert.equal(r.status, 204, `${path}: ${r.body}`);
    };
    await put('/machine-config', { vcpu_count: 1, mem_size_mib: 64 });
    await put('/boot-source', { kernel_image_path: join(dir, 'blkwatch.elf') });
    await put('/drives/data', {
      drive_id: 'data',
      path_on_host: oldImg,
      is_root_device: false,
      is_read_only: true,
    });
    // Before boot: Firecracker's answer (the update is for a running device).
    let r = await call(sock, 'PATCH', '/drives/data', { drive_id: 'data', path_on_host: newImg });
    assert.equal(r.status, 400);
    assert.equal(fault(r), 'The requested operation is not supported before starting the microVM.');

    await put('/actions', { action_type: 'InstanceStart' });
    await until('the guest reads the old image', srv, () => srv.stdout().includes('R\n'));
    assert.equal(srv.stdout(), 'M\naR\n');

    // Refused: nothing changes (the guest keeps polling the old capacity).
    r = await call(sock, 'PATCH', '/drives/nope', { drive_id: 'nope', path_on_host: newImg });
    assert.equal(r.status, 400);
    assert.match(fault(r), /no drive with id nope/);
    r = await call(sock, 'PATCH', '/drives/data', {
      drive_id: 'data',
      path_on_host: join(dir, 'missing.img'),
    });
    assert.equal(r.status, 400);
    assert.match(fault(r), /^Unable to patch the block device: .*the image does not exist/);
    r = await call(sock, 'PATCH', '/drives/data', {
      drive_id: 'data',
      path_on_host: join(dir, 'a-dir'),
    });
    assert.equal(r.status, 400);
    assert.match(fault(r), /is a directory/);
    r = await call(sock, 'PATCH', '/drives/data', { drive_id: 'data' });
    assert.equal(r.status, 400);
    assert.match(fault(r), /changes nothing/);
    let cfg = await call(sock, 'GET', '/vm/config');
    assert.equal(cfg.json.drives[0].path_on_host, oldImg);
    await new Promise((res) => setTimeout(res, 300));
    assert.equal(srv.stdout(), 'M\naR\n');

    // The swap: the guest sees capacity 24, the config-change bit and a new generation, then
    // reads sector 23 of the new image (tag "b").
    r = await call(sock, 'PATCH', '/drives/data', { drive_id: 'data', path_on_host: newImg });
    assert.equal(r.status, 204, r.body);
    await until('the guest reads the new image', srv, () => /D\n|E.\n/.test(srv.stdout()));
    assert.equal(srv.stdout(), 'M\naR\nbD\n');

    // Rate limiters: stored (merged per bucket), not enforced.
    r = await call(sock, 'PATCH', '/drives/data', {
      drive_id: 'data',
      rate_limiter: { bandwidth: { size: 1_000_000, refill_time: 100 } },
    });
    assert.equal(r.status, 204, r.body);
    r = await call(sock, 'PATCH', '/drives/data', {
      drive_id: 'data',
      rate_limiter: { ops: { size: 100, refill_time: 1000 } },
    });
    assert.equal(r.status, 204, r.body);
    cfg = await call(sock, 'GET', '/vm/config');
    assert.equal(cfg.json.drives[0].path_on_host, newImg);
    // GET /vm/config answers in Firecracker's shape: an unset one_time_burst is null.
    assert.deepEqual(cfg.json.drives[0].rate_limiter, {
      bandwidth: { size: 1_000_000, one_time_burst: null, refill_time: 100 },
      ops: { size: 100, one_time_burst: null, refill_time: 1000 },
    });
    assert.doesNotMatch(srv.stderr(), /host I\/O error|bad request/);
  },
);

test("PUT /serial: the guest's serial output goes to the file, not stdout", T, async () => {
  const srv = await startServer();
  servers.push(srv);
  const out = join(srv.dir, 'serial.out');
  for (const [path, body] of [
    ['/serial', { serial_out_path: out }],
    ['/machine-config', { vcpu_count: 1, mem_size_mib: 32 }],
    ['/boot-source', { kernel_image_path: join(dir, 'mark.elf') }],
    ['/actions', { action_type: 'InstanceStart' }],
  ] as Array<[string, unknown]>) {
    const r = await call(srv.sock, 'PUT', path, body);
    assert.equal(r.status, 204, `${path}: ${r.body}`);
  }
  // mark.elf prints "M\n" and resets: the VMM ends.
  const ended = await srv.exited;
  assert.equal(ended.code, 0, srv.stderr());
  assert.equal(readFileSync(out, 'utf8'), 'M\n');
  assert.equal(statSync(out).mode & 0o777, 0o600);
  assert.equal(srv.stdout(), '');
});

test(
  'PATCH /drives in a VM loaded from a snapshot; a snapshot after it keeps the new image',
  T,
  async () => {
    const oldImg = disk('snap-old.img', 16, 'a');
    const newImg = disk('snap-new.img', 32, 'c');
    const state = join(dir, 'vm.snap');
    const mem = join(dir, 'vm.mem');
    const serve = async () => {
      const s = await startServer();
      servers.push(s);
      return s;
    };
    const ok = async (s: ServerProcess, m: string, path: string, body: unknown) => {
      const r = await call(s.sock, m, path, body, 30_000);
      assert.equal(r.status, 204, `${m} ${path}: ${r.body}`);
    };
    // A: the guest has read the old image and polls the capacity; paused, snapshotted.
    const a = await serve();
    await ok(a, 'PUT', '/machine-config', { vcpu_count: 1, mem_size_mib: 64 });
    await ok(a, 'PUT', '/boot-source', { kernel_image_path: join(dir, 'blkwatch.elf') });
    await ok(a, 'PUT', '/drives/data', {
      drive_id: 'data',
      path_on_host: oldImg,
      is_root_device: false,
      is_read_only: true,
    });
    await ok(a, 'PUT', '/actions', { action_type: 'InstanceStart' });
    await until('A reads the old image', a, () => a.stdout().includes('R\n'));
    await ok(a, 'PATCH', '/vm', { state: 'Paused' });
    await ok(a, 'PUT', '/snapshot/create', { snapshot_path: state, mem_file_path: mem });
    await a.kill();

    // B: loaded and resumed, the guest still polls; the PATCH reaches it as in a booted VM.
    const b = await serve();
    await ok(b, 'PUT', '/snapshot/load', {
      snapshot_path: state,
      mem_backend: { backend_type: 'File', backend_path: mem },
      resume_vm: true,
    });
    await ok(b, 'PATCH', '/drives/data', { drive_id: 'data', path_on_host: newImg });
    await until('B reads the new image', b, () => /D\n|E.\n/.test(b.stdout()));
    assert.equal(b.stdout(), 'cD\n');
    await ok(b, 'PATCH', '/vm', { state: 'Paused' });
    const state2 = join(dir, 'vm2.snap');
    const mem2 = join(dir, 'vm2.mem');
    await ok(b, 'PUT', '/snapshot/create', { snapshot_path: state2, mem_file_path: mem2 });
    await b.kill();

    // C: B's snapshot names the new image (and its device serves it: the config space says 32).
    const c = await serve();
    await ok(c, 'PUT', '/snapshot/load', {
      snapshot_path: state2,
      mem_backend: { backend_type: 'File', backend_path: mem2 },
    });
    const cfg = await call(c.sock, 'GET', '/vm/config');
    assert.equal(cfg.json.drives[0].path_on_host, newImg);
  },
);

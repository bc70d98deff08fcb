/**
 * Needs /dev/kvm, gcc and ld. The VM generation id (ACPI VMGenID) with the counting tiny guest:
 * a booted VM has a random id in guest RAM at VMGENID_ADDR, and every snapshot load writes a new
 * one (two loads of one snapshot get two different ids) while the snapshot's memory file, mapped
 * privately, keeps the old one. The ids are read from the memory files of snapshots taken of
 * each VM (the guest's RAM exactly, back to back from guest address 0).
 */
import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { openSync, readSync, closeSync } from 'node:fs';
import { join } from 'node:path';
import { call, startServer, tempDir, type ServerProcess } from '../api/client.js';
import { guestPath, tinyGuests } from './helpers.js';
import { VMGENID_ADDR, VMGENID_SIZE } from '../../src/vmm/vmgenid.js';

const guests = tinyGuests();
const T = { timeout: 90_000, skip: guests.skip ?? false };

function idIn(memFile: string): string {
  const fd = openSync(memFile, 'r');
  try {
    const b = Buffer.alloc(VMGENID_SIZE);
    assert.equal(readSync(fd, b, 0, VMGENID_SIZE, VMGENID_ADDR), VMGENID_SIZE);
    return b.toString('hex');
  } finally {
    closeSync(fd);
  }
}

describe('VM generation id (KVM, tiny guest)', () => {
  const servers: ServerProcess[] = [];
  after(async () => {
    for (const s of servers) await s.kill();
  });
  const dir = tempDir();
  const snap = (n: string) => ({
    snapshot_path: join(dir, `${n}.snap`),
    mem_file_path: join(dir, `${n}.mem`),
  });
  const zero = '00'.repeat(VMGENID_SIZE);

  test('random at boot, new at every load, the snapshot file unchanged', T, async () => {
    const a = await startServer();
    servers.push(a);
    const ok = async (r: Promise<{ status: number; body: string }>) => {
      const x = await r;
      assert.equal(x.status, 204, x.body);
    };
    await ok(call(a.sock, 'PUT', '/machine-config', { vcpu_count: 1, mem_size_mib: 32 }));
    await ok(call(a.sock, 'PUT', '/boot-source', { kernel_image_path: guestPath('count') }));
    await ok(call(a.sock, 'PUT', '/actions', { action_type: 'InstanceStart' }));
    await ok(call(a.sock, 'PATCH', '/vm', { state: 'Paused' }));
    await ok(call(a.sock, 'PUT', '/snapshot/create', snap('a'), 30_000));
    await a.kill();
    const idA = idIn(snap('a').mem_file_path);
    assert.notEqual(idA, zero, 'a booted VM has a generation id');

    // Two loads of A's snapshot (paused), each snapshotted again to read its RAM.
    const ids: string[] = [];
    for (const n of ['b', 'c']) {
      const s = await startServer();
      servers.push(s);
      await ok(
        call(s.sock, 'PUT', '/snapshot/load', {
          snapshot_path: snap('a').snapshot_path,
          mem_backend: { backend_type: 'File', backend_path: snap('a').mem_file_path },
        }),
      );
      await ok(call(s.sock, 'PUT', '/snapshot/create', snap(n), 30_000));
      await s.kill();
      ids.push(idIn(snap(n).mem_file_path));
    }
    const [idB, idC] = ids as [string, string];
    assert.notEqual(idB, idA, 'a load writes a new id');
    assert.notEqual(idC, idA, 'a load writes a new id');
    assert.notEqual(idB, idC, 'two clones of one snapshot have different ids');
    assert.notEqual(idB, zero);
    assert.equal(idIn(snap('a').mem_file_path), idA, "the loads changed A's memory file");
  });
});

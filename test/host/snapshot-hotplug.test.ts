/**
 * Needs /dev/kvm, gcc and ld. A snapshot of a VM with memory hotplug (virtio-mem) carries the
 * hotplug region after RAM in the memory file (Firecracker's layout): the data in the region,
 * holes where nothing was written, and a load puts that data back into the new VM's region.
 *
 * The counting tiny guest has no virtio-mem driver, so the test writes into the region's memory
 * from outside (the VMM's memfd, opened through /proc/PID/fd), as plugged blocks' data would be;
 * the plugged bitmap itself goes through the device's save/restore (unit-tested in mem.test.ts).
 * A boots, gets the data, pauses and snapshots; B loads it, counts on, and its region holds the
 * same bytes at the same offsets, with the rest still unallocated.
 */
import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import {
  closeSync,
  fstatSync,
  openSync,
  readSync,
  readdirSync,
  readlinkSync,
  statSync,
  writeSync,
} from 'node:fs';
import { join } from 'node:path';
import { call, startServer, tempDir, type ServerProcess } from '../api/client.js';
import { guestPath, tinyGuests } from './helpers.js';
import { assertConsecutive, lineCount, numbers, until } from './counting-guest.js';

const guests = tinyGuests();
const T = { timeout: 60_000, skip: guests.skip ?? false };
const MiB = 1024 * 1024;
const MEM_MIB = 32;
const HOTPLUG_MIB = 256;

/** The VMM's virtio-mem region memfd, opened read-write through /proc (the caller closes it). */
function openHotplugMemfd(pid: number): number {
  for (const fd of readdirSync(`/proc/${pid}/fd`)) {
    let target = '';
    try {
      target = readlinkSync(`/proc/${pid}/fd/${fd}`);
    } catch {
      continue;
    }
    if (target.includes('memfd:typervisor-hotplug-memory'))
      return openSync(`/proc/${pid}/fd/${fd}`, 'r+');
  }
  throw new Error(`process ${pid} has no hotplug memfd`);
}

function readAt(fd: number, offset: number, length: number): Buffer {
  const b = Buffer.alloc(length);
  let got = 0;
  while (got < length) {
    const n = readSync(fd, b, got, length - got, offset + got);
    if (n <= 0) break;
    got += n;
  }
  return b;
}

describe('snapshots with hotplugged memory (KVM)', () => {
  const servers: ServerProcess[] = [];
  after(async () => {
    for (const s of servers) await s.kill();
  });
  const dir = tempDir();
  const state = join(dir, 'vm.snap');
  const mem = join(dir, 'vm.mem');
  // Data in two places of the region: 1 MiB at 130 MiB (the second slot), one page at 2 MiB + 4 KiB.
  const chunks = [
    { offset: 130 * MiB, data: randomBytes(MiB) },
    { offset: 2 * MiB + 4096, data: randomBytes(4096) },
  ];

  test('the memory file carries the hotplug region; a load puts it back', T, async () => {
    const a = await startServer();
    servers.push(a);
    const put = async (path: string, body: unknown) => {
      const r = await call(a.sock, 'PUT', path, body);
      assert.equal(r.status, 204, `${path}: ${r.body}`);
    };
    await put('/machine-config', { vcpu_count: 1, mem_size_mib: MEM_MIB });
    await put('/boot-source', { kernel_image_path: guestPath('count') });
    await put('/hotplug/memory', { total_size_mib: HOTPLUG_MIB });
    await put('/actions', { action_type: 'InstanceStart' });
    await until(() => lineCount(a.stdout()) >= 11, 20_000, 'A to count to 10');

    const fdA = openHotplugMemfd(a.child.pid!);
    try {
      for (const c of chunks) writeSync(fdA, c.data, 0, c.data.length, c.offset);
    } finally {
      closeSync(fdA);
    }
    assert.equal((await call(a.sock, 'PATCH', '/vm', { state: 'Paused' })).status, 204);
    const r = await call(
      a.sock,
      'PUT',
      '/snapshot/create',
      { snapshot_path: state, mem_file_path: mem },
      30_000,
    );
    assert.equal(r.status, 204, r.body);
    await new Promise((res) => setTimeout(res, 200)); // the pipe's last bytes
    const aOut = a.stdout();
    await a.kill();

    // RAM, then the whole region; only the data written is allocated in the region's part.
    const st = statSync(mem);
    assert.equal(st.size, (MEM_MIB + HOTPLUG_MIB) * MiB);
    assert.ok(
      st.blocks * 512 < (MEM_MIB + 8) * MiB,
      `memory file not sparse: ${st.blocks * 512} bytes allocated`,
    );
    const file = openSync(mem, 'r');
    try {
      for (const c of chunks)
        assert.ok(
          readAt(file, MEM_MIB * MiB + c.offset, c.data.length).equals(c.data),
          `the file's region at ${c.offset}`,
        );
    } finally {
      closeSync(file);
    }

    const b = await startServer();
    servers.push(b);
    const loaded = await call(b.sock, 'PUT', '/snapshot/load', {
      snapshot_path: state,
      mem_backend: { backend_type: 'File', backend_path: mem },
      resume_vm: true,
    });
    assert.equal(loaded.status, 204, loaded.body);
    await until(() => lineCount(b.stdout()) >= 10, 20_000, 'B to count 10 more');
    assertConsecutive(numbers(aOut + b.stdout()), 'A then B');

    const fdB = openHotplugMemfd(b.child.pid!);
    try {
      for (const c of chunks)
        assert.ok(readAt(fdB, c.offset, c.data.length).equals(c.data), `B's region at ${c.offset}`);
      // Holes stayed holes: B's region holds about the data written, not 256 MiB.
      const allocated = fstatSync(fdB).blocks * 512;
      assert.ok(allocated < 8 * MiB, `B's region has ${allocated} bytes allocated`);
    } finally {
      closeSync(fdB);
    }
    const hp = await call(b.sock, 'GET', '/hotplug/memory');
    assert.equal(hp.status, 200, hp.body);
    assert.equal(hp.json.total_size_mib, HOTPLUG_MIB);
  });

  test('a memory file without the hotplug region is refused, naming its size', T, async () => {
    const b = await startServer();
    servers.push(b);
    // The RAM-only size (what a snapshot without the region would have): a copy cut short.
    const cut = join(dir, 'cut.mem');
    const from = openSync(mem, 'r');
    const to = openSync(cut, 'w');
    try {
      const buf = Buffer.alloc(MiB);
      for (let off = 0; off < MEM_MIB * MiB; off += MiB) {
        readSync(from, buf, 0, MiB, off);
        writeSync(to, buf, 0, MiB, off);
      }
    } finally {
      closeSync(from);
      closeSync(to);
    }
    const r = await call(b.sock, 'PUT', '/snapshot/load', {
      snapshot_path: state,
      mem_backend: { backend_type: 'File', backend_path: cut },
    });
    assert.equal(r.status, 400, r.body);
    assert.match(
      r.json.fault_message ?? '',
      new RegExp(`${MEM_MIB * MiB} bytes; this snapshot's is ${(MEM_MIB + HOTPLUG_MIB) * MiB}`),
    );
    assert.equal((await call(b.sock, 'GET', '/')).json.state, 'Not started');
  });
});

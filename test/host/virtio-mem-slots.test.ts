/**
 * Needs /dev/kvm (and gcc and ld for the tiny guests). virtio-mem's KVM memory slots on the real
 * KVM: kvmSlotControl (device-memory.ts) really puts a reserved slot into the guest-physical map
 * and takes it out (KVM refuses an overlapping slot with EEXIST while it is in), and a VM with
 * memory hotplug starts and runs with its region's slots reserved, none made (nothing plugged).
 *
 * There is no tiny guest with a virtio-mem driver: plugging and unplugging (slots put back before
 * the ACK, taken out before the discard, restored from a snapshot) are unit-tested on the device
 * (src/devices/virtio/mem/mem.test.ts); the in-lab Linux test plugs memory for real.
 */
import { after, test } from 'node:test';
import assert from 'node:assert/strict';
import { ftruncateSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { KVM_SET_USER_MEMORY_REGION } from '../../src/kvm/constants.js';
import { Kvm } from '../../src/kvm/kvm.js';
import { encodeMemoryRegion } from '../../src/kvm/structs.js';
import { MAP_SHARED, PROT_READ, PROT_WRITE, isSyscallError, native } from '../../src/kvm/native.js';
import { kvmSlotControl } from '../../src/vmm/device-memory.js';
import { call, startServer, type ServerProcess } from '../api/client.js';
import { guestPath, kvmSkipReason, tinyGuests } from './helpers.js';

const MiB = 1024 * 1024;
const kvmSkip = kvmSkipReason();
const guests = tinyGuests();
const servers: ServerProcess[] = [];
after(async () => {
  for (const s of servers) await s.kill();
});

test(
  'kvmSlotControl puts a reserved slot into the guest-physical map, takes it out, puts it back',
  { skip: kvmSkip ?? false },
  () => {
    const n = native();
    const kvm = Kvm.open();
    const vm = kvm.createVm();
    const memfd = n.memfdCreate('typervisor-test-slot', 1);
    try {
      ftruncateSync(memfd, 4 * MiB);
      const buf = n.mmap(4 * MiB, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
      const other = n.mmap(2 * MiB, PROT_READ | PROT_WRITE, MAP_SHARED, memfd, 0);
      const gpa = 0x1_0000_0000;
      // As attachDeviceMemory does for a region that `startsOut`: a number, no slot yet.
      const slot = vm.reserveSlot();
      const ctl = kvmSlotControl([
        {
          vmFd: vm.fd,
          slot,
          guestAddr: gpa,
          size: 4 * MiB,
          hostAddr: n.bufferAddress(buf),
          flags: 0,
          present: false,
        },
      ]);
      // KVM refuses a slot overlapping one it has (EEXIST): whether the range is free says
      // whether our slot is in. A probe that fits is deleted again at once.
      const rangeFree = () => {
        try {
          const probe = vm.setUserMemoryRegion(gpa + 2 * MiB, other);
          n.ioctl(
            vm.fd,
            KVM_SET_USER_MEMORY_REGION,
            encodeMemoryRegion(probe, 0, gpa + 2 * MiB, 0, n.bufferAddress(other)),
          );
          return true;
        } catch (e) {
          if (isSyscallError(e, 'EEXIST')) return false;
          throw e;
        }
      };
      assert.equal(ctl.isPresent(0), false);
      assert.equal(rangeFree(), true, 'reserved, not made');
      ctl.setPresent(0, true);
      assert.equal(ctl.isPresent(0), true);
      assert.equal(rangeFree(), false, 'in');
      ctl.setPresent(0, false);
      assert.equal(rangeFree(), true, 'out');
      ctl.setPresent(0, true);
      assert.equal(rangeFree(), false, 'back in, the same slot');
      assert.throws(() => ctl.setPresent(1, true), RangeError);
      n.munmap(other);
      n.munmap(buf);
    } finally {
      n.close(memfd);
      n.close(vm.fd);
      kvm.close();
    }
  },
);

test(
  'a VM with memory hotplug starts with no slot of the region in the guest, and none to remove',
  { skip: guests.skip ?? false, timeout: 60_000 },
  async () => {
    // Our counters beside Firecracker's (the `typervisor` group): the child inherits this.
    process.env.TYPERVISOR_METRICS_EXTRAS = '1';
    const srv = await startServer();
    delete process.env.TYPERVISOR_METRICS_EXTRAS;
    servers.push(srv);
    const metrics = join(srv.dir, 'metrics.json');
    for (const [p, b] of [
      ['/metrics', { metrics_path: metrics }],
      ['/machine-config', { vcpu_count: 1, mem_size_mib: 32 }],
      ['/boot-source', { kernel_image_path: guestPath('spin') }],
      ['/hotplug/memory', { total_size_mib: 512, slot_size_mib: 128, block_size_mib: 2 }],
      ['/actions', { action_type: 'InstanceStart' }],
    ] as Array<[string, unknown]>) {
      const r = await call(srv.sock, 'PUT', p, b);
      assert.equal(r.status, 204, `${p}: ${r.body}`);
    }
    assert.equal(
      (await call(srv.sock, 'PUT', '/actions', { action_type: 'FlushMetrics' })).status,
      204,
    );
    const lines = readFileSync(metrics, 'utf8')
      .trim()
      .split('\n')
      .map((l) => JSON.parse(l) as { typervisor?: Record<string, number> });
    const sum = (k: string) => lines.reduce((a, l) => a + (l.typervisor?.[k] ?? 0), 0);
    // The VMM reserved the 4 slots' numbers and made none: nothing plugged, nothing to do.
    assert.equal(sum('memory_hotplug.slots_removed'), 0);
    assert.equal(sum('memory_hotplug.slots_added'), 0);
    assert.equal(sum('memory_hotplug.slot_fails'), 0);
    const hp = await call(srv.sock, 'GET', '/hotplug/memory');
    assert.equal(hp.json.plugged_size_mib, 0);
  },
);

/**
 * The VM generation id (ACPI VMGenID, see arch/x86_64/acpi/tables.ts vmgenidDevices): 16 random
 * bytes at VMGENID_ADDR in guest RAM, new at every boot and at every snapshot load, so that clones
 * of one snapshot tell themselves apart (Linux's vmgenid driver feeds a new id to its RNG and
 * reseeds: Firecracker's docs/snapshotting/random-for-clones.md).
 *
 * There is nothing here the guest can drive: no register, no exit. The VMM writes the id into
 * RAM (before any vCPU runs) and, after a load, pulses the GED's GSI once; the guest's _EVT then
 * notifies VGEN and the driver re-reads the id. The pulse goes into the in-kernel IOAPIC, so it
 * may come while the vCPUs are still parked: the interrupt waits in the LAPIC for them.
 */
import { randomFillSync } from 'node:crypto';
import { closeSync, fstatSync, openSync, readSync } from 'node:fs';
import { VMGENID_ADDR, VMGENID_GSI, VMGENID_SIZE } from '../arch/x86_64/layout.js';
import type { Vm } from '../kvm/kvm.js';
import type { GuestMemory } from '../memory/guest-memory.js';
import { ConfigError } from '../util/errors.js';
import { isCharDevice } from '../util/fs.js';

export { VMGENID_ADDR, VMGENID_GSI, VMGENID_SIZE };

/** Writes a fresh random generation id into guest RAM; returns it. */
export function writeGenerationId(mem: GuestMemory): Uint8Array {
  if (!mem.isValidRange(VMGENID_ADDR, VMGENID_SIZE))
    throw new ConfigError(
      `guest RAM does not cover the VM generation id at 0x${VMGENID_ADDR.toString(16)}`,
    );
  const id = new Uint8Array(VMGENID_SIZE);
  if (!readUrandom(id)) randomFillSync(id);
  mem.write(VMGENID_ADDR, id);
  return id;
}

/**
 * Fills `buf` from /dev/urandom (what node:crypto's randomFillSync reads too, via getrandom):
 * three syscalls, where loading node:crypto costs a VMM's start ~1.6 CPU ms and 0.4 MiB of peak
 * RSS (its bundles load it lazily: the micro guest needs it for nothing else). False when there
 * is no such device (a jail without it, another OS) or it is not 1:9: the caller uses node:crypto.
 */
function readUrandom(buf: Uint8Array): boolean {
  let fd: number | undefined;
  try {
    fd = openSync('/dev/urandom', 'r');
    // reads of up to 256 bytes from urandom are never short (random(4))
    return isCharDevice(fstatSync(fd), 1, 9) && readSync(fd, buf) === buf.length;
  } catch {
    return false;
  } finally {
    if (fd !== undefined) closeSync(fd);
  }
}

/** The generation id in guest RAM now. */
export function readGenerationId(mem: GuestMemory): Uint8Array {
  const id = new Uint8Array(VMGENID_SIZE);
  mem.read(VMGENID_ADDR, id);
  return id;
}

/**
 * Tells the guest the id changed: one edge on the GED's GSI (declared edge-triggered, so a
 * raise and a lower make exactly one interrupt). Call after the irqchips and LAPICs hold their
 * restored state, or the restore would overwrite the pending interrupt.
 */
export function notifyGenerationChange(vm: Vm): void {
  vm.irqLine(VMGENID_GSI, true);
  vm.irqLine(VMGENID_GSI, false);
}

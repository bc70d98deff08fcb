/**
 * One trap signature for port I/O and MMIO (as kvmtool does): a device sees the offset inside
 * its own window and the access bytes. `data` is the access (1, 2, 4 or 8 bytes, little-endian):
 * a read fills it, a write reads it. Devices never throw for guest-caused conditions, and keep
 * no reference to `data` after the call: the vCPU loop reuses one view per access size.
 */
export interface BusDevice {
  read(offset: number, data: Uint8Array): void;
  write(offset: number, data: Uint8Array): void;
}

/** An interrupt the device can raise. Edge: trigger(). Level lines also get setLevel(). */
export interface IrqLine {
  trigger(): void;
}

interface BusEntry {
  base: number;
  size: number;
  device: BusDevice;
}

/** Address -> device, for one address space (PIO or MMIO). Ranges never overlap. */
export class Bus {
  private entries: BusEntry[] = [];

  insert(base: number, size: number, device: BusDevice): void {
    if (size <= 0) throw new Error('bus range must not be empty');
    for (const e of this.entries) {
      if (base < e.base + e.size && e.base < base + size) {
        throw new Error(
          `bus range 0x${base.toString(16)}+${size} overlaps 0x${e.base.toString(16)}`,
        );
      }
    }
    this.entries.push({ base, size, device });
    this.entries.sort((a, b) => a.base - b.base);
  }

  /**
   * An access, served by the device whose window holds all of [addr, addr+data.length): a
   * write gives it `data`, a read has it fill `data`. False when no device holds it. What the
   * vCPU loop calls on every exit: it makes no object.
   */
  access(addr: number, data: Uint8Array, isWrite: boolean): boolean {
    const end = addr + data.length;
    const entries = this.entries;
    for (let i = 0; i < entries.length; i++) {
      const e = entries[i]!;
      if (addr >= e.base && end <= e.base + e.size) {
        if (isWrite) e.device.write(addr - e.base, data);
        else e.device.read(addr - e.base, data);
        return true;
      }
    }
    return false;
  }

  /** The device and offset for an access, when [addr, addr+len) lies inside one device. */
  resolve(addr: number, len: number): { device: BusDevice; offset: number } | undefined {
    for (const e of this.entries) {
      if (addr >= e.base && addr + len <= e.base + e.size)
        return { device: e.device, offset: addr - e.base };
    }
    return undefined;
  }
}

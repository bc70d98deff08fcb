/**
 * The JS cost of one vCPU exit after KVM_RUN returns, on the host, no KVM (issue 18's exits/s
 * row): VcpuLoop.handleExit over a kvm_run buffer we fill as KVM would, with the VM's real
 * legacy devices and unhandled-access table on its buses. What it leaves out: the ioctl itself
 * and the guest. Cases:
 *   pio-unclaimed  a 1-byte OUT to port 0x3f1, which no device claims (the micro guest's
 *                  `pioloop` exits/s row; a Linux guest's io_delay writes to port 0x80 too)
 *   pio-serial     a 1-byte IN of the UART's scratch register (0x3ff)
 *   mmio-unclaimed a 4-byte MMIO read no device claims
 *   mmio-pm        a 1-byte MMIO read of the ACPI PM block
 *
 *   node dist/bench/exit-dispatch.js [--exits N] [--runs N]
 */
import { parseArgs } from 'node:util';
import * as C from '../src/kvm/constants.js';
import type { Vcpu } from '../src/kvm/kvm.js';
import { RUN } from '../src/kvm/structs.js';
import { attachLegacyDevices, createLegacyDeviceState } from '../src/vmm/legacy-devices.js';
import { VcpuControl } from '../src/vmm/vcpu-control.js';
import { VcpuLoop, exitHandlersOf } from '../src/vmm/vcpu-loop.js';
import { countMinorGcs } from './common.js';
import { ACPI_PM_BASE } from '../src/arch/x86_64/layout.js';
import type { Vm } from '../src/kvm/kvm.js';
import { openSync } from 'node:fs';

/** KVM puts port-I/O data at data_offset; one page after the kvm_run header, as KVM does. */
const PIO_DATA_OFFSET = 4096;

interface Case {
  name: string;
  fill(run: DataView): void;
}

const pio = (port: number, out: boolean): Case['fill'] => {
  return (run) => {
    run.setUint32(RUN.exitReason, C.KVM_EXIT_IO, true);
    run.setUint8(RUN.ioDirection, out ? C.KVM_EXIT_IO_OUT : C.KVM_EXIT_IO_IN);
    run.setUint8(RUN.ioSize, 1);
    run.setUint16(RUN.ioPort, port, true);
    run.setUint32(RUN.ioCount, 1, true);
    run.setBigUint64(RUN.ioDataOffset, BigInt(PIO_DATA_OFFSET), true);
  };
};
const mmio = (addr: number, len: number): Case['fill'] => {
  return (run) => {
    run.setUint32(RUN.exitReason, C.KVM_EXIT_MMIO, true);
    run.setBigUint64(RUN.mmioPhysAddr, BigInt(addr), true);
    run.setUint32(RUN.mmioLen, len, true);
    run.setUint8(RUN.mmioIsWrite, 0);
  };
};

const CASES: Case[] = [
  { name: 'pio-unclaimed', fill: pio(0x3f1, true) },
  { name: 'pio-serial', fill: pio(0x3ff, false) },
  { name: 'mmio-unclaimed', fill: mmio(0xd100_0000, 4) },
  { name: 'mmio-pm', fill: mmio(ACPI_PM_BASE, 1) },
];

async function once(c: Case, exits: number): Promise<{ nsPerExit: number; minorGcs: number }> {
  // No KVM: the UART's and i8042's irqfds are registered with nobody.
  const vm = { registerIrqfd: () => {} } as unknown as Vm;
  const state = createLegacyDeviceState(vm, openSync('/dev/null', 'w'));
  const devices = attachLegacyDevices(state, {
    output: () => {},
    onPowerOff: () => {},
    onReset: () => {},
    onBootMarker: () => {},
    log: () => {},
  });
  const run = new DataView(new ArrayBuffer(PIO_DATA_OFFSET * 2));
  c.fill(run);
  const vcpu = {
    run,
    get exitReason() {
      return run.getUint32(RUN.exitReason, true);
    },
  } as unknown as Vcpu;
  const loop = new VcpuLoop(0, vcpu, new VcpuControl(), exitHandlersOf(devices));
  for (let i = 0; i < 20_000; i++) loop.handleExit(); // warm: optimized code, as a running VM has
  const gcs = countMinorGcs();
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < exits; i++) {
    if (loop.handleExit() !== undefined) throw new Error(`${c.name}: the exit ended the VM`);
  }
  const ns = Number(process.hrtime.bigint() - t0);
  return { nsPerExit: ns / exits, minorGcs: await gcs.stop() };
}

async function main(): Promise<void> {
  const { values } = parseArgs({
    options: {
      exits: { type: 'string', default: '2000000' },
      runs: { type: 'string', default: '5' },
    },
  });
  const exits = Number(values.exits);
  const runs = Number(values.runs);
  const rows = new Map<string, { ns: number[]; gcs: number[] }>();
  for (let r = 0; r < runs; r++) {
    for (const c of CASES) {
      const res = await once(c, exits);
      const row = rows.get(c.name) ?? { ns: [], gcs: [] };
      row.ns.push(res.nsPerExit);
      row.gcs.push(res.minorGcs);
      rows.set(c.name, row);
    }
  }
  const med = (a: number[]) => [...a].sort((x, y) => x - y)[Math.floor(a.length / 2)]!;
  console.log(`| exit | ns per exit, median (min-max) of ${runs} | young GCs per 10^6 exits |`);
  console.log('|---|---|---|');
  for (const [name, row] of rows) {
    const gcs = (med(row.gcs) / exits) * 1e6;
    console.log(
      `| ${name} | ${med(row.ns).toFixed(1)} (${Math.min(...row.ns).toFixed(1)}-${Math.max(...row.ns).toFixed(1)}) | ${gcs.toFixed(1)} |`,
    );
  }
}

await main();

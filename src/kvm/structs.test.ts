/**
 * Layouts of the KVM state structs, without KVM: encode/decode round trips, field offsets, and
 * the ioctl request numbers. The expected numbers and offsets were printed by a C program that
 * includes <linux/kvm.h> (linux-libc-dev for kernel 6.x, x86_64) and uses the kernel's own
 * _IOR/_IOW/_IOWR macros, sizeof and offsetof.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as C from './constants.js';
import * as S from './structs.js';
import type { Fpu } from './types.js';

test('ioctl request numbers match <linux/kvm.h>', () => {
  const expected: Record<string, number> = {
    KVM_GET_IRQCHIP: 0xc208ae62,
    KVM_SET_IRQCHIP: 0x8208ae63,
    KVM_GET_PIT2: 0x8070ae9f,
    KVM_SET_PIT2: 0x4070aea0,
    KVM_GET_CLOCK: 0x8030ae7c,
    KVM_SET_CLOCK: 0x4030ae7b,
    KVM_GET_FPU: 0x81a0ae8c,
    KVM_SET_FPU: 0x41a0ae8d,
    KVM_GET_LAPIC: 0x8400ae8e,
    KVM_SET_LAPIC: 0x4400ae8f,
    KVM_GET_MP_STATE: 0x8004ae98,
    KVM_SET_MP_STATE: 0x4004ae99,
    KVM_GET_VCPU_EVENTS: 0x8040ae9f,
    KVM_SET_VCPU_EVENTS: 0x4040aea0,
    KVM_GET_DEBUGREGS: 0x8080aea1,
    KVM_SET_DEBUGREGS: 0x4080aea2,
    KVM_GET_XSAVE: 0x9000aea4,
    KVM_SET_XSAVE: 0x5000aea5,
    KVM_GET_XSAVE2: 0x9000aecf,
    KVM_GET_XCRS: 0x8188aea6,
    KVM_SET_XCRS: 0x4188aea7,
    KVM_SET_TSC_KHZ: 0x0000aea2,
    KVM_GET_TSC_KHZ: 0x0000aea3,
    KVM_GET_MSRS: 0xc008ae88,
    KVM_SET_MSRS: 0x4008ae89,
    KVM_GET_REGS: 0x8090ae81,
    KVM_GET_SREGS: 0x8138ae83,
    KVM_CREATE_PIT2: 0x4040ae77,
    KVM_GET_CPUID2: 0xc008ae91,
  };
  const consts = C as unknown as Record<string, number>;
  for (const [name, value] of Object.entries(expected))
    assert.equal(consts[name], value, `${name}: 0x${consts[name]?.toString(16)}`);
});

test('struct sizes match <linux/kvm.h>', () => {
  assert.equal(S.IRQCHIP_SIZE, 520);
  assert.equal(S.PIT_STATE2_SIZE, 112);
  assert.equal(S.CLOCK_DATA_SIZE, 48);
  assert.equal(S.FPU_SIZE, 416);
  assert.equal(S.LAPIC_SIZE, 1024);
  assert.equal(S.VCPU_EVENTS_SIZE, 64);
  assert.equal(S.DEBUGREGS_SIZE, 128);
  assert.equal(S.XSAVE_SIZE, 4096);
  assert.equal(S.XCRS_SIZE, 392);
});

function sampleFpu(): Fpu {
  return {
    fpr: Uint8Array.from({ length: 128 }, (_, i) => i),
    fcw: 0x37f,
    fsw: 0x1234,
    ftwx: 0xa5,
    lastOpcode: 0x7ff,
    lastIp: 0xffff_ffff_8000_1000n,
    lastDp: 0x1122_3344_5566_7788n,
    xmm: Uint8Array.from({ length: 256 }, (_, i) => 255 - i),
    mxcsr: 0x1f80,
  };
}

test('kvm_fpu: round trip and field offsets (fcw 128, last_ip 136, xmm 152, mxcsr 408)', () => {
  const f = sampleFpu();
  const b = S.encodeFpu(f);
  assert.equal(b.length, S.FPU_SIZE);
  const v = new DataView(b.buffer);
  assert.equal(v.getUint16(128, true), 0x37f);
  assert.equal(v.getUint16(130, true), 0x1234);
  assert.equal(v.getUint8(132), 0xa5);
  assert.equal(v.getUint16(134, true), 0x7ff);
  assert.equal(v.getBigUint64(136, true), 0xffff_ffff_8000_1000n);
  assert.equal(v.getBigUint64(144, true), 0x1122_3344_5566_7788n);
  assert.equal(b[152], 255);
  assert.equal(v.getUint32(408, true), 0x1f80);
  assert.deepEqual(S.decodeFpu(b), f);
  assert.throws(() => S.encodeFpu({ ...f, xmm: new Uint8Array(16) }), RangeError);
  assert.throws(() => S.decodeFpu(new Uint8Array(100)), RangeError);
});

test('kvm_xcrs: nr_xcrs, then {xcr, reserved, value} from offset 8', () => {
  const xcrs = [{ xcr: 0, value: 0x207n }];
  const b = S.encodeXcrs(xcrs);
  const v = new DataView(b.buffer);
  assert.equal(b.length, S.XCRS_SIZE);
  assert.equal(v.getUint32(0, true), 1);
  assert.equal(v.getUint32(4, true), 0, 'flags');
  assert.equal(v.getUint32(8, true), 0);
  assert.equal(v.getBigUint64(16, true), 0x207n);
  assert.deepEqual(S.decodeXcrs(b), xcrs);
  assert.throws(() => S.encodeXcrs(Array.from({ length: 17 }, () => xcrs[0]!)), RangeError);
  // A hostile count is capped at the array's 16 entries.
  v.setUint32(0, 1000, true);
  assert.equal(S.decodeXcrs(b).length, S.MAX_XCRS);
});

test('kvm_debugregs: db[4], dr6 at 32, dr7 at 40, flags at 48', () => {
  const d = {
    db: [1n, 2n, 3n, 0xffff_ffff_ffff_fff0n] as [bigint, bigint, bigint, bigint],
    dr6: 0xffff0ff0n,
    dr7: 0x400n,
    flags: 0n,
  };
  const b = S.encodeDebugRegs(d);
  const v = new DataView(b.buffer);
  assert.equal(v.getBigUint64(24, true), 0xffff_ffff_ffff_fff0n);
  assert.equal(v.getBigUint64(32, true), 0xffff0ff0n);
  assert.equal(v.getBigUint64(40, true), 0x400n);
  assert.deepEqual(S.decodeDebugRegs(b), d);
});

test('kvm_clock_data: clock 0, flags 8, realtime 16, host_tsc 24', () => {
  const c = { clock: 123_456_789n, flags: C.KVM_CLOCK_REALTIME, realtime: 5n, hostTsc: 7n };
  const b = S.encodeClockData(c);
  const v = new DataView(b.buffer);
  assert.equal(b.length, 48);
  assert.equal(v.getBigUint64(0, true), 123_456_789n);
  assert.equal(v.getUint32(8, true), 4);
  assert.equal(v.getBigUint64(16, true), 5n);
  assert.equal(v.getBigUint64(24, true), 7n);
  assert.deepEqual(S.decodeClockData(b), c);
});

test('kvm_irqchip: chip_id first, PIC and IOAPIC fields in the union at 8', () => {
  const b = S.allocIrqchip(C.KVM_IRQCHIP_IOAPIC);
  assert.equal(b.length, 520);
  assert.equal(S.irqchipId(b), 2);
  assert.equal(S.IRQCHIP.picImr, 10);
  assert.equal(S.IRQCHIP.ioapicRedirTbl, 32);
  assert.throws(() => S.irqchipId(new Uint8Array(512)), RangeError);
});

test('LAPIC register helpers read and write little-endian u32s at the register offset', () => {
  const lapic = new Uint8Array(S.LAPIC_SIZE);
  S.setLapicReg(lapic, S.LAPIC.tpr, 0x20);
  assert.equal(lapic[0x80], 0x20);
  assert.equal(S.lapicReg(lapic, S.LAPIC.tpr), 0x20);
  // A view into a larger buffer works the same.
  const big = new Uint8Array(2048);
  const sub = big.subarray(512, 512 + S.LAPIC_SIZE);
  S.setLapicReg(sub, S.LAPIC.tpr, 0x30);
  assert.equal(big[512 + 0x80], 0x30);
});

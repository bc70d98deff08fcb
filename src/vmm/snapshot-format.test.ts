/**
 * The snapshot state file as hostile input: a round trip, then every truncation, every flipped
 * byte, wrong versions, trailing bytes, an oversized length and inconsistent records, each refused
 * through the Result with a message naming the problem (never a throw).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import {
  existsSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  truncateSync,
  writeFileSync,
} from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as S from '../kvm/structs.js';
import { versioned } from '../util/persist.js';
import {
  decodeSnapshotFile,
  encodeSnapshotFile,
  MAX_SNAPSHOT_PAYLOAD,
  readSnapshotFile,
  regionsInconsistency,
  SNAPSHOT_HEADER_BYTES,
  SnapshotFileError,
  SnapshotV1,
  writeFileAtomic,
  type SnapshotData,
} from './snapshot-format.js';
import { I8042 } from '../devices/legacy/i8042.js';
import { RtcCmos } from '../devices/legacy/rtc.js';
import { Serial16550 } from '../devices/legacy/serial.js';
import type { LegacyDeviceState } from './legacy-devices.js';
import { saveLegacy, type LegacyStateData } from './legacy-state.js';
import type { VcpuStateData, VmStateData } from './vcpu-state.js';

const MiB = 1024 * 1024;

const fill = (n: number, seed: number) =>
  Uint8Array.from({ length: n }, (_, i) => (i * 7 + seed) & 0xff);

function vcpuState(id: number): VcpuStateData {
  const regs = Object.fromEntries(
    S.REG_ORDER.map((k, i) => [k, BigInt(i * 0x1000 + id)]),
  ) as VcpuStateData['regs'];
  return {
    cpuid: [{ function: 0, index: 0, flags: 0, eax: 0xd, ebx: 1, ecx: 2, edx: 3 }],
    mpState: 0,
    regs,
    sregs: fill(S.SREGS_SIZE, 1),
    fpu: {
      fpr: fill(128, 2),
      fcw: 0x37f,
      fsw: 0,
      ftwx: 0,
      lastOpcode: 0,
      lastIp: 0n,
      lastDp: 0n,
      xmm: fill(256, 3),
      mxcsr: 0x1f80,
    },
    xsave: undefined,
    xcrs: [{ xcr: 0, value: 7n }],
    debugRegs: { dr0: 0n, dr1: 0n, dr2: 0n, dr3: 0n, dr6: 0xffff0ff0n, dr7: 0x400n },
    lapic: fill(S.LAPIC_SIZE, 4),
    tscKhz: 2_000_000,
    msrs: [
      { index: 0x10, data: 123456789n },
      { index: 0x6e0, data: 0n },
    ],
    events: fill(S.VCPU_EVENTS_SIZE, 5),
  };
}

function vmState(): VmStateData {
  return {
    picMaster: fill(S.IRQCHIP_SIZE, 6),
    picSlave: fill(S.IRQCHIP_SIZE, 7),
    ioapic: fill(S.IRQCHIP_SIZE, 8),
    pit: fill(S.PIT_STATE2_SIZE, 9),
    clock: { clock: 1_000_000n, flags: 6, realtime: 1_700_000_000_000_000_000n, hostTsc: 42n },
  };
}

/** Fresh legacy devices' state, saved (as a VM that has not run yet would give it). */
function legacyState(): LegacyStateData {
  return saveLegacy({
    serial: Serial16550.createState(),
    i8042: I8042.createState(),
    rtc: RtcCmos.createState(),
  } as LegacyDeviceState);
}

function sample(vcpus = 1): SnapshotData {
  return {
    producer: { version: '0.1.0', createdUnixMs: 1_764_500_000_000, hostTscKhz: 2_000_000 },
    machine: { vcpus, memMib: 32 },
    memory: {
      type: 'Full',
      pageSize: 4096,
      regions: [{ base: 0, size: 32 * MiB, fileOffset: 0 }],
      fileBytes: 32 * MiB,
    },
    config: JSON.stringify({ 'machine-config': { vcpu_count: vcpus, mem_size_mib: 32 } }),
    devices: [{ kind: 'rng', id: 'entropy', state: fill(40, 10) }],
    legacy: legacyState(),
    vm: vmState(),
    vcpus: Array.from({ length: vcpus }, (_, i) => vcpuState(i)),
  };
}

/** A container around any payload, with a valid checksum (to reach the checks behind it). */
function container(payload: Uint8Array, version = 1, flags = 0): Uint8Array {
  const out = new Uint8Array(SNAPSHOT_HEADER_BYTES + payload.length + 32);
  const v = new DataView(out.buffer);
  out.set(new TextEncoder().encode('TYPVSNAP'));
  v.setUint32(8, version, true);
  v.setUint32(12, flags, true);
  v.setBigUint64(16, BigInt(payload.length), true);
  out.set(payload, SNAPSHOT_HEADER_BYTES);
  const end = SNAPSHOT_HEADER_BYTES + payload.length;
  out.set(createHash('sha256').update(out.subarray(0, end)).digest(), end);
  return out;
}

function refused(bytes: Uint8Array): string {
  const r = decodeSnapshotFile(bytes);
  assert.equal(r.ok, false, 'accepted a bad file');
  if (r.ok) return '';
  assert.ok(r.error instanceof SnapshotFileError);
  return r.error.message;
}

test('snapshot file: round trip', () => {
  const d = sample(2);
  const bytes = encodeSnapshotFile(d);
  assert.equal(new TextDecoder().decode(bytes.subarray(0, 8)), 'TYPVSNAP');
  const back = decodeSnapshotFile(bytes);
  assert.ok(back.ok, back.ok ? '' : back.error.message);
  assert.deepEqual(back.value, d);
  // The container is exactly header + payload + trailer.
  assert.equal(bytes.length, 24 + SnapshotV1.encode(d).length + 32);
});

test('snapshot file: every truncation is refused', () => {
  const bytes = encodeSnapshotFile(sample());
  const seen = new Set<string>();
  for (let n = 0; n < bytes.length; n++) seen.add(refused(bytes.subarray(0, n)).split(':')[0]!);
  // Short of the header, then "file is N bytes, the header says M (file truncated)".
  assert.match(refused(bytes.subarray(0, 3)), /truncated/);
  assert.match(refused(bytes.subarray(0, 100)), /header says \d+ \(file truncated\)/);
  assert.match(refused(bytes.subarray(0, bytes.length - 1)), /truncated/);
  assert.ok(seen.size >= 2);
});

test('snapshot file: one flipped bit anywhere is refused', () => {
  const bytes = encodeSnapshotFile(sample());
  const messages = new Map<string, number>();
  for (let i = 0; i < bytes.length; i++) {
    const b = bytes.slice();
    b[i]! ^= 1 << (i % 8);
    const m = refused(b);
    const key = m.replace(/\d+/g, 'N');
    messages.set(key, (messages.get(key) ?? 0) + 1);
  }
  // The payload and trailer are covered by the checksum; the header's fields by their own checks.
  assert.ok(
    messages.has('checksum mismatch (file corrupted or truncated)'),
    [...messages.keys()].join('\n'),
  );
  assert.ok(messages.has('not a Typervisor snapshot'));
  for (const k of messages.keys())
    assert.match(k, /checksum|not a Typervisor|container version|flags|header says|payload length/);
});

test('snapshot file: wrong container version, flags, record version or name', () => {
  const payload = SnapshotV1.encode(sample());
  assert.equal(refused(container(payload, 2)), 'container version 2; this build reads 1');
  assert.match(refused(container(payload, 1, 1)), /unknown header flags 0x1/);
  const v3 = versioned('typervisor-snapshot', 3, SnapshotV1.codec).encode(sample());
  assert.match(refused(container(v3)), /typervisor-snapshot version 3; this build reads version 1/);
  const other = versioned('kvm-vm', 1, SnapshotV1.codec).encode(sample());
  assert.match(refused(container(other)), /"kvm-vm" record where "typervisor-snapshot"/);
  assert.equal(
    refused(new TextEncoder().encode('#!/bin/sh\necho hello\n'.repeat(4))),
    'not a Typervisor snapshot',
  );
  assert.match(refused(new Uint8Array(0)), /truncated: 0 bytes/);
});

test('snapshot file: trailing bytes and an oversized length are refused before decoding', () => {
  const bytes = encodeSnapshotFile(sample());
  const longer = new Uint8Array(bytes.length + 1);
  longer.set(bytes);
  assert.match(refused(longer), /has trailing bytes/);
  const huge = bytes.slice(0, 64);
  new DataView(huge.buffer).setBigUint64(16, BigInt(MAX_SNAPSHOT_PAYLOAD + 1), true);
  assert.match(refused(huge), /payload length \d+ is more than/);
  new DataView(huge.buffer).setBigUint64(16, 0xffff_ffff_ffff_ffffn, true);
  assert.match(refused(huge), /payload length/);
  // Payload with bytes after the record: persist refuses it even with a valid checksum.
  const payload = SnapshotV1.encode(sample());
  const padded = new Uint8Array(payload.length + 3);
  padded.set(payload);
  assert.match(refused(container(padded)), /3 trailing bytes/);
});

test('snapshot file: a garbled payload with a valid checksum is refused with a field path', () => {
  const payload = SnapshotV1.encode(sample());
  for (let i = 0; i < payload.length; i += 7) {
    const p = payload.slice();
    p[i] = 0xff;
    const r = decodeSnapshotFile(container(p));
    if (!r.ok) assert.ok(r.error instanceof SnapshotFileError);
  }
  const cut = container(payload.subarray(0, payload.length - 10));
  assert.match(refused(cut), /typervisor-snapshot.*(truncated|bytes)/);
});

test('snapshot file: inconsistent records are refused', () => {
  const bad = (f: (d: SnapshotData) => void): string => {
    const d = sample();
    f(d);
    return refused(container(SnapshotV1.encode(d)));
  };
  assert.match(
    bad((d) => (d.machine.vcpus = 2)),
    /1 saved vCPU states for 2 vCPUs/,
  );
  assert.match(
    bad((d) => (d.machine.memMib = 64)),
    /does not match mem_size_mib 64/,
  );
  assert.match(
    bad((d) => (d.memory.pageSize = 2 * MiB)),
    /page size/,
  );
  assert.match(
    bad((d) => (d.memory.fileBytes = 16 * MiB)),
    /add up to/,
  );
  assert.match(
    bad((d) => (d.memory.regions[0]!.fileOffset = 4096)),
    /file offset 4096, expected 0/,
  );
  assert.match(
    bad((d) => (d.memory.regions = [])),
    /no memory regions/,
  );
  assert.match(
    bad((d) => (d.memory.regions[0]!.size = 100)),
    /not whole pages/,
  );
  assert.match(
    bad((d) => (d.devices[0] = { ...d.devices[0]!, kind: 'floppy' as never })),
    /floppy/,
  );
  // Two regions, second overlapping the first.
  assert.match(
    regionsInconsistency(
      [
        { base: 0, size: 8192, fileOffset: 0 },
        { base: 4096, size: 4096, fileOffset: 8192 },
      ],
      12288,
    ) ?? '',
    /overlaps/,
  );
  assert.equal(
    regionsInconsistency(
      [
        { base: 0, size: 8192, fileOffset: 0 },
        { base: 0x1_0000_0000, size: 4096, fileOffset: 8192 },
      ],
      12288,
    ),
    undefined,
  );
});

test('readSnapshotFile and writeFileAtomic', () => {
  const dir = mkdtempSync(join(tmpdir(), 'typervisor-snapfmt-'));
  try {
    const path = join(dir, 'vm.snap');
    const d = sample();
    writeFileAtomic(path, encodeSnapshotFile(d));
    assert.deepEqual(readdirSync(dir), ['vm.snap']); // no temp file left
    const r = readSnapshotFile(path);
    assert.ok(r.ok);
    assert.deepEqual(r.value, d);

    // Overwrite in place; then a failed write (no such directory) throws and leaves nothing.
    const d2 = sample(3);
    writeFileAtomic(path, encodeSnapshotFile(d2));
    const r1 = readSnapshotFile(path);
    assert.equal(r1.ok && r1.value.machine.vcpus, 3);
    assert.throws(
      () => writeFileAtomic(join(dir, 'missing', 'x.snap'), new Uint8Array(4)),
      /ENOENT/,
    );
    assert.deepEqual(readdirSync(dir), ['vm.snap']);

    const missing = readSnapshotFile(join(dir, 'nope'));
    assert.ok(!missing.ok && /cannot open the snapshot file.*ENOENT/.test(missing.error.message));
    const isDir = readSnapshotFile(dir);
    assert.ok(!isDir.ok && /not a regular file/.test(isDir.error.message));

    // A huge (sparse) file is refused by its size, not read.
    const big = join(dir, 'big.snap');
    writeFileSync(big, readFileSync(path).subarray(0, 24));
    truncateSync(big, MAX_SNAPSHOT_PAYLOAD + 1000);
    const r2 = readSnapshotFile(big);
    assert.ok(!r2.ok && /has trailing bytes/.test(r2.error.message), r2.ok ? '' : r2.error.message);
    const junk = join(dir, 'junk');
    writeFileSync(junk, 'hello');
    truncateSync(junk, MAX_SNAPSHOT_PAYLOAD + 1000);
    const r3 = readSnapshotFile(junk);
    assert.ok(!r3.ok && r3.error.message === 'not a Typervisor snapshot');
    assert.ok(existsSync(path));
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

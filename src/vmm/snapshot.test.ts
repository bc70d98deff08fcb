/**
 * createSnapshot and loadSnapshot refusals that come before anything is created (no /dev/kvm
 * needed): each is a SnapshotError with Firecracker's prefix and the bare reason. The whole
 * create -> load path runs on KVM in test/host/snapshot.test.ts.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, truncateSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { I8042 } from '../devices/legacy/i8042.js';
import { RtcCmos } from '../devices/legacy/rtc.js';
import { Serial16550 } from '../devices/legacy/serial.js';
import * as S from '../kvm/structs.js';
import type { BuiltVm } from './builder.js';
import type { LegacyDeviceState } from './legacy-devices.js';
import { saveLegacy } from './legacy-state.js';
import { emptyVmConfig } from './resources.js';
import { encodeSnapshotFile, type SnapshotData } from './snapshot-format.js';
import { createSnapshot, loadSnapshot, SnapshotError, type LoadParams } from './snapshot.js';
import type { VcpuStateData, VmStateData } from './vcpu-state.js';

const MiB = 1024 * 1024;
const dir = mkdtempSync(join(tmpdir(), 'typervisor-snapshot-'));
process.on('exit', () => rmSync(dir, { recursive: true, force: true }));

const zeros = (n: number) => new Uint8Array(n);

function vcpuState(): VcpuStateData {
  const names = ['rax', 'rbx', 'rcx', 'rdx', 'rsi', 'rdi', 'rsp', 'rbp'];
  const more = ['r8', 'r9', 'r10', 'r11', 'r12', 'r13', 'r14', 'r15', 'rip', 'rflags'];
  return {
    cpuid: [],
    mpState: 0,
    regs: Object.fromEntries([...names, ...more].map((k) => [k, 0n])) as VcpuStateData['regs'],
    sregs: zeros(S.SREGS_SIZE),
    fpu: {
      fpr: zeros(128),
      fcw: 0x37f,
      fsw: 0,
      ftwx: 0,
      lastOpcode: 0,
      lastIp: 0n,
      lastDp: 0n,
      xmm: zeros(256),
      mxcsr: 0x1f80,
    },
    xsave: undefined,
    xcrs: undefined,
    debugRegs: { dr0: 0n, dr1: 0n, dr2: 0n, dr3: 0n, dr6: 0xffff0ff0n, dr7: 0x400n },
    lapic: zeros(S.LAPIC_SIZE),
    tscKhz: undefined,
    msrs: [],
    events: zeros(S.VCPU_EVENTS_SIZE),
  };
}

function vmState(): VmStateData {
  return {
    picMaster: zeros(S.IRQCHIP_SIZE),
    picSlave: zeros(S.IRQCHIP_SIZE),
    ioapic: zeros(S.IRQCHIP_SIZE),
    pit: zeros(S.PIT_STATE2_SIZE),
    clock: { clock: 0n, flags: 0, realtime: 0n, hostTsc: 0n },
  };
}

/** A 1-vCPU 32 MiB snapshot with an entropy device and a network interface. */
function sample(): SnapshotData {
  const config = emptyVmConfig();
  config['machine-config'] = { ...config['machine-config'], vcpu_count: 1, mem_size_mib: 32 };
  config.entropy = {};
  config['network-interfaces'] = [{ iface_id: 'eth0', host_dev_name: 'tap0' }];
  return {
    producer: { version: 'test', createdUnixMs: 0, hostTscKhz: undefined },
    machine: { vcpus: 1, memMib: 32 },
    memory: {
      type: 'Full',
      pageSize: 4096,
      regions: [{ base: 0, size: 32 * MiB, fileOffset: 0 }],
      fileBytes: 32 * MiB,
    },
    config: JSON.stringify(config),
    devices: [
      { kind: 'rng', id: 'entropy', state: zeros(8) },
      { kind: 'net', id: 'eth0', state: zeros(8) },
    ],
    legacy: saveLegacy({
      serial: Serial16550.createState(),
      i8042: I8042.createState(),
      rtc: RtcCmos.createState(),
    } as LegacyDeviceState),
    vm: vmState(),
    vcpus: [vcpuState()],
  };
}

let n = 0;
/** Writes a state file (and a memory file of `memBytes`) and gives load parameters for them. */
function files(d: SnapshotData, memBytes = 32 * MiB): LoadParams {
  n++;
  const snapshotPath = join(dir, `state${n}`);
  const memPath = join(dir, `mem${n}`);
  writeFileSync(snapshotPath, encodeSnapshotFile(d));
  writeFileSync(memPath, '');
  truncateSync(memPath, memBytes);
  return {
    snapshotPath,
    memBackend: { type: 'File', path: memPath },
    trackDirtyPages: false,
    resumeVm: false,
    clockRealtime: false,
    networkOverrides: [],
  };
}

async function refused(p: LoadParams, re: RegExp): Promise<void> {
  await assert.rejects(loadSnapshot(p), (e: unknown) => {
    assert.ok(e instanceof SnapshotError, String(e));
    assert.ok(e.message.startsWith('Load snapshot error: '), e.message);
    assert.equal(e.message, `Load snapshot error: ${e.reason}`);
    assert.match(e.reason, re);
    return true;
  });
}

test('load refuses a missing or damaged state file, and a Uffd backend with no handler', async () => {
  const p = files(sample());
  await refused({ ...p, snapshotPath: join(dir, 'nope') }, /cannot open the snapshot file/);
  // The state file is checked first, then the handler's socket (test/host/snapshot-uffd.test.ts).
  const uffd = { type: 'Uffd' as const, path: join(dir, 'no-handler.sock') };
  await refused(
    { ...p, snapshotPath: join(dir, 'nope'), memBackend: uffd },
    /cannot open the snapshot file/,
  );
  await refused(
    { ...p, memBackend: uffd },
    /^Uffd memory backend: (cannot connect to the page-fault handler at .*no-handler\.sock \(ENOENT\)|cannot create a userfaultfd)/,
  );
  truncateSync(p.snapshotPath, 100);
  await refused(p, /truncated/);
});

test('load refuses a memory file of the wrong size or that does not exist', async () => {
  await refused(files(sample(), 32 * MiB - 4096), /truncated/);
  await refused(files(sample(), 32 * MiB + 4096), /too long/);
  const p = files(sample());
  await refused({ ...p, memBackend: { type: 'File', path: join(dir, 'nope') } }, /memory file/);
});

test('load refuses a saved configuration that does not fit the saved state', async () => {
  const d = sample();
  await refused(files({ ...d, config: '{"machine-config":' }), /not JSON/);
  await refused(files({ ...d, config: '[]' }), /config: expected an object/);
  await refused(files({ ...d, devices: d.devices.slice(0, 1) }), /saved devices .* do not match/);
  await refused(files({ ...d, devices: [...d.devices].reverse() }), /do not match/);
  const c = JSON.parse(d.config) as ReturnType<typeof emptyVmConfig>;
  c['machine-config'].mem_size_mib = 64;
  await refused(files({ ...d, config: JSON.stringify(c) }), /does not match the saved machine/);
  // Consistent in itself, but not this build's layout for 32 MiB.
  const regions = [
    { base: 0, size: 16 * MiB, fileOffset: 0 },
    { base: 32 * MiB, size: 16 * MiB, fileOffset: 16 * MiB },
  ];
  await refused(files({ ...d, memory: { ...d.memory, regions } }), /memory regions do not match/);
});

test('load applies overrides and refuses one naming a device the snapshot lacks', async () => {
  const p = files(sample());
  await refused(
    { ...p, networkOverrides: [{ ifaceId: 'eth9', hostDevName: 'tap9' }] },
    /^Unknown Network Device: eth9$/,
  );
  await refused({ ...p, vsockOverride: { udsPath: '/tmp/v.sock' } }, /^Unknown Vsock Device$/);
  await refused(
    { ...p, networkOverrides: [{ ifaceId: 'eth0', hostDevName: 'bad name' }] },
    /TAP name/,
  );
});

test('load refuses vsock_override and track_dirty_pages on a snapshot whose vsock is vhost', async () => {
  const d = sample();
  const c = JSON.parse(d.config) as ReturnType<typeof emptyVmConfig>;
  c.vsock = { guest_cid: 3, backend: 'vhost' };
  const p = files({
    ...d,
    config: JSON.stringify(c),
    devices: [...d.devices, { kind: 'vsock', id: 'vsock', state: zeros(8) }],
  });
  await refused(
    { ...p, vsockOverride: { udsPath: '/tmp/v.sock' } },
    /^vsock_override: the snapshot's vsock device uses the vhost backend, which has no Unix socket to re-point/,
  );
  await refused(
    { ...p, trackDirtyPages: true },
    /^vsock: the vhost backend cannot be used with track_dirty_pages/,
  );
});

test('create refuses a VM that is not paused, and a Diff without dirty page tracking', async () => {
  const vm = (state: string, stopping = false) =>
    ({ vmm: { state, stopping } }) as unknown as BuiltVm;
  const p = { snapshotPath: join(dir, 's'), memFilePath: join(dir, 'm'), type: 'Full' as const };
  await assert.rejects(createSnapshot(vm('running'), p), {
    message: 'Create snapshot error: the microVM must be paused (it is Running)',
  });
  await assert.rejects(createSnapshot(vm('paused', true), p), /it is Stopped/);
  await assert.rejects(
    createSnapshot(vm('paused'), { ...p, type: 'Diff' }),
    (e: unknown) =>
      e instanceof SnapshotError &&
      e.message ===
        'Create snapshot error: Diff snapshots are not allowed on uVMs with dirty page tracking disabled.',
  );
  await assert.rejects(
    createSnapshot(vm('paused'), { ...p, memFilePath: p.snapshotPath }),
    /name the same file/,
  );
});

/**
 * Snapshots: create (a paused VM -> a state file and a memory file) and load (those files -> a
 * paused or running VM in a fresh process), with Firecracker's semantics.
 *
 * Create, on a paused VM: the device worker is paused too (net RX writes guest RAM), then the
 * devices, the vCPUs, the VM (irqchips, PIT, kvmclock) and the legacy devices are saved; the
 * memory file is written under a temporary name, the state file is written and renamed into
 * place, and only then the memory file. A failed create leaves the old files as they were. The
 * VM stays paused (its Resume resumes the device worker).
 *
 * Load, in a process with no VM: steps that create nothing come first (read and check the state
 * file, its configuration, its consistency, the memory file's size), so most bad input is refused
 * before anything exists. Then the VM is made from the same steps as a boot (builder.ts) with the
 * saved state put in; every step has an undo entry, so a failure leaves no fd, mapping or thread
 * and the process can try again.
 */
import { closeSync, readFileSync } from 'node:fs';
import { resolve } from 'node:path';
import { ramRegions } from '../arch/x86_64/layout.js';
import { KVM_CAP_TSC_CONTROL } from '../kvm/constants.js';
import type { Vm } from '../kvm/kvm.js';
import { countDirty, dirtyBitmapBytes, type DirtyPages } from '../memory/dirty-pages.js';
import { ConfigError, keepName } from '../util/errors.js';
import { log } from '../util/log.js';
import { attachDeviceMemory, deviceMemorySpace } from './device-memory.js';
import { attachRegisterPages } from './register-pages.js';
import {
  attachRam,
  createVcpu,
  createVmShell,
  finishVm,
  releaseVcpuRun,
  runUndo,
  type BuildOptions,
  type BuiltVm,
  type UndoList,
} from './builder.js';
import { deviceDirtyPages, trackDeviceWrites } from './guest-ram.js';
import {
  closeLegacyDeviceState,
  createLegacyDeviceState,
  legacyOptions,
} from './legacy-devices.js';
import { restoreLegacy, saveLegacy } from './legacy-state.js';
import { validateRestoreConfig, type RestoreSpec } from './resources.js';
import {
  encodeSnapshotFile,
  readSnapshotFile,
  writeFileAtomic,
  type SnapshotData,
  type SnapshotRegion,
} from './snapshot-format.js';
import type { GuestRamLayout, MappedGuestRam } from './guest-ram.js';
import { hotplugMemory, savedPluggedCount } from './memory-hotplug.js';
import {
  appendDeviceMemory,
  checkMemoryFile,
  loadDeviceMemory,
  mapMemoryFile,
  writeMemoryFile,
  type FileId,
} from './snapshot-memory.js';
import { uffdGuestMemory } from './snapshot-uffd.js';
import {
  MSR_IA32_TSC,
  MSR_IA32_TSC_DEADLINE,
  VcpuStateV1,
  restoreVcpu,
  restoreVm,
  saveVm,
} from './vcpu-state.js';
import { closeVirtio, planVirtioDevices } from './virtio-plan.js';
import { notifyGenerationChange, writeGenerationId } from './vmgenid.js';
import { monoMs } from '../util/clock.js';

const MiB = 1024 * 1024;
/** Firecracker's words for a Diff of a VM that does not track dirty pages. */
export const DIFF_NEEDS_TRACKING =
  'Diff snapshots are not allowed on uVMs with dirty page tracking disabled.';
/** KVM without TSC scaling runs a vCPU at the host's TSC frequency, give or take this much. */
const TSC_TOLERANCE_PPM = 250;

/**
 * A snapshot create or load that failed; nothing was changed (the API answers 400). `message`
 * has Firecracker's prefix ("Create snapshot error: ", "Load snapshot error: "); `reason` is the
 * cause alone (for the CLI's own line).
 */
export class SnapshotError extends ConfigError {
  constructor(
    message: string,
    readonly reason: string = message,
  ) {
    super(message);
  }
}
keepName(SnapshotError, 'SnapshotError');

function createError(reason: string): SnapshotError {
  return new SnapshotError(`Create snapshot error: ${reason}`, reason);
}

function loadError(reason: string): SnapshotError {
  return new SnapshotError(`Load snapshot error: ${reason}`, reason);
}

export interface CreateParams {
  snapshotPath: string;
  memFilePath: string;
  type: 'Full' | 'Diff';
}

export interface LoadParams {
  snapshotPath: string;
  memBackend: { type: 'File' | 'Uffd'; path: string };
  trackDirtyPages: boolean;
  resumeVm: boolean;
  clockRealtime: boolean;
  networkOverrides: Array<{ ifaceId: string; hostDevName: string }>;
  vsockOverride?: { udsPath: string };
}

/** Firecracker's state names, for messages. */
function stateName(built: BuiltVm): string {
  if (built.vmm.stopping || built.vmm.state === 'stopped') return 'Stopped';
  return built.vmm.state === 'paused' ? 'Paused' : 'Running';
}

let producerVersion: string | undefined;
function buildVersion(): string {
  if (producerVersion === undefined) {
    try {
      const pkg = JSON.parse(
        readFileSync(new URL('../../../package.json', import.meta.url), 'utf8'),
      ) as { version?: unknown };
      producerVersion = typeof pkg.version === 'string' ? pkg.version.slice(0, 64) : 'unknown';
    } catch {
      producerVersion = 'unknown';
    }
  }
  return producerVersion;
}

/**
 * Writes a snapshot of a paused VM: `snapshotPath` (the state file) and `memFilePath` (guest RAM,
 * sparse). Existing files are replaced only once both new ones are complete. The VM stays paused,
 * and so does its device worker. Throws SnapshotError.
 */
export async function createSnapshot(built: BuiltVm, p: CreateParams): Promise<void> {
  const started = monoMs();
  try {
    await create(built, p);
  } catch (e) {
    throw e instanceof SnapshotError ? e : createError((e as Error).message);
  }
  log('info', `snapshot ${p.snapshotPath} created in ${(monoMs() - started).toFixed(1)} ms`);
}

async function create(built: BuiltVm, p: CreateParams): Promise<void> {
  const { vmm, deviceWorker, parts } = built;
  // Firecracker's order: the Diff check first, whatever the state. A VM tracks dirty pages when
  // it was built or loaded with track_dirty_pages: its RAM layout then has the device bitmap.
  const tracking = built.parts?.layout.deviceDirty !== undefined;
  if (p.type === 'Diff' && !tracking) throw createError(DIFF_NEEDS_TRACKING);
  if (vmm.state !== 'paused' || vmm.stopping)
    throw createError(`the microVM must be paused (it is ${stateName(built)})`);
  if (resolve(p.snapshotPath) === resolve(p.memFilePath))
    throw createError('snapshot_path and mem_file_path name the same file');

  // The data plane too: a device (net RX, block reads) must not write guest RAM from here on.
  // Idempotent; the VM's Resume resumes it.
  if (deviceWorker) await deviceWorker.request({ op: 'pause' });
  const devices = deviceWorker ? await deviceWorker.request({ op: 'save' }) : [];
  const vcpus = (await vmm.saveVcpus()).map((bytes, id) => {
    const d = VcpuStateV1.decode(bytes);
    if (!d.ok) throw createError(`vCPU ${id}'s saved state does not decode: ${d.error.message}`);
    return d.value;
  });
  const vm = saveVm(parts.vm);
  // Console output waiting for a slow reader is host-side: written out, not saved.
  built.devices.console.flush();
  const legacy = saveLegacy(parts.legacy);

  const config = parts.config;
  // Logger and metrics are the process's, not the VM's.
  const configJson = JSON.stringify({ ...config, logger: null, metrics: null });
  // What a load will check, checked now: a snapshot that cannot be loaded is not written.
  const devicesOf = (list: ReadonlyArray<{ kind: string; id: string }>) =>
    list.map((x) => `${x.kind} ${x.id}`).join(', ');
  const restorable = validateRestoreConfig(JSON.parse(configJson) as unknown);
  if (devicesOf(restorable.devices) !== devicesOf(devices))
    throw createError(
      `the VM's configuration lists devices (${devicesOf(restorable.devices) || 'none'}) other than the VM has (${devicesOf(devices) || 'none'})`,
    );
  const regions = parts.layout.regions.map((r) => ({ ...r }));
  const fileBytes = regions.reduce((s, r) => s + r.size, 0);
  if (restorable.vcpus !== vcpus.length || restorable.memMib * MiB !== fileBytes)
    throw createError(
      `the VM's configuration says ${restorable.vcpus} vCPUs and ${restorable.memMib} MiB; the VM has ${vcpus.length} and ${fileBytes / MiB} MiB`,
    );
  const data: SnapshotData = {
    producer: {
      version: buildVersion(),
      createdUnixMs: Date.now(),
      hostTscKhz: vcpus[0]?.tscKhz,
    },
    machine: { vcpus: vcpus.length, memMib: restorable.memMib },
    memory: {
      type: p.type,
      pageSize: 4096,
      regions,
      fileBytes,
    },
    config: configJson,
    devices,
    legacy,
    vm,
    vcpus,
  };
  const stateBytes = encodeSnapshotFile(data);

  // Dirty pages since the last snapshot (or the boot or load): KVM's log (reading it clears it)
  // ORed with the device-dirty bitmap. Every create takes them, Full too (as Firecracker's
  // does), so the next Diff holds what changed since this snapshot. If this create fails, they
  // are put back into the device-dirty bitmap: nothing is lost for the next one.
  const hotplug = hotplugMemory(parts.plan);
  const deviceDirty = deviceDirtyPages(parts.layout);
  const dirty = tracking ? takeDirtyPages(parts.vm, regions, deviceDirty) : undefined;
  try {
    // Both files complete before either replaces an old one: memory (temporary name), state
    // (renamed into place), then the memory file's rename.
    const mem = writeMemoryFile(p.memFilePath, parts.ram, regions, {
      ...(parts.backing ? { backingFile: parts.backing } : {}),
      // Hugetlbfs RAM's memfd: only its data extents are read (anonymous RAM: its existing pages).
      sourceFd: parts.layout.memfd,
      deferRename: true,
      ...(p.type === 'Diff' ? { dirty } : {}),
    });
    try {
      // The virtio-mem region follows RAM, whole (Firecracker's layout): its plugged blocks'
      // data; unplugged or untouched ranges are holes. A Diff carries all of it too.
      if (hotplug) appendDeviceMemory(mem.tmpPath, fileBytes, hotplug.fd, hotplug.size);
      writeFileAtomic(p.snapshotPath, stateBytes);
    } catch (e) {
      mem.discard();
      throw e;
    }
    mem.commit();
  } catch (e) {
    dirty?.forEach((bits, i) => deviceDirty?.orInto(i, bits));
    throw e;
  }
  if (dirty)
    log(
      'info',
      `snapshot ${p.snapshotPath}: ${dirty.reduce((s, b) => s + countDirty(b), 0)} pages dirty since the last one${p.type === 'Diff' ? ' (written)' : ''}`,
    );
}

/**
 * Takes the pages dirtied since the last take, one bitmap per region (memory/dirty-pages.ts
 * layout): KVM's dirty log of slot i (= region i, attachRam's order; reading clears it) ORed
 * with the device-dirty bitmap, which is then cleared. Only while the vCPUs and the device
 * worker are paused.
 */
function takeDirtyPages(
  vm: Vm,
  regions: readonly SnapshotRegion[],
  deviceDirty: DirtyPages | undefined,
): Uint8Array[] {
  const out: Uint8Array[] = [];
  try {
    for (const [i, r] of regions.entries()) {
      const bits = new Uint8Array(dirtyBitmapBytes(r.size));
      vm.getDirtyLog(i, bits);
      out.push(bits);
    }
  } catch (e) {
    // KVM's bits already taken (and cleared there) must not be lost: keep them device-side.
    out.forEach((bits, i) => deviceDirty?.orInto(i, bits));
    throw e;
  }
  if (deviceDirty) {
    out.forEach((bits, i) => {
      const dev = deviceDirty.region(i);
      for (let k = 0; k < bits.length; k++) bits[k] = (bits[k] ?? 0) | (dev[k] ?? 0);
    });
    deviceDirty.clear();
  }
  return out;
}

/**
 * Makes a VM from a snapshot, in a process that has none: paused, or running with `resumeVm`.
 * Throws SnapshotError; then nothing was left behind (no fd, mapping or thread) and a corrected
 * load can be tried.
 */
export async function loadSnapshot(p: LoadParams, opts: BuildOptions = {}): Promise<BuiltVm> {
  const started = monoMs();
  const undo: UndoList = [];
  let built: BuiltVm;
  const phases = new LoadPhases();
  try {
    built = await load(p, opts, undo, phases);
  } catch (e) {
    runUndo(undo);
    throw e instanceof SnapshotError ? e : loadError((e as Error).message);
  }
  log(
    'info',
    `snapshot ${p.snapshotPath} loaded in ${(monoMs() - started).toFixed(1)} ms (${built.vmm.state}): ${phases.text()}`,
  );
  log('debug', `snapshot load timeline (ms): ${phases.timeline()}`);
  return built;
}

/** Steps 1-3 of a load: everything that can be checked without creating anything. */
function checkSnapshot(
  p: LoadParams,
  phases: LoadPhases,
): { data: SnapshotData; spec: RestoreSpec } {
  const read = readSnapshotFile(p.snapshotPath, (s) => phases.step(s));
  if (!read.ok) throw loadError(read.error.message);
  const data = read.value;

  let saved: unknown;
  try {
    saved = JSON.parse(data.config);
  } catch (e) {
    throw loadError(`the saved configuration is not JSON: ${(e as Error).message}`);
  }
  let spec: RestoreSpec;
  try {
    spec = validateRestoreConfig(saved, {
      network: p.networkOverrides,
      ...(p.vsockOverride ? { vsockUdsPath: p.vsockOverride.udsPath } : {}),
      trackDirtyPages: p.trackDirtyPages,
    });
  } catch (e) {
    throw loadError((e as Error).message);
  }
  spec.config['machine-config'].track_dirty_pages = p.trackDirtyPages;

  if (spec.vcpus !== data.machine.vcpus || spec.memMib !== data.machine.memMib)
    throw loadError(
      `the saved configuration (${spec.vcpus} vCPUs, ${spec.memMib} MiB) does not match the saved machine (${data.machine.vcpus} vCPUs, ${data.machine.memMib} MiB)`,
    );
  if (data.vcpus.length !== data.machine.vcpus)
    throw loadError(`${data.vcpus.length} saved vCPU states for ${data.machine.vcpus} vCPUs`);
  const want = ramRegions(spec.memMib * MiB);
  const regions = data.memory.regions;
  if (
    regions.length !== want.length ||
    regions.some((r, i) => r.base !== want[i]!.base || r.size !== want[i]!.size)
  )
    throw loadError(
      `the memory regions do not match this build's layout for ${spec.memMib} MiB (snapshot from another layout)`,
    );
  // A Diff's state file is loaded with its memory file merged onto its base (snapshot rebase);
  // a raw diff has the right size and cannot be told from a merged one (docs/api.md).
  const key = (d: { kind: string; id: string }) => `${d.kind} ${d.id}`;
  const savedDevices = data.devices.map(key).join(', ');
  const configured = spec.devices.map(key).join(', ');
  if (savedDevices !== configured)
    throw loadError(
      `the saved devices (${savedDevices || 'none'}) do not match the saved configuration's (${configured || 'none'})`,
    );
  phases.step('saved configuration checked');
  return { data, spec };
}

/**
 * Where a load's time goes: coarse phases for the info line (docs/bench.md has a measured
 * breakdown), and every step with its start offset for the debug line (the timeline).
 */
class LoadPhases {
  private readonly t0 = monoMs();
  private last = this.t0;
  private lastStep = this.t0;
  private readonly parts: string[] = [];
  private readonly steps: string[] = [];
  private stepsAtMark = 0;
  /** Ends a coarse phase. */
  mark(name: string): void {
    const now = monoMs();
    // A phase with no steps of its own is one step (one with steps ends with its last step;
    // what follows that, µs, counts in the next step).
    if (this.steps.length === this.stepsAtMark) this.step(name);
    this.stepsAtMark = this.steps.length;
    this.parts.push(`${name} ${(now - this.last).toFixed(1)}`);
    this.last = now;
  }
  /** Ends one step of the timeline: `name` took from the previous step's end to now. */
  step(name: string): void {
    const now = monoMs();
    this.steps.push(
      `${(this.lastStep - this.t0).toFixed(2)}+${(now - this.lastStep).toFixed(2)} ${name}`,
    );
    this.lastStep = now;
  }
  text(): string {
    return `${this.parts.join(', ')} ms`;
  }
  /** The timeline: `start+duration step` in ms from the load's start. */
  timeline(): string {
    return this.steps.join('; ');
  }
}

async function load(
  p: LoadParams,
  opts: BuildOptions,
  undo: UndoList,
  phases: LoadPhases,
): Promise<BuiltVm> {
  const { data, spec } = checkSnapshot(p, phases);
  phases.mark('read+check');
  const regions = data.memory.regions;
  // The virtio-mem region, if the VM has one, follows RAM in the memory file.
  const hotplugBytes = hotplugFileBytes(data, spec, p.memBackend.type);
  // Guest RAM: the memory file mapped privately (File), or anonymous memory a page-fault
  // handler fills (Uffd). Either way the main thread maps it and the workers wrap it.
  let memory: { layout: GuestRamLayout; ram: MappedGuestRam; backing?: FileId } | undefined;
  let memFd = -1;
  const closeMemFd = () => {
    if (memFd >= 0) closeFdQuietly(memFd);
    memFd = -1;
  };
  if (p.memBackend.type === 'Uffd') {
    // Before anything else is made: no handler is the likeliest failure.
    const uffd = await uffdGuestMemory(p.memBackend.path, regions).catch((e: Error) => {
      throw loadError(`Uffd memory backend: ${e.message}`);
    });
    undo.push(() => uffd.ram.unmap());
    memory = uffd;
  } else {
    const mem = checkMemoryFile(p.memBackend.path, regions, hotplugBytes);
    if (!mem.ok) throw loadError(mem.error.message);
    memFd = mem.value.fd;
    undo.push(closeMemFd);
  }
  phases.step('memory file opened');

  // From here on things are created; each has its undo entry.
  // Device memory (pmem files) at the addresses the saved VM had: same devices, same order.
  const plan = planVirtioDevices(spec.devices, deviceMemorySpace(spec.memMib * 1024 * 1024));
  undo.push(() => closeVirtio(plan));
  plan.warnings.forEach((w) => log('warn', w));
  phases.step('virtio devices planned');
  const hotplug = hotplugMemory(plan);
  if (hotplug && memFd >= 0) {
    // Its plugged blocks' data into the region's fresh memfd (holes stay unallocated); the
    // device's saved bitmap says which blocks are plugged (restored with the devices).
    if (hotplug.size !== hotplugBytes)
      throw loadError('the memory hotplug region does not match the saved configuration');
    step('cannot load the hotplugged memory', () =>
      loadDeviceMemory(memFd, memoryBytes(regions), hotplug.fd, hotplug.size),
    );
    phases.step('hotplugged memory loaded');
  }

  const { kvm, vm } = createVmShell(undo, (s) => phases.step(s));
  if (!memory) {
    const mapped = mapMemoryFile(memFd, regions);
    undo.push(() => mapped.ram.unmap());
    closeMemFd(); // the mapping holds the file
    memory = mapped;
    phases.step('memory file mapped');
  }
  // A restored VM tracks dirty pages from the start: the first Diff is relative to this load.
  if (p.trackDirtyPages) trackDeviceWrites(memory.layout);
  attachRam(vm, memory.layout, memory.ram, {
    dirtyLog: p.trackDirtyPages,
    trace: (s) => phases.step(s),
  });
  attachDeviceMemory(vm, plan);
  attachRegisterPages(vm, plan);
  // Every load is a new generation: a fresh VMGenID (into this process's private copy of the
  // page; with Uffd the handler serves the page first), announced to the guest once its
  // interrupt controllers are restored (below).
  const ram = memory.ram;
  step('cannot write the VM generation id', () => writeGenerationId(ram.memory));
  phases.step('device memory, VMGenID written');
  phases.mark('vm+memory');

  const legacy = createLegacyDeviceState(vm, opts.consoleFd ?? 1, legacyOptions(opts));
  undo.push(() => closeLegacyDeviceState(legacy));
  step('cannot restore the legacy devices', () => restoreLegacy(legacy, data.legacy));
  phases.step('legacy devices');

  // VM state before the vCPUs (Firecracker's order): irqchips, PIT, then kvmclock.
  step('cannot restore the VM state (irqchips, PIT, kvmclock)', () =>
    restoreVm(vm, data.vm, { realtime: p.clockRealtime }),
  );
  phases.step('irqchips, PIT, kvmclock restored');
  phases.mark('legacy+vm state');

  const mmapSize = kvm.vcpuMmapSize();
  const xsaveSize = kvm.xsaveSize();
  const tscScaling = kvm.checkExtension(KVM_CAP_TSC_CONTROL) > 0;
  const vcpuFds: number[] = [];
  phases.step('KVM sizes and caps');
  for (const [id, state] of data.vcpus.entries()) {
    const vcpu = createVcpu(vm, id, mmapSize, vcpuFds, undo);
    phases.step(`vCPU ${id} created`);
    if (state.tscKhz !== undefined && !tscScaling) {
      let host: number | undefined;
      try {
        host = vcpu.tscKhz() || undefined;
      } catch {
        host = undefined;
      }
      // Without TSC scaling KVM takes the host's frequency or a higher one (catch-up mode).
      if (host !== undefined && state.tscKhz < host * (1 - TSC_TOLERANCE_PPM / 1e6))
        throw loadError(
          `the snapshot's TSC runs at ${state.tscKhz} kHz, this host's at ${host} kHz, and this host's KVM cannot scale the TSC (no KVM_CAP_TSC_CONTROL)`,
        );
    }
    const { refusedMsrs } = step(`cannot restore vCPU ${id}`, () =>
      restoreVcpu(vcpu, state, { xsaveSize }),
    );
    const fatal = refusedMsrs.filter((m) => m === MSR_IA32_TSC || m === MSR_IA32_TSC_DEADLINE);
    if (fatal.length > 0)
      throw loadError(
        `KVM refused vCPU ${id}'s ${fatal.map((m) => `MSR 0x${m.toString(16)}`).join(' and ')}`,
      );
    if (refusedMsrs.length > 0)
      log(
        'warn',
        `vCPU ${id}: this host's KVM refused the saved MSRs ${refusedMsrs.map((m) => `0x${m.toString(16)}`).join(', ')}; continuing without them`,
      );
    releaseVcpuRun(vcpu);
    phases.step(`vCPU ${id} restored`);
  }
  phases.mark('vcpus');

  // The GED's edge now waits in the restored IOAPIC/LAPIC until the vCPUs run; its _EVT makes
  // the guest re-read the id and reseed its RNG.
  step('cannot notify the VM generation id', () => notifyGenerationChange(vm));
  phases.step('VMGenID notified');

  // The vCPU workers start parked; from here on the VM owns every part (its teardown closes
  // them), so a failure stops the VM instead of running the undo list.
  const built = finishVm(
    {
      kvm,
      vm,
      layout: memory.layout,
      ram: memory.ram,
      legacy,
      plan,
      config: spec.config,
      vcpuFds,
      mmapSize,
      ...(memory.backing ? { backing: memory.backing } : {}),
    },
    { ...opts, paused: true, trace: (s) => phases.step(s) },
    undo,
  );
  undo.length = 0;
  phases.mark('workers started');
  const dw = built.deviceWorker;
  try {
    if (dw) {
      await dw.request({ op: 'pause' });
      phases.mark('device worker up');
      await dw.request({ op: 'restore', devices: data.devices }).catch((e: Error) => {
        throw loadError(`cannot restore the virtio devices: ${e.message}`);
      });
      phases.mark('devices');
    }
    // Resume serves what was in flight: the device worker kicks every queue, then the vCPUs run.
    if (p.resumeVm) await built.vmm.resumeAll(dw);
    phases.mark('resume');
  } catch (e) {
    built.vmm.requestStop();
    await built.vmm.exited;
    throw e instanceof SnapshotError ? e : loadError((e as Error).message);
  }
  return built;
}

function memoryBytes(regions: readonly SnapshotRegion[]): number {
  return regions.reduce((s, r) => s + r.size, 0);
}

/**
 * The bytes of the virtio-mem region after RAM in a snapshot's memory file (0 without memory
 * hotplug). With the Uffd backend the handler serves RAM only: a snapshot with plugged blocks is
 * refused (their data is in the memory file, which this process does not see).
 */
function hotplugFileBytes(data: SnapshotData, spec: RestoreSpec, backend: 'File' | 'Uffd'): number {
  const mem = spec.devices.find((d) => d.kind === 'mem');
  if (!mem || mem.kind !== 'mem') return 0;
  if (backend === 'Uffd') {
    const saved = data.devices.find((d) => d.kind === 'mem');
    let plugged: number;
    try {
      plugged = saved ? savedPluggedCount(saved.state) : 0;
    } catch (e) {
      throw loadError(`the saved virtio-mem device: ${(e as Error).message}`);
    }
    if (plugged > 0)
      throw loadError(
        `the snapshot has ${plugged} hotplugged memory block(s) plugged; the Uffd backend serves guest RAM only: load it with the File backend`,
      );
  }
  return mem.totalMib * MiB;
}

/** Runs one restore step; its failure (KVM's errno, a bad value) says which step it was. */
function step<T>(what: string, f: () => T): T {
  try {
    return f();
  } catch (e) {
    throw e instanceof SnapshotError ? e : loadError(`${what}: ${(e as Error).message}`);
  }
}

function closeFdQuietly(fd: number): void {
  try {
    // node:fs owns fds opened with openSync
    closeSync(fd);
  } catch {
    // already closed
  }
}

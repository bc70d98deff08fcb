/**
 * The API mode's rehearsal (`typervisor --api-sock SOCK --rehearse`, what the daemon's process
 * pool starts; docs/daemon.md "Process mode"): before its API socket listens, the VMM process
 * serves one whole VM the way it will serve the real one. A second API server of its own, on a
 * temporary socket beside SOCK, with a controller of its own, is sent GET /, PUT /machine-config,
 * PUT /boot-source and InstanceStart over HTTP by this process; the guest (vmm/rehearsal.ts,
 * written to a temporary file beside SOCK) writes the boot marker and resets. Its vCPU worker
 * is a reusable one (vcpu-pool.ts ReusedVcpuWorkers) that the real VM then runs on.
 *
 * What a VM's start does only the first time in a process is then done before the create: V8
 * compiling the HTTP server's, the controller's, the builder's and the loader's code and
 * learning their types; the vCPU worker's first KVM_RUN, its kick handler, its /dev/kvm and
 * seccomp filter. Measured on this host's micro guest (a pool process idle 1 s, then created):
 * create -> boot marker ~30 ms without it (docs/daemon.md).
 *
 * Nothing of it is seen: its log lines are kept aside (and shown in the warning if it fails),
 * its metrics are counted in a MetricsSystem of its own, its VM's descriptors are closed as it
 * ends, its socket and file are removed. It has no devices, so the prewarmed device worker is
 * left for the real VM. It runs under the process's seccomp filters, as the real VM does.
 */
import { writeFileSync } from 'node:fs';
import { VmmController } from '../api/controller.js';
import type { LoggerControl } from '../api/logger.js';
import { MetricsSystem } from '../api/metrics.js';
import { startApiServer } from '../api/server.js';
import { unlinkQuietly } from '../util/fs.js';
import { setLogSink } from '../util/log.js';
import { rehearsalStem } from '../daemon/state.js';
import { callVmm } from '../daemon/vmm-client.js';
import { buildVm, rehearsalBuildOptions, rehearsalImage, type VmExitEvent } from '../vmm/index.js';
import type { ReusedVcpuWorkers } from '../vmm/vcpu-pool.js';
import { monoMs } from '../util/clock.js';

/** Guest RAM of the rehearsal VM, MiB (its guest touches one page). */
export const REHEARSAL_MEM_MIB = 16;
/** The whole rehearsal, or it is abandoned (its VM stopped) and reported as failed. */
export const REHEARSAL_TIMEOUT_MS = 10_000;
/** Log lines of the rehearsal kept for a failure's warning. */
const KEPT_LINES = 20;

export interface RehearsalResult {
  /** Start -> the rehearsal VM's end, ms. */
  ms: number;
}

/**
 * Runs the rehearsal for a process whose API socket will be `apiSock`. Rejects (with its log's
 * last lines) when any step fails or it takes longer than `timeoutMs`; the process is left as
 * it was, with `workers` possibly empty (the real VM then starts a worker of its own).
 */
export async function rehearseApi(
  apiSock: string,
  workers: ReusedVcpuWorkers,
  opts: { instanceId: string; version: string; logger: LoggerControl; maxPayload: number },
  timeoutMs: number = REHEARSAL_TIMEOUT_MS,
): Promise<RehearsalResult> {
  const t0 = monoMs();
  const stem = rehearsalStem(apiSock, process.pid);
  const sock = `${stem}.sock`;
  const image = `${stem}.elf`;
  const lines: string[] = [];
  setLogSink((line) => {
    lines.push(line);
    if (lines.length > KEPT_LINES) lines.shift();
  });
  let stop: (() => void) | undefined;
  let timer: NodeJS.Timeout | undefined;
  let server: Awaited<ReturnType<typeof startApiServer>> | undefined;
  try {
    writeFileSync(image, rehearsalImage(), { mode: 0o600, flag: 'wx' });
    let ended!: (ev: VmExitEvent) => void;
    const exited = new Promise<VmExitEvent>((r) => (ended = r));
    const metrics = new MetricsSystem(opts.instanceId);
    const controller = new VmmController({
      instanceId: opts.instanceId,
      version: opts.version,
      metrics,
      logger: opts.logger,
      build: (spec, o) => {
        const built = buildVm(spec, { ...o, ...rehearsalBuildOptions(workers) });
        stop = () => built.vmm.requestStop();
        return built;
      },
      onExit: (ev) => ended(ev),
    });
    server = await startApiServer({
      socketPath: sock,
      maxPayload: opts.maxPayload,
      counters: metrics.counters,
      handle: (a) => controller.handle(a),
    });
    const deadline = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        stop?.();
        reject(new Error(`it did not end within ${timeoutMs} ms`));
      }, timeoutMs);
    });
    const steps: Array<[string, string, unknown]> = [
      ['GET', '/', undefined],
      ['PUT', '/machine-config', { vcpu_count: 1, mem_size_mib: REHEARSAL_MEM_MIB }],
      ['PUT', '/boot-source', { kernel_image_path: image, boot_args: 'rehearsal' }],
      ['PUT', '/actions', { action_type: 'InstanceStart' }],
    ];
    for (const [method, path, body] of steps) {
      const { status } = await Promise.race([callVmm(sock, method, path, body), deadline]);
      if (status >= 300) throw new Error(`${method} ${path} answered ${status}`);
    }
    const ev = await Promise.race([exited, deadline]);
    if (ev.kind !== 'reset')
      throw new Error(
        `its VM ended with ${ev.kind === 'fatal' ? `an error: ${ev.message}` : `a ${ev.kind}`}, not its reset`,
      );
    return { ms: monoMs() - t0 };
  } catch (e) {
    const last = lines.length > 0 ? ` (its log: ${lines.slice(-3).join(' | ')})` : '';
    throw new Error(`${(e as Error).message}${last}`);
  } finally {
    clearTimeout(timer);
    setLogSink(undefined);
    await server?.close();
    unlinkQuietly(image);
  }
}

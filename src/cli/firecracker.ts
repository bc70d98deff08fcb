/**
 * The Firecracker-style entry: `typervisor --api-sock PATH [--config-file FILE] [--no-api] ...`.
 * Serves Firecracker's REST API on a Unix socket (src/api/) and/or boots from a config file, and
 * exits as Firecracker does: 0 when the guest powers off or reboots (after flushing metrics),
 * 1 when the guest fails, 152 for a bad --config-file, 153 for bad arguments.
 */
import { fstatSync, readFileSync } from 'node:fs';
import { isCharDevice } from '../util/fs.js';
import {
  MAX_GUEST_CID,
  MIN_GUEST_CID,
  parseGuestCid,
  VHOST_VSOCK_MAJOR,
  VHOST_VSOCK_MINOR,
  VHOST_VSOCK_PATH,
} from '../util/vhost-abi.js';
import { parseArgs } from 'node:util';
import { VmmController } from '../api/controller.js';
import { LoggerControl } from '../api/logger.js';
import { MetricsSystem } from '../api/metrics.js';
import { DEFAULT_MAX_PAYLOAD, startApiServer, type ApiServer } from '../api/server.js';
import { TypervisorError } from '../util/errors.js';
import { log } from '../util/log.js';
import { applySeccomp, seccompSettingsFromFlags } from '../sandbox/seccomp/options.js';
import {
  adoptInheritedVhostVsock,
  bootTimeMessage,
  buildVm,
  loadSnapshot,
  MAX_MEM_MIB,
  OnePreparedVm,
  prepareVm,
  processCpuUs,
  type BootTimerLine,
  type VmExitEvent,
} from '../vmm/index.js';
import { prewarmVcpuWorkers, ReusedVcpuWorkers } from '../vmm/vcpu-pool.js';
import { rehearseApi } from './api-rehearsal.js';
import { Console } from './console.js';
import { monoMs } from '../util/clock.js';

export const FC_EXIT_OK = 0;
export const FC_EXIT_GENERIC = 1;
export const FC_EXIT_BAD_CONFIGURATION = 152;
export const FC_EXIT_ARG_PARSING = 153;

export const DEFAULT_API_SOCK = '/run/typervisor.socket';
export const DEFAULT_INSTANCE_ID = 'anonymous-instance';
const MIB = 1024 * 1024;

/** The flags that make `typervisor` take this entry instead of a subcommand. */
export const FIRECRACKER_FLAGS = [
  '--api-sock',
  '--config-file',
  '--no-api',
  '--id',
  '--boot-timer',
  '--level',
  '--log-path',
  '--metrics-path',
  '--show-level',
  '--show-log-origin',
  '--module',
  '--http-api-max-payload-size',
  '--no-seccomp',
  '--seccomp-filter',
  '--start-time-us',
  '--start-time-cpu-us',
  '--parent-cpu-time-us',
  '--vhost-vsock-fd',
  '--vhost-vsock-cid',
  '--mmds-size-limit',
  '--metadata',
  '--enable-pci',
  '--rehearse',
  '--prepare-mem',
] as const;

export const FIRECRACKER_USAGE = `usage: typervisor [--api-sock PATH] [--config-file FILE] [--no-api] [options]
Firecracker-compatible mode: the REST API of Firecracker on a Unix socket (docs/api.md).
  --api-sock PATH      API socket (default ${DEFAULT_API_SOCK})
  --config-file FILE   boot at once from this JSON (the shape of GET /vm/config), or restore
                       a snapshot: {"snapshot-load": <the body of PUT /snapshot/load>}
  --no-api             no API socket (needs --config-file)
  --id ID              instance id, 1-64 letters, digits or '-' (default ${DEFAULT_INSTANCE_ID})
  --boot-timer         log the time from process start to the guest's boot marker
  --level L            log level: Error, Warning, Info, Debug, Trace or Off
  --log-path PATH      log to this file or named pipe
  --show-level         show each line's level; --show-log-origin: its file:line
  --module M           accepted, as Firecracker's
  --metrics-path PATH  metrics (JSON lines) to this file or named pipe
  --http-api-max-payload-size N   largest request body in bytes (default ${DEFAULT_MAX_PAYLOAD})
  --no-seccomp         run without the seccomp filters (on by default; docs/security.md)
  --seccomp-filter FILE   per-role allow-lists from this JSON instead of the defaults
  --start-time-us N, --start-time-cpu-us N, --parent-cpu-time-us N
                       the jailer's start times (CLOCK_MONOTONIC and process CPU, in us): the
                       start-up time goes to the metrics (api_server.process_startup_time_us,
                       process_startup_time_cpu_us) and the log
  --vhost-vsock-fd FD --vhost-vsock-cid CID
                       the jailer's: an open /dev/vhost-vsock whose guest CID it claimed
                       (typervisor-jailer --vhost-vsock-cid), for vsock's vhost backend
  --mmds-size-limit N  the MMDS data store's limit in bytes (default: the payload limit)
  --metadata FILE      the MMDS data store's first content: a JSON file (as a PUT /mmds)
  --rehearse           Typervisor's own: before the API socket listens, run one tiny VM in
                       this process, so that the VM it then serves starts on warm code
                       (what \`typervisor serve\` starts its process pool with; docs/daemon.md)
  --prepare-mem MIB    Typervisor's own: before the API socket listens, create the VM with
                       MIB MiB of RAM up to its vCPUs; InstanceStart with that mem_size_mib
                       then skips that kernel work (another size builds as usual)
  --enable-pci         refused: Typervisor has no PCI; its devices are virtio-mmio, as
                       Firecracker's are without this flag
  --version            print the version, in Firecracker's form: "Typervisor vX.Y.Z"`;

class ArgError extends Error {}

export interface FcArgs {
  apiSock: string;
  configFile?: string;
  noApi: boolean;
  id: string;
  bootTimer: boolean;
  level?: string;
  logPath?: string;
  showLevel: boolean;
  showLogOrigin: boolean;
  module?: string;
  metricsPath?: string;
  maxPayload: number;
  noSeccomp: boolean;
  seccompFilter?: string;
  startTimeUs?: bigint;
  startTimeCpuUs?: bigint;
  parentCpuTimeUs?: bigint;
  /** --vhost-vsock-fd / --vhost-vsock-cid: the jailer's claimed /dev/vhost-vsock (both or neither). */
  vhostVsock?: { fd: number; cid: number };
  /** --mmds-size-limit, or the payload limit when absent (as Firecracker defaults it). */
  mmdsSizeLimit: number;
  /** --metadata: a JSON file loaded into the MMDS data store before anything else. */
  metadata?: string;
  /** --rehearse: a rehearsal VM before the API socket listens (cli/api-rehearsal.ts). */
  rehearse: boolean;
  /** --prepare-mem: the VM made ahead with this much RAM, MiB (vmm/prepared-vm.ts). */
  prepareMemMib?: number;
}

/** A u64 in decimal, as Firecracker parses these flags. */
function u64Flag(v: string | undefined, name: string): bigint | undefined {
  if (v === undefined) return undefined;
  if (!/^\d{1,20}$/.test(v) || BigInt(v) > 0xffffffffffffffffn)
    throw new ArgError(
      `--${name} must be a whole number of microseconds (got "${v.slice(0, 40)}")`,
    );
  return BigInt(v);
}

export function parseFirecrackerArgs(argv: string[]): FcArgs {
  let v;
  try {
    v = parseArgs({
      args: argv,
      strict: true,
      allowPositionals: false,
      options: {
        'api-sock': { type: 'string' },
        'config-file': { type: 'string' },
        'no-api': { type: 'boolean' },
        id: { type: 'string' },
        'boot-timer': { type: 'boolean' },
        level: { type: 'string' },
        'log-path': { type: 'string' },
        'show-level': { type: 'boolean' },
        'show-log-origin': { type: 'boolean' },
        module: { type: 'string' },
        'metrics-path': { type: 'string' },
        'http-api-max-payload-size': { type: 'string' },
        'no-seccomp': { type: 'boolean' },
        'seccomp-filter': { type: 'string' },
        'start-time-us': { type: 'string' },
        'start-time-cpu-us': { type: 'string' },
        'parent-cpu-time-us': { type: 'string' },
        'vhost-vsock-fd': { type: 'string' },
        'vhost-vsock-cid': { type: 'string' },
        'mmds-size-limit': { type: 'string' },
        metadata: { type: 'string' },
        'enable-pci': { type: 'boolean' },
        rehearse: { type: 'boolean' },
        'prepare-mem': { type: 'string' },
      },
    }).values;
  } catch (e) {
    throw new ArgError((e as Error).message.split('\n')[0]!);
  }
  if (v['enable-pci'])
    throw new ArgError(
      '--enable-pci: PCI is not supported; Typervisor attaches its devices over virtio-mmio, ' +
        "as Firecracker does by default (run without --enable-pci, and keep the guest's pci=off)",
    );
  if (v['no-seccomp'] && v['seccomp-filter'] !== undefined)
    throw new ArgError('--no-seccomp and --seccomp-filter cannot be used together');
  if (v['no-api'] && v['config-file'] === undefined)
    throw new ArgError('--no-api requires --config-file');
  if (v.rehearse && v['config-file'] !== undefined)
    throw new ArgError(
      '--rehearse warms a process for the VM its API will ask for: not with --config-file, which starts one at once',
    );
  const prep = v['prepare-mem'];
  const prepareMemMib =
    prep === undefined ? undefined : /^\d{1,7}$/.test(prep) ? Number(prep) : NaN;
  if (prepareMemMib !== undefined && !(prepareMemMib >= 1 && prepareMemMib <= MAX_MEM_MIB))
    throw new ArgError(
      `--prepare-mem must be a whole number of MiB from 1 to ${MAX_MEM_MIB} (got "${String(prep).slice(0, 40)}")`,
    );
  if (prepareMemMib !== undefined && v['config-file'] !== undefined)
    throw new ArgError(
      '--prepare-mem prepares a process for the VM its API will ask for: not with --config-file',
    );
  const vhostVsock = parseVhostVsockFlags(v['vhost-vsock-fd'], v['vhost-vsock-cid']);
  const id = v.id ?? DEFAULT_INSTANCE_ID;
  if (!/^[A-Za-z0-9-]{1,64}$/.test(id))
    throw new ArgError(`--id must be 1 to 64 letters, digits or '-' (got "${id.slice(0, 80)}")`);
  const payload = v['http-api-max-payload-size'];
  const maxPayload =
    payload === undefined ? DEFAULT_MAX_PAYLOAD : /^\d{1,9}$/.test(payload) ? Number(payload) : NaN;
  if (!(maxPayload >= 1))
    throw new ArgError(
      '--http-api-max-payload-size must be a whole number of bytes from 1 to 999999999',
    );
  const mmds = v['mmds-size-limit'];
  const mmdsSizeLimit =
    mmds === undefined ? maxPayload : /^\d{1,9}$/.test(mmds) ? Number(mmds) : NaN;
  if (!(mmdsSizeLimit >= 0))
    throw new ArgError(
      `--mmds-size-limit must be a whole number of bytes from 0 to 999999999 (got "${String(mmds).slice(0, 40)}")`,
    );
  return {
    apiSock: v['api-sock'] ?? DEFAULT_API_SOCK,
    configFile: v['config-file'],
    noApi: v['no-api'] ?? false,
    id,
    bootTimer: v['boot-timer'] ?? false,
    level: v.level,
    logPath: v['log-path'],
    showLevel: v['show-level'] ?? false,
    showLogOrigin: v['show-log-origin'] ?? false,
    module: v.module,
    metricsPath: v['metrics-path'],
    maxPayload,
    noSeccomp: v['no-seccomp'] ?? false,
    seccompFilter: v['seccomp-filter'],
    startTimeUs: u64Flag(v['start-time-us'], 'start-time-us'),
    startTimeCpuUs: u64Flag(v['start-time-cpu-us'], 'start-time-cpu-us'),
    parentCpuTimeUs: u64Flag(v['parent-cpu-time-us'], 'parent-cpu-time-us'),
    ...(vhostVsock ? { vhostVsock } : {}),
    mmdsSizeLimit,
    ...(v.metadata !== undefined ? { metadata: v.metadata } : {}),
    rehearse: v.rehearse ?? false,
    ...(prepareMemMib !== undefined ? { prepareMemMib } : {}),
  };
}

/**
 * --vhost-vsock-fd and --vhost-vsock-cid come together (the jailer passes both). The descriptor
 * must be an open /dev/vhost-vsock (character device 10:241): anything else is refused here, so
 * that no ioctl of ours goes to a descriptor of some other kind.
 */
function parseVhostVsockFlags(
  fdText: string | undefined,
  cidText: string | undefined,
): { fd: number; cid: number } | undefined {
  if (fdText === undefined && cidText === undefined) return undefined;
  if (fdText === undefined || cidText === undefined)
    throw new ArgError(
      '--vhost-vsock-fd and --vhost-vsock-cid go together (typervisor-jailer passes both)',
    );
  const fd = /^\d{1,5}$/.test(fdText) ? Number(fdText) : NaN;
  if (!(fd >= 3 && fd <= 65535))
    throw new ArgError(
      `--vhost-vsock-fd must be a descriptor number from 3 to 65535 (got "${fdText.slice(0, 40)}")`,
    );
  const cid = parseGuestCid(cidText);
  if (cid === undefined)
    throw new ArgError(
      `--vhost-vsock-cid must be a guest CID from ${MIN_GUEST_CID} to ${MAX_GUEST_CID} (got "${cidText.slice(0, 40)}")`,
    );
  let st;
  try {
    st = fstatSync(fd);
  } catch {
    throw new ArgError(`--vhost-vsock-fd ${fd} is not an open descriptor`);
  }
  if (!isCharDevice(st, VHOST_VSOCK_MAJOR, VHOST_VSOCK_MINOR))
    throw new ArgError(`--vhost-vsock-fd ${fd} is not ${VHOST_VSOCK_PATH}`);
  return { fd, cid };
}

/**
 * The jailer's timing flags, used as Firecracker does (ProcessTimeReporter): the time since
 * --start-time-us on CLOCK_MONOTONIC, and the process CPU time since --start-time-cpu-us plus
 * the jailer's own --parent-cpu-time-us (the CPU clock survives the jailer's exec into us).
 * Stored in the metrics and logged once the VMM is ready to serve.
 */
export function reportStartupTime(args: FcArgs, metrics: Pick<MetricsSystem, 'store'>): string[] {
  const lines: string[] = [];
  if (args.startTimeUs !== undefined) {
    const now = process.hrtime.bigint() / 1000n; // CLOCK_MONOTONIC
    const us = now > args.startTimeUs ? Number(now - args.startTimeUs) : 0;
    metrics.store('api_server', 'process_startup_time_us', us);
    lines.push(`Process start-up time: ${us} us`);
  }
  if (args.startTimeCpuUs !== undefined) {
    const cpu = process.cpuUsage();
    const now = BigInt(cpu.user + cpu.system); // CLOCK_PROCESS_CPUTIME_ID, in us
    const us =
      (now > args.startTimeCpuUs ? Number(now - args.startTimeCpuUs) : 0) +
      Number(args.parentCpuTimeUs ?? 0n);
    metrics.store('api_server', 'process_startup_time_cpu_us', us);
    lines.push(`Process start-up CPU time: ${us} us`);
  }
  return lines;
}

function version(): string {
  const pkg = JSON.parse(
    readFileSync(new URL('../../../package.json', import.meta.url), 'utf8'),
  ) as { version: string };
  return pkg.version;
}

/**
 * `--version`, in the shape of Firecracker's ("Firecracker v1.2.3", then an empty line): a
 * name, a space, 'v' and the version on the first line. Firecracker's own test framework reads
 * that line with /^Firecracker v(.+)/; the name here is ours.
 */
export function versionText(): string {
  return `Typervisor v${version()}\n\n`;
}

function exitCodeOf(ev: VmExitEvent): number {
  switch (ev.kind) {
    case 'poweroff':
    case 'reset':
      log(
        'info',
        `Vmm is stopping: the guest ${ev.kind === 'reset' ? 'rebooted' : 'powered off'}.`,
      );
      return FC_EXIT_OK;
    case 'stopped':
      return FC_EXIT_OK;
    case 'fatal':
      log('error', ev.message);
      return FC_EXIT_GENERIC;
  }
}

/** Firecracker's last line (its main.rs), logged on every exit once the logger is set up. */
export function exitLine(code: number): string {
  return code === FC_EXIT_OK
    ? 'Firecracker exiting successfully. exit_code=0'
    : `Firecracker exiting with error. exit_code=${code}`;
}

export async function firecrackerCommand(argv: string[]): Promise<number> {
  if (argv.includes('--version')) {
    process.stdout.write(versionText());
    return FC_EXIT_OK;
  }
  if (argv.includes('--help') || argv.includes('-h')) {
    process.stdout.write(FIRECRACKER_USAGE + '\n');
    return FC_EXIT_OK;
  }
  let args: FcArgs;
  try {
    args = parseFirecrackerArgs(argv);
  } catch (e) {
    process.stderr.write(`typervisor: ${(e as Error).message}\n`);
    return FC_EXIT_ARG_PARSING;
  }
  if (args.vhostVsock) adoptInheritedVhostVsock(args.vhostVsock.fd, args.vhostVsock.cid);

  const metrics = new MetricsSystem(args.id, {
    extras: process.env.TYPERVISOR_METRICS_EXTRAS === '1',
  });
  const logger = new LoggerControl(metrics.counters, { instanceId: args.id });
  const code = await runWithLogger(args, metrics, logger);
  log(code === FC_EXIT_OK ? 'info' : 'error', exitLine(code));
  logger.restore();
  return code;
}

async function runWithLogger(
  args: FcArgs,
  metrics: MetricsSystem,
  logger: LoggerControl,
): Promise<number> {
  try {
    if (
      args.level !== undefined ||
      args.logPath !== undefined ||
      args.showLevel ||
      args.showLogOrigin
    ) {
      logger.configure({
        level: args.level,
        log_path: args.logPath,
        show_level: args.showLevel || undefined,
        show_log_origin: args.showLogOrigin || undefined,
        module: args.module,
      });
    }
    if (args.metricsPath !== undefined) metrics.init({ metrics_path: args.metricsPath });
  } catch (e) {
    log('error', (e as Error).message);
    return e instanceof TypervisorError ? FC_EXIT_BAD_CONFIGURATION : FC_EXIT_GENERIC;
  }
  // Before any VM exists (docs/security.md): the process filter, and the workers' to come.
  let seccomp;
  try {
    seccomp = seccompSettingsFromFlags(args.noSeccomp, args.seccompFilter);
  } catch (e) {
    log('error', (e as Error).message);
    return FC_EXIT_ARG_PARSING;
  }
  try {
    log('info', applySeccomp(seccomp));
  } catch (e) {
    log('error', `cannot install the seccomp filters: ${(e as Error).message}`);
    return FC_EXIT_GENERIC;
  }

  // --rehearse: the rehearsal VM and the VM this process serves share their vCPU workers.
  const workers = args.rehearse ? new ReusedVcpuWorkers() : undefined;
  // --prepare-mem: the VM made ahead, after the rehearsal (vmm/prepared-vm.ts).
  let prepared: OnePreparedVm | undefined;
  let finish!: (code: number) => void;
  const finished = new Promise<number>((r) => (finish = r));
  let console_: Console | undefined;
  let bootTimer: BootTimer | undefined;
  const controller = new VmmController({
    instanceId: args.id,
    version: version(),
    metrics,
    logger,
    mmdsSizeLimit: args.mmdsSizeLimit,
    // The boot timer counts from the start of the build, as Firecracker's (builder.rs).
    build: (spec, o) => {
      if (args.bootTimer) bootTimer = new BootTimer();
      const line = bootTimer?.lineFor(logger);
      return buildVm(spec, {
        ...o,
        ...(line ? { bootTimer: line } : {}),
        ...(workers ? { vcpuWorkers: workers } : {}),
        ...(prepared ? { prepared } : {}),
      });
    },
    ...(workers ? { loadSnapshot: (p, o) => loadSnapshot(p, { ...o, vcpuWorkers: workers }) } : {}),
    // A VM whose mode runs vCPUs on workers (not the default 'loop') gets them started at its
    // machine-config, ahead of InstanceStart (with --rehearse they are the rehearsal's).
    ...(workers ? {} : { onMachineConfig: (n: number) => prewarmVcpuWorkers(n) }),
    onStarted: (built) => {
      console_ = new Console(built.devices, () => built.vmm.requestStop());
      console_.start();
      bootTimer?.watch(built.vmm.control);
    },
    onExit: (ev) => {
      // A guest that powers off right after its marker: the line is still written, first.
      bootTimer?.report();
      finish(exitCodeOf(ev));
    },
  });

  let server: ApiServer | undefined;
  const shutdown = () => {
    const vm = controller.vm;
    if (vm && vm.vmm.state !== 'stopped') vm.vmm.requestStop();
    else finish(FC_EXIT_OK);
  };
  process.on('SIGTERM', shutdown);
  process.on('SIGINT', shutdown);
  process.on('SIGHUP', () => {
    metrics.counters.inc('signals', 'sighup');
    shutdown();
  });

  try {
    if (args.metadata !== undefined) {
      const fault = loadMetadataFile(controller, args.metadata);
      if (fault) {
        log('error', `bad metadata file ${args.metadata}: ${fault}`);
        return FC_EXIT_BAD_CONFIGURATION;
      }
    }
    if (args.configFile !== undefined) {
      const fault = await controller.applyConfigFile(args.configFile, { noApi: args.noApi });
      if (fault) {
        log('error', `bad configuration file ${args.configFile}: ${fault}`);
        return FC_EXIT_BAD_CONFIGURATION;
      }
    }
    if (workers) {
      try {
        const r = await rehearseApi(args.apiSock, workers, {
          instanceId: args.id,
          version: version(),
          logger,
          maxPayload: args.maxPayload,
        });
        log('debug', `the rehearsal VM ran in ${r.ms.toFixed(1)} ms`);
      } catch (e) {
        // The VM asked for later reports its own error if this host cannot run one.
        log('warn', `the rehearsal failed (the VM to come starts cold): ${(e as Error).message}`);
      }
    }
    if (args.prepareMemMib !== undefined) {
      try {
        prepared = new OnePreparedVm(prepareVm(args.prepareMemMib), args.prepareMemMib * MIB);
      } catch (e) {
        // The VM asked for later is built as usual, and reports its own error if it fails.
        log(
          'warn',
          `cannot prepare the VM ahead (it is built when started): ${(e as Error).message}`,
        );
      }
    }
    if (!args.noApi) {
      server = await startApiServer({
        socketPath: args.apiSock,
        maxPayload: args.maxPayload,
        counters: metrics.counters,
        handle: (a) => controller.handle(a),
      });
      log('info', `Listening on API socket (${JSON.stringify(args.apiSock)}).`, {
        thread: 'fc_api',
      });
      log('info', 'API server started.', { thread: 'fc_api' });
    }
    for (const line of reportStartupTime(args, metrics)) log('info', line);
    return await finished;
  } catch (e) {
    log('error', (e as Error).message);
    return e instanceof TypervisorError ? FC_EXIT_BAD_CONFIGURATION : FC_EXIT_GENERIC;
  } finally {
    console_?.stop();
    await metrics.close(); // the last line of metrics, as Firecracker writes on exit
    await server?.close();
  }
}

/**
 * --boot-timer, as Firecracker's boot timer device: once the guest writes the boot marker, one
 * line with the wall and process CPU time since the build began. The vCPU thread that takes the
 * marker logs it itself (lineFor(): vmm/boot-timer.ts) when the log allows that; else the
 * marker wakes us at once (VcpuControl.waitBootMarker, no polling) and we log it, and the exit
 * path reports it too, before the exit line, so a guest that powers off a few ms after its
 * marker still gets its line.
 */
export class BootTimer {
  private readonly startMs = monoMs();
  private readonly startCpuUs = processCpuUs();
  private control: { bootMarkerMs: number; bootLineLogged: boolean } | undefined;
  private done = false;

  /** The line for the build's vCPU threads to log, if `logger` lets them write it as it is. */
  lineFor(logger: LoggerControl): BootTimerLine | undefined {
    const direct = logger.directLine('fc_vcpu 0', 'info');
    return direct && { ...direct, startMs: this.startMs, startCpuUs: this.startCpuUs };
  }

  watch(control: {
    bootMarkerMs: number;
    bootLineLogged: boolean;
    waitBootMarker(): Promise<void>;
  }): void {
    this.control = control;
    void control.waitBootMarker().then(() => this.report());
  }

  /** Logs the line once, if the marker was written and no vCPU thread logged it; returns it. */
  report(): string | undefined {
    const c = this.control;
    const ms = c?.bootMarkerMs ?? 0;
    if (this.done || ms === 0) return undefined;
    this.done = true;
    if (c?.bootLineLogged) return undefined;
    const line = bootTimeMessage({ startMs: this.startMs, startCpuUs: this.startCpuUs }, ms);
    log('info', line, { thread: 'fc_vcpu 0' });
    return line;
  }
}

/** --metadata FILE: JSON into the MMDS data store (the size limit applies). */
function loadMetadataFile(controller: VmmController, path: string): string | undefined {
  let json: unknown;
  try {
    json = JSON.parse(readFileSync(path, 'utf8'));
  } catch (e) {
    return (e as Error).message;
  }
  return controller.loadMetadata(json);
}

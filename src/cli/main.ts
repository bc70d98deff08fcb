/** The `typervisor` command. */
import { readFileSync } from 'node:fs';
// Only light imports here: `run` starts its vCPU workers before loading the rest (see
// src/vmm/vcpu-pool.ts), so the modules are loaded on demand below.
import { prewarmVcpuWorkers, setLoopByDefault } from '../vmm/vcpu-pool.js';
import { boundExitAfterSignals } from './signals.js';

const EXIT_USAGE = 2;

const usage = (runUsage: string) => `usage: typervisor <command> [options]
commands:
  run        boot a VM with its console on this terminal (typervisor run --help), or restore
             a snapshot (run --restore STATE --mem-file MEM | --mem-uffd SOCK)
  clone      start N VMs restored from one snapshot (typervisor clone --help)
  snapshot   create a snapshot of a VM on an API socket, or inspect a state file
             (typervisor snapshot --help)
  uffd-handler  serve a snapshot's memory to one VMM loading it with the Uffd backend
             (typervisor uffd-handler --help)
  serve      the host daemon: VMs from a warm pool over an HTTP API (typervisor serve --help)
  version    print the version
  --api-sock PATH | --config-file FILE ...   Firecracker-compatible API mode (typervisor --api-sock x --help)
${runUsage}`;

/** `typervisor --api-sock ...` and Firecracker's other flags select the Firecracker-style entry. */
async function isFirecrackerInvocation(argv: string[]): Promise<boolean> {
  const first = argv[0]?.split('=')[0];
  if (first === undefined || !first.startsWith('--') || first === '--help' || first === '--version')
    return false;
  const { FIRECRACKER_FLAGS } = await import('./firecracker.js');
  return (FIRECRACKER_FLAGS as readonly string[]).includes(first);
}

/** The vCPU count `run` will ask for, read loosely (validation happens later). */
function vcpusHint(args: string[]): number {
  const i = args.findIndex((a) => a === '--vcpus' || a.startsWith('--vcpus='));
  const v = i < 0 ? '1' : args[i]!.includes('=') ? args[i]!.split('=')[1] : args[i + 1];
  const n = Number(v);
  return Number.isInteger(n) && n >= 1 && n <= 64 ? n : 1;
}

function version(): string {
  const pkg = JSON.parse(
    readFileSync(new URL('../../../package.json', import.meta.url), 'utf8'),
  ) as { version: string };
  return pkg.version;
}

export async function main(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv;
  if (cmd === 'run') boundExitAfterSignals();
  if (await isFirecrackerInvocation(argv)) {
    // From the bundle, the launcher runs src/cli/api-main.ts for this (the `api` bundle).
    return (await import('./api-mode.js')).apiMode(argv);
  }
  if (cmd === 'serve') {
    // The host daemon (src/daemon/): in process mode it does no guest work, so nothing is
    // prewarmed here (shared mode prewarms its own).
    const { serveCommand } = await import('../daemon/serve.js');
    return serveCommand(rest);
  }
  if (cmd === 'uffd-handler') {
    // Its own light process: none of the VMM is loaded.
    const { uffdHandlerCommand } = await import('../uffd/handler.js');
    return uffdHandlerCommand(rest);
  }
  // Workers read the seccomp settings when they are created: --no-seccomp is recorded before
  // the prewarm; with --seccomp-filter (a file to read and check first) there is no prewarm.
  if (cmd === 'run' && rest.includes('--no-seccomp'))
    (await import('../sandbox/seccomp/install.js')).configureSeccomp({ mode: 'off' });
  const customFilter = rest.some((a) => a.startsWith('--seccomp-filter'));
  // --vcpu-threads decides how many workers to prewarm (one for native threads): read it now.
  const vt = rest.findIndex((x) => x === '--vcpu-threads' || x.startsWith('--vcpu-threads='));
  if (cmd === 'run' && vt >= 0)
    process.env.TYPERVISOR_VCPU_THREADS = rest[vt]!.includes('=')
      ? rest[vt]!.split('=')[1]
      : rest[vt + 1];
  // One VM in this process: by default its vCPU 0 runs on this thread's loop and any others on
  // runner threads (vcpu-mode.ts 'loop'), with no worker to prewarm.
  if (cmd === 'run') setLoopByDefault(true);
  if (cmd === 'run' && !rest.includes('--help') && !rest.includes('-h') && !customFilter)
    prewarmVcpuWorkers(vcpusHint(rest));
  if (cmd === 'run') (await import('../vmm/index.js')).releaseVmsAtExit(true);
  const { exitCodeFor, runCommand, RUN_USAGE } = await import('./run.js');
  const USAGE = usage(RUN_USAGE);
  try {
    switch (cmd) {
      case 'run':
        if (rest.includes('--help') || rest.includes('-h')) {
          process.stdout.write(RUN_USAGE + '\n');
          return 0;
        }
        return await runCommand(rest);
      case 'clone':
        return await (await import('./clone.js')).cloneCommand(rest);
      case 'snapshot': {
        const { snapshotCommand } = await import('./snapshot.js');
        return await snapshotCommand(rest);
      }
      case 'version':
        process.stdout.write(`typervisor ${version()}\n`);
        return 0;
      case '--version':
        // Firecracker's form, for clients that run us as `firecracker --version`.
        process.stdout.write((await import('./firecracker.js')).versionText());
        return 0;
      case undefined:
      case 'help':
      case '--help':
      case '-h':
        process.stdout.write(USAGE + '\n');
        return cmd === undefined ? EXIT_USAGE : 0;
      default:
        process.stderr.write(`typervisor: unknown command "${cmd}" (try typervisor --help)\n`);
        return EXIT_USAGE;
    }
  } catch (e) {
    process.stderr.write(`typervisor: ${(e as Error).message}\n`);
    if (process.env.TYPERVISOR_DEBUG) process.stderr.write(`${(e as Error).stack}\n`);
    return exitCodeFor(e);
  }
}

main(process.argv.slice(2)).then(
  (code) => {
    process.exitCode = code;
    // Nothing may keep the process alive after the VM is gone (stdin, timers).
    setImmediate(() => process.exit(code));
  },
  (e) => {
    process.stderr.write(`typervisor: internal error: ${(e as Error).stack}\n`);
    process.exit(1);
  },
);

/** The `typervisor` command. */
import { readFileSync } from 'node:fs';
import { exitCodeFor, runCommand, RUN_USAGE, EXIT_USAGE } from './run.js';
import { FIRECRACKER_FLAGS } from './firecracker.js';

const USAGE = `usage: typervisor <command> [options]
commands:
  run        boot a VM with its console on this terminal (typervisor run --help)
  version    print the version
  --api-sock PATH | --config-file FILE ...   Firecracker-compatible API mode (typervisor --api-sock x --help)
${RUN_USAGE}`;

/** `typervisor --api-sock ...` and Firecracker's other flags select the Firecracker-style entry. */
function isFirecrackerInvocation(argv: string[]): boolean {
  const first = argv[0]?.split('=')[0];
  return first !== undefined && (FIRECRACKER_FLAGS as readonly string[]).includes(first);
}

function version(): string {
  const pkg = JSON.parse(
    readFileSync(new URL('../../../package.json', import.meta.url), 'utf8'),
  ) as { version: string };
  return pkg.version;
}

export async function main(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv;
  if (isFirecrackerInvocation(argv)) {
    const { firecrackerCommand } = await import('./firecracker.js');
    return firecrackerCommand(argv);
  }
  try {
    switch (cmd) {
      case 'run':
        if (rest.includes('--help') || rest.includes('-h')) {
          process.stdout.write(RUN_USAGE + '\n');
          return 0;
        }
        return await runCommand(rest);
      case 'version':
      case '--version':
        process.stdout.write(`typervisor ${version()}\n`);
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

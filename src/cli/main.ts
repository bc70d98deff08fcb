/** The `typervisor` command. */
import { readFileSync } from 'node:fs';
import { exitCodeFor, runCommand, RUN_USAGE, EXIT_USAGE } from './run.js';

const USAGE = `usage: typervisor <command> [options]
commands:
  run        boot a VM with its console on this terminal (typervisor run --help)
  version    print the version
${RUN_USAGE}`;

function version(): string {
  const pkg = JSON.parse(readFileSync(new URL('../../../package.json', import.meta.url), 'utf8')) as { version: string };
  return pkg.version;
}

export async function main(argv: string[]): Promise<number> {
  const [cmd, ...rest] = argv;
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

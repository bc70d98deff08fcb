// `npm run lab -- [--timeout SEC] [--] <command ...>`: runs the command as root inside the
// lab (see lab.ts) at the current directory and exits with its exit code. With no command,
// a login shell. Interactive when stdin is a terminal.
import { runInLab } from './lab.js';

async function main(argv: string[]): Promise<number> {
  let timeoutSec: number | undefined;
  let bootTimeoutSec: number | undefined;
  let i = 0;
  for (; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === '--') {
      i++;
      break;
    } else if (a === '--timeout' || a === '--boot-timeout') {
      const v = Number(argv[++i]);
      if (!(v > 0)) return usage(`${a} needs a number of seconds`);
      if (a === '--timeout') timeoutSec = v;
      else bootTimeoutSec = v;
    } else if (a === '-h' || a === '--help') {
      return usage();
    } else if (a.startsWith('--')) {
      return usage(`unknown option ${a}`);
    } else break;
  }
  const command = argv.slice(i);
  if (command.length === 0) command.push(process.env.SHELL || '/bin/bash', '-l');

  const ac = new AbortController();
  let sig = 0;
  for (const [s, n] of [
    ['SIGINT', 130],
    ['SIGTERM', 143],
    ['SIGHUP', 129],
  ] as const) {
    process.on(s, () => {
      sig = n;
      ac.abort();
    });
  }
  const r = await runInLab({
    command,
    timeoutSec,
    bootTimeoutSec,
    stdio: 'inherit',
    signal: ac.signal,
  });
  if (r.error) console.error(r.error);
  if (r.labFaults.length > 0) {
    console.error(`lab: its kernel reported that it broke:\n${r.labFaults.join('\n')}`);
  }
  if (process.env.TYPERVISOR_LAB_VERBOSE) {
    console.error(`lab: boot ${r.bootMs} ms, total ${r.totalMs} ms, exit ${r.code}`);
  }
  return sig || r.code;
}

function usage(err?: string): number {
  if (err) console.error(`lab: ${err}`);
  console.error('usage: npm run lab -- [--timeout SEC] [--boot-timeout SEC] [--] <command ...>');
  return err ? 2 : 0;
}

main(process.argv.slice(2)).then(
  (code) => process.exit(code),
  (e: Error) => {
    console.error(e.message);
    process.exit(125);
  },
);

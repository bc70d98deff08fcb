/**
 * The entry of the `api` bundle (scripts/bundle.mjs): `typervisor --api-sock ...` from the
 * bundle runs this instead of src/cli/main.ts, so that the other commands' code is neither
 * read nor deserialized before the API socket listens (docs/bench.md "API mode start-up").
 * Exits as main.ts does.
 */
import { apiMode } from './api-mode.js';

apiMode(process.argv.slice(2)).then(
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

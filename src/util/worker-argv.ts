/**
 * Node options for the threads the VMM starts. A Worker inherits process.execArgv, and Node
 * refuses some of it in a worker: a program run as `node --input-type=module -e '...'` (an
 * embedder of the library) gave every vCPU worker "--input-type can only be used with string
 * input". The script options (-e/--eval, -p/--print with their text, --input-type) concern the
 * main script only and are left out; every other option (--expose-gc, --cpu-prof, ...) stays.
 */
const WITH_VALUE = new Set(['-e', '--eval', '-p', '--print', '--input-type']);
const ALONE = new Set(['-pe', '-i', '--interactive']);

export function workerExecArgv(argv: readonly string[] = process.execArgv): string[] {
  const out: string[] = [];
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (WITH_VALUE.has(a) || a === '-pe') {
      i++; // its value
      continue;
    }
    if (ALONE.has(a) || /^--(eval|print|input-type)=/.test(a)) continue;
    out.push(a);
  }
  return out;
}

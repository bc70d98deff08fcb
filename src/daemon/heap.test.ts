import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createRequire } from 'node:module';
import { basename } from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  DAEMON_HEAP_FLAGS,
  DAEMON_MALLOC_TUNABLE,
  HEAP_REEXEC_ENV,
  heapReexec,
  withMallocTunable,
} from './heap.js';

const proc = (execArgv: string[] = [], env: Record<string, string | undefined> = {}) => ({
  execPath: '/usr/bin/node',
  execArgv,
  argv: ['/usr/bin/node', '/opt/tv/bin/typervisor', 'serve', '--socket', '/run/tv.sock'],
  env: { PATH: '/bin', ...env },
});

test('serve re-executes itself once with the heap flags, keeping its options and arguments', () => {
  assert.ok(DAEMON_HEAP_FLAGS.length > 0);
  const r = heapReexec('small', proc(['--enable-source-maps'], { NODE_EXTRA_CA_CERTS: '/ca' }))!;
  assert.equal(r.path, '/usr/bin/node');
  assert.deepEqual(r.argv, [
    '/usr/bin/node',
    '--enable-source-maps',
    ...DAEMON_HEAP_FLAGS,
    '/opt/tv/bin/typervisor',
    'serve',
    '--socket',
    '/run/tv.sock',
  ]);
  // The marker stops a second re-exec; the CA file is not read again; malloc's tunable is set.
  assert.deepEqual(r.env, {
    PATH: '/bin',
    [HEAP_REEXEC_ENV]: '1',
    GLIBC_TUNABLES: DAEMON_MALLOC_TUNABLE,
  });
  assert.equal(heapReexec('small', proc([], r.env)), undefined, 'marked: no loop');
  assert.equal(heapReexec('none', proc()), undefined, '--heap-cap none: as before');
});

test("malloc's tunable joins the caller's GLIBC_TUNABLES; one the caller set stays", () => {
  assert.equal(withMallocTunable(undefined), DAEMON_MALLOC_TUNABLE);
  assert.equal(withMallocTunable(''), DAEMON_MALLOC_TUNABLE);
  assert.equal(
    withMallocTunable('glibc.malloc.arena_max=2'),
    `glibc.malloc.arena_max=2:${DAEMON_MALLOC_TUNABLE}`,
  );
  const own = 'glibc.malloc.arena_max=2:glibc.malloc.mmap_threshold=65536';
  assert.equal(withMallocTunable(own), own);
  const r = heapReexec('small', proc([], { GLIBC_TUNABLES: own }))!;
  assert.equal(r.env.GLIBC_TUNABLES, own);
});

test('a heap flag the caller gave is kept, not overridden; all given: no re-exec', () => {
  // Every daemon flag given (spelled with _ too): nothing to do.
  const all = DAEMON_HEAP_FLAGS.map((f) => `--${f.slice(2).replace(/-/g, '_')}`);
  assert.equal(heapReexec('small', proc(all)), undefined);
  assert.equal(heapReexec('small', proc([...DAEMON_HEAP_FLAGS])), undefined);
  // One given with another value: that one stays, the others are added.
  const [first, ...rest] = DAEMON_HEAP_FLAGS;
  const own = `${first!.split('=')[0]}=7`;
  const r = heapReexec('small', proc([own]));
  if (rest.length === 0) assert.equal(r, undefined);
  else assert.deepEqual(r!.argv.slice(1, 2 + rest.length), [own, ...rest]);
});

// The loader (scripts/bundle-loader.cjs) picks the cache file of a bundle by the process's flags.
const loader = createRequire(import.meta.url)(
  fileURLToPath(new URL('../../../scripts/bundle-loader.cjs', import.meta.url)),
) as {
  cacheFiles(name: string, manifest: unknown, execArgv: string[]): string[];
  cacheMakers(names: string[], manifest: unknown, execArgv: string[]): [string[], string[]][];
  flagsOf(execArgv: string[]): string;
  variantId(flags: string): string;
};

test('the loader: the daemon flags read their own caches, other flags theirs too', () => {
  const id = loader.variantId(loader.flagsOf([...DAEMON_HEAP_FLAGS]));
  assert.match(id, /^[0-9a-f]{8}$/);
  assert.notEqual(id, loader.variantId(loader.flagsOf(['--max-semi-space-size=2'])));
  const manifest = {
    variants: { [id]: { execArgv: [...DAEMON_HEAP_FLAGS], bundles: ['main', 'vcpu-worker'] } },
  };
  const files = (name: string, m: unknown, argv: string[]) =>
    loader.cacheFiles(name, m, argv).map((f) => basename(f));
  assert.deepEqual(files('main', manifest, []), ['main.cache']);
  assert.deepEqual(files('main', manifest, [...DAEMON_HEAP_FLAGS]), [`main.${id}.cache`]);
  assert.deepEqual(files('vcpu-worker', manifest, [...DAEMON_HEAP_FLAGS]), [
    `vcpu-worker.${id}.cache`,
  ]);
  // A bundle the variant has no cache of (the API mode's: VMM processes run without the flags).
  assert.deepEqual(files('api', manifest, [...DAEMON_HEAP_FLAGS]), ['api.cache']);
  // Flags the build made nothing for: a cache of their own, so that a debugging run does not
  // remake the plain one under its flags (its key says whether it fits).
  const other = loader.variantId(loader.flagsOf(['--cpu-prof']));
  assert.deepEqual(files('main', manifest, ['--cpu-prof']), [`main.${other}.cache`]);
  assert.deepEqual(files('main', undefined, ['--cpu-prof']), [`main.${other}.cache`, 'main.cache']);
  // A worker reads no manifest: the variant's file first, when it exists.
  assert.deepEqual(files('vcpu-worker', undefined, [...DAEMON_HEAP_FLAGS]), [
    `vcpu-worker.${id}.cache`,
    'vcpu-worker.cache',
  ]);
  assert.deepEqual(files('vcpu-worker', undefined, []), ['vcpu-worker.cache']);
});

test('the loader: stale caches are remade under the flags they are for', () => {
  const flags = [...DAEMON_HEAP_FLAGS];
  const id = loader.variantId(loader.flagsOf(flags));
  const manifest = { variants: { [id]: { execArgv: flags, bundles: ['main', 'vcpu-worker'] } } };
  // A bundle file changed: its plain cache and its variant's, each by a maker with its flags.
  const both = [
    [[], ['main', 'api']],
    [flags, ['main']],
  ];
  assert.deepEqual(loader.cacheMakers(['main', 'api'], manifest, []), both);
  assert.deepEqual(loader.cacheMakers(['main', 'api'], manifest, flags), both);
  assert.deepEqual(loader.cacheMakers(['api'], manifest, []), [[[], ['api']]]);
  // Flags without a variant: their own caches (cacheFiles), under those flags.
  assert.deepEqual(loader.cacheMakers(['main'], manifest, ['--cpu-prof']), [
    [['--cpu-prof'], ['main']],
  ]);
});

/**
 * The per-thread bundles and their code caches (scripts/bundle.mjs, scripts/bundle-loader.cjs):
 * built into a folder of this test's own under dist/ (dist/bundle, which bin/ runs, is left
 * alone), they boot a tiny guest on every thread (main, vCPU worker, device worker), and
 * whatever is wrong with a cache or the bundle only costs time: a stale cache is not used and
 * is remade in the background, a cache V8 refuses is remade too, and a bundle older than its
 * dist/ sentinels (its entry, its newest input) is not run at all (dist/ is); one whose other
 * inputs changed is found out 2 s after start-up (not by a shorter run) and not run again. For `run`, the loader starts
 * vCPU 0's worker before it compiles the main bundle. The API mode runs the `api` bundle. The
 * deferred check of every input makes V8 optimize nothing (TurboFan's code pages cost an idle
 * VMM ~4 MiB of RSS). Needs /dev/kvm, gcc, ld and esbuild (a devDependency); the tests of the
 * build's output (its files, the seccomp programs in it) and of that last point only esbuild.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, spawnSync } from 'node:child_process';
import {
  existsSync,
  readdirSync,
  readFileSync,
  rmSync,
  statSync,
  utimesSync,
  writeFileSync,
} from 'node:fs';
import { createRequire } from 'node:module';
import { join } from 'node:path';
import { guestPath, REPO, tinyGuests } from './helpers.js';

const NAME = `bundle-test-${process.pid}`;
const OUT = join(REPO, 'dist', NAME);
const THREADS = ['main', 'vcpu-worker', 'device-worker'] as const;

function esbuildMissing(): string | undefined {
  try {
    createRequire(join(REPO, 'package.json')).resolve('esbuild');
    return undefined;
  } catch {
    return 'esbuild is not installed (npm install installs the devDependencies)';
  }
}

const guests = tinyGuests();
const noBuild = esbuildMissing() ?? false;
const skip = guests.skip ?? noBuild;
const T = { timeout: 60_000, skip };

function buildScript(...args: string[]) {
  return spawnSync(process.execPath, [join(REPO, 'scripts', 'bundle.mjs'), ...args], {
    encoding: 'utf8',
  });
}

/** Runs the test bundle's launcher with `args` (and node options): its exit code and output. */
function start(
  args: string[],
  nodeArgs: readonly string[] = [],
  env: Record<string, string> = {},
): Promise<{ code: number | null; stdout: string; stderr: string }> {
  const child = spawn(process.execPath, [...nodeArgs, join(OUT, 'main.cjs'), ...args], {
    stdio: ['ignore', 'pipe', 'pipe'],
    env: { ...process.env, TYPERVISOR_BUNDLE_DEBUG: '1', TYPERVISOR_NO_BUNDLE: undefined, ...env },
  });
  let stdout = '';
  let stderr = '';
  child.stdout.setEncoding('utf8').on('data', (s: string) => (stdout += s));
  child.stderr.setEncoding('utf8').on('data', (s: string) => (stderr += s));
  const timer = setTimeout(() => child.kill('SIGKILL'), 20_000);
  return new Promise((resolve) =>
    child.on('close', (code) => {
      clearTimeout(timer);
      resolve({ code, stdout, stderr });
    }),
  );
}

/**
 * Boots the poweroff guest (with a virtio-rng device: a device worker) from the test bundle, its
 * vCPU on a worker (the vcpu-worker bundle) unless `extra` says how to run it.
 */
function boot(
  extra: string[] = [],
  nodeArgs: readonly string[] = [],
  env: Record<string, string> = {},
) {
  const threads = extra.includes('--vcpu-threads') ? [] : ['--vcpu-threads', 'worker'];
  return start(
    ['run', '--kernel', guestPath('poweroff'), '--memory', '32', '--rng', ...threads, ...extra],
    nodeArgs,
    env,
  );
}

function cacheOf(stderr: string, thread: string): string | undefined {
  return new RegExp(`typervisor bundle ${thread}: ran the bundle, code cache (\\w+)`).exec(
    stderr,
  )?.[1];
}

/** Waits until `--check` passes (the background rebuild finished), at most `ms`. */
async function waitCurrent(ms: number): Promise<void> {
  const end = Date.now() + ms;
  for (;;) {
    const c = buildScript('--check', '--out', NAME);
    if (c.status === 0) return;
    if (Date.now() > end) assert.fail(`the caches were not remade within ${ms} ms: ${c.stderr}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

describe('per-thread bundles with code caches', () => {
  let buildLog = '';
  before(() => {
    if (noBuild) return;
    const b = buildScript('--out', NAME);
    assert.equal(b.status, 0, b.stderr);
    buildLog = b.stderr;
  });
  after(() => rmSync(OUT, { recursive: true, force: true }));

  // These two need only the build (esbuild), not a guest: they run where there is no KVM too.
  const B = { timeout: 60_000, skip: noBuild };

  test('the build writes a bundle, a loader and a current cache per thread', B, () => {
    for (const n of [...THREADS, 'api', 'jailer'])
      for (const ext of ['js', 'cjs', 'cache'])
        assert.ok(existsSync(join(OUT, `${n}.${ext}`)), `${n}.${ext} missing`);
    const c = buildScript('--check', '--out', NAME);
    assert.equal(c.status, 0, c.stderr);
  });

  test(
    "main's and api's caches come from training runs: smaller than eager ones, used",
    T,
    async () => {
      // this host has a usable /dev/kvm (the tiny guests need it too)
      for (const name of ['main', 'api']) {
        const m = new RegExp(
          `${name}'s code cache: trained on a micro VM \\((\\d+) bytes; eager (\\d+)\\)`,
        ).exec(buildLog);
        assert.ok(m, buildLog);
        assert.equal(statSync(join(OUT, `${name}.cache`)).size, Number(m[1]));
        assert.ok(Number(m[1]) < Number(m[2]) * 0.6, `${name}: ${m[1]} against ${m[2]}`);
      }
      const r = await boot();
      assert.equal(r.code, 0, r.stderr);
      assert.equal(cacheOf(r.stderr, 'main'), 'used', r.stderr);
    },
  );

  test('the bundle boots a tiny guest, every thread from its bundle and its cache', T, async () => {
    const r = await boot();
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout, 'tiny guest up\n');
    for (const t of THREADS) assert.equal(cacheOf(r.stderr, t), 'used', `${t}: ${r.stderr}`);
    assert.match(r.stderr, /started a vCPU worker before compiling/);
  });

  test(
    'the default run (vCPU 0 on the main thread’s loop, any others on runner threads) starts no vCPU worker, with 1 vCPU or 2',
    T,
    async () => {
      for (const vcpus of ['1', '2']) {
        const r = await boot(['--vcpu-threads', 'auto', '--vcpus', vcpus]);
        assert.equal(r.code, 0, r.stderr);
        assert.equal(r.stdout, 'tiny guest up\n');
        assert.equal(cacheOf(r.stderr, 'main'), 'used', r.stderr);
        assert.equal(cacheOf(r.stderr, 'device-worker'), 'used', r.stderr);
        assert.equal(cacheOf(r.stderr, 'vcpu-worker'), undefined, `${vcpus} vCPUs: ${r.stderr}`);
        assert.doesNotMatch(r.stderr, /started a vCPU worker before compiling/);
      }
    },
  );

  test(
    'the early vCPU worker: taken by a 2-vCPU VM, not started with --no-seccomp',
    T,
    async () => {
      const two = await boot(['--vcpus', '2']);
      assert.equal(two.code, 0, two.stderr);
      assert.equal(two.stdout, 'tiny guest up\n');
      assert.match(two.stderr, /started a vCPU worker before compiling/);
      assert.equal(two.stderr.match(/bundle vcpu-worker: ran the bundle/g)?.length, 2, two.stderr);
      const off = await boot(['--no-seccomp']);
      assert.equal(off.code, 0, off.stderr);
      assert.equal(off.stdout, 'tiny guest up\n');
      assert.doesNotMatch(off.stderr, /started a vCPU worker before compiling/);
      assert.equal(cacheOf(off.stderr, 'vcpu-worker'), 'used', off.stderr);
    },
  );

  test(
    "under the daemon's heap flags every thread takes the caches made under them",
    T,
    async () => {
      // `typervisor serve` runs with these V8 flags (src/daemon/heap.ts); V8 refuses a cache
      // made under other flags. 'used': a cache was given and V8 took it (cachedDataRejected
      // false), on the main thread and in each worker.
      const { DAEMON_HEAP_FLAGS } = (await import(
        join(REPO, 'dist', 'src', 'daemon', 'heap.js')
      )) as typeof import('../../src/daemon/heap.js');
      const caches = () =>
        readdirSync(OUT)
          .filter((f) => f.endsWith('.cache'))
          .map((f) => `${f} ${statSync(join(OUT, f)).mtimeMs}`)
          .sort();
      const before = caches();
      assert.equal(before.length, 5 + THREADS.length, before.join('\n'));
      const r = await boot([], DAEMON_HEAP_FLAGS);
      assert.equal(r.code, 0, r.stderr);
      assert.equal(r.stdout, 'tiny guest up\n');
      for (const t of THREADS) assert.equal(cacheOf(r.stderr, t), 'used', `${t}: ${r.stderr}`);
      // Nothing was remade: neither these caches nor the plain ones, which a start without
      // flags still takes.
      await new Promise((res) => setTimeout(res, 500));
      assert.deepEqual(caches(), before);
      const plain = await boot();
      for (const t of THREADS) assert.equal(cacheOf(plain.stderr, t), 'used', plain.stderr);
    },
  );

  test(
    'flags the build made no cache for get caches of their own; the plain ones are left alone',
    T,
    async () => {
      // `node --cpu-prof bin/typervisor ...` and the like: such a run used to remake the plain
      // caches under its flags, and every later run without flags then had them remade eagerly.
      const loader = createRequire(import.meta.url)(join(OUT, 'main.cjs')) as {
        flagsOf(execArgv: string[]): string;
        variantId(flags: string): string;
      };
      const flags = ['--max-semi-space-size=3'];
      const id = loader.variantId(loader.flagsOf(flags));
      const plain = () =>
        readdirSync(OUT)
          .filter((f) => /^[a-z-]+\.cache$/.test(f))
          .map((f) => `${f} ${statSync(join(OUT, f)).mtimeMs}`)
          .sort();
      const before = plain();
      const first = await boot([], flags);
      assert.equal(first.code, 0, first.stderr);
      assert.equal(cacheOf(first.stderr, 'main'), 'none', first.stderr);
      const own = join(OUT, `main.${id}.cache`);
      const end = Date.now() + 30_000;
      while (!existsSync(own) || !existsSync(join(OUT, `vcpu-worker.${id}.cache`))) {
        assert.ok(Date.now() < end, `no ${own} within 30 s`);
        await new Promise((r) => setTimeout(r, 200));
      }
      await new Promise((r) => setTimeout(r, 1000)); // the maker's last renames
      const again = await boot([], flags);
      assert.equal(again.code, 0, again.stderr);
      for (const t of THREADS)
        assert.equal(cacheOf(again.stderr, t), 'used', `${t}: ${again.stderr}`);
      assert.deepEqual(plain(), before, 'the plain caches were not touched');
      const none = await boot();
      for (const t of THREADS)
        assert.equal(cacheOf(none.stderr, t), 'used', `${t}: ${none.stderr}`);
    },
  );

  test('a stale cache is not used (the guest still boots) and is remade', T, async () => {
    // The bundle file's mtime is part of its cache's key.
    const f = join(OUT, 'main.js');
    const st = statSync(f);
    utimesSync(f, st.atime, new Date(st.mtimeMs + 5000));
    assert.notEqual(buildScript('--check', '--out', NAME).status, 0, '--check sees it stale');
    const r = await boot();
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout, 'tiny guest up\n');
    assert.equal(cacheOf(r.stderr, 'main'), 'none', r.stderr);
    assert.equal(cacheOf(r.stderr, 'vcpu-worker'), 'used', r.stderr);
    await waitCurrent(30_000);
    const again = await boot();
    assert.equal(again.code, 0, again.stderr);
    assert.equal(cacheOf(again.stderr, 'main'), 'used', again.stderr);
  });

  test('a cache V8 refuses costs only time, and is remade', T, async () => {
    const f = join(OUT, 'vcpu-worker.cache');
    const b = readFileSync(f);
    const body = b.indexOf(10) + 1;
    // The key (first line) still matches; the data after it is garbage to V8.
    for (let i = body; i < b.length; i++) b[i] = (b[i]! * 31 + 7) & 0xff;
    writeFileSync(f, b);
    const r = await boot();
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout, 'tiny guest up\n');
    assert.equal(cacheOf(r.stderr, 'vcpu-worker'), 'rejected', r.stderr);
    assert.equal(cacheOf(r.stderr, 'main'), 'used', r.stderr);
    // Worker caches are checked by their key only on the main thread: the refusal is seen by
    // the worker, so the cache is remade by the next build (or once its key is stale).
    const c = buildScript('--out', NAME);
    assert.equal(c.status, 0, c.stderr);
    const again = await boot();
    assert.equal(cacheOf(again.stderr, 'vcpu-worker'), 'used', again.stderr);
  });

  test('the bundles carry the default seccomp programs, as dist/ compiles them', B, async () => {
    const { programFor } = (await import(
      join(REPO, 'dist', 'src', 'sandbox', 'seccomp', 'install.js')
    )) as typeof import('../../src/sandbox/seccomp/install.js');
    for (const b of ['main', 'api', 'vcpu-worker', 'device-worker']) {
      const src = readFileSync(join(OUT, `${b}.js`), 'latin1');
      // The define's object: {main:"...",vcpu:"...",device:"..."}, whatever the minifier named
      // the variable that holds it (no spaces to count on; base64 has no '}').
      const found = src.match(/\{\s*main:\s*"[A-Za-z0-9+/=]+"[^}]*\}/g) ?? [];
      assert.equal(found.length, 1, `${b}: ${found.length} program sets`);
      const line = found[0]!;
      for (const role of ['main', 'vcpu', 'device'] as const) {
        const b64: string | undefined = new RegExp(`\\b${role}:\\s*"([A-Za-z0-9+/=]+)"`).exec(
          line,
        )?.[1];
        const want = Buffer.from(programFor(role, { mode: 'default' })).toString('base64');
        assert.equal(b64, want, `${b}: ${role}`);
      }
    }
  });

  test('the API mode runs the api bundle (a config file boots the guest)', T, async () => {
    const cfg = join(OUT, 'vm.json');
    const boot = (vcpus: number) => {
      writeFileSync(
        cfg,
        JSON.stringify({
          'boot-source': { kernel_image_path: guestPath('poweroff') },
          'machine-config': { vcpu_count: vcpus, mem_size_mib: 32 },
        }),
      );
      return start(['--no-api', '--config-file', cfg]);
    };
    const r = await boot(1);
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout, 'tiny guest up\n');
    assert.equal(cacheOf(r.stderr, 'api'), 'used', r.stderr);
    assert.equal(cacheOf(r.stderr, 'main'), undefined, r.stderr);
    // vCPU 0 run by the main thread's loop, any other on a runner thread: no vCPU worker with
    // one vCPU or two.
    assert.equal(cacheOf(r.stderr, 'vcpu-worker'), undefined, r.stderr);
    const two = await boot(2);
    assert.equal(two.code, 0, two.stderr);
    assert.equal(two.stdout, 'tiny guest up\n');
    assert.equal(cacheOf(two.stderr, 'api'), 'used', two.stderr);
    assert.equal(cacheOf(two.stderr, 'vcpu-worker'), undefined, two.stderr);
    // Not an API flag: the main bundle (which refuses it).
    const bad = await start(['--no-such-flag']);
    assert.equal(bad.code, 2, bad.stderr);
    assert.equal(cacheOf(bad.stderr, 'main'), 'used', bad.stderr);
  });

  type Manifest = {
    bundles: Record<string, { sentinels: string[]; inputs: Record<string, [number, number]> }>;
  };
  const manifestPath = () => join(OUT, 'manifest.json');
  const readManifest = () => JSON.parse(readFileSync(manifestPath(), 'utf8')) as Manifest;

  test('a bundle whose other inputs changed runs once, is reported, then not run', T, async () => {
    const manifest = readManifest();
    const main = manifest.bundles.main!;
    const other = Object.keys(main.inputs).find((k) => !main.sentinels.includes(k))!;
    main.inputs[other]![0] += 1; // as if the file had changed since the bundle was made
    writeFileSync(manifestPath(), JSON.stringify(manifest));
    // A run that ends before the check (2 s after start) leaves it to a longer one.
    const short = await boot();
    assert.equal(short.code, 0, short.stderr);
    assert.equal(cacheOf(short.stderr, 'main'), 'used', 'the sentinels are current: it ran');
    assert.doesNotMatch(short.stderr, /out of date/);
    const r = await boot([], [], { TYPERVISOR_BUNDLE_CHECK_MS: '0' });
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout, 'tiny guest up\n');
    assert.equal(cacheOf(r.stderr, 'main'), 'used', 'the sentinels are current: it ran');
    assert.match(r.stderr, new RegExp(`out of date \\(stale: dist/${other} changed\\)`));
    const again = await boot();
    assert.equal(again.code, 0, again.stderr);
    assert.equal(again.stdout, 'tiny guest up\n');
    assert.match(again.stderr, new RegExp(`bundle main: ran dist/ \\(stale: dist/${other}`));
    const c = buildScript('--out', NAME);
    assert.equal(c.status, 0, c.stderr);
  });

  test(
    "the deferred input check makes V8 optimize nothing (TurboFan's code is ~4 MiB of RSS)",
    { timeout: 60_000, skip: noBuild },
    () => {
      // The check every VMM runs 2 s after start-up (checkInputsLater), as a process of its own
      // with V8's optimization trace on: joined with path.join, its ~170 paths made Node's
      // normalizeString hot enough for TurboFan, and an idle VMM's RSS grew by ~4 MiB.
      const loader = join(OUT, 'main.cjs');
      const r = spawnSync(
        process.execPath,
        [
          '--trace-opt',
          '-e',
          `console.log('state', require(${JSON.stringify(loader)}).bundleState('main'))`,
        ],
        { encoding: 'utf8', env: { ...process.env, TYPERVISOR_BUNDLE_DEBUG: undefined } },
      );
      assert.equal(r.status, 0, r.stderr);
      assert.match(r.stdout, /^state ok$/m, 'every input checked and current');
      assert.doesNotMatch(r.stdout, /TURBOFAN/);
    },
  );

  test(
    '--train remakes the trained caches of current bundles, or says why not',
    { timeout: 120_000, skip: noBuild },
    () => {
      const r = buildScript('--train', '--out', NAME);
      assert.equal(r.status, 0, r.stderr);
      if (guests.skip === undefined) {
        for (const name of ['main', 'api'])
          assert.match(r.stderr, new RegExp(`${name}'s code cache: trained on a micro VM`));
        assert.equal(buildScript('--check', '--out', NAME).status, 0, 'still current');
      } else {
        assert.match(
          r.stderr,
          /main's code cache: left as it is \(no usable \/dev\/kvm for a training run\)/,
        );
      }
      const none = buildScript('--train', '--out', `${NAME}-none`);
      assert.equal(none.status, 1);
      assert.match(none.stderr, /main: no bundle \(make the bundles first/);
    },
  );

  test('a bundle older than its dist/ sentinels is not run: dist/ is', T, async () => {
    const manifest = readManifest();
    const main = manifest.bundles.main!;
    const first = main.sentinels[0]!;
    main.inputs[first]![0] += 1; // as if the file had changed since the bundle was made
    writeFileSync(manifestPath(), JSON.stringify(manifest));
    const r = await boot();
    assert.equal(r.code, 0, r.stderr);
    assert.equal(r.stdout, 'tiny guest up\n');
    assert.match(r.stderr, new RegExp(`typervisor bundle main: ran dist/ \\(stale: dist/${first}`));
    assert.equal(cacheOf(r.stderr, 'vcpu-worker'), undefined, 'un-bundled workers: no bundle');
  });
});

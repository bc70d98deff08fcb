#!/usr/bin/env node
/**
 * `node scripts/bundle.mjs [--check | --train] [--out NAME]`: one script per thread from tsc's dist/ output, each with a
 * V8 code cache, into dist/bundle/ (docs/architecture.md "Start-up").
 *
 * Loading ~64 ES modules costs the main thread ~80 ms and each worker as much again; one
 * CommonJS-style script compiled by `vm.Script` from a code cache costs a few. For each thread
 * (the CLI's main thread, a vCPU worker, the device worker, the jailer) this writes:
 *   NAME.js       the bundle: a function expression `(function (require, module, exports,
 *                 __tvUrl) {...})`; every `import.meta.url` of a module became `__tvUrl("its
 *                 path under dist/")`, so paths relative to a module (the native shim,
 *                 package.json, worker entries) resolve as they do un-bundled
 *   NAME.cache    V8's code cache for NAME.js, compiled eagerly (every function, not only the
 *                 top level), with a header naming what it is valid for (see bundle-loader.cjs);
 *                 main's and api's are then remade by training runs where they can be
 *                 (trainCaches)
 *   NAME.cjs      the loader a Worker or the launcher starts (bundle-loader.cjs with NAME)
 *   NAME.ID.cache the cache of NAME for a process started with V8 flags (manifest.variants: ID
 *                 names the flags): `typervisor serve` runs with heap flags (src/daemon/heap.ts),
 *                 and V8 refuses a cache made under other flags
 *   manifest.json every dist/ file each bundle was made from, with its size and mtime: the
 *                 loader runs a bundle only while its sentinels (its entry and its newest input:
 *                 tsc rewrites every file) are unchanged, else dist/ itself, and checks the rest
 *                 after start-up (a change found then: the next start runs dist/); the flags of
 *                 the API mode (the `api` bundle), and whether every bundle is ASCII
 *
 * esbuild is a devDependency: without it (a production install), nothing is written and the
 * launcher runs dist/ as before. --check: exit 1 if a bundle or cache is missing or stale.
 * --train: only remake main's and api's caches by training runs (current bundles; see train()).
 * --out NAME: dist/NAME instead of dist/bundle (a loader finds dist/ as its folder's parent).
 */
import {
  accessSync,
  constants as fsConstants,
  copyFileSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readFileSync,
  renameSync,
  rmSync,
  statSync,
  statfsSync,
  writeFileSync,
} from 'node:fs';
import { createRequire } from 'node:module';
import { tmpdir } from 'node:os';
import { dirname, join, relative, sep } from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = join(dirname(fileURLToPath(import.meta.url)), '..');
const DIST = join(ROOT, 'dist');
/** --out NAME: another folder directly under dist/ (the tests build one of their own). */
const outArg = process.argv.indexOf('--out');
const OUT_NAME = outArg > 0 ? process.argv[outArg + 1] : 'bundle';
if (!OUT_NAME || !/^[A-Za-z0-9._-]+$/.test(OUT_NAME) || OUT_NAME.startsWith('.')) {
  process.stderr.write('bundle: --out takes a folder name under dist/ (letters, digits, . _ -)\n');
  process.exit(2);
}
const OUT = join(DIST, OUT_NAME);

/** Bundle name -> entry under dist/. */
export const BUNDLES = {
  main: 'src/cli/main.js',
  // The API mode alone (`typervisor --api-sock ...`): the loader of `main` hands it over.
  api: 'src/cli/api-main.js',
  'vcpu-worker': 'src/vmm/vcpu-worker.js',
  'device-worker': 'src/vmm/device-worker.js',
  jailer: 'src/jailer/main.js',
};

/** The bundles `typervisor serve` runs (its own, and its workers'): cached under its flags too. */
const DAEMON_BUNDLES = ['main', 'vcpu-worker', 'device-worker'];

const loaderSource = () => readFileSync(join(ROOT, 'scripts', 'bundle-loader.cjs'), 'utf8');

async function build() {
  let esbuild;
  try {
    esbuild = await import('esbuild');
  } catch {
    process.stderr.write(
      'bundle: esbuild is not installed (a production install): no bundle; bin/ runs dist/\n',
    );
    rmSync(OUT, { recursive: true, force: true });
    return 0;
  }
  for (const entry of Object.values(BUNDLES))
    if (!existsSync(join(DIST, entry))) {
      process.stderr.write(
        `bundle: dist/${entry} is missing: run \`npx tsc -p tsconfig.json\` first\n`,
      );
      return 1;
    }
  const tmp = `${OUT}.tmp-${process.pid}`;
  rmSync(tmp, { recursive: true, force: true });
  mkdirSync(tmp, { recursive: true });
  // node:crypto costs the main thread ~1.6 CPU ms to load and is used only once a VM exists
  // (a MAC address, a snapshot's checksum, MMDS tokens); node:child_process (17 modules with
  // net and dgram) only by a few commands (`--rootfs`'s copy, clone, the daemon's backends): in
  // the main and api bundles they load on first use. Importers reach one as
  // `(0, import_node_crypto.X)(...)`, so a module whose exports are getters (one per name the
  // builtin has) defers the require to the first call. Not in the workers: they install their
  // seccomp filter once started, and load it before. node:worker_threads (with node:stream
  // under it) is ~1 MiB of a VMM's peak RSS that a native-vCPU VM without virtio devices never
  // uses (it starts no worker); node:v8 (and node:stream again) only the daemon and the library;
  // node:os (~0.25 MiB) only for a default path (the guest cache, a temp directory).
  const LAZY_BUILTINS = [
    'node:crypto',
    'node:child_process',
    'node:worker_threads',
    'node:stream',
    'node:v8',
    'node:os',
  ];
  const lazyBuiltins = {
    name: 'lazy-builtins',
    setup(b) {
      const filter = new RegExp(`^(${LAZY_BUILTINS.join('|')})$`);
      b.onResolve({ filter }, (args) =>
        args.namespace === 'lazy-builtin'
          ? { path: args.path, external: true }
          : { path: args.path, namespace: 'lazy-builtin' },
      );
      b.onLoad({ filter: /.*/, namespace: 'lazy-builtin' }, async (args) => {
        const names = Object.keys(await import(args.path)).filter((k) => k !== 'default');
        return {
          loader: 'js',
          contents: [
            'let m;',
            `const load = () => (m ??= require(${JSON.stringify(args.path)}));`,
            `for (const k of ${JSON.stringify(names)})`,
            '  Object.defineProperty(exports, k, { enumerable: true, get: () => load()[k] });',
          ].join('\n'),
        };
      });
    },
  };
  const LAZY_IN = new Set(['main', 'api']);
  const importMetaUrl = {
    name: 'import-meta-url',
    setup(b) {
      b.onLoad({ filter: /\.js$/ }, (args) => {
        const text = readFileSync(args.path, 'utf8');
        if (!args.path.startsWith(DIST + sep)) return { contents: text, loader: 'js' };
        const rel = relative(DIST, args.path).split(sep).join('/');
        return {
          contents: text.replace(/\bimport\.meta\.url\b/g, `__tvUrl(${JSON.stringify(rel)})`),
          loader: 'js',
        };
      });
    },
  };
  // The flags that select the API mode (src/cli/main.ts isFirecrackerInvocation), for the loader.
  const { FIRECRACKER_FLAGS } = await import(join(DIST, 'src/cli/firecracker.js'));
  // The default seccomp programs, compiled once here (src/sandbox/seccomp/install.ts programFor)
  // and defined in every bundle: each thread would otherwise compile its own at start-up.
  const seccomp = await import(join(DIST, 'src/sandbox/seccomp/install.js'));
  const { ROLES } = await import(join(DIST, 'src/sandbox/seccomp/roles.js'));
  const audit = process.env.TYPERVISOR_SECCOMP_AUDIT;
  delete process.env.TYPERVISOR_SECCOMP_AUDIT; // the programs without audit (the loader checks)
  const programs = {};
  for (const role of ROLES)
    programs[role] = Buffer.from(seccomp.programFor(role, { mode: 'default' })).toString('base64');
  if (audit !== undefined) process.env.TYPERVISOR_SECCOMP_AUDIT = audit;
  const manifest = {
    node: process.version,
    apiFlags: [...FIRECRACKER_FLAGS],
    ascii: true,
    bundles: {},
  };
  for (const [name, entry] of Object.entries(BUNDLES)) {
    const r = await esbuild.build({
      entryPoints: [join(DIST, entry)],
      bundle: true,
      platform: 'node',
      format: 'cjs',
      target: 'node20',
      // Minified, names too: main's source 1.0 MB -> 0.50, which V8 holds as a string in every
      // process that runs it, and shorter names in its scope tables and code cache (the micro
      // guest's peak RSS -0.33 MiB against whitespace-only minification, 6 interleaved runs on a
      // host; docs/architecture.md "Start-up"). Stack traces of the bundles name minified
      // functions (TYPERVISOR_NO_BUNDLE=1 runs dist/ with every name); error classes whose name a
      // user sees set it themselves (src/util/errors.ts keepName). keepNames would keep them all
      // but costs back 0.2 MiB (a __name call per function and class).
      minify: true,
      write: false,
      metafile: true,
      logLevel: 'error',
      plugins: LAZY_IN.has(name) ? [lazyBuiltins, importMetaUrl] : [importMetaUrl],
      // A .node addon is loaded at run time by its absolute path (src/kvm/native.ts).
      external: ['*.node'],
      define: { __TYPERVISOR_SECCOMP_DEFAULT__: JSON.stringify(programs) },
    });
    const body = r.outputFiles[0].text;
    const src = `(function (require, module, exports, __tvUrl) {${body}\n})`;
    // The loader reads an ASCII bundle as latin1 (no UTF-8 decoding). esbuild escapes every
    // other character in code (charset ascii); what is left is in comments, escaped alike.
    const ascii = src.replace(
      /[^\x00-\x7f]/g,
      (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`,
    );
    if (!/^[\x00-\x7f]*$/.test(ascii)) manifest.ascii = false;
    writeFileSync(join(tmp, `${name}.js`), ascii);
    const inputs = {};
    let newest = entry;
    for (const p of Object.keys(r.metafile.inputs)) {
      // the seccomp programs (made from dist/ inputs) and the lazy builtins' modules
      if (p.startsWith('<define:') || p.startsWith('lazy-builtin:')) continue;
      const abs = join(ROOT, p);
      const st = statSync(abs);
      const rel = relative(DIST, abs).split(sep).join('/');
      inputs[rel] = [st.size, st.mtimeMs];
      if (inputs[newest] === undefined || st.mtimeMs > inputs[newest][1]) newest = rel;
    }
    // What the loader checks at start-up (the rest later): the entry and the newest input.
    const sentinels = newest === entry ? [entry] : [entry, newest];
    manifest.bundles[name] = { entry, sentinels, inputs };
    writeFileSync(join(tmp, `${name}.cjs`), loaderSource().replace('__BUNDLE_NAME__', name));
  }
  // The variants: caches of the bundles a process started with V8 flags of ours runs, made
  // under exactly those flags (V8 checks them). `typervisor serve` re-executes itself with its
  // heap flags (src/daemon/heap.ts); it runs main and starts vCPU and device workers.
  const { DAEMON_HEAP_FLAGS } = await import(join(DIST, 'src/daemon/heap.js'));
  const loader = createRequire(join(tmp, 'main.cjs'))(join(tmp, 'main.cjs'));
  const variants = [{ execArgv: [...DAEMON_HEAP_FLAGS], bundles: DAEMON_BUNDLES }];
  manifest.variants = {};
  for (const v of variants) manifest.variants[loader.variantId(loader.flagsOf(v.execArgv))] = v;
  writeFileSync(join(tmp, 'manifest.json'), JSON.stringify(manifest));
  rmSync(OUT, { recursive: true, force: true });
  renameSync(tmp, OUT);
  // The caches: made by the loader itself (same key, same V8 flags as at run time), in a child
  // process so that this one's flags do not matter; a variant's in a child with its flags.
  const { spawnSync } = await import('node:child_process');
  const makers = [
    ...Object.keys(BUNDLES).map((name) => ({ name, execArgv: [], make: '1' })),
    ...variants.map((v) => ({
      name: v.bundles[0],
      execArgv: v.execArgv,
      make: v.bundles.join(','),
    })),
  ];
  for (const { name, execArgv, make } of makers) {
    const c = spawnSync(process.execPath, [...execArgv, join(OUT, `${name}.cjs`)], {
      env: { ...process.env, TYPERVISOR_BUNDLE_MAKE_CACHE: make, NODE_EXTRA_CA_CERTS: '' },
      encoding: 'utf8',
    });
    if (c.status !== 0) {
      process.stderr.write(
        `bundle: making the code cache of ${make === '1' ? name : make} ${execArgv.join(' ')} failed: ${c.stderr}\n`,
      );
      return 1;
    }
  }
  await trainCaches(spawnSync);
  return 0;
}

/**
 * The main and api bundles' caches from training runs, where they can run: each bundle,
 * compiled lazily (TYPERVISOR_BUNDLE_TRAIN=FILE), starts a guest of a few bytes
 * (TRAINING_GUEST: a line on the console, the boot marker, the reset, and the VMM exits) with a
 * virtio-rng device and a read-only drive, and writes the code cache of what it compiled at
 * exit (bundle-loader.cjs trainCacheAtExit): main as `run --vcpu-threads loop` (the default for one vCPU), api through its socket (GET /, the
 * boot source, machine config, entropy device and drive, InstanceStart). Such a cache holds the
 * functions a VM's start runs on the main thread (main: 0.60 MB against the eager 1.49 MB, which
 * also holds every other command and the device models that only the device worker runs): on
 * the micro guest with native vCPU threads exec -> marker -9 ms and peak RSS -1.1 MiB (41
 * interleaved runs); what it lacks is compiled when first called, as without a cache. Needs a
 * usable /dev/kvm; without one (or if a run fails) the eager cache stays, and this says why.
 * The loader's background re-maker of a stale cache stays eager.
 */
async function trainCaches(spawnSync, replaced = 'eager') {
  const say = (name, m) => process.stderr.write(`bundle: ${name}'s code cache: ${m}\n`);
  try {
    accessSync('/dev/kvm', fsConstants.R_OK | fsConstants.W_OK);
  } catch {
    for (const name of TRAINED)
      say(
        name,
        `${replaced === 'eager' ? 'eager' : 'left as it is'} (no usable /dev/kvm for a training run)`,
      );
    return;
  }
  const dir = mkdtempSync(join(tmpdir(), 'typervisor-train-'));
  const sockDir = await socketDir(dir);
  try {
    const elf = join(dir, 'train.elf');
    const { rehearsalImage } = await import(join(DIST, 'src', 'vmm', 'rehearsal.js'));
    writeFileSync(elf, rehearsalImage(TRAINING_GUEST));
    const disk = join(dir, 'disk.img');
    writeFileSync(disk, Buffer.alloc(1 << 20));
    for (const name of TRAINED) {
      const out = join(dir, `${name}.cache`);
      const env = { ...process.env, TYPERVISOR_BUNDLE_TRAIN: out, NODE_EXTRA_CA_CERTS: '' };
      const why =
        name === 'main'
          ? trainRun(spawnSync, elf, disk, env)
          : await trainApi(join(sockDir, 'api.sock'), elf, disk, { ...env, TMPDIR: sockDir });
      if (why !== undefined || !existsSync(out)) {
        say(name, `eager (the training run failed: ${why ?? 'no cache written'})`);
        continue;
      }
      const eager = statSync(join(OUT, `${name}.cache`)).size;
      // Copied next to its place, then renamed over the eager one: the training directory is
      // in the temp directory, which may be another file system (a tmpfs /tmp: EXDEV).
      const dest = join(OUT, `${name}.cache`);
      copyFileSync(out, `${dest}.tmp-${process.pid}`);
      renameSync(`${dest}.tmp-${process.pid}`, dest);
      say(
        name,
        `trained on a micro VM (${statSync(join(OUT, `${name}.cache`)).size} bytes; ${replaced} ${eager})`,
      );
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
    if (sockDir !== dir) rmSync(sockDir, { recursive: true, force: true });
  }
}

/**
 * A directory for the API training's socket and temporary files (its TMPDIR: the API mode makes
 * its console's FIFO there): `dir` when a Unix socket can be made there, else a temporary one
 * in /dev/shm or /run (the lab's temp directory is on 9p, which has no sockets or FIFOs).
 */
async function socketDir(dir) {
  const { createServer } = await import('node:net');
  // 9p (V9FS_MAGIC) has no sockets, and QEMU's 9p server logs a try as a broken client.
  const canListen = (d) =>
    new Promise((resolve) => {
      if (statfsSync(d).type === 0x01021997) return resolve(false);
      const srv = createServer();
      srv.once('error', () => resolve(false));
      srv.listen(join(d, 'probe.sock'), () => srv.close(() => resolve(true)));
    });
  if (await canListen(dir)) return dir;
  for (const base of ['/dev/shm', '/run']) {
    let d;
    try {
      d = mkdtempSync(join(base, 'typervisor-train-'));
    } catch {
      continue;
    }
    if (await canListen(d)) return d;
    rmSync(d, { recursive: true, force: true });
  }
  return dir;
}

/** The bundles whose caches trainCaches makes. */
const TRAINED = ['main', 'api'];

/**
 * The training guest's code (32-bit, PVH entry; src/vmm/rehearsal.ts makes the ELF): "M\n" on
 * COM1 (the console's path), the boot marker, then the i8042 reset (the VMM exits with 0).
 */
const TRAINING_GUEST = [
  ...[0x66, 0xba, 0xf8, 0x03], // mov $0x3f8,%dx
  ...[0xb0, 0x4d, 0xee], // mov $'M',%al; out %al,(%dx)
  ...[0xb0, 0x0a, 0xee], // mov $'\n',%al; out %al,(%dx)
  ...[0x66, 0xba, 0xf0, 0x03, 0xb0, 0x01, 0xee], // mov $0x3f0,%dx; mov $1,%al; out %al,(%dx)
  ...[0xb0, 0xfe, 0xe6, 0x64], // mov $0xfe,%al; out %al,$0x64
  ...[0xf4, 0xeb, 0xfd], // 1: hlt; jmp 1b
];

/** `run` from the main bundle: undefined, or why it failed. */
function trainRun(spawnSync, elf, disk, env) {
  // The default path: one vCPU run by the main thread's loop (the hub's code, as native mode's).
  const args = ['run', '--kernel', elf, '--memory', '32', '--vcpu-threads', 'loop'];
  args.push('--no-seccomp', '--rng', '--drive', `path=${disk},ro`);
  const r = spawnSync(process.execPath, [join(OUT, 'main.cjs'), ...args], {
    env,
    encoding: 'utf8',
    timeout: 60_000,
  });
  if (r.status === 0) return undefined;
  return r.error?.message ?? (r.stderr.trim().split('\n').pop() || `exit ${r.status}`);
}

/** The API mode (the launcher hands `--api-sock` to the api bundle), driven over its socket. */
async function trainApi(sock, elf, disk, env) {
  const { spawn } = await import('node:child_process');
  const { request } = await import('node:http');
  const child = spawn(
    process.execPath,
    [join(OUT, 'main.cjs'), '--api-sock', sock, '--no-seccomp'],
    {
      env,
      stdio: ['ignore', 'ignore', 'pipe'],
    },
  );
  let err = '';
  child.stderr.setEncoding('utf8').on('data', (d) => (err = (err + d).slice(-2000)));
  const exited = new Promise((resolve) => child.on('exit', (code) => resolve(code)));
  const timer = setTimeout(() => child.kill('SIGKILL'), 60_000);
  const call = (method, path, body) =>
    new Promise((resolve, reject) => {
      const req = request({ socketPath: sock, method, path }, (res) => {
        res.resume();
        res.on('end', () =>
          res.statusCode < 300
            ? resolve()
            : reject(new Error(`${method} ${path}: ${res.statusCode}`)),
        );
      });
      req.on('error', reject);
      req.end(body === undefined ? undefined : JSON.stringify(body));
    });
  try {
    for (let i = 0; !existsSync(sock); i++) {
      if (i > 1000 || child.exitCode !== null) throw new Error('no API socket');
      await new Promise((r) => setTimeout(r, 10));
    }
    await call('GET', '/');
    await call('PUT', '/boot-source', { kernel_image_path: elf });
    await call('PUT', '/machine-config', { vcpu_count: 1, mem_size_mib: 32 });
    await call('PUT', '/entropy', {});
    const drive = { drive_id: 'd1', path_on_host: disk, is_root_device: false };
    await call('PUT', '/drives/d1', { ...drive, is_read_only: true });
    await call('PUT', '/actions', { action_type: 'InstanceStart' });
    const code = await exited;
    return code === 0 ? undefined : `exit ${code}: ${err.trim().split('\n').pop()}`;
  } catch (e) {
    child.kill('SIGKILL');
    await exited;
    return `${e.message}: ${err.trim().split('\n').pop()}`;
  } finally {
    clearTimeout(timer);
  }
}

/** 0 when every bundle and cache is present and current. */
function check() {
  let ok = true;
  for (const name of Object.keys(BUNDLES)) {
    const loader = join(OUT, `${name}.cjs`);
    if (!existsSync(loader)) {
      process.stderr.write(`bundle: ${name}: no bundle\n`);
      ok = false;
      continue;
    }
    const { bundleState, cacheState } = createRequire(loader)(loader);
    for (const s of [bundleState(name), cacheState(name)])
      if (s !== 'ok') {
        process.stderr.write(`bundle: ${name}: ${s}\n`);
        ok = false;
      }
  }
  return ok ? 0 : 1;
}

/**
 * --train: main's and api's caches remade by training runs (trainCaches), for bundles that are
 * current, without building anything. For a build made where there was no /dev/kvm (eager
 * caches) that then runs where there is one: the lab's benchmarks run it first, so that their
 * figures are those of an install on a KVM host (bench/common.ts trainBundleCaches).
 */
async function train() {
  for (const name of TRAINED) {
    const loader = join(OUT, `${name}.cjs`);
    const state = existsSync(loader)
      ? createRequire(loader)(loader).bundleState(name)
      : 'no bundle';
    if (state !== 'ok') {
      process.stderr.write(
        `bundle: ${name}: ${state} (make the bundles first: node scripts/bundle.mjs)\n`,
      );
      return 1;
    }
  }
  // The caches it replaces may be trained already: say what they were, not 'eager'.
  await trainCaches((await import('node:child_process')).spawnSync, 'the one it replaced:');
  return 0;
}

if (process.argv[1] && fileURLToPath(import.meta.url) === process.argv[1]) {
  const code = process.argv.includes('--check')
    ? check()
    : process.argv.includes('--train')
      ? await train()
      : await build();
  process.exitCode = code;
}

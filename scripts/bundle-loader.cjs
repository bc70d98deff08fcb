'use strict';
/**
 * The loader of one bundle (scripts/bundle.mjs copies it to dist/bundle/NAME.cjs with NAME
 * filled in): what bin/typervisor and the workers start. It runs NAME.js compiled by
 * `vm.Script` from its code cache NAME.cache, or, when the bundle is not there or not current,
 * the un-bundled dist/ entry (only slower). A cache that is missing, made for another Node or
 * other flags, or refused by V8 costs compile time, never correctness (V8 checks the source
 * and its own version and flags as well).
 *
 * CommonJS and only node: built-ins, so that starting it loads nothing else (no ES module
 * loader). Environment: TYPERVISOR_BUNDLE_MAKE_CACHE=1 makes NAME.cache and exits (the build
 * does this; a comma-separated list of names makes those: the background remake);
 * TYPERVISOR_NO_BUNDLE=1 runs dist/; TYPERVISOR_BUNDLE_DEBUG=1 says on stderr what ran.
 */
const fs = require('node:fs');
const path = require('node:path');
const vm = require('node:vm');

const NAME = '__BUNDLE_NAME__';
const DIR = __dirname;
const DIST = path.dirname(DIR);
const KEY = Symbol.for('typervisor.bundle');
const EARLY_VCPU_WORKERS = Symbol.for('typervisor.early-vcpu-workers');
/** When the full input check runs after a quick start (ms). */
const CHECK_LATER_MS = 2000;

/**
 * The command-line options of this process (a worker inherits them), as the name of a set of
 * caches: '' when there are none. NODE_OPTIONS is left to the key (cacheKey).
 */
function flagsOf(execArgv = process.execArgv) {
  return execArgv.length === 0 ? '' : JSON.stringify(execArgv);
}

/** A short name for a set of flags (FNV-1a, 32 bits): NAME.ID.cache holds that variant's cache. */
function variantId(flags) {
  let h = 0x811c9dc5;
  for (let i = 0; i < flags.length; i++) h = Math.imul(h ^ flags.charCodeAt(i), 0x01000193) >>> 0;
  return h.toString(16).padStart(8, '0');
}

/**
 * The caches the build made besides the flag-less ones (manifest.variants, id -> {execArgv,
 * bundles}): one set per flag set a command re-executes itself with (`typervisor serve`,
 * src/daemon/heap.ts). The variant of this process's flags if the build made one, else undefined.
 */
function variantOf(manifest, flags = flagsOf()) {
  if (flags === '' || !manifest || !manifest.variants) return undefined;
  const id = variantId(flags);
  const v = manifest.variants[id];
  return v && Array.isArray(v.bundles) ? { id, bundles: v.bundles } : undefined;
}

/**
 * The cache file of `name` for this process: NAME.cache without flags; NAME.ID.cache (ID names
 * the flags) when its flags are a variant the build made a cache of `name` for, or flags the
 * build made nothing for (`node --cpu-prof bin/typervisor ...`): such a process reads and remakes
 * caches of its own, never the plain ones, which every run without flags takes (they used to be
 * remade under the debugging run's flags, and every later plain run then found them stale and
 * had them remade eagerly, untrained: +1.1 MiB of RSS until the next build). NAME.cache for a
 * variant's flags and a bundle it has no cache of (the API mode's). Without a manifest (a worker
 * reads none) the flags' file is taken when it exists (both are returned, that one first).
 */
function cacheFiles(name, manifest, execArgv = process.execArgv) {
  const plain = path.join(DIR, `${name}.cache`);
  const flags = flagsOf(execArgv);
  if (flags === '') return [plain];
  const own = path.join(DIR, `${name}.${variantId(flags)}.cache`);
  if (manifest === undefined) return [own, plain];
  const v = variantOf(manifest, flags);
  return v && !v.bundles.includes(name) ? [plain] : [own];
}

/** What a cache is valid for, besides the bundle file itself (its size and mtime). */
function cacheKey(
  bundleStat,
  execArgv = process.execArgv,
  nodeOptions = process.env.NODE_OPTIONS || '',
) {
  return JSON.stringify([
    process.version,
    process.arch,
    execArgv,
    nodeOptions,
    bundleStat.size,
    bundleStat.mtimeMs,
  ]);
}

function readManifest() {
  try {
    return JSON.parse(fs.readFileSync(path.join(DIR, 'manifest.json'), 'utf8'));
  } catch {
    return undefined;
  }
}

/**
 * 'ok', or why input `rel` (dist/-relative, as bundle.mjs wrote it: no `.` or `..` parts)
 * differs from what the manifest recorded. The path is joined by hand: `path.join` for each of
 * ~170 inputs made V8 optimize Node's `normalizeString` with TurboFan in the deferred check of
 * every VMM that lives past it, which maps ~3.6 MiB more of the node binary (the optimizing
 * compiler's code) into each VMM's RSS.
 */
function inputState(rel, [size, mtimeMs]) {
  const st = fs.statSync(`${DIST}/${rel}`, { throwIfNoEntry: false });
  return !st || st.size !== size || st.mtimeMs !== mtimeMs ? `stale: dist/${rel} changed` : 'ok';
}

/**
 * 'ok', or why the bundle `name` may not run (its dist/ inputs changed since it was made): every
 * input checked (`--check`, the deferred check below), or with `quick` only its sentinels (the
 * entry and the newest input when the bundle was made: tsc rewrites every output on each build,
 * so a rebuild changes both) -- two stat calls instead of one per input (~130), which cost the
 * start-up 2-4 ms of CPU.
 */
function bundleState(name, manifest = readManifest(), quick = false) {
  const b = manifest && manifest.bundles && manifest.bundles[name];
  if (!b) return 'no bundle';
  if (typeof manifest.stale === 'string') return manifest.stale;
  if (!fs.existsSync(path.join(DIR, `${name}.js`))) return 'no bundle';
  const rels = quick && Array.isArray(b.sentinels) ? b.sentinels : Object.keys(b.inputs);
  for (const rel of rels) {
    const rec = b.inputs[rel];
    if (!rec) return `stale: dist/${rel} is not among the inputs`;
    const s = inputState(rel, rec);
    if (s !== 'ok') return s;
  }
  return 'ok';
}

/**
 * After a quick start: every input is checked once, off the start-up path, checkLaterMs() after
 * start. A change the sentinels missed (a file rewritten alone, e.g. by `tsc --watch`) is
 * reported and written into the manifest (`stale`), so that the next start runs dist/ until the
 * bundle is made again. Not at exit: a process that ends sooner (a short VM, `--help`) leaves
 * the check to a longer one. At exit it cost a short VM its peak RSS (+4.6 MiB on the micro
 * guest: the check's garbage set off a scavenge, which touched new heap pages) and a few ms.
 */
function checkInputsLater(name, manifest) {
  const check = () => {
    const s = bundleState(name, manifest);
    if (s === 'ok') return;
    process.stderr.write(
      `typervisor: the bundle in ${DIR} is out of date (${s}); the next start runs dist/ (remake it: node scripts/bundle.mjs)\n`,
    );
    try {
      const m = path.join(DIR, 'manifest.json');
      const tmp = `${m}.tmp-${process.pid}`;
      fs.writeFileSync(tmp, JSON.stringify({ ...manifest, stale: s }));
      fs.renameSync(tmp, m);
    } catch {
      // read-only install: reported on every start instead
    }
  };
  setTimeout(check, checkLaterMs()).unref();
}

/** CHECK_LATER_MS, or TYPERVISOR_BUNDLE_CHECK_MS (0-60000; tests use 0). */
function checkLaterMs() {
  const v = process.env.TYPERVISOR_BUNDLE_CHECK_MS;
  const n = v === undefined || !/^[0-9]{1,5}$/.test(v) ? NaN : Number(v);
  return n <= 60_000 ? n : CHECK_LATER_MS;
}

/**
 * Whether the cache of `name` in `file` has the key of the bundle file as it is for `flags`
 * (execArgv and NODE_OPTIONS; this process's by default): reads its first line.
 */
function cacheKeyCurrent(name, file, flags) {
  let fd;
  try {
    const st = fs.statSync(path.join(DIR, `${name}.js`));
    fd = fs.openSync(file, 'r');
    const want = Buffer.from(`${flags ? cacheKey(st, ...flags) : cacheKey(st)}\n`);
    const got = Buffer.alloc(want.length);
    return fs.readSync(fd, got, 0, got.length, 0) === got.length && got.equals(want);
  } catch {
    return false;
  } finally {
    if (fd !== undefined) fs.closeSync(fd);
  }
}

/**
 * Remakes the caches of `names` in a background process (an eager compile takes longer than a
 * start-up): this start runs without them, the next ones with them. Through `sh -c '... &'`,
 * waited for here (a few ms): the maker is then nobody's child in this process, so nothing
 * here reaps it later, when this thread's seccomp filter allows no wait4.
 */
function rebuildCaches(names, manifest) {
  for (const [execArgv, ns] of cacheMakers(names, manifest)) {
    try {
      const env = { ...process.env, TYPERVISOR_BUNDLE_MAKE_CACHE: ns.join(',') };
      delete env.NODE_EXTRA_CA_CERTS;
      require('node:child_process').spawnSync(
        '/bin/sh',
        [
          '-c',
          '"$0" "$@" </dev/null >/dev/null 2>&1 &',
          process.execPath,
          ...execArgv,
          path.join(DIR, `${NAME}.cjs`),
        ],
        { env, stdio: 'ignore', timeout: 5000 },
      );
    } catch {
      // no shell (a jail) or a read-only install: it only costs time
    }
  }
}

/**
 * Who remakes the stale caches `names`: [execArgv, names] per maker. The caches of a bundle
 * file go stale together (its size and mtime are in every key), so a process without flags or
 * with a variant's remakes the plain caches and every variant's of those bundles, each under its
 * own flags; a process with other flags (no variant of them) remakes its own (cacheFiles:
 * NAME.ID.cache) under its flags, and leaves the plain ones alone.
 */
function cacheMakers(names, manifest, execArgv = process.execArgv) {
  const flags = flagsOf(execArgv);
  if (flags !== '' && !variantOf(manifest, flags)) return [[execArgv, names]];
  const out = [[[], names]];
  for (const v of Object.values((manifest && manifest.variants) || {})) {
    const ns = names.filter((n) => v.bundles.includes(n));
    if (ns.length > 0) out.push([v.execArgv, ns]);
  }
  return out;
}

/**
 * The cache of `name` if it was made for this bundle file, this Node and these flags, else
 * undefined: the first of cacheFiles() that exists.
 */
function readCache(name, bundleStat, manifest) {
  let buf;
  for (const f of cacheFiles(name, manifest)) {
    try {
      buf = fs.readFileSync(f);
      break;
    } catch {
      // the next one
    }
  }
  if (buf === undefined) return undefined;
  const nl = buf.indexOf(10);
  if (nl < 0 || buf.toString('utf8', 0, nl) !== cacheKey(bundleStat)) return undefined;
  return buf.subarray(nl + 1);
}

/**
 * 'ok', or why the cache of `name` is not current: the flag-less one, and that of every variant
 * the build made (checked against the variant's flags, without running under them).
 */
function cacheState(name) {
  const st = fs.statSync(path.join(DIR, `${name}.js`), { throwIfNoEntry: false });
  if (!st) return 'no bundle';
  if (!cacheKeyCurrent(name, path.join(DIR, `${name}.cache`))) return 'missing or stale';
  const manifest = readManifest();
  const nodeOptions = process.env.NODE_OPTIONS || '';
  for (const [id, v] of Object.entries((manifest && manifest.variants) || {})) {
    const file = path.join(DIR, `${name}.${id}.cache`);
    if (v.bundles.includes(name) && !cacheKeyCurrent(name, file, [v.execArgv, nodeOptions]))
      return `the cache for ${v.execArgv.join(' ')} is missing or stale`;
  }
  return 'ok';
}

/** Compiles every function of the bundle (not only those run at load) and writes its cache. */
function makeCache(name) {
  const file = path.join(DIR, `${name}.js`);
  const src = fs.readFileSync(file, 'utf8');
  const st = fs.statSync(file);
  const v8 = require('node:v8');
  // Eager compilation for the cache only; the flag is put back before the cache is made, so
  // that the cache carries the flags the VMM runs with (V8 refuses a cache made under others).
  v8.setFlagsFromString('--no-lazy');
  const script = new vm.Script(src, { filename: file });
  v8.setFlagsFromString('--lazy');
  const data = script.createCachedData();
  const out = cacheFiles(name, readManifest())[0];
  const tmp = `${out}.tmp-${process.pid}`;
  fs.writeFileSync(tmp, Buffer.concat([Buffer.from(`${cacheKey(st)}\n`), data]));
  fs.renameSync(tmp, out);
}

/**
 * A training run (scripts/bundle.mjs, TYPERVISOR_BUNDLE_TRAIN=FILE): the main thread's bundle
 * (main, or api for the API mode) compiled lazily, then, if the process exits with 0, its code
 * cache written to FILE with the key a run checks. It holds the functions this run compiled:
 * what a VM's start runs on the main thread, not every function of every command, as the eager
 * cache (makeCache) does.
 */
function trainCacheAtExit(script, st, file) {
  process.once('exit', (code) => {
    if (code !== 0) return;
    const tmp = `${file}.tmp-${process.pid}`;
    fs.writeFileSync(
      tmp,
      Buffer.concat([Buffer.from(`${cacheKey(st)}\n`), script.createCachedData()]),
    );
    fs.renameSync(tmp, file);
  });
}

function runUnbundled(name, manifest) {
  const entry =
    (manifest && manifest.bundles && manifest.bundles[name] && manifest.bundles[name].entry) ||
    undefined;
  if (!entry) throw new Error(`typervisor: no entry for bundle ${name}`);
  return import(require('node:url').pathToFileURL(path.join(DIST, entry)).href);
}

/**
 * `typervisor run`: vCPU 0's worker starts before the main bundle is compiled (~12 ms), as
 * src/vmm/vcpu-pool.ts would start it right after: the worker's own start-up is the longest
 * path to the guest. The pool adopts it (EARLY_VCPU_WORKERS). Not with --no-seccomp or
 * --seccomp-filter (workers read those settings when created: main.ts sets them first), nor
 * for --help.
 */
function startVcpuWorkerEarly(args) {
  if (args[0] !== 'run') return;
  for (const a of args)
    if (a === '--help' || a === '-h' || a === '--no-seccomp' || a.startsWith('--seccomp-filter'))
      return;
  // Native vCPU threads served by the main thread, and vCPU 0 on the main thread's loop, start
  // no worker at all (src/vmm/vcpu-mode.ts).
  const i = args.findIndex((a) => a === '--vcpu-threads' || a.startsWith('--vcpu-threads='));
  const threads =
    i < 0
      ? process.env.TYPERVISOR_VCPU_THREADS
      : args[i].includes('=')
        ? args[i].split('=')[1]
        : args[i + 1];
  // The default ('auto', or nothing said) is loop mode for `run`, whatever --vcpus says
  // (src/vmm/vcpu-mode.ts): vCPU 0 on the loop, the others on runner threads.
  if (threads === undefined || threads === '' || threads === 'auto' || threads === 'loop') return;
  if (threads === 'native' && (process.env.TYPERVISOR_VCPU_HUB || 'main') === 'main') return;
  const { Worker } = require('node:worker_threads');
  const w = new Worker(path.join(DIR, 'vcpu-worker.cjs'), { stdout: false, stderr: false });
  w.unref(); // unused, it must not keep the process alive
  globalThis[EARLY_VCPU_WORKERS] = [w];
  if (process.env.TYPERVISOR_BUNDLE_DEBUG)
    process.stderr.write('typervisor bundle main: started a vCPU worker before compiling\n');
}

/**
 * The Firecracker-style API mode (`typervisor --api-sock ...`, src/cli/main.ts
 * isFirecrackerInvocation): the same rule on the flags the build recorded (manifest.apiFlags).
 */
function isApiInvocation(args, manifest) {
  const flags = manifest && manifest.apiFlags;
  const first = args[0] === undefined ? undefined : args[0].split('=')[0];
  if (!Array.isArray(flags) || first === undefined || !first.startsWith('--')) return false;
  return first !== '--help' && first !== '--version' && flags.includes(first);
}

/**
 * Runs bundle `name`; `checkInputs` false in a worker started by a bundled main thread (which
 * checked already). Returns 'bundle' or 'dist' (which one ran). TYPERVISOR_BUNDLE_DEBUG=1: one
 * line on stderr saying which, and what became of the code cache. The main bundle hands the API
 * mode to the `api` bundle when there is one: the same code without the other commands (a
 * quarter less to read and deserialize before the API socket listens).
 */
function run(name, checkInputs) {
  const manifest = checkInputs ? readManifest() : undefined;
  if (
    name === 'main' &&
    checkInputs &&
    manifest &&
    manifest.bundles &&
    manifest.bundles.api &&
    isApiInvocation(process.argv.slice(2), manifest)
  )
    name = 'api';
  if (
    process.env.TYPERVISOR_NO_BUNDLE ||
    (checkInputs && bundleState(name, manifest, true) !== 'ok')
  ) {
    if (process.env.TYPERVISOR_BUNDLE_DEBUG)
      process.stderr.write(`typervisor bundle ${name}: ran dist/ (${bundleState(name)})\n`);
    runUnbundled(name, manifest || readManifest()).catch((e) => {
      process.stderr.write(`typervisor: internal error: ${e && e.stack}\n`);
      process.exit(1);
    });
    return 'dist';
  }
  if (name === 'main' && checkInputs) startVcpuWorkerEarly(process.argv.slice(2));
  const file = path.join(DIR, `${name}.js`);
  // esbuild writes ASCII (non-ASCII characters escaped; the build checks it: manifest.ascii),
  // and latin1 makes V8's one-byte string without decoding UTF-8.
  const src = fs.readFileSync(file, manifest && manifest.ascii === true ? 'latin1' : 'utf8');
  const st = fs.statSync(file);
  const train = checkInputs ? process.env.TYPERVISOR_BUNDLE_TRAIN : undefined;
  const cachedData = train ? undefined : readCache(name, st, manifest);
  const script = new vm.Script(src, { filename: file, cachedData });
  const cache = cachedData === undefined ? 'none' : script.cachedDataRejected ? 'rejected' : 'used';
  globalThis[KEY] = { dir: DIR, cache };
  if (train) trainCacheAtExit(script, st, train);
  else if (checkInputs) {
    // The main thread (never a worker: its seccomp filter may forbid a spawn) remakes the
    // caches that are missing, made for something else, or refused by V8.
    // Under a variant's flags, only that variant's bundles (the others run without them).
    const v = variantOf(manifest);
    const stale = (v ? v.bundles : Object.keys(manifest.bundles)).filter((n) =>
      n === name ? cache !== 'used' : !cacheKeyCurrent(n, cacheFiles(n, manifest)[0]),
    );
    if (stale.length > 0) rebuildCaches(stale, manifest);
    checkInputsLater(name, manifest);
  }
  if (process.env.TYPERVISOR_BUNDLE_DEBUG)
    process.stderr.write(`typervisor bundle ${name}: ran the bundle, code cache ${cache}\n`);
  const fn = script.runInThisContext();
  const mod = { exports: {} };
  const url = require('node:url');
  const urls = new Map();
  const tvUrl = (rel) => {
    let u = urls.get(rel);
    if (u === undefined) urls.set(rel, (u = url.pathToFileURL(path.join(DIST, rel)).href));
    return u;
  };
  fn(require, mod, mod.exports, tvUrl);
  return 'bundle';
}

module.exports = {
  bundleState,
  cacheFiles,
  cacheMakers,
  cacheState,
  flagsOf,
  makeCache,
  run,
  variantId,
};

if (NAME !== '__BUNDLE_' + 'NAME__' && require.main === module) {
  const make = process.env.TYPERVISOR_BUNDLE_MAKE_CACHE;
  if (make) {
    for (const n of make === '1' ? [NAME] : make.split(',')) {
      if (/^[a-z-]+$/.test(n) && fs.existsSync(path.join(DIR, `${n}.js`))) makeCache(n);
    }
  } else {
    run(NAME, require('node:worker_threads').isMainThread);
  }
}

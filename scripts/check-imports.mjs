#!/usr/bin/env node
// The import-boundary check: every import in src/**/*.ts must point one way down the layers
// of STYLE.md's layout (util at the bottom, cli at the top, lab beside them as dev tooling).
// Run: `node scripts/check-imports.mjs [checkout-root]` (exit 1 and one `file:line: ...` line
// per violation). src/boundaries.test.ts runs it in `npm test` through checkImports().
// Plain Node, no dependencies.
//
// What counts as an import: `import ... from '...'`, `import '...'`, `export ... from '...'`,
// `import('...')` (dynamic, and `typeof import('...')` in types), `require('...')`.
// `import type` counts too: a type import is still a dependency on the layer's design, and no
// layer needs an exception for one (arch uses kvm's plain data shapes in src/kvm/types.ts,
// values and types alike; devices import nothing of kvm at all).
// Only relative specifiers are ours; `node:*` and packages are not checked.
import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { dirname, join, relative, resolve, sep } from 'node:path';
import { fileURLToPath } from 'node:url';

/**
 * What each layer (a folder under src/) may import besides itself. Tests (`*.test.ts`) obey
 * their layer's row too; they may also import files outside src/ (test/fixtures, scripts/).
 */
export const LAYERS = {
  util: [],
  kvm: ['util'],
  memory: ['util'],
  loader: ['memory', 'util'],
  // The Uffd backend's handshake and our page-fault handler (a process of its own).
  uffd: ['kvm', 'util'],
  // kvm only through src/kvm/types.ts (see ONLY_THROUGH): arch fills in plain data, vmm hands
  // it to KVM. arch and devices are siblings: neither imports the other (the ACPI tables and
  // the AcpiPm device agree through arch/x86_64/layout.ts, checked in src/vmm/).
  arch: ['loader', 'memory', 'kvm', 'util'],
  events: ['kvm', 'util'],
  // Seccomp filters (and later the sandbox's other pieces), and the in-place re-exec of
  // `typervisor serve` (sandbox/exec.ts): through the shim.
  sandbox: ['kvm', 'util'],
  // Never kvm, events (it loads the native addon), arch, vmm, api, cli, lab.
  mmds: ['util'],
  devices: ['memory', 'util', 'mmds'],
  vmm: ['util', 'kvm', 'memory', 'loader', 'arch', 'events', 'devices', 'uffd', 'sandbox', 'mmds'],
  // vmm only through src/vmm/index.ts (see ONLY_THROUGH).
  api: ['vmm', 'util', 'mmds'],
  // The host daemon (typervisor serve): the API server and controller, the VMM and the
  // library's warm host (through its public src/lib/index.ts, see ONLY_THROUGH) for shared mode.
  daemon: ['api', 'vmm', 'util', 'sandbox', 'lib'],
  cli: ['api', 'vmm', 'uffd', 'util', 'sandbox', 'daemon'],
  // The `typervisor` package's public library (issue 19): VMs in the calling process. vmm only
  // through src/vmm/index.ts and vcpu-pool.ts (see ONLY_THROUGH); sandbox for its seccomp option.
  lib: ['vmm', 'util', 'sandbox'],
  // typervisor-jailer (issue 14): builds the jail through the shim, then execs the VMM's own bin.
  jailer: ['kvm', 'util'],
  // Development tooling (guest images, the nested-KVM lab): may use anything; nothing else in
  // src/ may import it (test/ and bench/ do, outside this check).
  lab: [
    'util',
    'kvm',
    'memory',
    'loader',
    'arch',
    'events',
    'devices',
    'vmm',
    'uffd',
    'api',
    'cli',
    'sandbox',
    'mmds',
    'lib',
  ],
};

/** Layers that the named importers may reach only through the listed files (repo-relative). */
export const ONLY_THROUGH = [
  { importers: ['arch'], layer: 'kvm', files: ['src/kvm/types.ts'] },
  // vcpu-pool.ts: the one light entry, imported by cli/main.ts before anything else so that
  // vCPU workers start while the rest of the VMM loads (start-up time).
  {
    importers: ['api', 'cli', 'lib'],
    layer: 'vmm',
    files: ['src/vmm/index.ts', 'src/vmm/vcpu-pool.ts'],
  },
  { importers: ['daemon'], layer: 'lib', files: ['src/lib/index.ts'] },
];

/**
 * TEMPORARY: files allowed to break the "api/cli import vmm only through src/vmm/index.ts"
 * rule (and no other rule) while the api/cli/vmm connection is rewritten. This list must end
 * empty; the check fails on an entry that no longer needs it, so it can only shrink.
 */
export const TEMPORARY_ALLOW = [];

/** Test-only code: importable only from `*.test.ts` files and from inside the folder itself. */
export const TEST_ONLY = ['src/devices/virtio/testing/', 'src/api/testing/'];

const isTest = (file) => file.endsWith('.test.ts');

/**
 * Blank out comments and the insides of string, template and regex literals (keeping every
 * offset and newline), so the import patterns below only ever see code. The quotes of plain
 * strings stay, so a specifier can be read back from the original text at the same offset.
 */
export function maskCode(src) {
  const out = src.split('');
  const blank = (from, to) => {
    for (let k = from; k < to; k++) if (out[k] !== '\n') out[k] = ' ';
  };
  const braces = []; // for each open `${`: the brace depth when it opened
  let depth = 0;
  let lastSignificant = ''; // last non-space code character, for telling a regex from a division
  let lastWord = '';
  let i = 0;
  const n = src.length;
  const templateFrom = (start) => {
    // scan a template body from `start`; returns the index after the closing ` or after `${`
    let j = start;
    while (j < n) {
      const c = src[j];
      if (c === '\\') j += 2;
      else if (c === '`') {
        blank(start, j);
        return j + 1;
      } else if (c === '$' && src[j + 1] === '{') {
        blank(start, j);
        braces.push(depth);
        depth++;
        return j + 2;
      } else j++;
    }
    blank(start, n);
    return n;
  };
  while (i < n) {
    const c = src[i];
    const d = src[i + 1];
    if (c === '/' && d === '/') {
      const end = src.indexOf('\n', i);
      const stop = end < 0 ? n : end;
      blank(i, stop);
      i = stop;
    } else if (c === '/' && d === '*') {
      const end = src.indexOf('*/', i + 2);
      const stop = end < 0 ? n : end + 2;
      blank(i, stop);
      i = stop;
    } else if (c === "'" || c === '"') {
      let j = i + 1;
      while (j < n && src[j] !== c && src[j] !== '\n') j += src[j] === '\\' ? 2 : 1;
      blank(i + 1, Math.min(j, n));
      i = j + 1;
      lastSignificant = c;
      lastWord = '';
    } else if (c === '`') {
      i = templateFrom(i + 1);
      lastSignificant = '`';
      lastWord = '';
    } else if (c === '}' && braces.length > 0 && braces[braces.length - 1] === depth - 1) {
      braces.pop();
      depth--;
      i = templateFrom(i + 1);
      lastSignificant = '`';
      lastWord = '';
    } else if (
      c === '/' &&
      (lastSignificant === '' ||
        '(,=:[!&|?{};+-*%<>~^'.includes(lastSignificant) ||
        ['return', 'typeof', 'case', 'do', 'else', 'in', 'of', 'void', 'yield', 'await'].includes(
          lastWord,
        ))
    ) {
      // a regex literal: up to the closing / that is not escaped or inside a [class]
      let j = i + 1;
      let inClass = false;
      while (j < n && src[j] !== '\n') {
        if (src[j] === '\\') j += 2;
        else if (src[j] === '[') ((inClass = true), j++);
        else if (src[j] === ']') ((inClass = false), j++);
        else if (src[j] === '/' && !inClass) break;
        else j++;
      }
      blank(i + 1, Math.min(j, n));
      i = j + 1;
      lastSignificant = '/';
      lastWord = '';
    } else {
      if (c === '{') depth++;
      else if (c === '}') depth--;
      if (!/\s/.test(c)) {
        if (/[\w$]/.test(c)) {
          lastWord = /[\w$]/.test(lastSignificant) ? lastWord + c : c;
        } else lastWord = '';
        lastSignificant = c;
      }
      i++;
    }
  }
  return out.join('');
}

// In masked code a quote is always the opening or closing quote of a string literal.
const IMPORT_PATTERNS = [
  /\bfrom\s*(['"])/g, // import ... from '...', export ... from '...'
  /(?<![.\w$])import\s*(['"])/g, // import '...'
  /(?<![.\w$])import\s*\(\s*(['"])/g, // import('...')
  /(?<![.\w$])require\s*\(\s*(['"])/g, // require('...'), import x = require('...')
];

/** Every module specifier in a TypeScript source: `{ spec, line }`, in source order. */
export function findImports(src) {
  const masked = maskCode(src);
  const found = [];
  for (const re of IMPORT_PATTERNS) {
    for (const m of masked.matchAll(re)) {
      const open = m.index + m[0].length - 1; // the opening quote
      const close = masked.indexOf(m[1], open + 1);
      if (close < 0) continue;
      const line = masked.slice(0, open).split('\n').length;
      found.push({ spec: src.slice(open + 1, close), line, at: open });
    }
  }
  return found.sort((a, b) => a.at - b.at).map(({ spec, line }) => ({ spec, line }));
}

function walk(dir, out) {
  for (const e of readdirSync(dir).sort()) {
    const p = join(dir, e);
    if (statSync(p).isDirectory()) walk(p, out);
    else if (e.endsWith('.ts') && !e.endsWith('.d.ts')) out.push(p);
  }
  return out;
}

const toPosix = (p) => p.split(sep).join('/');

/** The layer of a repo-relative path: the folder under src/, '' for src/ itself, or null. */
function layerOf(rel) {
  const parts = rel.split('/');
  if (parts[0] !== 'src') return null;
  return parts.length > 2 ? parts[1] : '';
}

/**
 * Check every src/**\/*.ts under `root` (the repository root). Returns the violations, each
 * `{ file, line, layer, target, rule, message }` with repo-relative paths, and counts.
 * `temporaryAllow` defaults to TEMPORARY_ALLOW (pass [] for a synthetic tree).
 */
export function checkImports(root, { temporaryAllow = TEMPORARY_ALLOW } = {}) {
  const srcDir = join(root, 'src');
  const files = existsSync(srcDir) ? walk(srcDir, []) : [];
  const violations = [];
  const allowUsed = new Set();
  let imports = 0;
  const report = (file, line, layer, target, rule, message) =>
    violations.push({
      file,
      line,
      layer,
      target,
      rule,
      message: message ?? `${file}:${line}: ${layer || 'src/'} may not import ${target} (${rule})`,
    });

  for (const abs of files) {
    const file = toPosix(relative(root, abs));
    const layer = layerOf(file);
    if (layer === '' && !isTest(file)) {
      const rule = 'code lives in a layer folder under src/; only tests sit in src/ itself';
      report(file, 1, '', '', rule, `${file}:1: ${rule}`);
    } else if (layer !== '' && !(layer in LAYERS)) {
      const rule = `src/${layer}/ is not a layer: add it to LAYERS in scripts/check-imports.mjs`;
      report(file, 1, layer, '', rule, `${file}:1: ${rule}`);
    }
    for (const { spec, line } of findImports(readFileSync(abs, 'utf8'))) {
      if (!spec.startsWith('.')) continue;
      imports++;
      let target = toPosix(relative(root, resolve(dirname(abs), spec)));
      if (target.endsWith('.js')) target = target.slice(0, -3) + '.ts';
      const tLayer = layerOf(target);
      if (tLayer === null || target.startsWith('..')) {
        if (!isTest(file))
          report(file, line, layer, target, 'only tests may import files outside src/');
        continue;
      }
      const testOnly = TEST_ONLY.find((d) => target.startsWith(d));
      if (testOnly && !isTest(file) && !file.startsWith(testOnly)) {
        report(
          file,
          line,
          layer,
          target,
          `${testOnly} is test-only: *.test.ts files may import it`,
        );
        continue;
      }
      if (layer === '' || tLayer === layer) continue; // a test in src/ itself; or same layer
      const allowed = LAYERS[layer];
      if (!allowed) continue; // the file is already reported as outside every layer
      if (!allowed.includes(tLayer)) {
        const may = allowed.length ? allowed.join(', ') : 'nothing of ours';
        report(file, line, layer, target, `${layer} may import: ${may}`);
        continue;
      }
      const through = ONLY_THROUGH.find((r) => r.layer === tLayer && r.importers.includes(layer));
      if (through && !through.files.includes(target)) {
        if (through.layer === 'vmm' && temporaryAllow.includes(file)) {
          allowUsed.add(file);
          continue;
        }
        report(
          file,
          line,
          layer,
          target,
          `${layer} reaches ${tLayer} only through ${through.files.join(', ')}`,
        );
      }
    }
  }
  for (const file of temporaryAllow) {
    if (!allowUsed.has(file)) {
      const rule =
        'TEMPORARY_ALLOW entry no longer needed: remove it from scripts/check-imports.mjs';
      report(file, 1, layerOf(file) ?? '', '', rule, `${file}:1: ${rule}`);
    }
  }
  return { violations, files: files.length, imports };
}

// Run as a script: check this checkout, or the one named on the command line.
if (process.argv[1] && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const root = resolve(process.argv[2] ?? join(dirname(fileURLToPath(import.meta.url)), '..'));
  const { violations, files, imports } = checkImports(root);
  for (const v of violations) console.error(v.message);
  if (violations.length > 0) {
    console.error(`check-imports: ${violations.length} violation(s) in ${files} files`);
    process.exit(1);
  }
  const allow = TEMPORARY_ALLOW.length
    ? ` (${TEMPORARY_ALLOW.length} files in TEMPORARY_ALLOW)`
    : '';
  console.log(`check-imports: ${files} files, ${imports} imports of ours, no violations${allow}`);
}

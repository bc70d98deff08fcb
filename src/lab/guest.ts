// Guest images (kernel, initramfs, rootfs, the lab's kernel+initramfs), built by the bash
// recipes in scripts/guest/ from Debian packages and cached outside the checkout in
// ${TYPERVISOR_CACHE:-~/.cache/typervisor}/<name>-<hash>/. The hash covers the recipe's
// script text and the package versions it reports ("inputs"), so a clean clone reuses a
// cache and a changed recipe rebuilds. Builds go to a temp dir renamed into place, so a
// partial build is never taken for a complete one. ensureImage() also points the symlink
// <cache>/<name> at the dir it returns: the CLI's default guest (src/util/guest-images.ts).
import { createHash } from 'node:crypto';
import { execFileSync } from 'node:child_process';
import {
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  renameSync,
  rmSync,
  statSync,
  symlinkSync,
  writeFileSync,
} from 'node:fs';
import { basename, dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import {
  IMAGE_FILES,
  cacheRoot,
  currentImageLink,
  imageFilePaths,
  type ImageName,
} from '../util/guest-images.js';

export type { ImageName };

interface Recipe {
  script: string;
  /** Other files under scripts/guest/ the image contains or depends on. */
  extra: string[];
  /** Output files, relative to the image dir. */
  files: Readonly<Record<string, string>>;
}

export const RECIPES: Record<ImageName, Recipe> = {
  kernel: { script: 'build-kernel.sh', extra: [], files: IMAGE_FILES.kernel },
  initramfs: { script: 'build-initramfs.sh', extra: ['init.sh'], files: IMAGE_FILES.initramfs },
  rootfs: { script: 'build-rootfs.sh', extra: ['init.sh'], files: IMAGE_FILES.rootfs },
  lab: { script: 'build-lab.sh', extra: ['lab-init.sh', 'lab-kvm-hold.c'], files: IMAGE_FILES.lab },
  generic: { script: 'build-generic.sh', extra: ['init.sh'], files: IMAGE_FILES.generic },
};

/** The checkout root (this file is dist/src/lab/guest.js or src/lab/guest.ts). */
export function repoRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  while (!existsSync(join(dir, 'package.json'))) {
    const up = dirname(dir);
    if (up === dir) throw new Error('typervisor: cannot find the checkout root');
    dir = up;
  }
  return dir;
}

function scriptsDir(): string {
  return join(repoRoot(), 'scripts', 'guest');
}

function runRecipe(script: string, args: string[], capture: boolean): string {
  return execFileSync('bash', [join(scriptsDir(), script), ...args], {
    encoding: 'utf8',
    stdio: ['ignore', capture ? 'pipe' : 'inherit', 'inherit'],
  });
}

/** Where an image lives (whether or not it is built yet). */
export function imageDir(name: ImageName): string {
  const r = RECIPES[name];
  const h = createHash('sha256');
  for (const f of ['lib.sh', r.script, ...r.extra]) {
    h.update(`${f}\0`)
      .update(readFileSync(join(scriptsDir(), f)))
      .update('\0');
  }
  h.update(recipeInputs(name, h.copy().digest('hex')));
  return join(cacheRoot(), `${name}-${h.digest('hex').slice(0, 16)}`);
}

/** The recipe's `inputs` (package versions). apt-cache takes ~1 s a call here, so the answer
 *  is memoized per script text and state of apt's package lists (their names and mtimes). */
function recipeInputs(name: ImageName, scriptHash: string): string {
  const h = createHash('sha256').update(scriptHash);
  for (const dir of ['/var/lib/apt/lists', '/etc/apt/sources.list.d']) {
    let entries: string[] = [];
    try {
      entries = readdirSync(dir).sort();
    } catch {}
    for (const f of entries) h.update(`${f}:${statSync(join(dir, f)).mtimeMs}\n`);
  }
  const memo = join(cacheRoot(), 'inputs', `${name}-${h.digest('hex').slice(0, 16)}`);
  if (existsSync(memo)) return readFileSync(memo, 'utf8');
  const inputs = runRecipe(RECIPES[name].script, ['inputs'], true);
  mkdirSync(dirname(memo), { recursive: true });
  writeFileSync(`${memo}.tmp${process.pid}`, inputs);
  renameSync(`${memo}.tmp${process.pid}`, memo);
  return inputs;
}

export function isBuilt(name: ImageName): boolean {
  return existsSync(imageDir(name));
}

/** Builds the image if missing (or if rebuild), returns its dir. */
export function ensureImage(name: ImageName, opts: { rebuild?: boolean } = {}): string {
  const dir = imageDir(name);
  if (existsSync(dir) && !opts.rebuild) return pointCurrentAt(name, dir);
  mkdirSync(cacheRoot(), { recursive: true });
  const tmp = mkdtempSync(join(cacheRoot(), `.${name}-tmp-`));
  try {
    process.stderr.write(`[guest] building ${name} -> ${dir}\n`);
    runRecipe(RECIPES[name].script, ['build', tmp], false);
    for (const f of Object.values(RECIPES[name].files)) {
      if (!existsSync(join(tmp, f))) throw new Error(`guest: recipe ${name} did not produce ${f}`);
    }
    if (opts.rebuild) rmSync(dir, { recursive: true, force: true });
    try {
      renameSync(tmp, dir);
    } catch (e) {
      // Another process finished the same build first: its result is as good as ours.
      if (!existsSync(dir)) throw e;
    }
  } finally {
    rmSync(tmp, { recursive: true, force: true });
  }
  return pointCurrentAt(name, dir);
}

/** Points <cache>/<name> at dir (relative, replaced atomically); returns dir. */
function pointCurrentAt(name: ImageName, dir: string): string {
  const link = currentImageLink(name);
  let now: string | undefined;
  try {
    now = readlinkSync(link);
  } catch {}
  if (now !== basename(dir)) {
    const tmp = `${link}.tmp${process.pid}`;
    rmSync(tmp, { force: true });
    symlinkSync(basename(dir), tmp);
    renameSync(tmp, link);
  }
  return dir;
}

/** KEY -> absolute path of every output file of the image. */
export function imagePaths(name: ImageName, dir = imageDir(name)): Record<string, string> {
  return imageFilePaths(name, dir);
}

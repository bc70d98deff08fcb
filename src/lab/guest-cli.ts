// `npm run guest -- [paths | build [kernel|initramfs|rootfs|lab|all] [--rebuild]]`
// paths (default): builds the kernel and initramfs if missing and prints KEY=path lines
// (the rootfs and lab lines only when those are built; `build rootfs` is slow).
import { ensureImage, imagePaths, isBuilt, RECIPES, type ImageName } from './guest.js';

function main(argv: string[]): number {
  const rebuild = argv.includes('--rebuild');
  const args = argv.filter((a) => a !== '--rebuild');
  const cmd = args[0] ?? 'paths';
  const all = Object.keys(RECIPES) as ImageName[];
  let names: ImageName[];
  if (cmd === 'paths') {
    names = ['kernel', 'initramfs'];
  } else if (cmd === 'build') {
    const what = args.slice(1);
    if (what.length === 0 || what.includes('all')) names = all;
    else {
      for (const w of what) {
        if (!(w in RECIPES)) return usage(`unknown image '${w}'`);
      }
      names = what as ImageName[];
    }
  } else {
    return usage(`unknown command '${cmd}'`);
  }
  const printed = new Set<ImageName>();
  for (const n of names) {
    for (const [k, p] of Object.entries(imagePaths(n, ensureImage(n, { rebuild })))) {
      console.log(`${k}=${p}`);
    }
    printed.add(n);
  }
  if (cmd === 'paths') {
    for (const n of all) {
      if (!printed.has(n) && isBuilt(n)) {
        // ensureImage does not build a built image; it points <cache>/<name> at it (the CLI's
        // default guest, src/util/guest-images.ts).
        for (const [k, p] of Object.entries(imagePaths(n, ensureImage(n))))
          console.log(`${k}=${p}`);
      }
    }
  }
  return 0;
}

function usage(err: string): number {
  console.error(`guest: ${err}
usage: npm run guest -- [paths | build [kernel|initramfs|rootfs|lab|all] [--rebuild]]`);
  return 2;
}

try {
  process.exitCode = main(process.argv.slice(2));
} catch (e) {
  console.error(`guest: ${(e as Error).message}`);
  process.exitCode = 1;
}

// Where the project's guest images live, shared by their builder (src/lab/guest.ts) and the
// CLI's defaults (`typervisor run` without --kernel, --rootfs), which must not import the lab.
// Each build goes to ${TYPERVISOR_CACHE:-~/.cache/typervisor}/<name>-<hash>/ (the hash covers
// the recipe and its package versions, which only the lab can compute); every time the lab
// hands an image out it points the symlink <cache>/<name> at that dir. The CLI reads through
// the link: the image the lab built or checked last, with no recipe or apt run at startup.
import { homedir } from 'node:os';
import { join, resolve } from 'node:path';

export type ImageName = 'kernel' | 'initramfs' | 'rootfs' | 'lab' | 'generic';

/** The output files of each image: KEY -> file name inside the image dir. */
export const IMAGE_FILES: Readonly<Record<ImageName, Readonly<Record<string, string>>>> = {
  kernel: { KERNEL: 'vmlinuz' },
  initramfs: { INITRAMFS: 'initramfs.cpio.gz' },
  rootfs: { ROOTFS: 'rootfs.ext4' },
  lab: { LAB_KERNEL: 'vmlinux', LAB_INITRAMFS: 'initramfs.cpio.gz' },
  /** Debian's generic kernel (it has CONFIG_VMGENID) and an initramfs with its modules. */
  generic: { GENERIC_KERNEL: 'vmlinux', GENERIC_INITRAMFS: 'initramfs.cpio.gz' },
};

export function cacheRoot(): string {
  return resolve(process.env.TYPERVISOR_CACHE ?? join(homedir(), '.cache', 'typervisor'));
}

/** The symlink to the image's current build (it may not exist yet). */
export function currentImageLink(name: ImageName): string {
  return join(cacheRoot(), name);
}

/** KEY -> absolute path of every output file of the image in `dir` (default: the current build). */
export function imageFilePaths(
  name: ImageName,
  dir = currentImageLink(name),
): Record<string, string> {
  const out: Record<string, string> = {};
  for (const [k, f] of Object.entries(IMAGE_FILES[name])) out[k] = join(dir, f);
  return out;
}

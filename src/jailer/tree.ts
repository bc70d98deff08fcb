/**
 * What a jailed VMM sees besides /dev and its own /run: a minimal read-only tree, each entry
 * bind-mounted at the path the runtime asks for it (docs/jailer.md lists it):
 *  - the node binary at its host path (realpath of process.execPath),
 *  - the shared libraries `ldd` names for node and for the native addon, each at the path the
 *    dynamic loader looks at (the ld.so interpreter included),
 *  - the package's dist/ (the compiled VMM) at /dist, and the addon at
 *    /native/build/Release/typervisor_native.node (src/kvm/native.ts finds it there: dist/../),
 *  - /proc/cpuinfo (the KVM kind check of src/kvm/detect.ts reads the CPU flags),
 *  - plus two files the jailer writes: /<exec name> (the copied launcher, which imports
 *    ../dist/src/cli/main.js, that is /dist/...) and /package.json ({"type":"module"}, so that
 *    Node loads /dist's .js files as ES modules).
 */
import { execFileSync } from 'node:child_process';
import { realpathSync } from 'node:fs';
import { isAbsolute, join } from 'node:path';
import { HostError } from '../util/errors.js';

export interface TreeEntry {
  /** Host path (symlinks resolved). */
  source: string;
  /** Absolute path inside the jail. */
  target: string;
  kind: 'file' | 'dir';
  /** Mounted noexec (dist/: nothing there is executed, only read). */
  noexec: boolean;
}

/** The absolute library paths in `ldd` output; a "not found" library is an error. */
export function parseLdd(text: string): string[] {
  const out: string[] = [];
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (line === '' || line.endsWith(':')) continue;
    if (/=> not found/.test(line)) throw new HostError(`ldd: a shared library is missing: ${line}`);
    const arrow = /=>\s*(\/\S+)\s*\(0x[0-9a-f]+\)$/.exec(line);
    const bare = /^(\/\S+)\s*\(0x[0-9a-f]+\)$/.exec(line);
    const p = arrow?.[1] ?? bare?.[1];
    if (p !== undefined && !out.includes(p)) out.push(p); // vdso lines have no path
  }
  return out;
}

export const ADDON_IN_JAIL = '/native/build/Release/typervisor_native.node';

/** The read-only tree for the package at `pkgRoot` run by the node binary at `nodePath`. */
export function jailTree(pkgRoot: string, nodePath: string, libs: string[]): TreeEntry[] {
  const node = realpathSync(nodePath);
  const entries: TreeEntry[] = [
    { source: node, target: node, kind: 'file', noexec: false },
    { source: realpathSync(join(pkgRoot, 'dist')), target: '/dist', kind: 'dir', noexec: true },
    {
      source: realpathSync(join(pkgRoot, ADDON_IN_JAIL)),
      target: ADDON_IN_JAIL,
      kind: 'file',
      noexec: false,
    },
  ];
  // The VMM tells a hardware KVM from a PVM-only one by the CPU flags (src/kvm/detect.ts) and
  // refuses stock kernels on the latter; without this file it would refuse them everywhere.
  // Nothing beyond what the unprivileged CPUID instruction already tells.
  entries.push({ source: '/proc/cpuinfo', target: '/proc/cpuinfo', kind: 'file', noexec: true });
  for (const lib of libs) {
    if (!isAbsolute(lib)) throw new HostError(`ldd named a relative library path: ${lib}`);
    if (entries.some((e) => e.target === lib)) continue;
    entries.push({ source: realpathSync(lib), target: lib, kind: 'file', noexec: false });
  }
  return entries;
}

/** Runs ldd on node and the addon (before the jail exists: it forks). */
export function sharedLibraries(nodePath: string, addon: string): string[] {
  let text: string;
  try {
    text = execFileSync('ldd', [realpathSync(nodePath), realpathSync(addon)], {
      encoding: 'utf8',
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { PATH: '/usr/bin:/bin', LC_ALL: 'C' },
      timeout: 10_000,
    });
  } catch (e) {
    throw new HostError(`ldd failed on ${nodePath} and ${addon}: ${(e as Error).message}`);
  }
  return parseLdd(text);
}

/**
 * Replacing this process in place: execve(2) through the shim (every thread goes, the pid
 * stays). `typervisor serve` re-executes itself so with its V8 heap flags (src/daemon/heap.ts),
 * before it has started any thread of its own.
 */
import { native } from '../kvm/native.js';

/**
 * execve(path, argv, env) keeping stdin, stdout and stderr (Node marks them close-on-exec);
 * every other descriptor is left as it is (Node's own are close-on-exec). Returns only by
 * throwing (the shim missing, or execve's error).
 */
export function execInPlace(path: string, argv: string[], env: Record<string, string>): never {
  const n = native();
  for (const fd of [0, 1, 2]) {
    try {
      n.setInheritable(fd);
    } catch {
      // closed: Node opens /dev/null in its place at start-up
    }
  }
  return n.execve(
    path,
    argv,
    Object.entries(env).map(([k, v]) => `${k}=${v}`),
  );
}

/**
 * Errors as values: every library call that can fail resolves to a `Result`, never rejects and
 * never throws (a programming error inside the library is returned as `INTERNAL`). The error is
 * a `VmError`: an Error with a stable `code` to branch on and a one-line `message` for people.
 */
import { ConfigError, HostError, ImageError } from '../util/errors.js';

/**
 * Why a call failed. Stable within a minor version (semver 0.x: a new code may be added in a
 * minor release; none is removed or renamed without a major one).
 *  - `INVALID_CONFIG`: the VmResources (or an option) is wrong; nothing was created.
 *  - `BAD_IMAGE`: the kernel or initrd cannot be read or loaded (missing, not a kernel, too big).
 *  - `HOST`: this host cannot run it (no /dev/kvm, a missing KVM capability, a PVM-only host).
 *  - `INVALID_STATE`: the VM is not in a state that allows the call (e.g. pause a stopped VM).
 *  - `TIMEOUT`: the VM did not do it in time (a pause), and was left as it was.
 *  - `CLOSED`: the VmHost was closed.
 *  - `INTERNAL`: anything else (a bug of ours: please report it with the message).
 */
export type VmErrorCode =
  'INVALID_CONFIG' | 'BAD_IMAGE' | 'HOST' | 'INVALID_STATE' | 'TIMEOUT' | 'CLOSED' | 'INTERNAL';

export class VmError extends Error {
  override readonly name = 'VmError';
  constructor(
    readonly code: VmErrorCode,
    message: string,
  ) {
    super(message);
  }
}

/** What a fallible call resolves to: `if (!r.ok) handle(r.error.code)` else use `r.value`. */
export type Result<T> = { ok: true; value: T } | { ok: false; error: VmError };

export const ok = <T>(value: T): Result<T> => ({ ok: true, value });
export const fail = <T = never>(code: VmErrorCode, message: string): Result<T> => ({
  ok: false,
  error: new VmError(code, message),
});

/** An exception from the VMM, as the error value the library returns. */
export function toVmError(e: unknown, fallback: VmErrorCode = 'INTERNAL'): VmError {
  if (e instanceof VmError) return e;
  const message = e instanceof Error ? e.message : String(e);
  if (e instanceof ConfigError) return new VmError('INVALID_CONFIG', message);
  if (e instanceof ImageError) return new VmError('BAD_IMAGE', message);
  if (e instanceof HostError) return new VmError('HOST', message);
  return new VmError(fallback, message);
}

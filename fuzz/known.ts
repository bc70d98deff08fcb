/**
 * Findings the fuzzer reproduces in code other helpers own (see FINDINGS.md): the smoke test
 * in CI tolerates these (and says so) and fails on anything else. Remove an entry once its
 * bug is fixed; an entry nothing matches any more is reported by the smoke as stale.
 */
export interface KnownFinding {
  id: string;
  /** Matches the failure message. */
  pattern: RegExp;
  summary: string;
}

export const KNOWN: KnownFinding[] = [];

export function knownFinding(message: string): KnownFinding | undefined {
  return KNOWN.find((k) => k.pattern.test(message));
}

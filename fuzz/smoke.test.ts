/**
 * The fuzz campaign's smoke run for CI: every target of `npm run fuzz` for a fiftieth of its
 * cases (fixed seed 2026, or TYPERVISOR_FUZZ_SEED), in this process. It fails on any failure
 * that is not a known finding (known.ts, FINDINGS.md), and notes the known ones it saw.
 */
import { test, after } from 'node:test';
import assert from 'node:assert/strict';
import { runTarget } from './core.js';
import { KNOWN, knownFinding } from './known.js';
import { stopRacer } from './racer.js';
import { TARGETS } from './targets/index.js';

const SEED = Number(process.env.TYPERVISOR_FUZZ_SEED ?? 2026) >>> 0;

after(() => stopRacer());

const seen = new Set<string>();

for (const t of TARGETS) {
  test(`fuzz smoke: ${t.name} (${t.what})`, async (tc) => {
    const cases = Math.max(200, Math.floor(t.cases / 50));
    const r = await runTarget(t, { seed: SEED, cases });
    assert.equal(r.cases, cases);
    const unknown = r.failures.filter((f) => {
      const k = knownFinding(f.message);
      if (k) seen.add(k.id);
      return !k;
    });
    for (const f of r.failures) {
      const k = knownFinding(f.message);
      if (k) tc.diagnostic(`known ${k.id}: ${f.count}x (first: case ${f.case})`);
    }
    assert.equal(r.failureShapesDropped, 0, 'more distinct failures than kept');
    assert.deepEqual(
      unknown.map(
        (f) =>
          `case ${f.case}: ${f.message} (replay: npm run fuzz -- --target ${t.name} --seed ${SEED} --from ${f.sessionStart} --cases ${f.case - f.sessionStart + 1})`,
      ),
      [],
    );
  });
}

test('fuzz smoke: known findings still seen', (tc) => {
  const stale = KNOWN.filter((k) => !seen.has(k.id)).map((k) => k.id);
  // Not a failure (a fix elsewhere makes one stale, and the racing ones are timing-dependent).
  if (stale.length > 0) tc.diagnostic(`known findings not seen this run: ${stale.join(', ')}`);
});

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { ConfigError } from '../util/errors.js';
import { SnapshotFileError } from './snapshot-format.js';
import { SnapshotError } from './snapshot.js';

test("snapshot errors name themselves (src/util/errors.ts keepName: the bundles' minifier renames classes)", () => {
  for (const [C, name] of [
    [SnapshotFileError, 'SnapshotFileError'],
    [SnapshotError, 'SnapshotError'],
  ] as const) {
    const e = new C('why');
    assert.equal(e.name, name);
    assert.ok(e.stack?.startsWith(`${name}: why\n`), e.stack);
    assert.ok(e instanceof ConfigError);
  }
});

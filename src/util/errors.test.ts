import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  ConfigError,
  GuestMemoryError,
  HostError,
  ImageError,
  TypervisorError,
  keepName,
} from './errors.js';

test('every error class a user may see names itself, whatever a minifier calls the class', () => {
  const classes: [new (m: string) => Error, string][] = [
    [TypervisorError, 'TypervisorError'],
    [ConfigError, 'ConfigError'],
    [HostError, 'HostError'],
    [ImageError, 'ImageError'],
    [GuestMemoryError, 'GuestMemoryError'],
  ];
  for (const [C, name] of classes) {
    const e = new C('why');
    assert.equal(e.name, name);
    assert.equal(String(e), `${name}: why`);
    assert.ok(e.stack?.startsWith(`${name}: why\n`), e.stack);
  }
});

test('keepName gives a renamed class its name back, and its errors that name', () => {
  // What esbuild's minifier makes of `class ConfigError extends TypervisorError {}`.
  const Qe = class extends TypervisorError {};
  assert.equal(new Qe('x').name, 'Qe');
  keepName(Qe, 'SomeError');
  assert.equal(Qe.name, 'SomeError');
  assert.equal(new Qe('x').name, 'SomeError');
  assert.ok(new Qe('x') instanceof TypervisorError);
});

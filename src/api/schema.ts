/**
 * A small JSON-schema subset and its validator, for API bodies and the config file. We write
 * our own schemas from Firecracker's OpenAPI description (the contract) in schemas.ts; this file
 * only knows how to check a parsed JSON value against one and say, in one line, which field is
 * wrong. Semantics follow serde's `deny_unknown_fields` + `Option<T>` as Firecracker uses them:
 * unknown fields are errors, a missing required field is an error, and `null` for an optional
 * field means "absent".
 */

interface Described {
  description?: string;
}
export type Schema = Described &
  (
    | {
        type: 'string';
        enum?: readonly string[];
        maxLength?: number;
        pattern?: RegExp;
        patternText?: string;
      }
    | { type: 'integer'; minimum: number; maximum: number }
    | { type: 'boolean' }
    | { type: 'array'; items: Schema; maxItems: number }
    | {
        type: 'object';
        properties: Readonly<Record<string, Schema>>;
        required?: readonly string[];
        /** A map with free keys (e.g. metrics properties): every value must match this. */
        values?: Schema;
        maxProperties?: number;
      }
  );

/** Longest path we accept anywhere (Linux PATH_MAX). */
export const PATH_MAX = 4096;

function kindOf(v: unknown): string {
  if (v === null) return 'null';
  if (Array.isArray(v)) return 'an array';
  if (typeof v === 'number') return Number.isInteger(v) ? 'an integer' : 'a number';
  if (typeof v === 'string') return 'a string';
  if (typeof v === 'boolean') return 'a boolean';
  return 'an object';
}

function expected(s: Schema): string {
  switch (s.type) {
    case 'string':
      return s.enum ? `one of ${s.enum.map((e) => `"${e}"`).join(', ')}` : 'a string';
    case 'integer':
      return `an integer from ${s.minimum} to ${s.maximum}`;
    case 'boolean':
      return 'a boolean';
    case 'array':
      return 'an array';
    case 'object':
      return 'an object';
  }
}

const fieldName = (path: string) => (path === '' ? 'the body' : `field \`${path}\``);

/**
 * Checks `value` against `schema`. Returns undefined when it conforms, or a one-line message
 * naming the first offending field (dotted path, array indexes in brackets).
 */
export function check(schema: Schema, value: unknown, path = ''): string | undefined {
  switch (schema.type) {
    case 'string': {
      if (typeof value !== 'string')
        return `${fieldName(path)}: expected ${expected(schema)}, got ${kindOf(value)}`;
      if (schema.enum && !schema.enum.includes(value)) {
        return `${fieldName(path)}: expected ${expected(schema)}, got ${JSON.stringify(value.slice(0, 64))}`;
      }
      if (schema.maxLength !== undefined && value.length > schema.maxLength) {
        return `${fieldName(path)}: longer than ${schema.maxLength} characters`;
      }
      if (schema.pattern && !schema.pattern.test(value)) {
        return `${fieldName(path)}: ${schema.patternText ?? 'has an invalid format'} (got ${JSON.stringify(value.slice(0, 64))})`;
      }
      return undefined;
    }
    case 'integer':
      if (typeof value !== 'number' || !Number.isInteger(value)) {
        return `${fieldName(path)}: expected ${expected(schema)}, got ${kindOf(value)}`;
      }
      if (value < schema.minimum || value > schema.maximum) {
        return `${fieldName(path)}: expected ${expected(schema)}, got ${value}`;
      }
      return undefined;
    case 'boolean':
      return typeof value === 'boolean'
        ? undefined
        : `${fieldName(path)}: expected a boolean, got ${kindOf(value)}`;
    case 'array': {
      if (!Array.isArray(value))
        return `${fieldName(path)}: expected an array, got ${kindOf(value)}`;
      if (value.length > schema.maxItems)
        return `${fieldName(path)}: more than ${schema.maxItems} items`;
      for (let i = 0; i < value.length; i++) {
        const e = check(schema.items, value[i], `${path}[${i}]`);
        if (e) return e;
      }
      return undefined;
    }
    case 'object': {
      if (typeof value !== 'object' || value === null || Array.isArray(value)) {
        return `${fieldName(path)}: expected an object, got ${kindOf(value)}`;
      }
      const obj = value as Record<string, unknown>;
      const keys = Object.keys(obj);
      if (schema.values) {
        if (schema.maxProperties !== undefined && keys.length > schema.maxProperties) {
          return `${fieldName(path)}: more than ${schema.maxProperties} entries`;
        }
        for (const k of keys) {
          const e = check(schema.values, obj[k], path ? `${path}.${k}` : k);
          if (e) return e;
        }
        return undefined;
      }
      const known = Object.keys(schema.properties);
      for (const k of keys) {
        if (!Object.hasOwn(schema.properties, k)) {
          const where = path ? ` in \`${path}\`` : '';
          return `unknown field \`${k.slice(0, 64)}\`${where}, expected one of ${known.map((n) => `\`${n}\``).join(', ')}`;
        }
      }
      for (const r of schema.required ?? []) {
        if (!Object.hasOwn(obj, r) || obj[r] === null)
          return `missing field \`${path ? `${path}.${r}` : r}\``;
      }
      for (const k of keys) {
        if (obj[k] === null) continue; // an optional field set to null is absent (serde Option)
        const e = check(schema.properties[k]!, obj[k], path ? `${path}.${k}` : k);
        if (e) return e;
      }
      return undefined;
    }
  }
}

/**
 * A deep copy of a value that passed `check`, with optional fields that were `null` removed,
 * so the rest of the VMM sees only present-or-absent fields.
 */
export function stripNulls<T>(value: T): T {
  if (Array.isArray(value)) return value.map((v) => stripNulls(v)) as T;
  if (typeof value === 'object' && value !== null) {
    const out: Record<string, unknown> = {};
    for (const [k, v] of Object.entries(value)) if (v !== null) out[k] = stripNulls(v);
    return out as T;
  }
  return value;
}

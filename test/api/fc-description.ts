/**
 * Firecracker's published API description (Swagger 2.0), vendored as test/api/firecracker-api.json
 * by scripts/firecracker-api-to-json.py, turned into JSON-schema validators (ajv): the list of
 * operations (path x method) with their documented responses, a check of a response (status
 * documented for the operation; a 2xx body against its schema, an error body against the
 * Error schema), and a check of a request body against the operation's body parameter.
 */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { Ajv, type ValidateFunction } from 'ajv';
import { REPO } from './client.js';

/* eslint-disable @typescript-eslint/no-explicit-any */
type Json = any;

export const DESCRIPTION_FILE = join(REPO, 'test', 'api', 'firecracker-api.json');

export interface Operation {
  method: 'GET' | 'PUT' | 'PATCH';
  /** As written in the description, e.g. /drives/{drive_id}. */
  path: string;
  operationId: string;
  /** Documented status codes ("200", "204", "400", "404", "default"), each with its schema. */
  responses: Record<string, { schema?: Json }>;
  /** The body parameter's schema, when the operation takes one. */
  bodySchema?: Json;
}

export interface Description {
  version: string;
  operations: Operation[];
  /**
   * Problems with a response, [] when it conforms. With `contentType` (the header as received),
   * a response with a body must say the media type the description produces.
   */
  checkResponse(op: Operation, status: number, body: string, contentType?: string): string[];
  /** Problems with a request body we send, [] when it conforms. */
  checkRequest(op: Operation, body: unknown): string[];
  /** A validator for one definition (e.g. "Error"). */
  definition(name: string): ValidateFunction;
}

/** The description's "#/definitions/X" refs, made absolute to the schema registered as "fc". */
function absolute(schema: Json): Json {
  return JSON.parse(JSON.stringify(schema).replaceAll('"#/definitions/', '"fc#/definitions/'));
}

/**
 * The definitions with `additionalProperties: false` on every object schema that lists its
 * properties and says nothing about others: an answer may then carry only documented fields.
 */
function closed(node: Json): Json {
  if (Array.isArray(node)) return node.map(closed);
  if (node === null || typeof node !== 'object') return node;
  const out: Json = {};
  for (const [k, v] of Object.entries(node))
    out[k] = k === 'properties' ? closedProps(v) : closed(v);
  if (node.properties && node.additionalProperties === undefined) out.additionalProperties = false;
  return out;
}
function closedProps(props: Json): Json {
  const out: Json = {};
  for (const [name, schema] of Object.entries(props)) out[name] = closed(schema);
  return out;
}

/**
 * Every property an object schema does not list as required may also be null: Firecracker
 * serialises its unset `Option` fields as null (GET /vm/config's `balloon`, a drive's
 * `partuuid`, ...), which its Swagger 2.0 description cannot say (no `nullable` there).
 */
function nullableOptional(node: Json): Json {
  if (Array.isArray(node)) return node.map(nullableOptional);
  if (node === null || typeof node !== 'object') return node;
  const out: Json = {};
  for (const [k, v] of Object.entries(node)) out[k] = k === 'properties' ? v : nullableOptional(v);
  if (node.properties && typeof node.properties === 'object') {
    const required = new Set<string>(Array.isArray(node.required) ? node.required : []);
    const props: Json = {};
    for (const [name, schema] of Object.entries(node.properties as Json)) {
      const inner = nullableOptional(schema);
      props[name] = required.has(name) ? inner : { anyOf: [inner, { type: 'null' }] };
    }
    out.properties = props;
  }
  return out;
}

/**
 * `strict`: no undocumented fields in answers (the description itself allows them; Firecracker's
 * clients that compare configurations for equality do not).
 */
export function loadDescription(file = DESCRIPTION_FILE, strict = false): Description {
  const doc = JSON.parse(readFileSync(file, 'utf8')) as Json;
  if (doc.swagger !== '2.0' || typeof doc.paths !== 'object' || typeof doc.definitions !== 'object')
    throw new Error(`${file}: not a Swagger 2.0 description with paths and definitions`);
  // Swagger 2.0 schemas are JSON-schema draft 4 plus annotations (example, readOnly, x-...):
  // strict off so the annotations are ignored; formats (int64, int32, an IP pattern named as a
  // format) are Swagger's type hints, not checked.
  const ajv = new Ajv({ strict: false, allErrors: true, validateFormats: false });
  const definitions = nullableOptional(doc.definitions);
  ajv.addSchema({ $id: 'fc', definitions: strict ? closed(definitions) : definitions });
  const cache = new Map<string, ValidateFunction>();
  const compile = (schema: Json): ValidateFunction => {
    const key = JSON.stringify(schema);
    let v = cache.get(key);
    if (!v) {
      v = ajv.compile(absolute(schema));
      cache.set(key, v);
    }
    return v;
  };
  const errorsOf = (v: ValidateFunction): string =>
    (v.errors ?? []).map((e) => `${e.instancePath || '(body)'} ${e.message}`).join('; ');

  const produces: string[] = doc.produces ?? ['application/json'];
  const operations: Operation[] = [];
  for (const [path, item] of Object.entries<Json>(doc.paths)) {
    for (const [m, op] of Object.entries<Json>(item)) {
      const method = m.toUpperCase();
      if (method !== 'GET' && method !== 'PUT' && method !== 'PATCH')
        throw new Error(`${file}: ${m} ${path}: a method this test does not know`);
      const body = (op.parameters ?? []).find((p: Json) => p.in === 'body');
      operations.push({
        method,
        path,
        operationId: op.operationId,
        responses: op.responses,
        bodySchema: body?.schema,
      });
    }
  }

  return {
    version: String(doc.info?.version),
    operations,
    definition: (name) => {
      if (!doc.definitions[name]) throw new Error(`no definition ${name}`);
      return compile({ $ref: `#/definitions/${name}` });
    },
    checkRequest(op, body) {
      if (!op.bodySchema) return body === undefined ? [] : ['the operation takes no body'];
      const v = compile(op.bodySchema);
      return v(body) ? [] : [`request body: ${errorsOf(v)}`];
    },
    checkResponse(op, status, body, contentType) {
      const problems: string[] = [];
      if (contentType !== undefined && status !== 204) {
        const media = contentType.split(';')[0]!.trim().toLowerCase();
        if (!produces.includes(media))
          problems.push(`Content-Type ${contentType}, the description produces ${produces.join()}`);
      }
      const codes = Object.keys(op.responses).filter((c) => c !== 'default');
      const errorCodes = codes.filter((c) => Number(c) >= 400);
      let doc = op.responses[String(status)];
      if (!doc) {
        // "default" documents every other answer, but a status is only "documented" when it is
        // listed, or when it is an error and the operation lists no error status of its own.
        if (status >= 400 && errorCodes.length === 0 && op.responses.default)
          doc = op.responses.default;
        else
          problems.push(
            `status ${status} is not documented for ${op.method} ${op.path} (documented: ${codes.join(', ')})`,
          );
      }
      if (status === 204) {
        if (body !== '') problems.push(`a 204 with a body: ${JSON.stringify(body)}`);
        return problems;
      }
      let json: unknown;
      try {
        json = JSON.parse(body);
      } catch {
        problems.push(`body is not JSON: ${JSON.stringify(body.slice(0, 200))}`);
        return problems;
      }
      const schema = doc?.schema ?? (status >= 400 ? { $ref: '#/definitions/Error' } : undefined);
      if (schema) {
        const v = compile(schema);
        if (!v(json)) problems.push(`body ${errorsOf(v)}: ${body.slice(0, 300)}`);
      } else problems.push(`status ${status} documents no body, got ${body.slice(0, 200)}`);
      if (status >= 400) {
        // Clients print fault_message: the schema leaves it optional, we always send it.
        const fm = (json as { fault_message?: unknown } | null)?.fault_message;
        if (typeof fm !== 'string' || fm === '') problems.push('error body without fault_message');
      }
      return problems;
    },
  };
}

/**
 * The MMDS data store and its configuration (Firecracker's docs/mmds/mmds-user-guide.md): a JSON
 * value set by PUT /mmds, changed by PATCH /mmds (a JSON merge patch, RFC 7396), read by GET
 * /mmds and, from the guest, through the responder (responder.ts) as JSON or in the IMDS format.
 *
 * The store is "not initialised" until the first PUT (or --metadata): a PATCH before then is
 * refused, as Firecracker refuses it. Its serialised size may not exceed the limit
 * (--mmds-size-limit); a PUT or PATCH over it changes nothing.
 */

export type MmdsVersion = 'V1' | 'V2';

/** PUT /mmds/config, checked (the interfaces' existence is the controller's check). */
export interface MmdsConfig {
  version?: MmdsVersion;
  network_interfaces: string[];
  ipv4_address?: string;
  imds_compat?: boolean;
}

export const MMDS_DEFAULT_IPV4 = '169.254.169.254';
/** Firecracker's default limit: the API's default payload limit. */
export const MMDS_DEFAULT_SIZE_LIMIT = 51_200;

/** Firecracker's messages (MmdsDatastoreError, MmdsConfigError). */
export const MMDS_NOT_INITIALIZED = 'The MMDS data store is not initialized.';
export const MMDS_LIMIT_EXCEEDED = "The MMDS patch request doesn't fit.";
export const MMDS_BAD_IPV4 =
  'The MMDS IPv4 address is not link local (it must be 169.254.1.0 to 169.254.254.255).';
export const MMDS_NO_IFACES =
  'The list of network interface IDs that allow forwarding MMDS requests is empty.';

/**
 * RFC 3927 link-local as Firecracker accepts it (utils/net/ipv4addr.rs): 169.254.x.y with x not
 * 0 and not 255. Returns the four octets, or undefined.
 */
export function parseLinkLocal(s: string): [number, number, number, number] | undefined {
  const m = /^(\d{1,3})\.(\d{1,3})\.(\d{1,3})\.(\d{1,3})$/.exec(s);
  if (!m) return undefined;
  const o = m.slice(1).map(Number) as [number, number, number, number];
  if (o.some((x, i) => x > 255 || (m[i + 1]!.length > 1 && m[i + 1]!.startsWith('0'))))
    return undefined;
  if (o[0] !== 169 || o[1] !== 254 || o[2] === 0 || o[2] === 255) return undefined;
  return o;
}

/** A config's problem (Firecracker's wording where it has one), or undefined. */
export function checkMmdsConfig(c: MmdsConfig, ifaces: readonly string[]): string | undefined {
  if (c.ipv4_address !== undefined && !parseLinkLocal(c.ipv4_address)) return MMDS_BAD_IPV4;
  if (c.network_interfaces.length === 0) return MMDS_NO_IFACES;
  const unknown = c.network_interfaces.find((id) => !ifaces.includes(id));
  if (unknown !== undefined)
    return `The list of network interface IDs provided contains at least one ID that does not correspond to any existing network interface (${JSON.stringify(unknown.slice(0, 64))}).`;
  return undefined;
}

/** RFC 7396: `patch` merged into `target` (a new value; neither argument is changed). */
export function mergePatch(target: unknown, patch: unknown): unknown {
  if (!isObject(patch)) return patch;
  const out: Record<string, unknown> = isObject(target) ? { ...target } : {};
  for (const [k, v] of Object.entries(patch)) {
    if (v === null) delete out[k];
    // Defined, not assigned: a key "__proto__" (JSON.parse makes it an own key) stays data.
    else
      Object.defineProperty(out, k, {
        value: mergePatch(Object.hasOwn(out, k) ? out[k] : undefined, v),
        enumerable: true,
        writable: true,
        configurable: true,
      });
  }
  return out;
}

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

/** serde_json's recursion limit: a /mmds body nested deeper is refused. */
export const MMDS_MAX_DEPTH = 128;

/** How deep a JSON value nests (a scalar: 0); stops counting past MMDS_MAX_DEPTH + 1. */
export function jsonDepth(v: unknown): number {
  let max = 0;
  const stack: Array<[unknown, number]> = [[v, 0]];
  while (stack.length > 0) {
    const [x, d] = stack.pop()!;
    if (typeof x !== 'object' || x === null) continue;
    if (d + 1 > max) max = d + 1;
    if (max > MMDS_MAX_DEPTH) return max;
    for (const y of Array.isArray(x) ? x : Object.values(x)) stack.push([y, d + 1]);
  }
  return max;
}

export type StoreResult = { ok: true } | { ok: false; error: string };

/** The data store as the API (main thread) holds it. */
export class MmdsStore {
  private data: unknown = undefined;
  private json = '{}';

  constructor(readonly limit: number = MMDS_DEFAULT_SIZE_LIMIT) {}

  get initialized(): boolean {
    return this.data !== undefined;
  }

  /** GET /mmds: the store as JSON text ({} before the first PUT, as Firecracker answers). */
  text(): string {
    return this.json;
  }

  value(): unknown {
    return this.data ?? {};
  }

  put(v: unknown): StoreResult {
    return this.commit(v);
  }

  patch(p: unknown): StoreResult {
    if (!this.initialized) return { ok: false, error: MMDS_NOT_INITIALIZED };
    return this.commit(mergePatch(this.data, p));
  }

  private commit(v: unknown): StoreResult {
    const text = JSON.stringify(v);
    if (Buffer.byteLength(text) > this.limit) return { ok: false, error: MMDS_LIMIT_EXCEEDED };
    this.data = v;
    this.json = v === null ? '{}' : text;
    return { ok: true };
  }
}

export type Lookup =
  { ok: true; body: string; json: boolean } | { ok: false; status: 400 | 404; error: string };

/**
 * A guest's GET of `path` (a JSON pointer: "/latest/meta-data/ami-id"; a trailing "/" and the
 * empty path name the node itself) in the store `root`. IMDS format: a string is its value, an
 * object is its keys one per line (objects end with "/"); other types cannot be shown so.
 */
export function lookup(root: unknown, path: string, json: boolean): Lookup {
  let node: unknown = root ?? {};
  const parts = path.split('/').filter((p) => p !== '');
  for (const raw of parts) {
    const key = raw.replace(/~1/g, '/').replace(/~0/g, '~');
    if (Array.isArray(node) && /^(0|[1-9]\d{0,8})$/.test(key)) node = node[Number(key)];
    else if (isObject(node) && Object.prototype.hasOwnProperty.call(node, key)) node = node[key];
    else node = undefined;
    if (node === undefined)
      return { ok: false, status: 404, error: `Resource not found: ${path}.` };
  }
  if (json) return { ok: true, body: JSON.stringify(node), json: true };
  if (typeof node === 'string') return { ok: true, body: node, json: false };
  if (isObject(node))
    return {
      ok: true,
      body: Object.entries(node)
        .map(([k, v]) => (isObject(v) ? `${k}/` : k))
        .join('\n'),
      json: false,
    };
  return {
    ok: false,
    status: 400,
    error: 'Cannot retrieve value. The value has an unsupported type.',
  };
}

/**
 * The daemon's HTTP API (docs/daemon.md): method + path + body -> a DaemonAction, or the 400
 * fault naming what is wrong. A VM is created from Firecracker's full configuration (the
 * --config-file shape, checked by the same parser, src/api/config-file.ts) or from a snapshot
 * (the body of PUT /snapshot/load, checked the same way); nothing is started for a request that
 * is refused here.
 */
import { readFileSync } from 'node:fs';
import { parseVmConfig, SNAPSHOT_LOAD_SECTION } from '../api/config-file.js';
import type { VmmAction } from '../api/routes.js';

/** A VM's id: also a file name in the state directory (`<id>.sock`). */
export const VM_ID_PATTERN = /^[A-Za-z0-9_-]{1,64}$/;
/** The daemon's own field in a create body (the rest is the configuration). */
export const VM_ID_FIELD = 'vm_id';
export const SNAPSHOT_FIELD = 'snapshot';

export type CreateRequest =
  | { kind: 'config'; id?: string; config: Record<string, unknown>; actions: VmmAction[] }
  | { kind: 'snapshot'; id?: string; load: Record<string, unknown>; actions: VmmAction[] };

export type DaemonAction =
  | { kind: 'GetDaemon' }
  | { kind: 'GetPool' }
  | { kind: 'ListVms' }
  | { kind: 'CreateVm'; request: CreateRequest }
  | { kind: 'GetVm'; id: string }
  | { kind: 'GetConsole'; id: string }
  | { kind: 'WaitVm'; id: string }
  | { kind: 'StopVm'; id: string }
  | { kind: 'DeleteVm'; id: string };

export interface DaemonRouted {
  action?: DaemonAction;
  fault?: string;
  metric?: [string, string];
}

/** The body of POST /vms -> a CreateRequest, or a fault naming the problem. */
export function parseCreate(body: string): { request: CreateRequest } | { fault: string } {
  let json: unknown;
  try {
    json = JSON.parse(body);
  } catch (e) {
    return { fault: `the body is not JSON: ${(e as Error).message}` };
  }
  if (typeof json !== 'object' || json === null || Array.isArray(json))
    return { fault: 'the body must be a JSON object: a VM configuration or {"snapshot": {...}}' };
  const o = { ...(json as Record<string, unknown>) };
  let id: string | undefined;
  if (Object.hasOwn(o, VM_ID_FIELD)) {
    const v = o[VM_ID_FIELD];
    if (typeof v !== 'string' || !VM_ID_PATTERN.test(v))
      return { fault: `${VM_ID_FIELD} must be 1-64 letters, digits, '-' or '_'` };
    id = v;
    delete o[VM_ID_FIELD];
  }
  if (Object.hasOwn(o, SNAPSHOT_FIELD)) {
    const others = Object.keys(o).filter((k) => k !== SNAPSHOT_FIELD);
    if (others.length > 0)
      return {
        fault: `"${others[0]}" cannot be used with "${SNAPSHOT_FIELD}": the snapshot decides the VM`,
      };
    const load = o[SNAPSHOT_FIELD];
    if (typeof load !== 'object' || load === null || Array.isArray(load))
      return { fault: `"${SNAPSHOT_FIELD}" must be an object: the body of PUT /snapshot/load` };
    const r = parseVmConfig(JSON.stringify({ [SNAPSHOT_LOAD_SECTION]: load }));
    if ('fault' in r) return { fault: r.fault.replaceAll(SNAPSHOT_LOAD_SECTION, SNAPSHOT_FIELD) };
    return {
      request: { kind: 'snapshot', id, load: load as Record<string, unknown>, actions: r.actions },
    };
  }
  if (!Object.hasOwn(o, 'boot-source'))
    return { fault: 'missing "boot-source": a VM configuration needs a kernel to boot' };
  const r = parseVmConfig(JSON.stringify(o));
  if ('fault' in r) return r;
  return { request: { kind: 'config', id, config: o, actions: r.actions } };
}

export function routeDaemon(method: string, url: string, body: string | undefined): DaemonRouted {
  const path = url.split('?')[0] ?? '';
  const parts = path.replace(/^\/+/, '').replace(/\/+$/, '').split('/');
  const invalid: DaemonRouted = { fault: `Invalid request method and/or path: ${method} ${path}.` };
  const noBody = (action: DaemonAction): DaemonRouted =>
    body !== undefined && body.trim() !== ''
      ? { fault: `${method} ${path} takes no body.` }
      : { action };
  const [top, id, sub, ...extra] = parts;
  if (extra.length > 0) return invalid;
  if (top === '' && parts.length === 1)
    return method === 'GET' ? noBody({ kind: 'GetDaemon' }) : invalid;
  if (top === 'pool' && id === undefined)
    return method === 'GET' ? noBody({ kind: 'GetPool' }) : invalid;
  if (top !== 'vms') return invalid;
  if (id === undefined) {
    if (method === 'GET') return noBody({ kind: 'ListVms' });
    if (method !== 'POST') return invalid;
    if (body === undefined || body.trim() === '')
      return { fault: 'POST /vms needs a body: a VM configuration or {"snapshot": {...}}' };
    const r = parseCreate(body);
    return 'fault' in r
      ? { fault: r.fault, metric: ['daemon', 'create'] }
      : { action: { kind: 'CreateVm', request: r.request }, metric: ['daemon', 'create'] };
  }
  if (!VM_ID_PATTERN.test(id))
    return { fault: `Invalid VM id "${id.slice(0, 80)}": 1-64 letters, digits, '-' or '_'.` };
  if (sub === undefined) {
    if (method === 'GET') return noBody({ kind: 'GetVm', id });
    if (method === 'DELETE') return noBody({ kind: 'DeleteVm', id });
    return invalid;
  }
  if (sub === 'stop' && method === 'PUT') return noBody({ kind: 'StopVm', id });
  if (sub === 'console' && method === 'GET') return noBody({ kind: 'GetConsole', id });
  if (sub === 'wait' && method === 'GET') return noBody({ kind: 'WaitVm', id });
  return invalid;
}

/**
 * The Firecracker API calls that configure a fresh VMM with `config` (already checked by
 * parseCreate), in the order the config file applies them, ending with InstanceStart.
 */
export function configRequests(config: Record<string, unknown>): Array<[string, string, unknown]> {
  const out: Array<[string, string, unknown]> = [];
  const put = (path: string, body: unknown) => out.push(['PUT', path, body]);
  const c = config as Record<string, any>; // eslint-disable-line @typescript-eslint/no-explicit-any
  if (c.logger) put('/logger', c.logger);
  if (c.metrics) put('/metrics', c.metrics);
  if (c['machine-config']) put('/machine-config', c['machine-config']);
  // A template given as a file path was read and checked by parseCreate; the VMM gets its JSON.
  const cpu = c['cpu-config'];
  if (typeof cpu === 'string') put('/cpu-config', JSON.parse(readFileSync(cpu, 'utf8')));
  else if (cpu) put('/cpu-config', cpu);
  if (c['boot-source']) put('/boot-source', c['boot-source']);
  for (const d of c.drives ?? []) put(`/drives/${d.drive_id}`, d);
  for (const n of c['network-interfaces'] ?? []) put(`/network-interfaces/${n.iface_id}`, n);
  if (c['mmds-config']) put('/mmds/config', c['mmds-config']);
  if (c.vsock) put('/vsock', c.vsock);
  if (c.entropy) put('/entropy', c.entropy);
  if (c.balloon) put('/balloon', c.balloon);
  for (const p of c.pmem ?? []) put(`/pmem/${p.id}`, p);
  if (c['memory-hotplug']) put('/hotplug/memory', c['memory-hotplug']);
  put('/actions', { action_type: 'InstanceStart' });
  return out;
}

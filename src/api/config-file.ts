/**
 * --config-file: Firecracker's JSON configuration (the same shape GET /vm/config answers), turned
 * into the sequence of actions the equivalent API calls would make, ending with InstanceStart.
 * So a config file goes through exactly the checks the API applies.
 *
 * Or, with a "snapshot-load" section (Typervisor's: Firecracker's --config-file has none), the
 * file restores a snapshot instead of booting: the section is the body of PUT /snapshot/load,
 * with the same fields, rules and errors, and it may come only with "logger" and "metrics" (the
 * API's rule too: a load happens in a process that has configured nothing else; the snapshot
 * decides the VM, and network_overrides / vsock_override re-point its TAPs and vsock socket).
 */
import { readFileSync } from 'node:fs';
import { normalizeCpuConfig, type CpuConfigJson, type VmConfig } from '../vmm/index.js';
import {
  DESERIALIZE_PREFIX,
  LOAD_MISSING_MEM,
  LOAD_TOO_MANY_MEM,
  parseBody,
  type SnapshotLoadBody,
  type VmmAction,
} from './routes.js';
import type { Schema } from './schema.js';
import { FullVmConfiguration, SnapshotLoadParams, UNSUPPORTED_CONFIG_SECTIONS } from './schemas.js';

/** The config file's own section name for a restore (kebab-case, as the other sections). */
export const SNAPSHOT_LOAD_SECTION = 'snapshot-load';
/** Sections a snapshot-load may come with: the process's, not the VM's. */
const WITH_SNAPSHOT_LOAD = ['logger', 'metrics', SNAPSHOT_LOAD_SECTION];

/** FullVmConfiguration plus the snapshot-load section (the body of PUT /snapshot/load). */
const full = FullVmConfiguration as Extract<Schema, { type: 'object' }>;
export const ConfigFileSchema: Schema = {
  ...full,
  description:
    'The content of --config-file: the shape of GET /vm/config, or "snapshot-load" (with "logger" and "metrics" only) to restore a snapshot.',
  properties: { ...full.properties, [SNAPSHOT_LOAD_SECTION]: SnapshotLoadParams },
};

type ConfigFile = Partial<VmConfig> &
  Record<string, unknown> & { [SNAPSHOT_LOAD_SECTION]?: SnapshotLoadBody };

/**
 * The sections of features Typervisor lacks, taken out of the file's text when they are in
 * their empty form (null), as Firecracker's example files carry them; a fault
 * naming the feature when one is not empty. Text that is not a JSON object is returned as it
 * is, for parseBody to report.
 */
function takeEmptySections(text: string): string | { fault: string } {
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch {
    return text;
  }
  if (typeof json !== 'object' || json === null || Array.isArray(json)) return text;
  const o = json as Record<string, unknown>;
  for (const k of [...UNSUPPORTED_CONFIG_SECTIONS, SERIAL_SECTION]) {
    if (!Object.hasOwn(o, k)) continue;
    const v = o[k];
    const isEmpty = v === null;
    if (!isEmpty) {
      const hint = k === SERIAL_SECTION ? ' (use PUT /serial)' : '';
      return {
        fault: `configuration section "${k}" is not supported by Typervisor: only null is accepted${hint}`,
      };
    }
    delete o[k];
  }
  return JSON.stringify(o);
}

/** The custom CPU template section: an object, or (as in Firecracker) the path of a JSON file. */
const CPU_CONFIG_SECTION = 'cpu-config';
/** A CPU template file is small (Firecracker's largest is under 16 KiB). */
const CPU_CONFIG_FILE_MAX = 1024 * 1024;

/**
 * Takes the "cpu-config" section out of the file's text (its shape is checked by the template
 * parser, not the schema): the normalized template, or a fault naming the problem.
 */
function takeCpuConfig(text: string): { text: string; cpu?: CpuConfigJson } | { fault: string } {
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch {
    return { text };
  }
  if (typeof json !== 'object' || json === null || Array.isArray(json)) return { text };
  const o = json as Record<string, unknown>;
  const v = o[CPU_CONFIG_SECTION];
  if (!Object.hasOwn(o, CPU_CONFIG_SECTION)) return { text };
  delete o[CPU_CONFIG_SECTION];
  const rest = JSON.stringify(o);
  if (v === null) return { text: rest };
  let template: unknown = v;
  if (typeof v === 'string') {
    try {
      const t = readFileSync(v, 'utf8');
      if (t.length > CPU_CONFIG_FILE_MAX)
        return { fault: `${CPU_CONFIG_SECTION}: ${v}: larger than ${CPU_CONFIG_FILE_MAX} bytes` };
      template = JSON.parse(t);
    } catch (e) {
      return {
        fault: `${CPU_CONFIG_SECTION}: cannot read the CPU template ${v}: ${(e as Error).message}`,
      };
    }
  }
  try {
    return { text: rest, cpu: normalizeCpuConfig(template) };
  } catch (e) {
    return { fault: `${DESERIALIZE_PREFIX}${CPU_CONFIG_SECTION}: ${(e as Error).message}` };
  }
}

/** Not a section of Firecracker's VmmConfig (it skips it) but sometimes written: null only. */
const SERIAL_SECTION = 'serial';

export function parseVmConfig(
  text: string,
  opts: { noApi?: boolean } = {},
): { actions: VmmAction[] } | { fault: string } {
  const empty = takeEmptySections(text);
  if (typeof empty === 'object') return empty;
  const cpuTaken = takeCpuConfig(empty);
  if ('fault' in cpuTaken) return cpuTaken;
  const cpu = cpuTaken.cpu;
  const r = parseBody<ConfigFile>(ConfigFileSchema, cpuTaken.text);
  if ('fault' in r)
    return { fault: r.fault.replace('the json body of a request', 'the configuration file') };
  const c = r.value;
  const load = c[SNAPSHOT_LOAD_SECTION];
  if (load) {
    const other = [
      ...(cpu ? [CPU_CONFIG_SECTION] : []),
      ...Object.keys(c).filter((k) => c[k] !== undefined && !WITH_SNAPSHOT_LOAD.includes(k)),
    ];
    if (other.length > 0)
      return {
        fault: `configuration section "${other[0]}" cannot be used with "${SNAPSHOT_LOAD_SECTION}": the snapshot decides the VM (use network_overrides or vsock_override to re-point its devices)`,
      };
    // The same exclusivity check as PUT /snapshot/load (routes.ts).
    const hasBackend = load.mem_backend !== undefined;
    if (hasBackend === (load.mem_file_path !== undefined))
      return {
        fault: `${DESERIALIZE_PREFIX}${SNAPSHOT_LOAD_SECTION}: ${hasBackend ? LOAD_TOO_MANY_MEM : LOAD_MISSING_MEM}`,
      };
    if (opts.noApi && load.resume_vm !== true)
      return {
        fault: `"${SNAPSHOT_LOAD_SECTION}" without "resume_vm": true leaves the VM paused, and with --no-api nothing can resume it`,
      };
  }
  const actions: VmmAction[] = [];
  // Logger and metrics first, so that what follows is logged and counted.
  if (c.logger) actions.push({ kind: 'PutLogger', config: c.logger });
  if (c.metrics) actions.push({ kind: 'PutMetrics', config: c.metrics });
  if (load) {
    actions.push({ kind: 'LoadSnapshot', params: load });
    return { actions };
  }
  if (c['machine-config']) actions.push({ kind: 'PutMachineConfig', config: c['machine-config'] });
  if (cpu) actions.push({ kind: 'PutCpuConfig', config: cpu });
  if (c['boot-source']) actions.push({ kind: 'PutBootSource', config: c['boot-source'] });
  for (const d of c.drives ?? []) actions.push({ kind: 'PutDrive', config: d });
  for (const n of c['network-interfaces'] ?? [])
    actions.push({ kind: 'PutNetworkInterface', config: n });
  const mmds = c['mmds-config'];
  if (mmds) actions.push({ kind: 'PutMmdsConfig', config: mmds });
  if (c.vsock) actions.push({ kind: 'PutVsock', config: c.vsock });
  if (c.entropy) actions.push({ kind: 'PutEntropy', config: c.entropy });
  if (c.balloon) actions.push({ kind: 'PutBalloon', config: c.balloon });
  for (const p of c.pmem ?? []) actions.push({ kind: 'PutPmem', config: p });
  if (c['memory-hotplug']) actions.push({ kind: 'PutMemoryHotplug', config: c['memory-hotplug'] });
  actions.push({ kind: 'InstanceStart' });
  return { actions };
}

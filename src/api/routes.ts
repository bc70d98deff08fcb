/**
 * HTTP method + path + body -> a VmmAction, or the 400 Firecracker gives for that request.
 * Mirrors Firecracker's request parsing (src/firecracker/src/api_server/parsed_request.rs):
 * a GET may not have a body, a PUT/PATCH must; resource ids are non-empty and alphanumeric or
 * '_'; the id in the path must equal the id in the body; every body is checked against its
 * schema with unknown fields refused. We are stricter in one way: extra path segments
 * (GET /version/x) are an invalid path, not ignored.
 */
import { normalizeCpuConfig } from '../vmm/index.js';
import type {
  BalloonConfig,
  BootSource,
  CpuConfigJson,
  DriveConfig,
  EntropyConfig,
  LoggerConfig,
  MachineConfig,
  MetricsConfig,
  MemoryHotplugConfig,
  NetworkInterfaceConfig,
  PmemApiConfig,
  RateLimiter,
  TokenBucket,
  VsockConfig,
} from '../vmm/index.js';
import { jsonDepth, MMDS_MAX_DEPTH, type MmdsConfig } from '../mmds/store.js';
import { check, stripNulls, type Schema } from './schema.js';
import * as S from './schemas.js';

export type VmmAction =
  | { kind: 'GetInstanceInfo' }
  | { kind: 'GetVersion' }
  | { kind: 'GetFullVmConfig' }
  /**
   * PUT /vm/config (Typervisor's; Firecracker has GET only): a whole configuration in GET
   * /vm/config's shape, applied as --config-file applies it (each section as its PUT, then
   * InstanceStart, or a "snapshot-load" section). The text is parsed by the controller.
   */
  | { kind: 'ApplyVmConfig'; text: string }
  | { kind: 'GetMachineConfig' }
  | { kind: 'PutMachineConfig'; config: MachineConfig }
  | { kind: 'PatchMachineConfig'; update: Partial<MachineConfig> }
  | { kind: 'PutBootSource'; config: BootSource }
  | { kind: 'PutDrive'; config: DriveConfig }
  | {
      kind: 'PatchDrive';
      update: { drive_id: string; path_on_host?: string; rate_limiter?: RateLimiter };
    }
  | { kind: 'PutNetworkInterface'; config: NetworkInterfaceConfig }
  | {
      kind: 'PatchNetworkInterface';
      update: { iface_id: string; rx_rate_limiter?: RateLimiter; tx_rate_limiter?: RateLimiter };
    }
  | { kind: 'PutVsock'; config: VsockConfig }
  | { kind: 'PutEntropy'; config: EntropyConfig }
  | { kind: 'PutBalloon'; config: BalloonConfig }
  | { kind: 'PatchBalloon'; amountMib: number }
  | { kind: 'GetBalloon' }
  | { kind: 'GetBalloonStats' }
  | { kind: 'PatchBalloonStats'; seconds: number }
  | { kind: 'StartBalloonHinting'; acknowledgeOnStop: boolean }
  | { kind: 'GetBalloonHintingStatus' }
  | { kind: 'StopBalloonHinting' }
  | { kind: 'PutPmem'; config: PmemApiConfig }
  | { kind: 'PatchPmem'; update: { id: string; rate_limiter?: RateLimiter } }
  | { kind: 'PutMemoryHotplug'; config: MemoryHotplugConfig }
  | { kind: 'PatchMemoryHotplug'; requestedMib: number }
  | { kind: 'GetMemoryHotplug' }
  | { kind: 'PutLogger'; config: LoggerConfig }
  | { kind: 'PutMetrics'; config: MetricsConfig }
  | { kind: 'PutSerial'; config: SerialBody }
  | { kind: 'PutCpuConfig'; config: CpuConfigJson }
  | { kind: 'InstanceStart' }
  | { kind: 'SendCtrlAltDel' }
  | { kind: 'FlushMetrics' }
  | { kind: 'Pause' }
  | { kind: 'Resume' }
  | { kind: 'CreateSnapshot'; params: SnapshotCreateBody }
  | { kind: 'LoadSnapshot'; params: SnapshotLoadBody }
  | { kind: 'GetMmds' }
  | { kind: 'PutMmds'; data: unknown }
  | { kind: 'PatchMmds'; patch: unknown }
  | { kind: 'PutMmdsConfig'; config: MmdsConfig }
  | { kind: 'NotSupported'; feature: string };

/** PUT /snapshot/create, as checked against S.SnapshotCreateParams. */
export interface SnapshotCreateBody {
  snapshot_path: string;
  mem_file_path: string;
  snapshot_type?: 'Full' | 'Diff';
}

/** PUT /snapshot/load, as checked against S.SnapshotLoadParams (exactly one memory source). */
export interface SnapshotLoadBody {
  snapshot_path: string;
  mem_backend?: { backend_type: 'File' | 'Uffd'; backend_path: string };
  mem_file_path?: string;
  enable_diff_snapshots?: boolean;
  track_dirty_pages?: boolean;
  resume_vm?: boolean;
  network_overrides?: Array<{ iface_id: string; host_dev_name: string }>;
  vsock_override?: { uds_path: string };
  clock_realtime?: boolean;
  huge_pages?: 'None' | 'Snapshot' | 'Transparent' | '2M';
}

/** PUT /serial, as checked against S.SerialDevice. */
export interface SerialBody {
  serial_out_path?: string;
  rate_limiter?: TokenBucket;
}

/** Firecracker's messages when a load names no memory source, or two. */
export const LOAD_MISSING_MEM =
  'missing field: either `mem_backend` or `mem_file_path` is required';
export const LOAD_TOO_MANY_MEM =
  'too many fields: either `mem_backend` or `mem_file_path` exclusively is required';

export interface Routed {
  /** The action, or undefined when `fault` says why the request is refused (400). */
  action?: VmmAction;
  fault?: string;
  /** Firecracker-style request counter: [group, name] -> group.name_count / group.name_fails. */
  metric?: [string, string];
}

/** Features Firecracker has and we do not (yet): their endpoints answer 400 saying so. */
export const UNSUPPORTED_ENDPOINTS: ReadonlyArray<{
  path: string;
  verbs: string;
  feature: string;
}> = [
  { path: '/drives/{id}', verbs: 'DELETE', feature: 'hot-unplugging devices' },
  { path: '/network-interfaces/{id}', verbs: 'DELETE', feature: 'hot-unplugging devices' },
  { path: '/pmem/{id}', verbs: 'DELETE', feature: 'hot-unplugging devices' },
];

export const DESERIALIZE_PREFIX =
  'An error occurred when deserializing the json body of a request: ';

const ID_RE = /^[\p{L}\p{N}_]+$/u;

function unsupported(method: string, tokens: string[]): string | undefined {
  const concrete = tokens.map((t, i) =>
    i === 1 && ['pmem', 'drives', 'network-interfaces'].includes(tokens[0]!) ? '{id}' : t,
  );
  const path = '/' + concrete.join('/');
  return UNSUPPORTED_ENDPOINTS.find((e) => e.path === path && e.verbs.split(' ').includes(method))
    ?.feature;
}

/** Parses and checks a JSON body; a fault message naming the field, or the value. */
export function parseBody<T>(schema: Schema, body: string): { value: T } | { fault: string } {
  let json: unknown;
  try {
    json = JSON.parse(body);
  } catch (e) {
    return { fault: `${DESERIALIZE_PREFIX}${(e as Error).message}.` };
  }
  const problem = check(schema, json);
  if (problem) return { fault: `${DESERIALIZE_PREFIX}${problem}.` };
  return { value: stripNulls(json) as T };
}

/** A /mmds body: a JSON object (the data store or a merge patch), nested at most MMDS_MAX_DEPTH. */
function mmdsBody(body: string): { value: unknown } | { fault: string } {
  let json: unknown;
  try {
    json = JSON.parse(body);
  } catch (e) {
    return { fault: `${DESERIALIZE_PREFIX}${(e as Error).message}.` };
  }
  // The description's MmdsContentsObject (Firecracker itself takes any JSON value here).
  if (typeof json !== 'object' || json === null || Array.isArray(json))
    return { fault: `${DESERIALIZE_PREFIX}the body must be a JSON object.` };
  if (jsonDepth(json) > MMDS_MAX_DEPTH)
    return {
      fault: `${DESERIALIZE_PREFIX}recursion limit exceeded (nested deeper than ${MMDS_MAX_DEPTH}).`,
    };
  return { value: json };
}

export function route(method: string, url: string, body: string | undefined): Routed {
  const path = url.split('?')[0] ?? '';
  const tokens = path.replace(/^\/+/, '').split('/');
  if (tokens.length > 1 && tokens[tokens.length - 1] === '') tokens.pop(); // split_terminator
  const first = tokens[0] ?? '';
  const invalid: Routed = { fault: `Invalid request method and/or path: ${method} ${path}.` };
  const arity = (n: number) => tokens.length === n;

  if (method === 'GET' && body !== undefined) return { fault: 'GET request cannot have a body.' };
  if (method === 'PUT' && body === undefined) return { fault: 'Empty PUT request.' };
  // The hinting commands may come without a body (Firecracker: start's body is optional).
  const hinting = first === 'balloon' && tokens[1] === 'hinting';
  if (method === 'PATCH' && body === undefined && !hinting)
    return { fault: 'Empty PATCH request.' };
  if (method === 'DELETE' && body !== undefined) return { fault: 'Empty Delete request.' };

  const feature = unsupported(method, tokens);
  if (feature) return { action: { kind: 'NotSupported', feature } };

  const withBody = <T>(
    schema: Schema,
    metric: [string, string],
    make: (v: T) => VmmAction,
  ): Routed => {
    const r = parseBody<T>(schema, body!);
    return 'fault' in r ? { fault: r.fault, metric } : { action: make(r.value), metric };
  };
  /** /drives/{id} and /network-interfaces/{id}: the id checks, then the body. */
  const withId = <T>(
    schema: Schema,
    metric: [string, string],
    idField: keyof T,
    make: (v: T) => VmmAction,
  ): Routed => {
    if (!arity(2) && !arity(1)) return invalid;
    const id = tokens[1];
    if (id === undefined || id === '') return { fault: 'The ID cannot be empty.', metric };
    if (!ID_RE.test(id))
      return {
        fault: 'API Resource IDs can only contain alphanumeric characters and underscores.',
        metric,
      };
    const r = parseBody<T>(schema, body!);
    if ('fault' in r) return { fault: r.fault, metric };
    const bodyId = r.value[idField] as unknown as string;
    if (bodyId !== id)
      return {
        fault: `The id from the path [${id}] does not match the id from the body [${bodyId}]!`,
        metric,
      };
    return { action: make(r.value), metric };
  };

  switch (method) {
    case 'GET':
      if (first === '' && arity(1))
        return {
          action: { kind: 'GetInstanceInfo' },
          metric: ['get_api_requests', 'instance_info'],
        };
      if (first === 'version' && arity(1))
        return { action: { kind: 'GetVersion' }, metric: ['get_api_requests', 'vmm_version'] };
      if (first === 'machine-config' && arity(1))
        return {
          action: { kind: 'GetMachineConfig' },
          metric: ['get_api_requests', 'machine_cfg'],
        };
      if (first === 'hotplug' && arity(2) && tokens[1] === 'memory')
        return {
          action: { kind: 'GetMemoryHotplug' },
          metric: ['get_api_requests', 'hotplug_memory'],
        };
      if (first === 'vm' && arity(2) && tokens[1] === 'config')
        return { action: { kind: 'GetFullVmConfig' }, metric: ['get_api_requests', 'vm_config'] };
      if (first === 'balloon') {
        if (arity(1)) return { action: { kind: 'GetBalloon' } };
        if (arity(2) && tokens[1] === 'statistics') return { action: { kind: 'GetBalloonStats' } };
        if (arity(3) && hinting && tokens[2] === 'status')
          return { action: { kind: 'GetBalloonHintingStatus' } };
      }
      if (first === 'mmds' && arity(1))
        return { action: { kind: 'GetMmds' }, metric: ['get_api_requests', 'mmds'] };
      return invalid;
    case 'PUT':
      if (
        !arity(1) &&
        !['drives', 'network-interfaces', 'snapshot', 'pmem', 'hotplug', 'mmds', 'vm'].includes(
          first,
        )
      )
        return invalid;
      switch (first) {
        case 'vm':
          if (!arity(2) || tokens[1] !== 'config') return invalid;
          return { action: { kind: 'ApplyVmConfig', text: body! } };
        case 'hotplug':
          if (!arity(2) || tokens[1] !== 'memory') return invalid;
          return withBody<MemoryHotplugConfig>(
            S.MemoryHotplugConfig,
            ['put_api_requests', 'hotplug_memory'],
            (config) => ({ kind: 'PutMemoryHotplug', config }),
          );
        case 'mmds': {
          const metric: [string, string] = ['put_api_requests', 'mmds'];
          if (arity(2) && tokens[1] === 'config')
            return withBody<MmdsConfig>(S.MmdsConfig, metric, (config) => ({
              kind: 'PutMmdsConfig',
              config,
            }));
          if (!arity(1)) return invalid;
          const r = mmdsBody(body!);
          return 'fault' in r
            ? { fault: r.fault, metric }
            : { action: { kind: 'PutMmds', data: r.value }, metric };
        }
        case 'snapshot':
          if (arity(1)) return { fault: 'Missing snapshot operation type.' };
          if (!arity(2)) return invalid;
          if (tokens[1] === 'create')
            return withBody<SnapshotCreateBody>(
              S.SnapshotCreateParams,
              ['put_api_requests', 'snapshot_create'],
              (params) => ({ kind: 'CreateSnapshot', params }),
            );
          if (tokens[1] === 'load') {
            const metric: [string, string] = ['put_api_requests', 'snapshot_load'];
            const r = parseBody<SnapshotLoadBody>(S.SnapshotLoadParams, body!);
            if ('fault' in r) return { fault: r.fault, metric };
            const hasBackend = r.value.mem_backend !== undefined;
            const hasFile = r.value.mem_file_path !== undefined;
            if (hasBackend === hasFile)
              return {
                fault: DESERIALIZE_PREFIX + (hasBackend ? LOAD_TOO_MANY_MEM : LOAD_MISSING_MEM),
                metric,
              };
            return { action: { kind: 'LoadSnapshot', params: r.value }, metric };
          }
          return invalid;
        case 'actions':
          return withBody<{ action_type: string }>(
            S.InstanceActionInfo,
            ['put_api_requests', 'actions'],
            (v) =>
              v.action_type === 'InstanceStart'
                ? { kind: 'InstanceStart' }
                : v.action_type === 'SendCtrlAltDel'
                  ? { kind: 'SendCtrlAltDel' }
                  : { kind: 'FlushMetrics' },
          );
        case 'machine-config':
          return withBody<MachineConfig>(
            S.MachineConfiguration,
            ['put_api_requests', 'machine_cfg'],
            (config) => ({ kind: 'PutMachineConfig', config }),
          );
        case 'boot-source':
          return withBody<BootSource>(
            S.BootSource,
            ['put_api_requests', 'boot_source'],
            (config) => ({ kind: 'PutBootSource', config }),
          );
        case 'vsock':
          return withBody<VsockConfig>(S.Vsock, ['put_api_requests', 'vsock'], (config) => ({
            kind: 'PutVsock',
            config,
          }));
        case 'balloon':
          return withBody<BalloonConfig>(S.Balloon, ['put_api_requests', 'balloon'], (config) => ({
            kind: 'PutBalloon',
            config,
          }));
        case 'entropy':
          return withBody<EntropyConfig>(
            S.EntropyDevice,
            ['put_api_requests', 'entropy'],
            (config) => ({ kind: 'PutEntropy', config }),
          );
        case 'logger':
          return withBody<LoggerConfig>(S.Logger, ['put_api_requests', 'logger'], (config) => ({
            kind: 'PutLogger',
            config,
          }));
        case 'metrics':
          return withBody<MetricsConfig>(S.Metrics, ['put_api_requests', 'metrics'], (config) => ({
            kind: 'PutMetrics',
            config,
          }));
        case 'cpu-config': {
          // Checked by the template parser (cpu-template.ts), whose faults name the field.
          const metric: [string, string] = ['put_api_requests', 'cpu_cfg'];
          let json: unknown;
          try {
            json = JSON.parse(body!);
          } catch (e) {
            return { fault: `${DESERIALIZE_PREFIX}${(e as Error).message}.`, metric };
          }
          try {
            return { action: { kind: 'PutCpuConfig', config: normalizeCpuConfig(json) }, metric };
          } catch (e) {
            return { fault: `${DESERIALIZE_PREFIX}${(e as Error).message}.`, metric };
          }
        }
        case 'serial':
          return withBody<SerialBody>(S.SerialDevice, ['put_api_requests', 'serial'], (config) => ({
            kind: 'PutSerial',
            config,
          }));
        case 'drives':
          return withId<DriveConfig>(
            S.Drive,
            ['put_api_requests', 'drive'],
            'drive_id',
            (config) => ({ kind: 'PutDrive', config }),
          );
        case 'pmem':
          return withId<PmemApiConfig>(S.Pmem, ['put_api_requests', 'pmem'], 'id', (config) => ({
            kind: 'PutPmem',
            config,
          }));
        case 'network-interfaces':
          return withId<NetworkInterfaceConfig>(
            S.NetworkInterface,
            ['put_api_requests', 'network'],
            'iface_id',
            (config) => ({ kind: 'PutNetworkInterface', config }),
          );
      }
      return invalid;
    case 'PATCH':
      switch (first) {
        case 'balloon':
          if (arity(1))
            return withBody<{ amount_mib: number }>(
              S.BalloonUpdate,
              ['patch_api_requests', 'balloon'],
              (v) => ({ kind: 'PatchBalloon', amountMib: v.amount_mib }),
            );
          if (arity(2) && tokens[1] === 'statistics')
            return withBody<{ stats_polling_interval_s: number }>(
              S.BalloonStatsUpdate,
              ['patch_api_requests', 'balloon'],
              (v) => ({ kind: 'PatchBalloonStats', seconds: v.stats_polling_interval_s }),
            );
          if (arity(3) && hinting && tokens[2] === 'start') {
            if (body === undefined || body.trim() === '')
              return { action: { kind: 'StartBalloonHinting', acknowledgeOnStop: true } };
            return withBody<{ acknowledge_on_stop?: boolean }>(
              S.BalloonStartCmd,
              ['patch_api_requests', 'balloon'],
              (v) => ({
                kind: 'StartBalloonHinting',
                acknowledgeOnStop: v.acknowledge_on_stop ?? true,
              }),
            );
          }
          if (arity(3) && hinting && tokens[2] === 'stop')
            return { action: { kind: 'StopBalloonHinting' } };
          return invalid;
        case 'hotplug':
          if (!arity(2) || tokens[1] !== 'memory') return invalid;
          return withBody<{ requested_size_mib: number }>(
            S.MemoryHotplugSizeUpdate,
            ['patch_api_requests', 'hotplug_memory'],
            (v) => ({ kind: 'PatchMemoryHotplug', requestedMib: v.requested_size_mib }),
          );
        case 'mmds': {
          if (!arity(1)) return invalid;
          const metric: [string, string] = ['patch_api_requests', 'mmds'];
          const r = mmdsBody(body!);
          return 'fault' in r
            ? { fault: r.fault, metric }
            : { action: { kind: 'PatchMmds', patch: r.value }, metric };
        }
        case 'machine-config': {
          if (!arity(1)) return invalid;
          const r = withBody<Partial<MachineConfig>>(
            S.MachineConfigurationUpdate,
            ['patch_api_requests', 'machine_cfg'],
            (update) => ({ kind: 'PatchMachineConfig', update }),
          );
          if (r.action?.kind === 'PatchMachineConfig' && Object.keys(r.action.update).length === 0)
            return { fault: 'Empty PATCH request.', metric: r.metric };
          return r;
        }
        case 'vm':
          if (!arity(1)) return invalid;
          return withBody<{ state: string }>(S.Vm, ['patch_api_requests', 'vm'], (v) =>
            v.state === 'Paused' ? { kind: 'Pause' } : { kind: 'Resume' },
          );
        case 'drives':
          return withId<{ drive_id: string }>(
            S.PartialDrive,
            ['patch_api_requests', 'drive'],
            'drive_id',
            (update) => ({ kind: 'PatchDrive', update }),
          );
        case 'network-interfaces':
          return withId<{ iface_id: string }>(
            S.PartialNetworkInterface,
            ['patch_api_requests', 'network'],
            'iface_id',
            (update) => ({ kind: 'PatchNetworkInterface', update }),
          );
        case 'pmem':
          return withId<{ id: string }>(
            S.PartialPmem,
            ['patch_api_requests', 'pmem'],
            'id',
            (update) => ({ kind: 'PatchPmem', update }),
          );
      }
      return invalid;
    default:
      return invalid;
  }
}

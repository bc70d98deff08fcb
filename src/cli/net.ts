/**
 * The syntax of `--net tap=NAME[,mac=MAC]` (repeatable) and `--vsock cid=N,uds=PATH` (or
 * `cid=N,backend=vhost`); run.ts turns them into VmResources' network interfaces and vsock,
 * checked and opened by the same code as the API's.
 */
import { ConfigError } from '../util/errors.js';
import { MAX_GUEST_CID, MIN_GUEST_CID, parseGuestCid } from '../util/vhost-abi.js';

export interface NetFlag {
  kind: 'net';
  tap: string;
  mac?: string;
}
/** The unix backend (the default) listens at `uds`; the vhost backend has no socket. */
export type VsockFlag = { kind: 'vsock'; cid: number } & ({ uds: string } | { backend: 'vhost' });

function fields(flag: string, spec: string, usage: string): Map<string, string> {
  const m = new Map<string, string>();
  for (const part of spec.split(',')) {
    const eq = part.indexOf('=');
    if (eq <= 0) throw new ConfigError(`--${flag}: malformed "${part}" (expected ${usage})`);
    const k = part.slice(0, eq);
    if (m.has(k)) throw new ConfigError(`--${flag}: ${k} given twice`);
    m.set(k, part.slice(eq + 1));
  }
  return m;
}

export function parseNet(spec: string): NetFlag {
  const usage = 'tap=NAME[,mac=MAC]';
  const f = fields('net', spec, usage);
  for (const k of f.keys())
    if (k !== 'tap' && k !== 'mac')
      throw new ConfigError(`--net: unknown "${k}" (expected ${usage})`);
  const tap = f.get('tap');
  if (!tap) throw new ConfigError(`--net ${spec}: tap=NAME is required`);
  const mac = f.get('mac');
  return mac === undefined ? { kind: 'net', tap } : { kind: 'net', tap, mac };
}

export function parseVsock(spec: string): VsockFlag {
  const usage = 'cid=N,uds=PATH or cid=N,backend=vhost';
  const f = fields('vsock', spec, usage);
  for (const k of f.keys())
    if (k !== 'cid' && k !== 'uds' && k !== 'backend')
      throw new ConfigError(`--vsock: unknown "${k}" (expected ${usage})`);
  const backend = f.get('backend') ?? 'unix';
  if (backend !== 'unix' && backend !== 'vhost')
    throw new ConfigError(`--vsock: backend must be unix or vhost (got "${backend}")`);
  const cidText = f.get('cid');
  const uds = f.get('uds');
  if (backend === 'vhost' && uds !== undefined)
    throw new ConfigError(
      '--vsock: uds= is for the unix backend; with backend=vhost host programs reach the guest over AF_VSOCK at its cid',
    );
  if (cidText === undefined || (backend === 'unix' && !uds))
    throw new ConfigError(
      `--vsock ${spec}: ${backend === 'vhost' ? 'cid=N is' : 'cid=N and uds=PATH are'} required (${usage})`,
    );
  const cid = parseGuestCid(cidText);
  if (cid === undefined)
    throw new ConfigError(
      `--vsock: cid must be a whole number from ${MIN_GUEST_CID} to ${MAX_GUEST_CID} (got "${cidText}")`,
    );
  return backend === 'vhost' ? { kind: 'vsock', cid, backend } : { kind: 'vsock', cid, uds: uds! };
}

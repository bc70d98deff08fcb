/**
 * --config-file: Firecracker's JSON configuration (the same shape GET /vm/config answers), turned
 * into the sequence of actions the equivalent API calls would make, ending with InstanceStart.
 * So a config file goes through exactly the checks the API applies.
 */
import type { VmConfig } from '../vmm/index.js';
import { parseBody, type VmmAction } from './routes.js';
import { FullVmConfiguration, UNSUPPORTED_CONFIG_SECTIONS } from './schemas.js';

export function parseVmConfig(text: string): { actions: VmmAction[] } | { fault: string } {
  const r = parseBody<Partial<VmConfig> & Record<string, unknown>>(FullVmConfiguration, text);
  if ('fault' in r)
    return { fault: r.fault.replace('the json body of a request', 'the configuration file') };
  const c = r.value;
  for (const k of UNSUPPORTED_CONFIG_SECTIONS) {
    if (c[k] !== undefined)
      return { fault: `configuration section "${k}" is not supported by Typervisor yet` };
  }
  const actions: VmmAction[] = [];
  // Logger and metrics first, so that what follows is logged and counted.
  if (c.logger) actions.push({ kind: 'PutLogger', config: c.logger });
  if (c.metrics) actions.push({ kind: 'PutMetrics', config: c.metrics });
  if (c['machine-config']) actions.push({ kind: 'PutMachineConfig', config: c['machine-config'] });
  if (c['boot-source']) actions.push({ kind: 'PutBootSource', config: c['boot-source'] });
  for (const d of c.drives ?? []) actions.push({ kind: 'PutDrive', config: d });
  for (const n of c['network-interfaces'] ?? [])
    actions.push({ kind: 'PutNetworkInterface', config: n });
  if (c.vsock) actions.push({ kind: 'PutVsock', config: c.vsock });
  if (c.entropy) actions.push({ kind: 'PutEntropy', config: c.entropy });
  actions.push({ kind: 'InstanceStart' });
  return { actions };
}

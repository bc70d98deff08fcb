/**
 * Test-only: a VmmController whose builds are the test's (no KVM): each build is handed to
 * `onBuild` and answered with a running stand-in VM, so the API's checks and order can be tested
 * on any host. The host tests build real VMs.
 */
import type { BuildOptions, BuiltVm, VmSpec } from '../../vmm/index.js';
import { VmmController } from '../controller.js';
import { LoggerControl } from '../logger.js';
import { MetricsSystem } from '../metrics.js';

export function buildlessController(
  onBuild: (spec: VmSpec, opts: BuildOptions) => void = () => undefined,
): VmmController {
  const metrics = new MetricsSystem('test');
  return new VmmController({
    instanceId: 'test',
    version: '0',
    metrics,
    logger: new LoggerControl(metrics.counters),
    hostCheck: () => undefined,
    build: (spec, opts) => {
      onBuild(spec, opts);
      return {
        vmm: { state: 'running', exited: new Promise(() => undefined), vcpuCount: 0 },
        devices: {},
      } as unknown as BuiltVm;
    },
  });
}

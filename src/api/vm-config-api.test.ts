/**
 * PUT /vm/config (Typervisor's; what the daemon's process mode sends a pooled VMM): a whole
 * configuration in --config-file's shape, applied section by section and started in one
 * request; the first failure is answered naming its section, and nothing after it runs.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { VmSpec } from '../vmm/index.js';
import type { ApiOutcome } from './controller.js';
import { route } from './routes.js';
import { buildlessController } from './testing/controller.js';

const fault = (o: ApiOutcome) => ('fault' in o ? o.fault : '');

function controller() {
  const built: VmSpec[] = [];
  const c = buildlessController((spec) => built.push(spec));
  const put = (body: string) => {
    const r = route('PUT', '/vm/config', body);
    assert.ok(r.action, r.fault);
    return c.handle(r.action);
  };
  return { c, put, built };
}

test('PUT /vm/config: routed with its text; other /vm paths and verbs are not', () => {
  assert.deepEqual(route('PUT', '/vm/config', '{"a":1}').action, {
    kind: 'ApplyVmConfig',
    text: '{"a":1}',
  });
  assert.match(route('PUT', '/vm/other', '{}').fault!, /Invalid request method and\/or path/);
  assert.match(route('PUT', '/vm/config/x', '{}').fault!, /Invalid request method and\/or path/);
  assert.match(route('PUT', '/vm', '{}').fault!, /Invalid request method and\/or path/);
  assert.equal(route('PUT', '/vm/config', undefined).fault, 'Empty PUT request.');
  assert.equal(route('GET', '/vm/config', undefined).action?.kind, 'GetFullVmConfig');
});

test('PUT /vm/config: the sections, then InstanceStart, in one request', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'typervisor-vmconfig-'));
  try {
    const kernel = join(dir, 'k');
    writeFileSync(kernel, new Uint8Array(4096));
    const { c, put, built } = controller();
    const r = await put(
      JSON.stringify({
        'machine-config': { vcpu_count: 2, mem_size_mib: 96 },
        'boot-source': { kernel_image_path: kernel, boot_args: 'console=ttyS0' },
      }),
    );
    assert.equal(r.status, 204, fault(r));
    assert.equal(built.length, 1, 'built once');
    assert.equal(built[0]!.vcpus, 2);
    assert.equal(built[0]!.memMib, 96);
    assert.equal(built[0]!.kernelPath, kernel);
    const info = await c.handle({ kind: 'GetInstanceInfo' });
    assert.equal('body' in info && (info.body as { state: string }).state, 'Running');
    // A second one: the VM runs, so its first section is refused, named.
    const again = await put(
      JSON.stringify({ 'machine-config': { vcpu_count: 1, mem_size_mib: 64 } }),
    );
    assert.equal(again.status, 400);
    assert.match(fault(again), /^machine-config: .*after starting the microVM/);
    assert.equal(built.length, 1);
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('PUT /vm/config: the first failure is answered, named; nothing after it runs', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'typervisor-vmconfig-'));
  try {
    const kernel = join(dir, 'k');
    writeFileSync(kernel, new Uint8Array(4096));
    // A schema error: refused whole, before any section.
    {
      const { c, put, built } = controller();
      const r = await put(JSON.stringify({ 'boot-source': { kernel_image_path: 3 } }));
      assert.equal(r.status, 400);
      assert.match(fault(r), /kernel_image_path/);
      const cfg = await c.handle({ kind: 'GetFullVmConfig' });
      const body = 'body' in cfg ? (cfg.body as Record<string, any>) : {}; // eslint-disable-line @typescript-eslint/no-explicit-any
      assert.equal(body['boot-source']?.kernel_image_path, '', 'nothing applied');
      assert.equal(built.length, 0);
      assert.match(fault(await put('not json')), /json/i);
    }
    // A drive whose file is missing: the sections before it are applied, no start.
    {
      const { c, put, built } = controller();
      const r = await put(
        JSON.stringify({
          'boot-source': { kernel_image_path: kernel },
          drives: [
            {
              drive_id: 'root',
              path_on_host: join(dir, 'missing.img'),
              is_root_device: true,
              is_read_only: false,
            },
          ],
        }),
      );
      assert.equal(r.status, 400);
      assert.match(fault(r), /^drives \(root\): .*missing\.img/);
      assert.equal(built.length, 0, 'not started');
      const cfg = await c.handle({ kind: 'GetFullVmConfig' });
      const body = 'body' in cfg ? (cfg.body as Record<string, any>) : {}; // eslint-disable-line @typescript-eslint/no-explicit-any
      assert.equal(body['boot-source']?.kernel_image_path, kernel, 'boot-source applied');
      assert.deepEqual(body.drives, []);
    }
    // No boot source: InstanceStart's own refusal, named.
    {
      const { put, built } = controller();
      const r = await put(
        JSON.stringify({ 'machine-config': { vcpu_count: 1, mem_size_mib: 64 } }),
      );
      assert.equal(r.status, 400);
      assert.match(fault(r), /^InstanceStart: /);
      assert.equal(built.length, 0);
    }
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

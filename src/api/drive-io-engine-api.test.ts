/**
 * A drive's io_engine through the API: PUT /drives without it gives the default, "Async", which
 * GET /vm/config reports (Firecracker's default is "Sync": a client that leaves it unset gets
 * Async here) and the started VM's block device is planned with; "Sync" given stays Sync.
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

test('PUT /drives: io_engine unset is "Async" in GET /vm/config and at start; "Sync" stays Sync', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'typervisor-io-engine-api-'));
  try {
    const kernel = join(dir, 'k');
    writeFileSync(kernel, new Uint8Array(4096));
    const built: VmSpec[] = [];
    const c = buildlessController((spec) => built.push(spec));
    const run = async (m: string, p: string, body: unknown) => {
      const r = route(m, p, JSON.stringify(body));
      assert.ok(r.action, r.fault);
      const o = await c.handle(r.action);
      assert.equal(o.status, 204, `${m} ${p}: ${fault(o)}`);
    };
    await run('PUT', '/boot-source', { kernel_image_path: kernel });
    for (const [id, engine] of [
      ['unset', undefined],
      ['sync', 'Sync'],
      ['async', 'Async'],
    ] as const) {
      const path = join(dir, `${id}.img`);
      writeFileSync(path, new Uint8Array(4096));
      await run('PUT', `/drives/${id}`, {
        drive_id: id,
        path_on_host: path,
        is_root_device: false,
        is_read_only: false,
        ...(engine ? { io_engine: engine } : {}),
      });
    }
    const cfg = await c.handle({ kind: 'GetFullVmConfig' });
    const body = 'body' in cfg ? (cfg.body as { drives: Array<Record<string, unknown>> }) : null;
    assert.deepEqual(
      body?.drives.map((d) => [d.drive_id, d.io_engine]),
      [
        ['unset', 'Async'],
        ['sync', 'Sync'],
        ['async', 'Async'],
      ],
    );
    await run('PUT', '/actions', { action_type: 'InstanceStart' });
    assert.equal(built.length, 1);
    assert.deepEqual(
      built[0]!.devices.map((d) =>
        d.kind === 'block' ? [d.id, d.ioEngine, d.ioEngineDefaulted === true] : [d.kind],
      ),
      [
        ['unset', 'Async', true],
        ['sync', 'Sync', false],
        ['async', 'Async', false],
      ],
    );
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

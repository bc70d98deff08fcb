/**
 * PUT /cpu-config, machine-config's cpu_template and smt over a real socket (no KVM needed:
 * nothing is booted): accepted forms, refusals that name the field and change nothing, the
 * exclusivity of a custom and a static template, and what GET /vm/config and GET
 * /machine-config then answer.
 */
import { after, before, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { call, startServer, tempDir, type ServerProcess } from './client.js';

const T = { timeout: 20_000 };
const fault = (r: { json?: { fault_message?: string } }) => r.json?.fault_message ?? '';

const TEMPLATE = {
  kvm_capabilities: ['!56'],
  cpuid_modifiers: [
    {
      leaf: '0x1',
      subleaf: '0b0',
      flags: 0,
      modifiers: [{ register: 'ecx', bitmap: '0bx0xx_xxxx' }],
    },
  ],
  msr_modifiers: [{ addr: '266', bitmap: '0b1' }],
  reg_modifiers: [],
  vcpu_features: [],
};
/** TEMPLATE as Firecracker writes it back: hex indices, full-width bitmaps. */
const TEMPLATE_WIRE = {
  kvm_capabilities: ['!56'],
  cpuid_modifiers: [
    {
      leaf: '0x1',
      subleaf: '0x0',
      flags: 0,
      modifiers: [{ register: 'ecx', bitmap: '0b' + 'x'.repeat(25) + '0' + 'x'.repeat(6) }],
    },
  ],
  msr_modifiers: [{ addr: '0x10a', bitmap: '0b' + 'x'.repeat(63) + '1' }],
};

describe('CPU templates and smt through the API (real socket, no boot)', () => {
  let srv: ServerProcess;
  before(async () => {
    srv = await startServer();
  });
  after(async () => {
    await srv.kill();
  });
  const sock = () => srv.sock;
  const vmConfig = async () => (await call(sock(), 'GET', '/vm/config')).json;

  test('PUT /cpu-config: a template is taken and GET /vm/config shows it', T, async () => {
    assert.equal((await vmConfig())['cpu-config'], null);
    const r = await call(sock(), 'PUT', '/cpu-config', TEMPLATE);
    assert.equal(r.status, 204, fault(r));
    assert.deepEqual((await vmConfig())['cpu-config'], TEMPLATE_WIRE);
    // An empty template is a template too.
    assert.equal((await call(sock(), 'PUT', '/cpu-config', {})).status, 204);
    assert.deepEqual((await vmConfig())['cpu-config'], {
      kvm_capabilities: [],
      cpuid_modifiers: [],
      msr_modifiers: [],
    });
  });

  test('a bad template is refused naming the field, and changes nothing', T, async () => {
    assert.equal((await call(sock(), 'PUT', '/cpu-config', TEMPLATE)).status, 204);
    const leaf = (m: object) => ({
      cpuid_modifiers: [{ ...TEMPLATE.cpuid_modifiers[0], ...m }],
    });
    const cases: Array<[unknown, RegExp]> = [
      [
        leaf({ modifiers: [{ register: 'ecx', bitmap: '0b12' }] }),
        /cpuid_modifiers\[0\]\.modifiers\[0\]\.bitmap: "0b12" has "2"/,
      ],
      [
        leaf({ modifiers: [{ register: 'ecx', bitmap: '0b' + '0'.repeat(33) }] }),
        /has more than 32 bits/,
      ],
      [
        leaf({ modifiers: [{ register: 'xmm0', bitmap: '0b1' }] }),
        /"xmm0" is not a CPUID register/,
      ],
      [leaf({ leaf: 'one' }), /cpuid_modifiers\[0\]\.leaf: "one" is not a number/],
      [leaf({ flags: -1 }), /flags: -1 is not a set of KVM CPUID flags/],
      [{ msr_modifiers: [{ addr: '0x10a' }] }, /msr_modifiers\[0\]: missing field `bitmap`/],
      [{ reg_modifiers: [{ addr: '0x0', bitmap: '0b1' }] }, /reg_modifiers: aarch64 only/],
      [{ cpuid_modifiers: [], extra: 1 }, /unknown field `extra`/],
      ['{"cpuid_modifiers": [', /An error occurred when deserializing the json body/],
    ];
    for (const [body, re] of cases) {
      const r = await call(sock(), 'PUT', '/cpu-config', body);
      assert.equal(r.status, 400, String(re));
      assert.match(fault(r), /^An error occurred when deserializing the json body of a request: /);
      assert.match(fault(r), re);
    }
    assert.deepEqual((await vmConfig())['cpu-config'], TEMPLATE_WIRE);
  });

  test('a static cpu_template and a custom template replace each other', T, async () => {
    assert.equal((await call(sock(), 'PUT', '/cpu-config', TEMPLATE)).status, 204);
    let r = await call(sock(), 'PATCH', '/machine-config', { cpu_template: 'T2' });
    assert.equal(r.status, 204, fault(r));
    assert.equal(r.headers.deprecation, 'true');
    let c = await vmConfig();
    assert.equal(c['cpu-config'], null);
    assert.equal(c['machine-config'].cpu_template, 'T2');
    // A PUT without cpu_template keeps the static template (Firecracker's update rule).
    r = await call(sock(), 'PUT', '/machine-config', { vcpu_count: 2, mem_size_mib: 64 });
    assert.equal(r.status, 204);
    assert.equal((await call(sock(), 'GET', '/machine-config')).json.cpu_template, 'T2');
    // A custom template replaces it.
    assert.equal((await call(sock(), 'PUT', '/cpu-config', TEMPLATE)).status, 204);
    c = await vmConfig();
    assert.deepEqual(c['cpu-config'], TEMPLATE_WIRE);
    assert.ok(!('cpu_template' in c['machine-config']));
    // "None" removes any template.
    assert.equal(
      (await call(sock(), 'PATCH', '/machine-config', { cpu_template: 'None' })).status,
      204,
    );
    c = await vmConfig();
    assert.equal(c['cpu-config'], null);
    assert.ok(!('cpu_template' in c['machine-config']));
    // Every static name is taken before boot (the host check is InstanceStart's); V1N1 is not.
    for (const name of ['C3', 'T2', 'T2S', 'T2CL', 'T2A']) {
      r = await call(sock(), 'PATCH', '/machine-config', { cpu_template: name });
      assert.equal(r.status, 204, `${name}: ${fault(r)}`);
    }
    r = await call(sock(), 'PATCH', '/machine-config', { cpu_template: 'V1N1' });
    assert.equal(r.status, 400);
    assert.match(fault(r), /V1N1 is for aarch64 hosts/);
    r = await call(sock(), 'PATCH', '/machine-config', { cpu_template: 'T9' });
    assert.equal(r.status, 400);
    assert.equal((await call(sock(), 'GET', '/machine-config')).json.cpu_template, 'T2A');
  });

  test('smt: taken with 1 or an even vCPU count, refused with an odd one', T, async () => {
    let r = await call(sock(), 'PUT', '/machine-config', {
      vcpu_count: 2,
      mem_size_mib: 64,
      smt: true,
    });
    assert.equal(r.status, 204, fault(r));
    assert.equal((await call(sock(), 'GET', '/machine-config')).json.smt, true);
    r = await call(sock(), 'PATCH', '/machine-config', { vcpu_count: 3 });
    assert.equal(r.status, 400);
    assert.match(fault(r), /vcpu_count must be 1 or an even number when smt is enabled \(got 3\)/);
    assert.equal((await call(sock(), 'PATCH', '/machine-config', { vcpu_count: 1 })).status, 204);
    r = await call(sock(), 'PATCH', '/machine-config', { vcpu_count: 5, smt: false });
    assert.equal(r.status, 204);
    const m = (await call(sock(), 'GET', '/machine-config')).json;
    assert.deepEqual([m.vcpu_count, m.smt], [5, false]);
  });

  test('PUT /cpu-config is counted in put_api_requests.cpu_cfg_count / _fails', T, async () => {
    const dir = tempDir();
    const metricsPath = join(dir, 'metrics');
    const m = await startServer(['--metrics-path', metricsPath], dir);
    try {
      assert.equal((await call(m.sock, 'PUT', '/cpu-config', TEMPLATE)).status, 204);
      assert.equal((await call(m.sock, 'PUT', '/cpu-config', { msr_modifiers: 1 })).status, 400);
      m.child.kill('SIGHUP');
      assert.equal((await m.exited).code, 0, m.stderr());
      const last = readFileSync(metricsPath, 'utf8').trimEnd().split('\n').at(-1)!;
      const put = JSON.parse(last).put_api_requests;
      assert.deepEqual([put.cpu_cfg_count, put.cpu_cfg_fails], [2, 1]);
    } finally {
      await m.kill();
    }
  });
});

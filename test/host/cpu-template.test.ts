/**
 * Needs /dev/kvm, gcc and ld. CPU templates and smt as a guest sees them: the CPUID tiny guest
 * (test/guests/tiny.S MODE_CPUID) prints what CPUID answers for a few leaves on vCPU 0, booted
 * through the API with smt, a custom template (PUT /cpu-config) or a static one; a template's
 * MSR value and each vCPU's CPUID are read back from a snapshot of the spinning guest. A
 * template that does not fit this host fails InstanceStart with a clear message.
 */
import { after, describe, test } from 'node:test';
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { call, startServer, type ServerProcess } from '../api/client.js';
import { guestPath, tinyGuests } from './helpers.js';
import { readSnapshotFile } from '../../src/vmm/snapshot-format.js';
import { savedMsr } from '../../src/vmm/vcpu-state.js';

const guests = tinyGuests();
const T = { timeout: 60_000, skip: guests.skip ?? false };
const MSR_TSC_AUX = 0xc000_0103;
const fault = (r: { json?: { fault_message?: string } }) => r.json?.fault_message ?? '';

type Regs = [eax: number, ebx: number, ecx: number, edx: number];

/** "cpuid LEAF SUBLEAF EAX EBX ECX EDX" lines -> "leaf/subleaf" -> registers. */
function cpuidLines(out: string): Map<string, Regs> {
  const m = new Map<string, Regs>();
  for (const l of out.split('\n')) {
    const f =
      /^cpuid ([0-9a-f]{8}) ([0-9a-f]{8}) ([0-9a-f]{8}) ([0-9a-f]{8}) ([0-9a-f]{8}) ([0-9a-f]{8})$/.exec(
        l,
      );
    if (f)
      m.set(
        `${parseInt(f[1]!, 16).toString(16)}/${parseInt(f[2]!, 16)}`,
        f.slice(3).map((x) => parseInt(x, 16)) as Regs,
      );
  }
  return m;
}

async function until(what: string, f: () => boolean, ms = 30_000): Promise<void> {
  const end = Date.now() + ms;
  while (!f()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

describe('CPU templates and smt in the guest (KVM)', () => {
  const servers: ServerProcess[] = [];
  after(async () => {
    for (const s of servers) await s.kill();
  });

  /** Configures and starts a VM through the API; returns the server and InstanceStart's reply. */
  async function boot(
    guest: string,
    machine: object,
    cpuConfig?: object,
  ): Promise<{ srv: ServerProcess; start: Awaited<ReturnType<typeof call>> }> {
    const srv = await startServer();
    servers.push(srv);
    const s = srv.sock;
    assert.equal(
      (await call(s, 'PUT', '/machine-config', { mem_size_mib: 32, ...machine })).status,
      204,
    );
    assert.equal(
      (await call(s, 'PUT', '/boot-source', { kernel_image_path: guestPath(guest) })).status,
      204,
    );
    if (cpuConfig) {
      const r = await call(s, 'PUT', '/cpu-config', cpuConfig);
      assert.equal(r.status, 204, fault(r));
    }
    const start = await call(s, 'PUT', '/actions', { action_type: 'InstanceStart' }, 20_000);
    return { srv, start };
  }

  /** Boots the CPUID guest and returns what it printed once it powered off. */
  async function guestCpuid(machine: object, cpuConfig?: object): Promise<Map<string, Regs>> {
    const { srv, start } = await boot('cpuid', machine, cpuConfig);
    assert.equal(start.status, 204, fault(start));
    const { code } = await srv.exited;
    assert.equal(code, 0, srv.stderr());
    const m = cpuidLines(srv.stdout());
    assert.ok(m.has('8000001e/0'), `the guest printed: ${srv.stdout()}`);
    return m;
  }

  test('smt: the guest sees two threads per core; without it, one', T, async () => {
    const flat = await guestCpuid({ vcpu_count: 2 });
    const smt = await guestCpuid({ vcpu_count: 2, smt: true });
    // Leaf 0xb level 0 (SMT): shift and logical processors.
    assert.deepEqual(flat.get('b/0')!.slice(0, 2), [0, 1]);
    assert.deepEqual(smt.get('b/0')!.slice(0, 2), [1, 2]);
    assert.equal(smt.get('b/1')![1], 2); // two logical processors in the package
    const amd = smt.get('0/0')![1] === 0x6874_7541; // "Auth"
    if (amd) {
      // 0x8000_001e EBX[15:8]: threads per core - 1.
      assert.equal((flat.get('8000001e/0')![1] >>> 8) & 0xff, 0);
      assert.equal((smt.get('8000001e/0')![1] >>> 8) & 0xff, 1);
    }
    // The rest of the table is the same.
    assert.deepEqual(smt.get('1/0'), flat.get('1/0'));
  });

  test(
    'a custom template changes the CPUID the guest sees, or the VMM says it could not',
    T,
    async () => {
      const plain = await guestCpuid({ vcpu_count: 1 });
      // Leaf 1 EBX[7:0] (brand index) is passed through by the normalization: set it to 0x5a.
      // Leaf 1 ECX bit 30 (RDRAND) flipped: some hosts (PVM) put their own feature bits back,
      // which the VMM must then report.
      const l1 = plain.get('1/0')!;
      const rdrand = ((l1[2] >>> 30) & 1) === 1;
      const { srv, start } = await boot(
        'cpuid',
        { vcpu_count: 1 },
        {
          cpuid_modifiers: [
            {
              leaf: '0x1',
              subleaf: '0x0',
              flags: 0,
              modifiers: [
                { register: 'ebx', bitmap: '0b0101_1010' },
                { register: 'ecx', bitmap: `0bx${rdrand ? 0 : 1}` + 'x'.repeat(30) },
              ],
            },
          ],
        },
      );
      assert.equal(start.status, 204, fault(start));
      assert.equal((await srv.exited).code, 0, srv.stderr());
      const t1 = cpuidLines(srv.stdout()).get('1/0')!;
      assert.equal(t1[1] & 0xff, 0x5a);
      assert.equal(t1[1] >>> 8, l1[1] >>> 8); // APIC id, count, CLFLUSH kept
      const flipped = ((t1[2] >>> 30) & 1) === (rdrand ? 0 : 1);
      const warned = /CPU template not fully applied: CPUID leaf 0x1 subleaf 0x0 ecx/.test(
        srv.stderr(),
      );
      assert.ok(flipped !== warned, `flipped ${flipped}, warned ${warned}: ${srv.stderr()}`);
    },
  );

  test('a static template applies on its own hosts and is refused elsewhere', T, async () => {
    const plain = await guestCpuid({ vcpu_count: 1 });
    const amd = plain.get('0/0')![1] === 0x6874_7541;
    const fms = plain.get('1/0')![0] & 0x0fff_0fff;
    for (const name of amd ? ['T2A', 'T2'] : ['T2', 'T2A']) {
      const { srv, start } = await boot('cpuid', { vcpu_count: 1, cpu_template: name });
      const fits = name === 'T2A' ? amd && fms === 0x00a0_0f11 : false; // this test: AMD or not
      if (name === 'T2A' && fits) {
        assert.equal(start.status, 204, fault(start));
        await srv.exited;
        assert.equal(cpuidLines(srv.stdout()).get('1/0')![0] & 0x0fff_3fff, 0x0003_06f2);
      } else if (name === 'T2A' && amd) {
        assert.equal(start.status, 400);
        assert.match(
          fault(start),
          /^Start microvm error: cpu_template T2A does not support this host's CPU model \(family 0x/,
        );
      } else if (name === 'T2' && amd) {
        assert.equal(start.status, 400);
        assert.match(
          fault(start),
          /cpu_template T2 is for Intel hosts; this host's CPU vendor is AuthenticAMD/,
        );
      }
      // A refused start leaves the VM not started, and a start without the template works.
      if (start.status === 400) {
        assert.equal((await call(srv.sock, 'GET', '/')).json.state, 'Not started');
        assert.equal(
          (await call(srv.sock, 'PATCH', '/machine-config', { cpu_template: 'None' })).status,
          204,
        );
        const again = await call(
          srv.sock,
          'PUT',
          '/actions',
          { action_type: 'InstanceStart' },
          20_000,
        );
        assert.equal(again.status, 204, fault(again));
        assert.equal((await srv.exited).code, 0);
      }
    }
  });

  test(
    "a template's MSR value and CPUID reach every vCPU, and a snapshot keeps them",
    T,
    async () => {
      const { srv, start } = await boot(
        'spin',
        { vcpu_count: 2, smt: true },
        {
          cpuid_modifiers: [
            {
              leaf: '0x1',
              subleaf: '0x0',
              flags: 0,
              modifiers: [{ register: 'ebx', bitmap: '0b1010_0101' }],
            },
          ],
          msr_modifiers: [{ addr: '0xc0000103', bitmap: '0b101010' }],
        },
      );
      assert.equal(start.status, 204, fault(start));
      await until('the guest banner', () => srv.stdout().includes('tiny guest up'));
      assert.equal((await call(srv.sock, 'PATCH', '/vm', { state: 'Paused' })).status, 204);
      const r = await call(
        srv.sock,
        'PUT',
        '/snapshot/create',
        { snapshot_path: 's', mem_file_path: 'm' },
        20_000,
      );
      assert.equal(r.status, 204, fault(r));
      const snap = readSnapshotFile(join(srv.dir, 's'));
      assert.ok(snap.ok, snap.ok ? '' : snap.error.message);
      assert.equal(snap.value.vcpus.length, 2);
      snap.value.vcpus.forEach((v, i) => {
        const aux = savedMsr(v, MSR_TSC_AUX);
        assert.equal(aux! & 0x3fn, 0b101010n, `vCPU ${i} TSC_AUX`);
        const leaf1 = v.cpuid.find((e) => e.function === 1 && e.index === 0)!;
        assert.equal(leaf1.ebx & 0xff, 0xa5, `vCPU ${i} leaf 1 EBX[7:0]`);
        assert.equal(leaf1.ebx >>> 24, i, `vCPU ${i} leaf 1 APIC id`);
        const b0 = v.cpuid.find((e) => e.function === 0xb && e.index === 0)!;
        assert.deepEqual([b0.eax, b0.ebx, b0.edx], [1, 2, i], `vCPU ${i} leaf 0xb`);
      });
      // The configuration the snapshot records has the template (GET /vm/config shows it).
      const cfg = await call(srv.sock, 'GET', '/vm/config');
      assert.equal(cfg.json['cpu-config'].msr_modifiers[0].addr, '0xc0000103');
      assert.equal(cfg.json['machine-config'].smt, true);
    },
  );

  test(
    'a template naming an MSR or leaf this host lacks fails InstanceStart, saying which',
    T,
    async () => {
      const msr = await boot(
        'poweroff',
        { vcpu_count: 1 },
        {
          msr_modifiers: [{ addr: '0x4b564dff', bitmap: '0b1' }],
        },
      );
      assert.equal(msr.start.status, 400);
      assert.match(
        fault(msr.start),
        /changes MSR 0x4b564dff, which this host's KVM does not support/,
      );
      assert.equal((await call(msr.srv.sock, 'GET', '/')).json.state, 'Not started');
      const leaf = await boot(
        'poweroff',
        { vcpu_count: 1 },
        {
          cpuid_modifiers: [{ leaf: '0x7fffffff', subleaf: '0x0', flags: 0, modifiers: [] }],
        },
      );
      assert.equal(leaf.start.status, 400);
      assert.match(
        fault(leaf.start),
        /changes CPUID leaf 0x7fffffff subleaf 0x0, which this host's KVM does not support/,
      );
    },
  );
});
